"""Phone and torch.export files: ExecuTorch programs (.pte, XNNPACK) and torch.export archives (.pt2).

- ``model.pt2``: ``torch.export.export`` of the network (batch dimension dynamic), saved with
  ``torch.export.save``; ``torch.export.load(path).module()`` runs it with no code of this repository. The
  successor of TorchScript, which the pinned torch deprecates.
- ``model.pte``: the same exported graph lowered to ExecuTorch with the XNNPACK delegate (fp32). ExecuTorch is
  PyTorch's on-device runtime for Android and iOS; its Python runtime runs the very same file here, on x86.
- ``model.int8.pte``: PT2E static post-training quantization with ExecuTorch's XNNPACK quantizer (symmetric
  int8 weights, one scale per output channel; int8 activations calibrated on real images), then lowered
  like the fp32 file.

Class names and preprocessing travel inside every file: ``.pt2`` as ``extra_files`` (read with
``torch.export.load(path, extra_files={"classes": "", "preprocess": ""})``), ``.pte`` as constant methods
``classes`` and ``preprocess`` that return the JSON text (``module.execute("classes")`` in the apps).

A ``.pte`` program has a fixed input shape ``[1, 3, S, S]`` (one image, as a phone app feeds it); the runner
here feeds a batch one image at a time.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Sequence

import torch
from torch import nn

from utils.checkpoint import atomic_write, model_metadata  # the same JSON strings as ONNX metadata_props
from utils.errors import UserError

PTE_IDENTIFIER = b"ET"  # flatbuffer file identifier (bytes 4-8, e.g. ET12) of an ExecuTorch program
PT2_MAX_BATCH = 1024
META_METHODS = ("classes", "preprocess", "calibration")  # calibration only once fitted
INSTALL = "pip install executorch==1.5.1"


# -------------------------------------------------------------------------------------------- availability
def executorch_problem() -> str | None:
    """None when ExecuTorch (exporter, XNNPACK delegate, Python runtime) imports here, else the reason."""
    try:
        with _quiet_python_logs():
            import executorch.exir  # noqa: F401, PLC0415  (lazy: optional/heavy dependency)
            import executorch.runtime  # noqa: F401, PLC0415  (lazy: optional/heavy dependency)
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401, PLC0415  (lazy: optional/heavy dependency)
    except Exception as e:  # ImportError, or a build that does not match this torch
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"{type(e).__name__}: {first[:200]}"
    return None


def require_executorch(what: str = "the executorch formats") -> str:
    """ExecuTorch's version, or a one-line UserError saying why it cannot be used here and what still works."""
    problem = executorch_problem()
    if problem:
        raise UserError(f"{what}: ExecuTorch cannot be imported here ({problem}); install it with "
                        f"`{INSTALL}` (requirements.txt); the onnx, torchscript, int8 and pt2 formats work without it")
    return executorch_version()


def executorch_version() -> str:

    try:
        return version("executorch")
    except PackageNotFoundError:
        return "unknown"


@contextlib.contextmanager
def _quiet_python_logs():
    """Hide torch's import-time notices of ExecuTorch/torchao (e.g. a pytree registration warning)."""
    logger = logging.getLogger("torch.utils._pytree")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence the C++ runtime's start-up notices (cpuinfo probing /sys files) written straight to fd 2."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# ------------------------------------------------------------------------------------------------ writers
def _write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def _example(img_size: int, n: int = 1) -> tuple[torch.Tensor]:
    return (torch.zeros(n, 3, img_size, img_size),)


def export_pt2(model: nn.Module, path: str, img_size: int, classes: Sequence[str],
               preprocess: dict[str, Any]) -> dict[str, Any]:
    """``torch.export`` the model (dynamic batch) and save it with classes/preprocess as ``extra_files``."""
    model = model.float().eval().cpu()
    batch = torch.export.Dim("batch", min=1, max=PT2_MAX_BATCH)
    with torch.no_grad():
        ep = torch.export.export(model, _example(img_size, 2), dynamic_shapes=({0: batch},))
    buf = io.BytesIO()  # a buffer: torch.export.save warns about any file name not ending in .pt2 (temp names)
    torch.export.save(ep, buf, extra_files=model_metadata(classes, preprocess, getattr(model, "calibration", None)))
    _write_bytes(path, buf.getvalue())
    return {"exporter": "torch.export.export", "dynamic_batch": [1, PT2_MAX_BATCH],
            "load": "torch.export.load(path).module()"}


def _lower(ep, path: str, classes: Sequence[str], preprocess: dict[str, Any],
           calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Lower an ExportedProgram to ExecuTorch with the XNNPACK delegate and write the program to ``path``."""
    with _quiet_python_logs():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: PLC0415  (lazy: optional/heavy dependency)
        from executorch.exir import to_edge_transform_and_lower  # noqa: PLC0415  (lazy: optional/heavy dependency)

    program = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                          constant_methods=model_metadata(classes, preprocess, calibration)).to_executorch()
    graph = program.exported_program().graph
    calls = [str(n.target) for n in graph.nodes if n.op == "call_function"]
    left = sorted({c for c in calls if "executorch_call_delegate" not in c and "getitem" not in c})
    _write_bytes(path, program.buffer)
    return {"backend": "XNNPACK", "delegated_subgraphs": sum("executorch_call_delegate" in c for c in calls),
            "not_delegated_ops": left, "input_shape": list(ep.example_inputs[0][0].shape),
            "metadata_methods": list(model_metadata(classes, preprocess, calibration)), "executorch": executorch_version()}


def export_pte(model: nn.Module, path: str, img_size: int, classes: Sequence[str],
               preprocess: dict[str, Any]) -> dict[str, Any]:
    """fp32 ExecuTorch program (XNNPACK) for one image ``[1, 3, S, S]``, classes/preprocess as constant methods."""
    model = model.float().eval().cpu()
    with torch.no_grad():
        ep = torch.export.export(model, _example(img_size))
    return {"precision": "fp32", **_lower(ep, path, classes, preprocess, getattr(model, "calibration", None))}


def quantize_pte_int8(model: nn.Module, path: str, img_size: int, calib: torch.Tensor, classes: Sequence[str],
                      preprocess: dict[str, Any], per_channel: bool = True, batch_size: int = 16) -> dict[str, Any]:
    """PT2E static int8 (ExecuTorch's XNNPACK quantizer) calibrated on ``calib``, lowered to XNNPACK."""
    with _quiet_python_logs():
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (  # noqa: PLC0415  (lazy: optional/heavy dependency)
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: PLC0415  (lazy: optional/heavy dependency)

    model = model.float().eval().cpu()
    batch = torch.export.Dim("batch", min=1, max=max(2, batch_size))
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
    with torch.no_grad():
        graph = torch.export.export(model, _example(img_size, 2), dynamic_shapes=({0: batch},)).module()
        prepared = prepare_pt2e(graph, quantizer)
        for i in range(0, len(calib), batch_size):  # observers record the activation ranges
            prepared(calib[i:i + batch_size])
        converted = convert_pt2e(prepared)
        ep = torch.export.export(converted, _example(img_size))
    facts = _lower(ep, path, classes, preprocess, getattr(model, "calibration", None))
    return {"precision": "int8", "quantizer": "XNNPACKQuantizer (PT2E static)",
            "weights": "int8 symmetric " + ("per-channel" if per_channel else "per-tensor"),
            "activations": "int8 (HistogramObserver ranges: the quantizer's own; --calib-method is for ONNX)",
            "calibration_images": len(calib), **facts}


# ------------------------------------------------------------------------------------------------ readers
def is_pte(path: str) -> bool:
    """True for an ExecuTorch program (flatbuffer identifier ``ET..`` at bytes 4-8)."""
    with open(path, "rb") as f:
        head = f.read(8)
    return len(head) == 8 and head[4:6] == PTE_IDENTIFIER


def is_pt2(names: Sequence[str]) -> bool:
    """True for the member list of a ``torch.export.save`` archive."""
    return any(n.endswith("/archive_format") for n in names) and any("/models/" in n for n in names)


def open_pte(path: str) -> tuple[str | None, str | None, Callable[[torch.Tensor], torch.Tensor]]:
    """``({classes, preprocess, calibration} JSON, run)`` of an ExecuTorch program (None for a missing method) and a
    runner taking a float NCHW batch (fed one image at a time, the program's input shape)."""
    problem = executorch_problem()
    if problem:
        raise UserError(f"{path} is an ExecuTorch program; running it needs ExecuTorch ({problem}): `{INSTALL}`")
    from executorch.runtime import Runtime  # noqa: PLC0415  (lazy: optional/heavy dependency)

    try:
        with _quiet_native_stderr():
            program = Runtime.get().load_program(path)
            names = set(program.method_names)
            meta = {k: program.load_method(k).execute([])[0] if k in names else None for k in META_METHODS}
            forward = program.load_method("forward")
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load ExecuTorch program {path} ({first[:160]}); re-export it with "
                        "export.py --format executorch") from None

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32)
        # outputs live in the program's planned memory, overwritten by the next call: copy them out
        return torch.cat([forward.execute([x[i:i + 1].contiguous()])[0].clone() for i in range(len(x))])

    return meta, run


def open_pt2(path: str) -> tuple[str, str, Callable[[torch.Tensor], torch.Tensor]]:
    """``({classes, preprocess, calibration} JSON ("" when absent), run)`` of a ``torch.export`` archive."""
    extra = {k: "" for k in META_METHODS}
    try:
        with open(path, "rb") as f:  # a buffer: torch.export.load refuses names not ending in .pt2 (temp names)
            module = torch.export.load(io.BytesIO(f.read()), extra_files=extra).module()
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read torch.export file {path} ({first[:160]}); re-export it with "
                        "export.py --format pt2") from None

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x.to("cpu", torch.float32))

    return extra, run

