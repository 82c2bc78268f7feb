"""Classification metrics: top-k hits, confusion matrix, per-class precision/recall/F1 and their macro averages.

Per-class precision/recall/F1 are computed in one place, :func:`per_class_from_confusion`, from a confusion
matrix: train.py's validation (balanced accuracy and macro-F1 per epoch) and evaluate.py use the same code.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at the class count)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(target[:, None])
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


def confusion_counts(target: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Flattened confusion counts of class indices 0..num_classes-1 (``[t * num_classes + p]``, on the tensors'
    device): what training's validation sums batch by batch and across processes, without scikit-learn."""
    return torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)


def confusion_matrix(target: Sequence[int], pred: Sequence[int], labels: Sequence[int]) -> np.ndarray:
    """Counts ``cm[i, j]`` of samples whose true class is ``labels[i]`` and predicted class ``labels[j]``; samples
    whose true or predicted class is not in ``labels`` are not counted (scikit-learn's convention, without its
    UserWarning when a val split holds a single class)."""
    t, p = torch.as_tensor(np.asarray(target), dtype=torch.long), torch.as_tensor(np.asarray(pred), dtype=torch.long)
    idx = [int(c) for c in labels]
    k = max([*idx, int(t.max()) if len(t) else 0, int(p.max()) if len(p) else 0]) + 1
    full = confusion_counts(t, p, k).reshape(k, k).numpy().astype(np.int64)
    return full[np.ix_(idx, idx)]


def row_normalize(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the recall view); rows without samples stay zero."""
    sums = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, sums, out=np.zeros(cm.shape, dtype=np.float64), where=sums > 0)


def per_class_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support of each class of a square confusion matrix (rows = true class).

    precision = TP / column sum, recall = TP / row sum, F1 = 2 TP / (2 TP + FP + FN); 0 where a denominator is 0
    (scikit-learn's ``zero_division=0``).
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    return (ratio(tp, predicted), ratio(tp, support), ratio(2 * tp, support + predicted),
            support.astype(np.int64))


def class_summary(cm: np.ndarray) -> dict[str, float]:
    """Balanced accuracy (percent: mean per-class recall) and macro-F1 (0-1) of a confusion matrix.

    Both average over the classes that have samples (support > 0), as :func:`macro_average` does, so a class
    absent from the data does not count as a zero; an all-zero matrix gives 0.
    """
    _, recall, f1, support = per_class_from_confusion(cm)
    present = support > 0
    if not present.any():
        return {"balanced_acc": 0.0, "macro_f1": 0.0}
    return {"balanced_acc": 100.0 * float(recall[present].mean()), "macro_f1": float(f1[present].mean())}


def standard_errors(cm: np.ndarray) -> dict[str, float]:
    """Binomial standard errors (percent points) of top-1 and balanced accuracy measured on a confusion matrix.

    top-1: sqrt(p (1 - p) / n); balanced accuracy, the mean of C per-class recalls measured on n_c images each:
    sqrt(sum_c r_c (1 - r_c) / n_c) / C over the classes present. Each rate is taken as (hits + 1) / (n + 2)
    (Laplace), so a class at 0 or 100% recall on a few images still counts as uncertain. A 27-image class at 33%
    recall alone puts +-2.4 points on a 4-class balanced accuracy: what train.py's ``select_se`` allows for.
    """
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum()
    if n <= 0:
        return {"top1": 0.0, "balanced_acc": 0.0}
    p = (np.trace(cm) + 1) / (n + 2)
    support = cm.sum(axis=1)
    present = support > 0
    hits, m = np.diag(cm)[present], support[present]
    r = (hits + 1) / (m + 2)
    var = (r * (1 - r) / m).sum() / present.sum() ** 2
    return {"top1": 100.0 * float(np.sqrt(p * (1 - p) / n)), "balanced_acc": 100.0 * float(np.sqrt(var))}


def per_class_report(target: Sequence[int], pred: Sequence[int], labels: Sequence[int],
                     names: Sequence[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support for each class in ``labels`` (0 where undefined), from the confusion
    matrix over ``labels`` (samples whose true or predicted class is not in ``labels`` are left out)."""
    p, r, f, s = per_class_from_confusion(confusion_matrix(target, pred, labels))
    return [{"class": names[i], "precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]),
             "support": int(s[k])} for k, i in enumerate(labels)]


def macro_average(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Unweighted mean precision/recall/F1 over the classes that have samples (support > 0)."""
    present = [r for r in rows if r["support"] > 0]
    if not present:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    return {k: float(np.mean([r[k] for r in present])) for k in ("precision", "recall", "f1")}
