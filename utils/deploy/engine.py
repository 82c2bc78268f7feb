"""Forward-only passes (no gradients) on the fastest engine this machine has.

On a CPU the network is exported to ONNX (utils/deploy/export.py's exporter settings) and run by onnxruntime, once
the first real batch shows that onnxruntime computes what PyTorch computes within export.py's tolerance and
is faster. Anything else (onnx/onnxruntime missing, a failed export, a mismatch, onnxruntime slower, a pass too
short to repay the export) runs PyTorch eager (fp32, channels_last, inference_mode) and says why in one line.
On a GPU, PyTorch stays on the GPU.

    engine = fast_forward(model, first_batch, method="forward_features", images=len(dataset))
    print(f"engine: {engine.choice.value} - {engine.choice.reason}")
    outputs = [engine.first] + [engine.run(x) for x in other_batches]

Measured (train.py's cached feature pass of configs/finetune.yaml, MobileNetV2 1.0, 224 px, batch 32, 2,000 real
photos, 2-core AMD EPYC shared with other jobs, fresh processes): PyTorch eager fp32 with one decode worker
(before) 41-45 img/s, onnxruntime fp32 119-133 img/s, export and first-batch check included.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from utils.data import single_thread
from utils.deploy.onnx_io import INPUT_NAME, ONNX_OPSET, onnx_session
from utils.machine import Choice

PARITY_TOL = 1e-4  # export.py's --tol: max |difference| <= tol x max(1, largest |value|)
# Exporting + opening a session took 0.3-1.6 s for MobileNetV2 (measured, 2 shared cores); a pass PyTorch would
# finish sooner than this is left to PyTorch (predicting a handful of photos must not wait for an export).
MIN_PASS_SECONDS = 2.0
MIN_SPEEDUP = 1.0  # onnxruntime must run the first batch at least this much faster than PyTorch (both cold)
ENGINES = ("auto", "onnxruntime", "pytorch")

Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Engine:
    """A fast batch callable plus the decision behind it.

    ``run(x)``: float NCHW batch -> output (float32; on the CPU for onnxruntime, on the model's device for
    PyTorch). ``choice``: engine name (``onnxruntime`` | ``pytorch``) and why (its reason gains the thread count
    once a :class:`ThreadProbe` has settled it). ``first``: the output for the batch the choice was made on
    (computed during the check, so the caller need not run it again).
    """

    run: Runner
    choice: Choice
    first: torch.Tensor


class _Method(nn.Module):
    """``model.<method>`` as a module of its own, so the exporter can trace e.g. ``forward_features``."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model, self.method = model, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(x)


def pytorch_runner(model: nn.Module, method: str = "forward") -> Runner:
    """PyTorch eager: inference_mode, channels_last input on the model's device (the model is put in
    channels_last here, in place: same values, the layout oneDNN's fastest CPU kernels read)."""
    device = next(model.parameters()).device
    model.eval().to(memory_format=torch.channels_last)
    fn = getattr(model, method)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return fn(x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last))

    return run


def export_sessions(model: nn.Module, method: str, input_shape: tuple[int, ...], threads: Sequence[int] = (0,),
                    spinning: bool = False) -> list:
    """Export ``model.<method>`` for inputs (N, *input_shape) to ONNX in a temporary folder and open one
    onnxruntime session per entry of ``threads`` (intra-op threads, 0 = onnxruntime's default).

    Same exporter settings as utils.deploy.export.export_onnx (legacy TorchScript exporter, constant folding folds
    BatchNorm into the convolutions, dynamic batch axis); traced on one thread: a batch of one gains nothing
    from more, and busy OpenMP threads on a shared machine made the trace ~5x slower (0.56 vs 3.3 s, measured).
    """

    device = next(model.parameters()).device
    x = torch.zeros(1, *input_shape, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "forward.onnx")
        with single_thread(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter announces its own deprecation
            torch.onnx.export(_Method(model, method).eval(), (x,), path, dynamo=False, opset_version=ONNX_OPSET,
                              do_constant_folding=True, input_names=[INPUT_NAME], output_names=["output"],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, "output": {0: "batch"}})
        return [onnx_session(path, t, spinning=spinning) for t in threads]  # sessions keep the graph in memory


def onnx_runner(sess) -> Runner:
    """Batch -> float32 CPU tensor through an onnxruntime session (any input layout or device)."""
    in_name, out_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(sess.run([out_name], {in_name: arr})[0])

    return run


def parity(reference: torch.Tensor, got: torch.Tensor, tol: float = PARITY_TOL,
           same_top1: bool = False) -> tuple[bool, str]:
    """utils.deploy.export.verify_parity's rule: max |difference| <= ``tol`` x max(1, largest |reference|) (and, for
    logits, the same top-1 on every row). Returns (passed, one-line detail)."""
    reference, got = reference.detach().float().cpu(), got.detach().float().cpu()
    if reference.shape != got.shape:
        return False, f"output shape {tuple(got.shape)} instead of {tuple(reference.shape)}"
    diff = float((reference - got).abs().max()) if reference.numel() else 0.0
    allowed = tol * max(1.0, float(reference.abs().max()) if reference.numel() else 0.0)
    if not diff <= allowed:  # also catches NaN
        return False, f"max difference {diff:.2g} > allowed {allowed:.2g}"
    if same_top1 and reference.dim() == 2 and not torch.equal(reference.argmax(1), got.argmax(1)):
        flips = int((reference.argmax(1) != got.argmax(1)).sum())
        return False, f"top-1 differs on {flips}/{len(reference)} images"
    return True, f"max difference {diff:.1g} <= {allowed:.1g}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _timed(run: Runner, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = run(x)
    return out, time.perf_counter() - t0


def _threads_text(threads: int) -> str:
    return f"{threads} thread{'s' if threads != 1 else ''}" if threads else "default threads"


class ThreadProbe:
    """Runs the pass's next batches on each onnxruntime session in turn, in blocks, timing the loop's wall clock
    per batch (the wait for decoded images included), then keeps the fastest session for the rest of the pass.

    Why measure in the pass: how many threads pay beside decode workers depends on the machine and its load. On
    this repository's 2-core VM, beside 1 decode worker, the 224 px feature pass ran at 155 img/s with 2 threads
    vs 134 with 1 when the machine was quiet, and at 59 vs 82 while other jobs ran (benchmark.py features).
    The first ``skip`` batches of a block are not counted: they were decoded while the previous block ran.
    Outputs do not depend on the thread count (onnxruntime gave bit-identical features with 1 and 2 threads).
    """

    def __init__(self, runners: dict[int, Runner], choice: Choice, block: int = 4, rounds: int = 2,
                 skip: int = 2) -> None:
        self.runners, self.choice, self.base = runners, choice, choice.reason
        self.schedule = [t for _ in range(rounds) for t in runners for _ in range(block)]
        self.block, self.skip = block, skip
        self.per_image: dict[int, list[float]] = {t: [] for t in runners}
        self.pos, self.last, self.best = 0, time.perf_counter(), None
        names = " vs ".join(_threads_text(t) for t in runners)
        choice.reason = f"{self.base}; {names}: the pass ended before the comparison ({len(self.schedule)} batches)"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.best is not None:
            return self.runners[self.best](x)
        threads = self.schedule[self.pos]
        out = self.runners[threads](x)
        now = time.perf_counter()
        if self.pos % self.block >= self.skip:
            self.per_image[threads].append((now - self.last) / max(1, len(x)))
        self.last = now
        self.pos += 1
        if self.pos == len(self.schedule):
            self._settle()
        return out

    def _settle(self) -> None:

        rate = {t: 1.0 / statistics.median(v) for t, v in self.per_image.items()}
        self.best = max(rate, key=rate.get)
        others = ", ".join(f"{rate[t]:.0f} with {_threads_text(t)}" for t in rate if t != self.best)
        self.choice.reason = (f"{self.base}; {_threads_text(self.best)}: {rate[self.best]:.0f} img/s vs {others} "
                              f"over the pass's first {len(self.schedule)} batches (decoding included)")


def fast_forward(model: nn.Module, sample: torch.Tensor, *, method: str = "forward", images: Optional[int] = None,
                 threads: int | Sequence[int] = 0, spinning: bool = False, engine: str = "auto",
                 tol: float = PARITY_TOL, same_top1: bool = False) -> Engine:
    """The fastest way to run ``model.<method>`` (eval mode, no gradients) on batches shaped like ``sample``.

    ``sample`` is the pass's first real batch: PyTorch runs it (the reference, timed), then on a CPU onnxruntime
    runs it too (timed) and must match within ``tol`` (:func:`parity`; ``same_top1`` for logits) and be faster.
    ``images``: how many images the whole pass has (None: unknown, assumed long); a pass PyTorch would finish
    in under :data:`MIN_PASS_SECONDS` is not worth an export. ``threads``: onnxruntime intra-op threads (0: its
    default), or several counts to compare on the pass's next batches (:class:`ThreadProbe`; the first one
    runs the check). ``spinning``: idle onnxruntime threads busy-wait between operators (off: decode workers
    need the cores). ``engine``: ``auto``, or force ``onnxruntime`` (still verified; a failure still falls
    back) or ``pytorch``.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    candidates = [threads] if isinstance(threads, int) else list(dict.fromkeys(threads))
    device = next(model.parameters()).device
    torch_run = pytorch_runner(model, method)
    if device.type != "cpu":
        return Engine(torch_run, Choice("pytorch", f"PyTorch on {device} (onnxruntime here is for CPU passes)"),
                      torch_run(sample))
    ref, t_torch = _timed(torch_run, sample)

    def stay(why: str) -> Engine:
        return Engine(torch_run, Choice("pytorch", f"PyTorch eager fp32 channels_last: {why}"), ref)

    if engine == "pytorch":
        return stay("asked for (engine='pytorch')")
    if engine == "auto" and images is not None:
        estimate = t_torch * images / max(1, len(sample))
        if estimate < MIN_PASS_SECONDS:
            return stay(f"the pass is short (~{estimate:.2g} s in PyTorch), an onnxruntime export would not pay off")
    try:
        import onnxruntime  # noqa: PLC0415, F401  (lazy: is the optional runtime installed?)
    except ImportError:
        return stay("onnxruntime is not installed (pip install onnxruntime onnx)")
    t0 = time.perf_counter()
    try:
        sessions = export_sessions(model, method, tuple(sample.shape[1:]), candidates, spinning)
    except Exception as e:  # any exporter or session failure: PyTorch still computes the right thing
        return stay(f"ONNX export failed ({_first_line(e)})")
    t_export = time.perf_counter() - t0
    runners = {t: onnx_runner(sess) for t, sess in zip(candidates, sessions)}
    try:
        got, t_ort = _timed(runners[candidates[0]], sample)
    except Exception as e:
        return stay(f"onnxruntime failed on the first batch ({_first_line(e)})")
    ok, detail = parity(ref, got, tol, same_top1)
    if not ok:
        return stay(f"onnxruntime differs from PyTorch on the first batch ({detail}, tolerance {tol:g})")
    speedup = t_torch / max(t_ort, 1e-9)
    if engine == "auto" and speedup < MIN_SPEEDUP:
        return stay(f"onnxruntime ran the first batch at {speedup:.2f}x PyTorch's speed")
    choice = Choice("onnxruntime", (
        f"onnxruntime fp32 ({_threads_text(candidates[0])}): {speedup:.1f}x PyTorch eager on the first batch, "
        f"same output ({detail}); export {t_export:.1f} s"))
    run = ThreadProbe(runners, choice) if len(runners) > 1 else runners[candidates[0]]
    return Engine(run, choice, got)
