"""int8 ONNX files that stay accurate on every CPU they may meet, and an honest word on their speed here.

Two facts about onnxruntime's x86 int8 kernels (MLAS) decide what ``export.py`` writes and reports:

- Accuracy. Without VNNI (AVX2-only CPUs: AMD Zen 2/Zen 3, Intel before Cascade Lake / Ice Lake) the u8 x s8
  kernels add products in pairs into int16 with saturation (``vpmaddubsw``): 255 * 127 * 2 = 64770 overflows
  32767 and the result is silently clipped. Weights within [-64, 64] (onnxruntime's ``reduce_range``, 7 bits)
  cannot overflow (255 * 64 * 2 = 32640); onnxruntime's own S8->U8 graph rewrite treats that range as safe.
  VNNI/AMX and ARM kernels accumulate in 32 bits, so full 8-bit weights are safe there.
- Speed. int8 pays where the CPU multiplies u8 x s8 in one instruction (VNNI, AMX, ARM dot-product); on AVX2
  alone the gain is small and the quantize/dequantize steps can make batch-1 latency *worse* than fp32.
  So the export times both files on the machine it runs on and says so when int8 is not faster.
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from utils.deploy.onnx_io import onnx_session
from utils.machine import INT8_DOT
from utils.timing import interleaved_timings, median

DEFAULT_TARGET = "any-x86"


@dataclass(frozen=True)
class Int8Target:
    """Where an int8 file is meant to run, and the weight range that is exact there."""

    name: str
    reduce_range: bool  # True: 7-bit weights in [-64, 64]
    reason: str

    @property
    def weight_bits(self) -> int:
        return 7 if self.reduce_range else 8


TARGETS = {
    "any-x86": Int8Target("any-x86", True,
                          "7-bit weights: x86 CPUs without VNNI (AVX2 only) add u8 x s8 products in pairs into "
                          "saturating int16 (vpmaddubsw), where 8-bit weights overflow; 7-bit weights cannot"),
    "vnni": Int8Target("vnni", False,
                       "8-bit weights: the target has VNNI or AMX (u8 x s8 dot products accumulate in int32, "
                       "no saturation)"),
    "arm": Int8Target("arm", False,
                      "8-bit weights: onnxruntime's ARM64 int8 kernels accumulate in 32 bits (no saturation)"),
}


def weight_range(onnx_path: str) -> tuple[int, int]:
    """Smallest and largest quantized weight in an int8 ONNX file (int8 initializers of rank >= 2 that a
    DequantizeLinear reads: convolution and Gemm weights, not zero points or int32 biases)."""
    import onnx  # noqa: PLC0415  (lazy: optional/heavy dependency)
    from onnx import numpy_helper  # noqa: PLC0415  (lazy: optional/heavy dependency)

    proto = onnx.load(onnx_path)
    inits = {i.name: i for i in proto.graph.initializer}
    lo, hi = 0, 0
    for n in proto.graph.node:
        init = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if init is not None and init.data_type == onnx.TensorProto.INT8 and len(init.dims) >= 2:
            w = numpy_helper.to_array(init)
            lo, hi = min(lo, int(w.min())), max(hi, int(w.max()))
    return lo, hi


# ------------------------------------------------------------------------------------------------ speed
SPEED_BATCH = 32


def _repeats(budget_s: float, seconds_per_round: float, lo: int, hi: int) -> int:
    """Timed calls per variant that fit ``budget_s`` (at least ``lo``, at most ``hi``)."""
    return int(min(hi, max(lo, budget_s / max(seconds_per_round, 1e-6))))


def time_int8_vs_fp32(fp32_path: str, int8_path: str, images: np.ndarray, batch: int = SPEED_BATCH,
                      budget_s: float = 4.0) -> dict[str, Any]:
    """Batch-1 latency p50 (ms) and batch-``batch`` throughput (images/s) of both files, here, in seconds.

    onnxruntime sessions as a serving process gets them (default threads, spinning on). Timed interleaved in
    blocks (utils.timing): a spinning session would otherwise steal the cores from the other one's first calls.
    ``images`` are real preprocessed images (N, 3, S, S); repeated to fill the batch when N < ``batch``.
    About ``budget_s`` seconds in all, split 1:2 between batch 1 and the batch.
    """


    sessions = {"fp32": onnx_session(fp32_path), "int8": onnx_session(int8_path)}
    name = sessions["fp32"].get_inputs()[0].name
    one = np.ascontiguousarray(images[:1], dtype=np.float32)
    many = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])), dtype=np.float32)

    def calls(x: np.ndarray) -> dict[str, Any]:
        return {k: (lambda s=s: s.run(None, {name: x})) for k, s in sessions.items()}

    def round_seconds(fns: dict[str, Any]) -> float:  # one warm call of each: sizes the repeats to the budget
        for fn in fns.values():
            fn()
        t0 = time.perf_counter()
        for fn in fns.values():
            fn()
        return time.perf_counter() - t0

    b1, bn = calls(one), calls(many)
    settle = 0.05  # per block and variant: spinning threads of the other session go idle
    n1 = _repeats(budget_s / 3, round_seconds(b1) + 2 * settle / 5, 10, 60)
    nn = _repeats(budget_s * 2 / 3, round_seconds(bn) + 2 * settle / 2, 3, 10)
    t1 = interleaved_timings(b1, repeats=n1, warmup=2, block=5, settle=settle)
    tn = interleaved_timings(bn, repeats=nn, warmup=1, block=2, settle=settle)
    return {"batch1_p50_ms": {k: round(1000 * median(v), 3) for k, v in t1.items()},
            f"batch{batch}_img_s": {k: round(batch / median(v), 1) for k, v in tn.items()},
            "repeats": {"batch1": n1, f"batch{batch}": nn},
            "threads": "onnxruntime default", "timing": "interleaved blocks, medians"}


def missing_feature(cpu) -> Optional[str]:
    """What this CPU lacks for fast int8 (None when it has a single-instruction int8 dot product)."""
    if cpu.int8_dot:
        return None
    if platform.machine().lower() in ("aarch64", "arm64") or "asimd" in cpu.features:
        return "no ARM dot-product"
    return "no VNNI: AVX2 only" if "avx2" in cpu.features else "no VNNI, no AVX2"


def speed_note(speed: dict[str, Any], cpu) -> Optional[str]:
    """One line when int8 is not faster than fp32 at batch 1 here (None when it is)."""
    fp32, int8 = speed["batch1_p50_ms"]["fp32"], speed["batch1_p50_ms"]["int8"]
    if int8 < fp32:
        return None
    ratio = f"{int8 / fp32:.2f}x slower than" if int8 > fp32 else "as fast as"
    missing = missing_feature(cpu)
    if missing:
        why, hint = missing, "it may still pay on a target with VNNI or ARM dot-product; "
    else:
        has = "/".join(f.replace("_", "-").upper() for f in cpu.features if f in INT8_DOT)
        why, hint = f"it has {has}; int8 does not pay for this model here", ""
    return f"int8 is {ratio} fp32 at batch 1 on this CPU ({why}); {hint}model.onnx is the faster file here"
