"""Fake ``tensorrt`` modules (API generations 8.2, 8.6, 10 and 11) and a fake cuda-python runtime, for CPU tests.

Each fake mimics its generation's Python API surface (what exists and what is gone, checked against the
tensorrt_bindings 8.6.1 / tensorrt_cu12_bindings 10.3.0 / 11.4.0 wheels) and records every call that decides how
an engine is built, so tests can assert exactly which flags were used. The fake engine really computes: its
"plan" is a small header plus the ONNX bytes TensorRT's parser received, run by onnxruntime on the CPU. Device
memory is host memory (fake ``cudaMalloc`` returns the address of a numpy buffer), so the runner's pointer
plumbing (copies in and out, tensor addresses, chunking to the profile's max batch) is exercised for real.
"""
from __future__ import annotations

import ctypes
import enum
import json
import types
from typing import Callable

import numpy as np

MAGIC = b"FAKEPLAN"
GENERATIONS = ("8.2", "8.6", "10", "11")
VERSIONS = {"8.2": "8.2.5", "8.6": "8.6.1", "10": "10.3.0", "11": "11.4.0"}


def _header(plan: bytes) -> tuple[dict, bytes]:
    size = int.from_bytes(plan[len(MAGIC):len(MAGIC) + 4], "little")
    start = len(MAGIC) + 4
    return json.loads(plan[start:start + size]), plan[start + size:]


def make_plan(onnx_bytes: bytes, **header) -> bytes:
    """A fake serialized engine: MAGIC, a JSON header (e.g. max_batch) and the ONNX model it runs."""
    head = json.dumps(header).encode()
    return MAGIC + len(head).to_bytes(4, "little") + head + onnx_bytes


def _read(ptr: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * n).from_address(ptr), dtype=dtype).reshape(shape).copy()


def _write(ptr: int, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    ctypes.memmove(ptr, arr.ctypes.data, arr.nbytes)


def make_tensorrt(generation: str, calls: list, gpu: bool = True, fast_fp16: bool = True,
                  corrupt: Callable[[np.ndarray], np.ndarray] | None = None) -> types.ModuleType:
    """A fake ``tensorrt`` module of one API generation; ``calls`` collects (what, detail) tuples.

    ``gpu=False``: Builder/Runtime constructors raise like TensorRT without a usable GPU.
    ``corrupt``: applied to the logits the engine returns (a broken engine).
    """
    old = generation.startswith("8")
    named_api = generation != "8.2"  # named tensors arrived in 8.5; 10 removed bindings
    trt = types.ModuleType("tensorrt")
    trt.__version__ = VERSIONS[generation]

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, severity=1):
            self.severity = severity

    if old:
        Flag = enum.IntEnum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1})
    elif generation == "10":
        Flag = enum.IntEnum("NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
    else:
        Flag = enum.IntEnum("NetworkDefinitionCreationFlag",
                            {"STRONGLY_TYPED": 0, "PREFER_AOT_PYTHON_PLUGINS": 1, "PREFER_JIT_PYTHON_PLUGINS": 2})
    flags = {"TF32": 0, "DEBUG": 1}
    if generation != "11":
        flags["FP16"] = 2
    BuilderFlag = enum.IntEnum("BuilderFlag", flags)
    DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1})
    TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})

    def nptype(dt):
        return {DataType.FLOAT: np.float32, DataType.HALF: np.float16}[dt]

    class Network:
        def __init__(self, flags):
            self.flags = flags
            # TensorRT 8 without EXPLICIT_BATCH makes an implicit-batch network, which the ONNX parser refuses
            self.implicit_batch = old and not flags & (1 << int(Flag.EXPLICIT_BATCH))
            self.onnx = b""

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

        def parse(self, data):
            import onnx

            if self.network.implicit_batch:
                self.errors.append("ModelImporter: the ONNX parser only supports explicit batch networks")
                return False
            proto = onnx.load_from_string(data)
            conv_w = {i.name: i.data_type for i in proto.graph.initializer}
            calls.append(("parse", {
                "input_type": proto.graph.input[0].type.tensor_type.elem_type,
                "output_type": proto.graph.output[0].type.tensor_type.elem_type,
                "conv_weight_types": sorted({conv_w[n.input[1]] for n in proto.graph.node
                                             if n.op_type == "Conv" and n.input[1] in conv_w})}))
            self.network.onnx = data
            return True

    class Profile:
        def set_shape(self, name, mn, opt, mx):
            calls.append(("set_shape", (name, tuple(mn), tuple(opt), tuple(mx))))
            self.max_batch = mx[0]

    class Config:
        def __init__(self):
            self.profiles = []

        def set_flag(self, flag):
            calls.append(("set_flag", flag.name))

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

    class Builder:
        def __init__(self, logger):
            if not gpu:
                raise TypeError("pybind11::init(): factory function returned nullptr")
            calls.append(("Builder", None))

        def create_network(self, flags=0):
            calls.append(("create_network", flags))
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls.append(("build", None))
            return make_plan(network.onnx, max_batch=config.profiles[0].max_batch)

    if old:
        Builder.max_batch_size = 1  # the implicit-batch knob, removed in TensorRT 10
    if generation != "11":
        Builder.platform_has_fast_fp16 = fast_fp16

    class Context:
        def __init__(self, engine):
            self.engine, self.shape, self.addresses = engine, None, {}

        def _run(self, ptr_in, ptr_out):
            x = _read(ptr_in, self.shape, np.float32)
            y = self.engine.sess.run(None, {self.engine.input: x})[0].astype(np.float32)
            calls.append(("execute", len(x)))
            _write(ptr_out, corrupt(y) if corrupt else y)
            return True

        def _set_shape(self, shape):
            if not 1 <= shape[0] <= self.engine.max_batch:
                return False
            self.shape = tuple(shape)
            return True

        def _out_shape(self):
            return (self.shape[0], self.engine.classes)

    class NamedContext(Context):
        def set_input_shape(self, name, shape):
            assert name == self.engine.input
            return self._set_shape(shape)

        def get_tensor_shape(self, name):
            return self._out_shape() if name == self.engine.output else self.shape

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def execute_async_v3(self, stream_handle):
            assert isinstance(stream_handle, int)
            return self._run(self.addresses[self.engine.input], self.addresses[self.engine.output])

    class BindingContext(Context):
        def set_binding_shape(self, index, shape):
            assert index == 0
            return self._set_shape(shape)

        def get_binding_shape(self, index):
            return self._out_shape() if index == 1 else self.shape

        def execute_v2(self, bindings):
            return self._run(bindings[0], bindings[1])

    class Engine:
        def __init__(self, header, onnx_bytes):
            import onnxruntime as ort

            self.sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
            self.input, self.output = self.sess.get_inputs()[0].name, self.sess.get_outputs()[0].name
            self.classes = self.sess.get_outputs()[0].shape[1]
            self.max_batch = header["max_batch"]

        def _dtype(self, name):
            t = (self.sess.get_inputs()[0] if name == self.input else self.sess.get_outputs()[0]).type
            return DataType.HALF if t == "tensor(float16)" else DataType.FLOAT

        def create_execution_context(self):
            return NamedContext(self) if named_api else BindingContext(self)

    class NamedEngine(Engine):
        num_io_tensors = 2

        def get_tensor_name(self, i):
            return (self.input, self.output)[i]

        def get_tensor_mode(self, name):
            return TensorIOMode.INPUT if name == self.input else TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return self._dtype(name)

    class BindingEngine(Engine):
        num_bindings = 2

        def get_binding_index(self, name):
            return (self.input, self.output).index(name)

        def get_binding_dtype(self, index):
            return self._dtype((self.input, self.output)[index])

    class Runtime:
        def __init__(self, logger):
            if not gpu:
                raise TypeError("pybind11::init(): factory function returned nullptr")

        def deserialize_cuda_engine(self, plan):
            plan = bytes(plan)
            if not plan.startswith(MAGIC):
                return None
            header, onnx_bytes = _header(plan)
            return (NamedEngine if named_api else BindingEngine)(header, onnx_bytes)

    for name, value in dict(Logger=Logger, NetworkDefinitionCreationFlag=Flag, BuilderFlag=BuilderFlag,
                            DataType=DataType, TensorIOMode=TensorIOMode, nptype=nptype, OnnxParser=OnnxParser,
                            Builder=Builder, Runtime=Runtime).items():
        setattr(trt, name, value)
    return trt


def make_cudart(calls: list, devices: int = 1) -> types.ModuleType:
    """A fake ``cuda.bindings.runtime`` whose "device" memory is host memory (tuple returns like cuda-python)."""
    rt = types.ModuleType("cuda.bindings.runtime")
    Err = enum.IntEnum("cudaError_t", {"cudaSuccess": 0, "cudaErrorNoDevice": 100})
    Kind = enum.IntEnum("cudaMemcpyKind", {"cudaMemcpyHostToHost": 0, "cudaMemcpyHostToDevice": 1,
                                           "cudaMemcpyDeviceToHost": 2})
    buffers: dict[int, np.ndarray] = {}

    class Stream:
        def __int__(self):
            return 7

    def cudaGetDeviceCount():
        return (Err.cudaSuccess, devices) if devices else (Err.cudaErrorNoDevice, 0)

    def cudaSetDevice(index):
        calls.append(("cudaSetDevice", index))
        return (Err.cudaSuccess,)

    def cudaMalloc(nbytes):
        buf = np.zeros(nbytes, np.uint8)
        buffers[buf.ctypes.data] = buf
        calls.append(("cudaMalloc", nbytes))
        return Err.cudaSuccess, buf.ctypes.data

    def cudaFree(ptr):
        buffers.pop(ptr, None)
        return (Err.cudaSuccess,)

    def cudaMemcpyAsync(dst, src, nbytes, kind, stream):
        calls.append(("cudaMemcpyAsync", Kind(kind).name))
        ctypes.memmove(dst, src, nbytes)
        return (Err.cudaSuccess,)

    for name, value in dict(cudaError_t=Err, cudaMemcpyKind=Kind, cudaGetDeviceCount=cudaGetDeviceCount,
                            cudaSetDevice=cudaSetDevice, cudaMalloc=cudaMalloc, cudaFree=cudaFree,
                            cudaMemcpyAsync=cudaMemcpyAsync,
                            cudaStreamCreate=lambda: (Err.cudaSuccess, Stream()),
                            cudaStreamSynchronize=lambda s: (Err.cudaSuccess,),
                            cudaStreamDestroy=lambda s: (Err.cudaSuccess,),
                            cudaGetErrorString=lambda e: (Err.cudaSuccess, b"no CUDA-capable device is detected"),
                            ).items():
        setattr(rt, name, value)
    return rt
