"""Build, store and run TensorRT engines: ``model.engine`` plus its sidecar ``model.engine.json``.

Three TensorRT API generations, told apart by feature checks (never by version strings):

- 8.x (JetPack 5): networks default to implicit batch, which the ONNX parser refuses, so the network is
  created with ``EXPLICIT_BATCH``; fp16 comes from ``BuilderFlag.FP16``. Engines run through named tensors
  (8.5+) or, on 8.0-8.4, through bindings.
- 10.x (JetPack 6): explicit batch is the only mode (``EXPLICIT_BATCH`` survives only as an ignored,
  deprecated name, and ``Builder.max_batch_size`` is gone), so flags are 0; ``BuilderFlag.FP16`` still exists.
- 11.x: every network is strongly typed, ``BuilderFlag.FP16`` and ``platform_has_fast_fp16`` are gone and
  precision comes from the ONNX types, so the engine is built from an fp16 copy of the verified ONNX file
  (onnxruntime's float16 converter, input and output kept fp32).

A plan file carries no metadata of ours, so class names and preprocessing travel in the sidecar, which also
records the engine's SHA-256 so a sidecar copied from another export is caught instead of mislabelling.
Device memory for running an engine comes from torch (when built with CUDA) or from cuda-python (a Jetson
with a CPU-only torch).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from typing import Any, Callable

import numpy as np
import torch

from utils.errors import UserError
from utils.files import atomic_write, write_json

ENGINE_EXTENSIONS = (".engine", ".plan")
FP16_CONVERTER = "onnxruntime.transformers.float16"

# execute(input device pointer, output device pointer, CUDA stream handle)
Execute = Callable[[int, int, int], None]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def sidecar_path(engine_path: str) -> str:
    """``model.engine`` -> ``model.engine.json`` (class names, preprocessing, how the engine was built)."""
    return engine_path + ".json"


def import_tensorrt():
    """The ``tensorrt`` module, or None when it is not installed."""
    try:
        import tensorrt  # noqa: PLC0415  (lazy: optional/heavy dependency)
    except ImportError:
        return None
    return tensorrt


def _import_cudart():
    """cuda-python's runtime API module (``cuda.bindings.runtime``, older ``cuda.cudart``), or None."""
    try:
        from cuda.bindings import runtime  # noqa: PLC0415  (lazy: optional/heavy dependency)
        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart  # noqa: PLC0415  (lazy: optional/heavy dependency)
        return cudart
    except ImportError:
        return None


# ------------------------------------------------------------------------------------ what this box can do
def gpu_problem(trt) -> str | None:
    """Why TensorRT cannot use a GPU here, or None when it can.

    Decided by TensorRT itself, not torch (a Jetson often has a CPU-only torch): creating a Builder
    initialises CUDA, and without a usable GPU the constructor raises.
    """
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as e:  # e.g. "pybind11::init(): factory function returned nullptr" after a CUDA init failure
        return f"TensorRT {getattr(trt, '__version__', '')} cannot initialise a CUDA GPU ({_first_line(e)})"
    if builder is None:
        return f"TensorRT {getattr(trt, '__version__', '')} cannot initialise a CUDA GPU"
    return None


def cuda_memory_problem() -> str | None:
    """Why no CUDA memory API is available to feed an engine (torch with CUDA, else cuda-python), or None."""
    if torch.cuda.is_available():
        return None
    cudart = _import_cudart()
    if cudart is None:
        return ("running a TensorRT engine needs CUDA memory from torch (this torch has no CUDA) or from "
                "cuda-python, which is not installed: `pip install cuda-python`")
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or not count:
        return f"cuda-python sees no CUDA GPU ({_cuda_error(cudart, err)})"
    return None


def _cuda_error(cudart, err) -> str:
    try:
        ok, text = cudart.cudaGetErrorString(err)
        if ok == cudart.cudaError_t.cudaSuccess:
            return f"{getattr(err, 'name', err)}: {text.decode() if isinstance(text, bytes) else text}"
    except Exception:
        pass
    return str(getattr(err, "name", err))


# ------------------------------------------------------------------------------------------------- build
def network_flags(trt) -> tuple[int, list[str]]:
    """``create_network`` flags: EXPLICIT_BATCH while TensorRT still has implicit batch (8.x), else 0.

    Implicit batch exists exactly as long as the Builder has its ``max_batch_size`` knob (removed in 10.0,
    where EXPLICIT_BATCH became an ignored deprecated name; 11 dropped the name too).
    """
    flags = trt.NetworkDefinitionCreationFlag
    if hasattr(flags, "EXPLICIT_BATCH") and hasattr(trt.Builder, "max_batch_size"):
        return 1 << int(flags.EXPLICIT_BATCH), ["EXPLICIT_BATCH"]
    return 0, []


def choose_precision(trt, builder) -> dict[str, str]:
    """How the engine gets fp16: ``{"precision": "fp16"|"fp32", "how": "flag"|"onnx"|"none", "why": ...}``."""
    if hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 8/9/10 (deprecated from 10.12, still honoured)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            fast = getattr(builder, "platform_has_fast_fp16", True)
        if fast:
            return {"precision": "fp16", "how": "flag",
                    "why": "BuilderFlag.FP16: TensorRT runs each layer in fp16 or fp32, whichever is faster"}
        return {"precision": "fp32", "how": "none", "why": "this GPU has no fast fp16 (platform_has_fast_fp16 False)"}
    try:  # TensorRT 11+: strongly typed, precision is whatever the ONNX types say
        __import__(FP16_CONVERTER)
    except ImportError as e:
        return {"precision": "fp32", "how": "none",
                "why": f"TensorRT without BuilderFlag.FP16 takes precision from the ONNX types and {FP16_CONVERTER} "
                       f"is not importable ({_first_line(e)}), so the fp32 ONNX file was used"}
    return {"precision": "fp16", "how": "onnx",
            "why": f"TensorRT without BuilderFlag.FP16 (strongly typed): built from an fp16 copy of the ONNX file "
                   f"({FP16_CONVERTER}, input and output kept fp32)"}


def _sort_topologically(graph) -> None:
    """Reorder ``graph.node`` so every node follows its producers (the float16 converter appends its Casts)."""
    ready = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    todo, ordered = list(graph.node), []
    while todo:
        runnable = [n for n in todo if all(i in ready for i in n.input)]
        if not runnable:
            raise RuntimeError("ONNX graph has a cycle or an undefined input; cannot sort it")
        for n in runnable:
            ready.update(n.output)
        ordered += runnable
        todo = [n for n in todo if not any(n is r for r in runnable)]
    del graph.node[:]
    graph.node.extend(ordered)


def convert_onnx_fp16(src: str, dst: str) -> None:
    """Write an fp16 copy of ``src`` to ``dst`` whose input and output stay fp32 (Casts inside the graph)."""
    import onnx  # noqa: PLC0415  (lazy: optional/heavy dependency)
    from onnxruntime.transformers.float16 import convert_float_to_float16  # noqa: PLC0415  (lazy: optional/heavy dependency)

    proto = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    _sort_topologically(proto.graph)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, dst)


def build_plan(trt, onnx_path: str, input_name: str, img_size: int, max_batch: int) -> tuple[bytes, dict[str, Any]]:
    """Parse the ONNX file and build a serialized engine for batches 1..max_batch; returns (plan, facts)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    precision = choose_precision(trt, builder)
    flags, flag_names = network_flags(trt)
    with tempfile.TemporaryDirectory() as tmp:
        source = onnx_path
        if precision["how"] == "onnx":
            source = os.path.join(tmp, "model.fp16.onnx")
            convert_onnx_fp16(onnx_path, source)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        with open(source, "rb") as f:
            if not parser.parse(f.read()):
                errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise UserError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errs}")
        config = builder.create_builder_config()
        if precision["how"] == "flag":
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        shape = (3, img_size, img_size)
        profile.set_shape(input_name, (1, *shape), (1, *shape), (max_batch, *shape))
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} (see its log above)")
    facts = {"precision": precision["precision"], "precision_source": precision["why"],
             "network_flags": flag_names, "max_batch": max_batch, "tensorrt": trt.__version__}
    return bytes(plan), facts


# ----------------------------------------------------------------------------------------- plan + sidecar
def write_engine(engine_path: str, plan: bytes, meta: dict[str, Any]) -> None:
    """Write the plan and its sidecar (with the plan's SHA-256), each atomically; the sidecar goes first."""
    doc = {**meta, "engine_sha256": hashlib.sha256(plan).hexdigest()}

    def write_plan(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(plan)

    write_json(sidecar_path(engine_path), doc)
    atomic_write(engine_path, write_plan)


def read_engine(engine_path: str) -> tuple[bytes, dict[str, Any]]:
    """The plan bytes and its sidecar; a missing, broken or mismatched sidecar is a UserError."""
    side = sidecar_path(engine_path)
    redo = "re-export with `python export.py CHECKPOINT --format tensorrt`"
    if not os.path.isfile(side):
        raise UserError(f"{engine_path} has no sidecar {os.path.basename(side)} next to it (class names and "
                        f"preprocessing of the engine); copy it along with the engine or {redo}")
    try:
        with open(side) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {side} ({_first_line(e)}); {redo}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{side} is not a TensorRT engine sidecar written by export.py; {redo}")
    with open(engine_path, "rb") as f:
        plan = f.read()
    want = meta.get("engine_sha256")
    if want and hashlib.sha256(plan).hexdigest() != want:
        raise UserError(f"{side} describes a different engine than {engine_path} (SHA-256 differs); copy the "
                        f"pair from the same export or {redo}")
    return plan, meta


# ------------------------------------------------------------------------------------------ device memory
class TorchCudaMemory:
    """Device buffers as torch CUDA tensors, on a stream of their own (TensorRT warns on the default stream)."""

    name = "torch.cuda"

    def __init__(self, index: int) -> None:
        self.device = torch.device("cuda", index)
        torch.cuda.set_device(self.device)  # TensorRT deserialises and runs on the current device
        self._stream = torch.cuda.Stream(self.device)

    def run(self, x: np.ndarray, out_shape: tuple[int, ...], out_dtype: np.dtype, execute: Execute) -> np.ndarray:
        with torch.cuda.stream(self._stream):  # copies, engine and read-back all queue on this stream
            dev_in = torch.from_numpy(x).to(self.device)
            dev_out = torch.empty(out_shape, dtype=torch.from_numpy(np.empty(0, out_dtype)).dtype, device=self.device)
            execute(dev_in.data_ptr(), dev_out.data_ptr(), self._stream.cuda_stream)
            return dev_out.cpu().numpy()  # .cpu() waits for the stream


class CudaPythonMemory:
    """Device buffers from cuda-python's runtime API (cudaMalloc/cudaMemcpyAsync on one stream)."""

    name = "cuda-python"

    def __init__(self, cudart, index: int) -> None:
        self._rt = cudart
        self._check("cudaSetDevice", cudart.cudaSetDevice(index))
        self._stream = self._check("cudaStreamCreate", cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes); grown, never shrunk

    def _check(self, what: str, result: tuple) -> Any:
        err, *rest = result
        if err != self._rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"CUDA {what} failed: {_cuda_error(self._rt, err)}")
        return rest[0] if rest else None

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                self._check("cudaFree", self._rt.cudaFree(ptr))
            ptr = self._check("cudaMalloc", self._rt.cudaMalloc(nbytes))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def run(self, x: np.ndarray, out_shape: tuple[int, ...], out_dtype: np.dtype, execute: Execute) -> np.ndarray:
        rt, kind = self._rt, self._rt.cudaMemcpyKind
        out = np.empty(out_shape, out_dtype)
        d_in, d_out = self._buffer("input", x.nbytes), self._buffer("output", out.nbytes)
        self._check("cudaMemcpyAsync", rt.cudaMemcpyAsync(d_in, x.ctypes.data, x.nbytes,
                                                          kind.cudaMemcpyHostToDevice, self._stream))
        execute(d_in, d_out, int(self._stream))
        self._check("cudaMemcpyAsync", rt.cudaMemcpyAsync(out.ctypes.data, d_out, out.nbytes,
                                                          kind.cudaMemcpyDeviceToHost, self._stream))
        self._check("cudaStreamSynchronize", rt.cudaStreamSynchronize(self._stream))
        return out

    def __del__(self) -> None:  # best effort: the process usually ends right after
        try:
            for ptr, _ in self._buffers.values():
                self._rt.cudaFree(ptr)
            self._rt.cudaStreamDestroy(self._stream)
        except Exception:
            pass


def cuda_memory(index: int):
    """A device-memory backend on GPU ``index``: torch when it has CUDA, else cuda-python; else a UserError."""
    problem = cuda_memory_problem()
    if problem:
        raise UserError(problem)
    if torch.cuda.is_available():
        return TorchCudaMemory(index)
    return CudaPythonMemory(_import_cudart(), index)


# ----------------------------------------------------------------------------------------------- running
class EngineRunner:
    """``runner(x) -> logits``: a deserialized engine fed through a device-memory backend, in chunks of max_batch."""

    def __init__(self, trt, plan: bytes, path: str, meta: dict[str, Any], memory) -> None:
        self._trt = trt
        self._memory = memory
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise UserError(f"TensorRT {trt.__version__} cannot load {path} (built with TensorRT "
                            f"{meta.get('tensorrt', '?')}; an engine runs only on the TensorRT version and GPU model "
                            "that built it); rebuild it on this machine with `python export.py CHECKPOINT --format tensorrt`")
        self._context = self._engine.create_execution_context()
        self.input_name, self.output_name = str(meta["input"]), str(meta["output"])
        self.max_batch = int(meta["max_batch"])
        self._named = hasattr(self._context, "set_tensor_address")  # TensorRT >= 8.5; 8.0-8.4 use bindings
        self._in_dtype, self._out_dtype = self._dtype(self.input_name), self._dtype(self.output_name)

    def _dtype(self, name: str) -> np.dtype:
        e = self._engine
        dt = e.get_tensor_dtype(name) if self._named else e.get_binding_dtype(e.get_binding_index(name))
        return np.dtype(self._trt.nptype(dt))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).numpy().astype(self._in_dtype, copy=False)
        outs = [self._run_chunk(np.ascontiguousarray(arr[i:i + self.max_batch]))
                for i in range(0, len(arr), self.max_batch)]
        return torch.from_numpy(np.concatenate(outs)).float()

    def _run_chunk(self, x: np.ndarray) -> np.ndarray:
        ctx, eng = self._context, self._engine
        if self._named:
            if ctx.set_input_shape(self.input_name, tuple(x.shape)) is False:
                raise RuntimeError(f"TensorRT refused input shape {tuple(x.shape)} (engine built for batch 1..{self.max_batch})")
            out_shape = tuple(ctx.get_tensor_shape(self.output_name))

            def execute(d_in: int, d_out: int, stream: int) -> None:
                ctx.set_tensor_address(self.input_name, d_in)
                ctx.set_tensor_address(self.output_name, d_out)
                if not ctx.execute_async_v3(stream):
                    raise RuntimeError(f"TensorRT failed to run the engine on a batch of {len(x)}")
        else:
            i_in, i_out = eng.get_binding_index(self.input_name), eng.get_binding_index(self.output_name)
            if ctx.set_binding_shape(i_in, tuple(x.shape)) is False:
                raise RuntimeError(f"TensorRT refused input shape {tuple(x.shape)} (engine built for batch 1..{self.max_batch})")
            out_shape = tuple(ctx.get_binding_shape(i_out))

            def execute(d_in: int, d_out: int, stream: int) -> None:
                bindings = [0] * eng.num_bindings
                bindings[i_in], bindings[i_out] = d_in, d_out
                if not ctx.execute_v2(bindings):  # synchronous, default stream
                    raise RuntimeError(f"TensorRT failed to run the engine on a batch of {len(x)}")
        return self._memory.run(x, out_shape, self._out_dtype, execute)


def _gpu_index(device: str | torch.device | None, path: str) -> int:
    if device is None:
        return 0
    dev = torch.device(device)
    if dev.type != "cuda":
        raise UserError(f"{path} is a TensorRT engine and runs only on a CUDA GPU, not on --device {device}; "
                        "drop --device (or pass cuda / cuda:N), or use the model.onnx exported with it on a CPU")
    return dev.index or 0


def open_engine(path: str, meta: dict[str, Any], plan: bytes,
                device: str | torch.device | None = None) -> tuple[EngineRunner, torch.device]:
    """Deserialize ``plan`` on GPU ``device`` (default cuda:0); UserError when TensorRT, a GPU or CUDA memory is missing."""
    index = _gpu_index(device, path)
    trt = import_tensorrt()
    if trt is None:
        built = meta.get("tensorrt", "")
        raise UserError(f"{path} is a TensorRT engine: running it needs NVIDIA TensorRT {built} (JetPack, or "
                        "`pip install tensorrt`) and a CUDA GPU; elsewhere use the model.onnx exported with it")
    try:
        runner = EngineRunner(trt, plan, path, meta, cuda_memory(index))
    except UserError:
        raise
    except Exception as e:  # no usable GPU or a bad index: TensorRT's Runtime, like its Builder, raises
        raise UserError(f"cannot load TensorRT engine {path} on cuda:{index} ({_first_line(e)}); "
                        "check that this machine's GPU is visible (nvidia-smi / tegrastats)") from None
    return runner, torch.device("cuda", index)
