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
For two models on the same images (:func:`paired_difference`), paired intervals of the difference, much narrower
than two separate intervals: Newcombe's paired interval for top-1 and for each class's recall (MOVER joins those
into balanced accuracy), and MOVER-D with Newcombe's correlation for each class's F1.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from utils.deploy.int8_check import mover_difference, newcombe_phi, paired_difference_interval, wilson_interval


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


def mover_mean(values: Sequence[float], intervals: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """95% interval of the mean of independent estimates from each one's 95% interval (MOVER: the distances to
    the bounds are squared, added and rooted, as in Newcombe's interval of a difference)."""
    k = len(values)
    est = sum(values) / k
    lo = est - math.sqrt(sum((v - low) ** 2 for v, (low, _) in zip(values, intervals))) / k
    hi = est + math.sqrt(sum((high - v) ** 2 for v, (_, high) in zip(values, intervals))) / k
    return lo, hi


def _f1_and_interval(t: np.ndarray, p: np.ndarray, c: int) -> tuple[float, tuple[float, float]]:
    """Class ``c``'s F1 read as the proportion TP / (TP + (FP + FN) / 2), and its Wilson interval."""
    tp, fp, fn = int(((p == c) & (t == c)).sum()), int(((p == c) & (t != c)).sum()), int(((t == c) & (p != c)).sum())
    trials = tp + (fp + fn) / 2
    return (tp / trials if trials else 0.0), wilson_interval(tp, trials)


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
    f1s, f1_cis = zip(*(_f1_and_interval(t, p, c) for _, c in present))
    lo, hi = mover_mean(f1s, f1_cis)
    out["macro_f1"] = {"value": float(full["macro_f1"][0]), "ci": [max(0.0, lo), min(1.0, hi)]}
    out["recall"] = {names[c]: {"value": float(full["recall"][0, i]), "ci": list(recall_ci[c])} for i, c in present}
    out.update(n=int(len(t)),
               method="95%: Wilson (top-1, recall), MOVER over the recalls' Wilson intervals (balanced accuracy), "
                      "MOVER over the classes' F1 Wilson intervals, F1 = TP / (TP + (FP + FN) / 2) (macro-F1)")
    return out


def _table(right_a: np.ndarray, right_b: np.ndarray) -> tuple[int, int, int, int]:
    """The paired 2x2 counts: right by both, by A only, by B only, by neither."""
    return (int((right_a & right_b).sum()), int((right_a & ~right_b).sum()), int((~right_a & right_b).sum()),
            int((~right_a & ~right_b).sum()))


def paired_difference(target: Sequence[int], pred_a: Sequence[int], pred_b: Sequence[int],
                      labels: Sequence[int]) -> dict[str, Any]:
    """A - B for top-1, balanced accuracy and macro-F1 on the same images, with paired 95% intervals in closed
    form (the same data always gives the same interval), and the images only A / only B gets right.

    - Top-1: Newcombe's paired interval (as export.py's int8 check).
    - Balanced accuracy: each class's recall difference gets Newcombe's paired interval on that class's images;
      MOVER combines them into the mean (the classes are independent samples).
    - Macro-F1: each class's F1 (as in :func:`metric_intervals`) gets its Wilson interval per model, MOVER-D
      joins the two with the correlation Newcombe's method estimates from the class's paired right/wrong table,
      and MOVER combines the classes.
    A paired bootstrap did this until 2026-12-06: it collapses to a point when the two models disagree on no or
    one image, and covered the true difference of balanced accuracy in 4-63% of 20-image folders
    (scripts/interval_coverage.py, docs/trust.md).
    """
    t = np.asarray(target, dtype=np.int64)
    a, b = np.asarray(pred_a, dtype=np.int64), np.asarray(pred_b, dtype=np.int64)
    labels = sorted(set(labels) | set(t.tolist()) | set(a.tolist()) | set(b.tolist()))
    fa, fb = _metrics(t[None, :], a[None, :], labels), _metrics(t[None, :], b[None, :], labels)
    ra, rb = a == t, b == t
    recall_d, recall_ci, f1_d, f1_ci = [], [], [], []
    for c in sorted(set(t.tolist())):  # the classes balanced accuracy and macro-F1 average over
        table = _table(ra[t == c], rb[t == c])
        est, lo, hi = paired_difference_interval(*table)
        recall_d.append(est)
        recall_ci.append((lo, hi))
        (f_a, ci_a), (f_b, ci_b) = _f1_and_interval(t, a, c), _f1_and_interval(t, b, c)
        f1_d.append(f_a - f_b)
        f1_ci.append(mover_difference(f_a, ci_a, f_b, ci_b, newcombe_phi(*table)))
    out: dict[str, Any] = {}
    lo, hi = mover_mean(recall_d, recall_ci)
    out["balanced_acc"] = {"value": float(fa["balanced_acc"][0] - fb["balanced_acc"][0]),
                           "ci": [100.0 * max(-1.0, lo), 100.0 * min(1.0, hi)], "method": "Newcombe per class, MOVER"}
    lo, hi = mover_mean(f1_d, f1_ci)
    out["macro_f1"] = {"value": float(fa["macro_f1"][0] - fb["macro_f1"][0]), "ci": [max(-1.0, lo), min(1.0, hi)],
                       "method": "Wilson per class and model, MOVER-D with Newcombe's phi, MOVER"}
    counts = _table(ra, rb)
    est, lo, hi = paired_difference_interval(*counts)
    out["top1"] = {"value": 100.0 * est, "ci": [100.0 * lo, 100.0 * hi], "method": "Newcombe paired"}
    out.update(n=int(len(t)), only_a_right=counts[1], only_b_right=counts[2])
    return out


def ci_text(name: str, entry: dict[str, Any], n: int, percent: bool = True) -> str:
    """``top-1 87.5% (95% CI 62.5-100, n=8)``; macro-F1 style (0-1) with ``percent=False``."""
    lo, hi = entry["ci"]
    if percent:
        def short(v: float) -> str:
            return f"{v:.1f}".rstrip("0").rstrip(".")
        return f"{name} {entry['value']:.1f}% (95% CI {short(lo)}-{short(hi)}, n={n})"
    return f"{name} {entry['value']:.3f} (95% CI {lo:.3f}-{hi:.3f}, n={n})"
