"""Timing helpers for benchmarks: interleaved repeats and medians, because this machine is noisy."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable


def interleaved_timings(fns: dict[str, Callable[[], object]], repeats: int = 20, warmup: int = 3,
                        block: int = 1, settle: float = 0.0) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, round-robin (A B C A B C ...), after ``warmup`` calls each.

    Interleaving spreads machine noise evenly over the variants, so their ratios are fair.
    ``block > 1`` runs blocks instead (A A A B B B ...): ``settle`` seconds of sleep, then one untimed call,
    then ``block`` timed ones. Runtimes whose idle threads keep spinning after a call (OpenMP in PyTorch spins
    for milliseconds, onnxruntime too) would otherwise steal the cores from the next variant's first calls.
    Returns seconds per call, per name (``repeats`` each).
    """
    if block < 1 or repeats < 1:
        raise ValueError(f"block and repeats must be at least 1 (got block={block}, repeats={repeats})")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    while any(len(t) < repeats for t in times.values()):
        for name, fn in fns.items():
            if block > 1:
                time.sleep(settle)  # the previous variant's idle threads stop spinning
                fn()  # and caches are warm again for this one
            for _ in range(min(block, repeats - len(times[name]))):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    """Median of a non-empty list."""
    return statistics.median(xs)


def percentile(xs: list[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def load_average() -> str:
    """The 1/5/15-minute load averages as text (benchmarks print it: a busy machine skews absolute numbers)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # not available on this platform
        return "n/a"
