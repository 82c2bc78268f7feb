"""Classification metrics: top-k hits, confusion matrix, per-class precision/recall/F1 (scikit-learn)."""
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


def confusion_matrix(target: Sequence[int], pred: Sequence[int], labels: Sequence[int]) -> np.ndarray:
    """Counts ``cm[i, j]`` of samples whose true class is ``labels[i]`` and predicted class ``labels[j]``."""
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    return sk_confusion_matrix(np.asarray(target), np.asarray(pred), labels=list(labels)).astype(np.int64)


def row_normalize(cm: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the recall view); rows without samples stay zero."""
    sums = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, sums, out=np.zeros(cm.shape, dtype=np.float64), where=sums > 0)


def per_class_report(target: Sequence[int], pred: Sequence[int], labels: Sequence[int],
                     names: Sequence[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support for each class in ``labels`` (scikit-learn; 0 where undefined)."""
    from sklearn.metrics import precision_recall_fscore_support

    p, r, f, s = precision_recall_fscore_support(np.asarray(target), np.asarray(pred), labels=list(labels),
                                                 zero_division=0)
    return [{"class": names[i], "precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]),
             "support": int(s[k])} for k, i in enumerate(labels)]


def macro_average(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Unweighted mean precision/recall/F1 over the classes that have samples (support > 0)."""
    present = [r for r in rows if r["support"] > 0]
    if not present:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    return {k: float(np.mean([r[k] for r in present])) for k in ("precision", "recall", "f1")}
