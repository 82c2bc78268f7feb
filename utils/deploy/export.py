"""Turn a trained network into deployable files and prove each file computes what the network computes.

- ONNX (fp32): legacy TorchScript-based exporter (``dynamo=False``, opset 17). Chosen on purpose: the
  default dynamo exporter needs the extra ``onnxscript`` package, and the legacy path with constant folding
  already folds BatchNorm into the convolutions and turns ReLU6 into ``Clip`` with constant bounds.
- TorchScript: traced, then frozen (weights inlined as constants, BatchNorm folded by the freezer).
- int8: onnxruntime static post-training quantization, QDQ format, per-channel s8 weights and u8
  activations (u8 activations hit the fast u8s8 kernels on x86; s8 activations gave no speed-up here and
  dynamic quantization was 17x slower, see README), calibrated on real training images. Weights are 7-bit
  by default (``reduce_range``): exact on x86 CPUs without VNNI too (see utils/deploy/int8.py).
- TensorRT: an engine built from the verified ONNX file (fp16 where GPU and TensorRT version allow it) when
  TensorRT can use a GPU here; see utils.deploy.tensorrt_engine for the TensorRT 8/10/11 differences.

Class names and preprocessing travel inside every file (ONNX ``metadata_props``, TorchScript
``_extra_files``), so a single file is enough for inference; a TensorRT plan cannot hold them, so they travel
in its sidecar ``model.engine.json``.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from utils.checkpoint import atomic_write, load_checkpoint, model_from_checkpoint, model_metadata
from utils.data import ImageFiles, build_eval_transform, collate_readable, images_under
from utils.deploy import tensorrt_engine as te
from utils.deploy.onnx_io import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME
from utils.deploy.runtime import open_model
from utils.errors import UserError


@dataclass
class ExportSource:
    """A network to export plus everything the exported files must carry."""

    model: nn.Module
    classes: list[str]
    preprocess: dict[str, Any]
    arch: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    path: str = ""
    pruned: bool = False
    calibration: dict[str, Any] | None = None  # temperature + reject threshold (utils/trust/calibration.py)


def load_export_source(path: str) -> ExportSource:
    """Read a train.py (or utils.pruning) checkpoint into an eval-mode fp32 CPU model plus its metadata."""

    ckpt = load_checkpoint(path)
    for key in ("classes", "preprocess", "arch"):
        if key not in ckpt:
            raise UserError(f"checkpoint {path} has no '{key}' entry; export a checkpoint written by train.py")
    model = model_from_checkpoint(ckpt).float().eval()
    # The network carries its calibration like its ``arch``: every exporter given ``model`` embeds it.
    model.calibration = ckpt.get("calibration")
    return ExportSource(model=model, classes=list(ckpt["classes"]), preprocess=dict(ckpt["preprocess"]),
                        arch=dict(ckpt["arch"]), config=dict(ckpt.get("config") or {}), path=path,
                        pruned=bool(ckpt.get("pruned")), calibration=ckpt.get("calibration"))


# ----------------------------------------------------------------------------------------------- images
def list_images(root: str) -> list[str]:
    """Every image file under ``root`` (recursive), sorted so runs are reproducible."""

    if not os.path.isdir(root):
        raise UserError(f"image folder {root} not found; pass an existing folder of images")
    return images_under(root)


def evenly_spaced(items: list, limit: int) -> list:
    """At most ``limit`` items spread over the whole (class-sorted) list, so every class stays represented."""
    if limit <= 0 or len(items) <= limit:
        return list(items)
    idx = np.linspace(0, len(items) - 1, limit).round().astype(int)
    return [items[i] for i in idx]


@dataclass
class ReadImages:
    """What :func:`read_images` decoded: ``x`` (N, 3, S, S) float32 for the readable files, ``kept`` their
    positions in the input list, ``failed`` the others as ``[(path, error)]``."""

    x: torch.Tensor
    kept: list[int]
    failed: list[tuple[str, str]]


def read_images(paths: Sequence[str], preprocess: dict[str, Any], chunk: int = 64) -> ReadImages:
    """Decode and preprocess images exactly like evaluation does (utils.deploy.inference.ImageFiles), skipping the
    unreadable ones (not reported here: callers pass ``failed`` to a utils.data.SkippedFiles)."""

    files = ImageFiles(paths, build_eval_transform(preprocess))
    xs, kept, failed = [], [], []
    for start in range(0, len(files), chunk):
        x, idx, bad = collate_readable([files[i] for i in range(start, min(start + chunk, len(files)))])
        if x is not None:
            xs.append(x)
            kept += idx.tolist()
        failed += [(files.paths[i], err) for i, err in bad]
    size = int(preprocess["img_size"])
    return ReadImages(torch.cat(xs) if xs else torch.empty(0, 3, size, size), kept, failed)


def load_images(paths: Sequence[str], preprocess: dict[str, Any]) -> torch.Tensor:
    """:func:`read_images` for callers that need every image: (N, 3, S, S) float32, or a UserError naming the
    first unreadable file."""
    read = read_images(paths, preprocess)
    if read.failed:
        path, error = read.failed[0]
        raise UserError(f"cannot read image {path} ({error}); remove or replace the file")
    return read.x


# --------------------------------------------------------------------------------------------- exporters
def export_onnx(model: nn.Module, path: str, img_size: int, classes: Sequence[str], preprocess: dict[str, Any],
                opset: int = ONNX_OPSET, calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write an fp32 ONNX file with a dynamic batch axis, folded constants and class/preprocess metadata.

    Returns facts checked on the written graph (op types, Clip bounds constant, checker passed).
    """
    import onnx  # noqa: PLC0415  (lazy: optional/heavy dependency)

    model = model.float().eval().cpu()
    x = torch.zeros(1, 3, img_size, img_size)
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "raw.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter announces its own deprecation
            torch.onnx.export(model, (x,), raw, dynamo=False, opset_version=opset, do_constant_folding=True,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        proto = onnx.load(raw)
    for k, v in model_metadata(classes, preprocess, calibration or getattr(model, "calibration", None)).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "mobilenet-export"
    onnx.checker.check_model(proto, full_check=True)
    facts = describe_onnx(proto)
    if not facts["clip_bounds_constant"]:
        raise RuntimeError("ONNX export left a Clip with non-constant bounds; constant folding failed")
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    return facts


def describe_onnx(proto) -> dict[str, Any]:
    """Op histogram, opset, dynamic batch flag and whether every Clip has constant min/max inputs."""
    constants = {i.name for i in proto.graph.initializer}
    constants |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    ops: dict[str, int] = {}
    clip_ok = True
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
        if n.op_type == "Clip" and not all(i in constants for i in n.input[1:] if i):
            clip_ok = False
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    return {
        "opset": max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "ops": dict(sorted(ops.items())),
        "dynamic_batch": bool(batch_dim.dim_param) and not batch_dim.HasField("dim_value"),
        "clip_bounds_constant": clip_ok,
        "batchnorm_folded": "BatchNormalization" not in ops,
        "checker": "passed",
    }


def export_torchscript(model: nn.Module, path: str, img_size: int, classes: Sequence[str],
                       preprocess: dict[str, Any], calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trace + freeze the model and save it with ``classes``/``preprocess`` as ``_extra_files``."""
    model = model.float().eval().cpu()
    x = torch.zeros(1, 3, img_size, img_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch>=2.9 flags jit as deprecated; the format still works
        traced = torch.jit.trace(model, x)
        frozen = torch.jit.freeze(traced)
        meta = model_metadata(classes, preprocess, calibration or getattr(model, "calibration", None))
        atomic_write(path, lambda tmp: torch.jit.save(frozen, tmp, _extra_files=meta))
    return {"traced": True, "frozen": True}


class _CalibrationReader:
    """Feeds calibration batches to onnxruntime's calibrator (an object with ``get_next``)."""

    def __init__(self, batches: list[np.ndarray]) -> None:
        self._it = iter(batches)

    def get_next(self):
        b = next(self._it, None)
        return None if b is None else {INPUT_NAME: b}


def stem_convs(onnx_path: str) -> list[str]:
    """Names of the stem convolution and the first depthwise convolution: the two full-resolution layers.

    onnxruntime's int8 kernels are slow exactly there: a 3-input-channel convolution gives its int8 GEMM almost
    nothing to multiply, and its int8 depthwise kernel is slower than the fp32 one on large maps. Measured for
    mobilenet_v2 1.0 at 224 px, one thread, stem conv 290 us int8 vs 107 us fp32; keeping both layers fp32 made
    the whole int8 model 1.78 -> 1.53 ms (1.09 -> 1.02 ms with two threads).
    """
    import onnx  # noqa: PLC0415  (lazy: optional/heavy dependency)

    convs = [n for n in onnx.load(onnx_path).graph.node if n.op_type == "Conv"]
    grouped = [n for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
    return [n.name for n in convs[:1] + grouped[:1]]


def quantize_int8(fp32_path: str, out_path: str, calib: torch.Tensor, per_channel: bool = True,
                  reduce_range: bool = True, method: str = "minmax", batch_size: int = 16,
                  fp32_stem: bool = True) -> dict[str, Any]:
    """Static post-training int8 quantization (QDQ, s8 weights, u8 activations) calibrated on ``calib``.

    ``reduce_range`` (default) keeps weights within [-64, 64]: no int16 saturation on x86 CPUs without VNNI;
    False gives full 8-bit weights for VNNI/AMX and ARM targets (utils.deploy.int8.TARGETS).

    ``quant_pre_process`` first runs shape inference and graph optimisation, so every Conv/Gemm gets
    quantization parameters (BatchNorm is already folded into the convolutions by the exporter).
    ``fp32_stem`` keeps :func:`stem_convs` in fp32 (faster and a little more accurate; see there).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static  # noqa: PLC0415  (lazy: optional/heavy dependency)
    from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415  (lazy: optional/heavy dependency)

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise UserError(f"unknown calibration method '{method}'; choose one of: {', '.join(methods)}")
    arr = calib.numpy().astype(np.float32)
    # Equal batches: onnxruntime's histogram calibrators (percentile, entropy) stack per-batch outputs and fail
    # on a shorter last batch; it is filled with the first images again (no effect on minmax ranges).
    padded = np.resize(arr, (-(-len(arr) // batch_size) * batch_size, *arr.shape[1:]))
    batches = [padded[i:i + batch_size] for i in range(0, len(padded), batch_size)]
    with tempfile.TemporaryDirectory() as tmp:
        prepped = os.path.join(tmp, "prepped.onnx")
        quant_pre_process(fp32_path, prepped)
        quantized = os.path.join(tmp, "int8.onnx")
        keep = stem_convs(prepped) if fp32_stem else []
        quantize_static(prepped, quantized, _CalibrationReader(batches), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=methods[method], nodes_to_exclude=keep,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        atomic_write(out_path, lambda t: _copy_with_metadata(fp32_path, quantized, t))
    return {"format": "QDQ", "weights": "int8 per-channel" if per_channel else "int8 per-tensor",
            "activations": "uint8", "reduce_range": reduce_range, "weight_bits": 7 if reduce_range else 8, "calibration_method": method,
            "calibration_images": len(arr), "fp32_layers": keep}


def _copy_with_metadata(src_with_meta: str, model_path: str, dst: str) -> None:
    """Save ``model_path`` to ``dst`` carrying over ``src_with_meta``'s metadata_props (classes, preprocess)."""
    import onnx  # noqa: PLC0415  (lazy: optional/heavy dependency)

    meta = {p.key: p.value for p in onnx.load(src_with_meta).metadata_props}
    proto = onnx.load(model_path)
    have = {p.key for p in proto.metadata_props}
    for k, v in meta.items():
        if k not in have:
            e = proto.metadata_props.add()
            e.key, e.value = k, v
    onnx.checker.check_model(proto)
    onnx.save(proto, dst)


def trtexec_command(onnx_path: str, engine_path: str, img_size: int, max_batch: int = 32) -> str:
    """The equivalent NVIDIA ``trtexec`` command line for :func:`build_tensorrt_engine`."""
    s = f"3x{img_size}x{img_size}"
    return (f"trtexec --onnx={onnx_path} --saveEngine={engine_path} --fp16 --minShapes={INPUT_NAME}:1x{s} "
            f"--optShapes={INPUT_NAME}:1x{s} --maxShapes={INPUT_NAME}:{max_batch}x{s}")


def require_tensorrt(cmd: str, first: str = "") -> None:
    """UserError (with the equivalent ``trtexec`` line) unless this machine can build and check an engine.

    Needs the tensorrt package, a GPU that TensorRT itself can initialise (not torch: a Jetson often has a
    CPU-only torch) and a CUDA memory API to run the engine on the verification images (torch with CUDA, or
    cuda-python). ``first`` is prepended to the trtexec line, e.g. the export.py call that writes its ONNX file.
    """

    todo = f"{first}then {cmd}" if first else cmd
    trt = te.import_tensorrt()
    if trt is None:
        raise UserError("the tensorrt format needs NVIDIA TensorRT (`pip install tensorrt`) and a CUDA GPU; "
                        f"on a machine that has them run: {todo}")
    problem = te.gpu_problem(trt)
    if problem:
        raise UserError(f"the tensorrt format needs a CUDA GPU and {problem}; on a GPU machine run: {todo}")
    problem = te.cuda_memory_problem()
    if problem:
        raise UserError(f"the tensorrt format checks the engine on real images, and {problem}")


def build_tensorrt_engine(onnx_path: str, engine_path: str, img_size: int, classes: Sequence[str],
                          preprocess: dict[str, Any], max_batch: int = 32,
                          calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build a TensorRT engine from the ONNX file and write it with its sidecar ``<engine_path>.json``.

    fp16 where the GPU and TensorRT version allow it (see utils.deploy.tensorrt_engine); returns the facts
    (precision and how it was obtained, network flags, TensorRT version, equivalent trtexec line).
    """

    cmd = trtexec_command(onnx_path, engine_path, img_size, max_batch)
    require_tensorrt(cmd)
    trt = te.import_tensorrt()
    plan, facts = te.build_plan(trt, onnx_path, INPUT_NAME, img_size, max_batch)
    meta = {"format": "tensorrt-engine", "classes": list(classes), "preprocess": dict(preprocess),
            "input": INPUT_NAME, "output": OUTPUT_NAME, "onnx": os.path.abspath(onnx_path), **facts}
    if calibration:
        meta["calibration"] = dict(calibration)
    te.write_engine(engine_path, plan, meta)
    return {**facts, "sidecar": te.sidecar_path(engine_path), "equivalent": cmd}


def engine_predictor(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``predict(x) -> logits`` for an engine file and its sidecar, whatever the file is named (e.g. unverified)."""

    plan, meta = te.read_engine(path)
    runner, _ = te.open_engine(path, meta, plan)
    return runner


# -------------------------------------------------------------------------------------------- inference
def file_predictor(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``predict(x) -> logits`` for an exported file, through the loader evaluate/predict use (utils.deploy.runtime)."""

    return open_model(path, device="cpu").predict_batch


@torch.no_grad()
def batched_logits(predict: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                   batch_size: int = 32) -> torch.Tensor:
    """Run ``predict`` over ``images`` in batches and concatenate the logits."""
    return torch.cat([predict(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def compare_logits(reference: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    """Max abs logit difference and top-1 agreement of ``got`` vs ``reference``."""
    return {
        "images": int(len(reference)),
        "max_abs_diff": float((reference - got).abs().max()),
        "top1_agree": int((reference.argmax(1) == got.argmax(1)).sum()),
    }


FP32_ROUNDING_FACTOR = 4.0  # a correct export may differ from PyTorch by this many times PyTorch's own fp32 error


def fp32_rounding_error(model: nn.Module, images: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest |logit| difference between ``reference`` (``model`` in fp32 on ``images``) and the same model in
    float64: how far PyTorch's own fp32 answer is from the exact one. A pruned network whose BatchNorm statistics
    were re-estimated can carry large intermediate values: one measured 2.7e-3 here at logits of 31, where
    onnxruntime was closer to the float64 answer (7.3e-4) than PyTorch was, yet 3.4e-3 from PyTorch."""
    exact = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        r64 = batched_logits(lambda t: exact(t.double()), images)
    return float((reference.double() - r64).abs().max())


def verify_parity(name: str, path: str, reference: torch.Tensor, got: torch.Tensor, tol: float,
                  near_ties: bool = False, flag: str = "--tol",
                  hint: str = "report this with your torch/onnx/onnxruntime versions",
                  rounding: Callable[[], float] | None = None) -> dict[str, Any]:
    """Fail (UserError) unless ``got`` matches ``reference`` within ``tol`` with the same top-1 on every image.

    ``tol`` is absolute for logits within +-1 and relative to the largest |logit| beyond that: fp32 rounding
    error grows with magnitude (a model with logits near 30 differs by ~2e-4 between two correct runtimes).
    ``rounding`` (e.g. :func:`fp32_rounding_error`), asked only when that bound is exceeded: the reference's own
    fp32 error; up to :data:`FP32_ROUNDING_FACTOR` times it is allowed too, since two correct fp32 runtimes
    differ by about their distance from the exact answer (a broken export differs by whole logits).
    ``near_ties`` (fp16 engines, whose ``tol`` is large): top-1 may differ on near-ties, images whose reference
    top-1/top-2 gap is within twice the allowed difference, as rounding within the bound can swap those two;
    on every other image the bound itself rules out a different top-1, so the bound alone decides.
    """
    r = compare_logits(reference, got)
    scale = max(1.0, float(reference.abs().max()))
    r.update(tolerance=tol, logit_scale=round(scale, 3), allowed=tol * scale)
    if rounding is not None and not r["max_abs_diff"] <= r["allowed"]:
        r["fp32_rounding"] = float(f"{rounding():.3g}")
        r["allowed"] = max(r["allowed"], FP32_ROUNDING_FACTOR * r["fp32_rounding"])
    top1_ok = r["top1_agree"] == r["images"]
    if near_ties and reference.shape[1] > 1:
        top2 = reference.topk(2, dim=1).values
        r["near_ties"] = int(((top2[:, 0] - top2[:, 1]) <= 2 * r["allowed"]).sum())
        top1_ok = True
    r["passed"] = r["max_abs_diff"] <= r["allowed"] and top1_ok
    if not r["passed"]:
        ties = f" ({r['near_ties']} near-ties may differ)" if "near_ties" in r else ""
        raise UserError(
            f"{name} export {path} does not match the PyTorch model: max abs logit difference "
            f"{r['max_abs_diff']:.3g} (allowed {r['allowed']:.3g} = {flag} {tol:g} x largest |logit| {scale:.3g}"
            + (f", or {FP32_ROUNDING_FACTOR:g}x PyTorch's own fp32 error {r['fp32_rounding']:.3g}"
               if "fp32_rounding" in r else "") + "), "
            f"same top-1 on {r['top1_agree']}/{r['images']} images{ties}; nothing was written under that name; {hint}")
    return r


def top1_percent(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float((logits.argmax(1) == labels).float().mean())
