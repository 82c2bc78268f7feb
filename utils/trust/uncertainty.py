"""Intervals that fit the folder's size: confidence intervals of one model's metrics and paired differences.

On 8 test images one image is 12.5 points; a number without an interval says nothing about that.
- Top-1 and each class's recall are proportions: Wilson score intervals. A bootstrap of them collapses to one
  point when every image is right (11 of 11: "100-100") or a class has one image; Wilson gives 74-100 for 11/11.
- Balanced accuracy is the mean of the classes' recalls: MOVER (Zou & Donner 2008; the square-and-add rule of
  Newcombe's difference interval) combines their Wilson intervals, so it stays honest in the same cases.
- Macro-F1 is the mean of the classes' F1 = TP / (TP + (FP + FN) / 2): each class's F1 is read as that
  proportion, with its Wilson interval, and MOVER combines them as for balanced accuracy. A percentile bootstrap
  collapsed here too ("1.000 (95% CI 1.000-1.000, n=6)") and, in a seeded simulation (scripts/interval_coverage.py,
  docs/trust.md), covered the true macro-F1 in 9-69% of 12-image folders and 34-89% of 40-image ones, against
  84-96% for this interval at every size from 12 to 640 images.
For two models on the same images, a stratified bootstrap (images resampled with replacement *within each class*,
seeded, the same resamples for both models) gives a paired interval of the difference in balanced accuracy and
macro-F1, much narrower than comparing two separate intervals; top-1 uses Newcombe's paired interval.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from utils.deploy.int8_check import paired_difference_interval, wilson_interval

N_BOOT = 1000
SEED = 0


def _resamples(target: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n) indices: each row resamples every class's images with replacement (stratified)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, len(target)), dtype=np.int64)
    start = 0
    for c in np.unique(target):
        members = np.nonzero(target == c)[0]
        out[:, start:start + len(members)] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
        start += len(members)
    return out


def _metrics(target: np.ndarray, pred: np.ndarray, labels: Sequence[int]) -> dict[str, np.ndarray]:
    """Top-1 (%), balanced accuracy (%), macro-F1 (0-1) and per-class recall (0-1) of each row of (B, n) arrays."""
    k = len(labels)
    pos = {c: i for i, c in enumerate(labels)}
    lut = np.full(max(max(labels), int(target.max()), int(pred.max())) + 1, -1, dtype=np.int64)
    for c, i in pos.items():
        lut[c] = i
    t, p = lut[target], lut[pred]
    b = t.shape[0]
    flat = (np.arange(b)[:, None] * k * k + t * k + p).ravel()
    cm = np.bincount(flat, minlength=b * k * k).reshape(b, k, k).astype(np.float64)
    tp = np.einsum("bii->bi", cm)
    support, predicted = cm.sum(axis=2), cm.sum(axis=1)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=(support + predicted) > 0)
    present = support[0] > 0  # stratified: every resample has the folder's class counts
    return {"top1": 100.0 * tp.sum(axis=1) / t.shape[1], "balanced_acc": 100.0 * recall[:, present].mean(axis=1),
            "macro_f1": f1[:, present].mean(axis=1), "recall": recall}


def _boot(target: np.ndarray, preds: Sequence[np.ndarray], labels: Sequence[int], n_boot: int, seed: int,
          chunk: int = 100) -> list[dict[str, np.ndarray]]:
    """:func:`_metrics` of every prediction array over the same ``n_boot`` stratified resamples, computed
    ``chunk`` resamples at a time (memory stays ~chunk x images, not n_boot x images)."""
    idx = [_resamples(target, min(chunk, n_boot - i), seed + i) for i in range(0, n_boot, chunk)]
    out = []
    for p in preds:
        parts = [_metrics(target[ix], p[ix], labels) for ix in idx]
        out.append({k: np.concatenate([m[k] for m in parts]) for k in parts[0]})
    return out


def _interval(values: np.ndarray) -> list[float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def mover_mean(values: Sequence[float], intervals: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """95% interval of the mean of independent estimates from each one's 95% interval (MOVER: the distances to
    the bounds are squared, added and rooted, as in Newcombe's interval of a difference)."""
    k = len(values)
    est = sum(values) / k
    lo = est - math.sqrt(sum((v - low) ** 2 for v, (low, _) in zip(values, intervals))) / k
    hi = est + math.sqrt(sum((high - v) ** 2 for v, (_, high) in zip(values, intervals))) / k
    return lo, hi


def metric_intervals(target: Sequence[int], pred: Sequence[int], labels: Sequence[int],
                     names: Sequence[str]) -> dict[str, Any]:
    """95% intervals of top-1 and each class's recall (Wilson), balanced accuracy (MOVER over the recalls) and
    macro-F1 (MOVER over the classes' F1 read as TP / (TP + (FP + FN) / 2)); see the module docstring. Closed
    form: the same data always gives the same interval.

    ``labels`` are the class indices of the confusion matrix, ``names`` the names of all the model's classes.
    Returns ``{"top1": {"value", "ci": [lo, hi]}, ..., "recall": {class: {"value", "ci"}}, "n", "method"}``.
    """
    t, p = np.asarray(target, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    full = _metrics(t[None, :], p[None, :], labels)
    present = [(i, c) for i, c in enumerate(labels) if c in set(t.tolist())]
    right = t == p
    recall_ci = {c: wilson_interval(int(right[t == c].sum()), int((t == c).sum())) for _, c in present}
    lo, hi = wilson_interval(int(right.sum()), len(t))
    out: dict[str, Any] = {"top1": {"value": float(full["top1"][0]), "ci": [100.0 * lo, 100.0 * hi]}}
    lo, hi = mover_mean([float(full["recall"][0, i]) for i, _ in present], [recall_ci[c] for _, c in present])
    out["balanced_acc"] = {"value": float(full["balanced_acc"][0]), "ci": [100.0 * max(0.0, lo), 100.0 * min(1.0, hi)]}
    f1s, f1_cis = [], []
    for _, c in present:  # support > 0, so TP + (FP + FN) / 2 > 0
        tp, fp, fn = int((right & (t == c)).sum()), int(((p == c) & (t != c)).sum()), int(((t == c) & ~right).sum())
        trials = tp + (fp + fn) / 2
        f1s.append(tp / trials)
        f1_cis.append(wilson_interval(tp, trials))
    lo, hi = mover_mean(f1s, f1_cis)
    out["macro_f1"] = {"value": float(full["macro_f1"][0]), "ci": [max(0.0, lo), min(1.0, hi)]}
    out["recall"] = {names[c]: {"value": float(full["recall"][0, i]), "ci": list(recall_ci[c])} for i, c in present}
    out.update(n=int(len(t)),
               method="95%: Wilson (top-1, recall), MOVER over the recalls' Wilson intervals (balanced accuracy), "
                      "MOVER over the classes' F1 Wilson intervals, F1 = TP / (TP + (FP + FN) / 2) (macro-F1)")
    return out


def paired_difference(target: Sequence[int], pred_a: Sequence[int], pred_b: Sequence[int], labels: Sequence[int],
                      n_boot: int = N_BOOT, seed: int = SEED) -> dict[str, Any]:
    """A - B for top-1, balanced accuracy and macro-F1 on the same images with paired 95% intervals (bootstrap:
    both models scored on the same resamples; top-1: Newcombe). Also the images only A / only B gets right."""
    t = np.asarray(target, dtype=np.int64)
    a, b = np.asarray(pred_a, dtype=np.int64), np.asarray(pred_b, dtype=np.int64)
    labels = sorted(set(labels) | set(t.tolist()) | set(a.tolist()) | set(b.tolist()))
    fa, fb = _metrics(t[None, :], a[None, :], labels), _metrics(t[None, :], b[None, :], labels)
    ba, bb = _boot(t, [a, b], labels, n_boot, seed)
    out: dict[str, Any] = {k: {"value": float(fa[k][0] - fb[k][0]), "ci": _interval(ba[k] - bb[k])}
                           for k in ("balanced_acc", "macro_f1")}
    ra, rb = a == t, b == t
    counts = [int((ra & rb).sum()), int((ra & ~rb).sum()), int((~ra & rb).sum()), int((~ra & ~rb).sum())]
    # Top-1: Newcombe's closed-form paired interval (as export.py's int8 check), which stays honest when the two
    # models disagree on no or one image, where a bootstrap interval collapses to a point.
    est, lo, hi = paired_difference_interval(*counts)
    out["top1"] = {"value": 100.0 * est, "ci": [100.0 * lo, 100.0 * hi], "method": "Newcombe paired"}
    out.update(n=int(len(t)), only_a_right=counts[1], only_b_right=counts[2], n_boot=n_boot, seed=seed)
    return out


def ci_text(name: str, entry: dict[str, Any], n: int, percent: bool = True) -> str:
    """``top-1 87.5% (95% CI 62.5-100, n=8)``; macro-F1 style (0-1) with ``percent=False``."""
    lo, hi = entry["ci"]
    if percent:
        def short(v: float) -> str:
            return f"{v:.1f}".rstrip("0").rstrip(".")
        return f"{name} {entry['value']:.1f}% (95% CI {short(lo)}-{short(hi)}, n={n})"
    return f"{name} {entry['value']:.3f} (95% CI {lo:.3f}-{hi:.3f}, n={n})"
