"""A reject option: answer only when the calibrated confidence reaches a threshold, else ``unknown``.

The coverage curve sorts images by confidence: accepting the most confident fraction ``c`` of them (the
coverage) gives some accuracy on the accepted ones. :func:`threshold_for_accuracy` picks the lowest
confidence threshold whose accepted images reach a target accuracy; fitted on the validation set it is
optimistic for that set, so check it on other images (evaluate.py reports the stored threshold's accuracy
on the images it evaluates).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from utils.errors import UserError
from utils.plots import Figure, _save_figure

DEFAULT_TARGET_ACCURACY = 0.99
UNKNOWN = "unknown"


def _sorted_groups(conf: torch.Tensor, correct: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds (distinct confidences, high to low), images accepted at each and correct among them."""
    c = conf.double().numpy()
    ok = correct.double().numpy()
    order = np.argsort(-c, kind="stable")
    c, ok = c[order], ok[order]
    ends = np.nonzero(np.append(c[1:] != c[:-1], True))[0]  # last position of each run of equal confidences
    return c[ends], ends + 1, np.cumsum(ok)[ends]


def coverage_curve(conf: torch.Tensor, correct: torch.Tensor, max_points: int = 500) -> list[dict[str, float]]:
    """``[{threshold, coverage, accuracy, accepted}]`` from the most confident image to all images (at most
    ``max_points`` rows, evenly spread, the last always included)."""
    n = len(conf)
    if n == 0:
        return []
    thr, accepted, right = _sorted_groups(conf, correct)
    keep = np.unique(np.linspace(0, len(thr) - 1, min(max_points, len(thr))).round().astype(int))
    return [{"threshold": float(thr[k]), "coverage": float(accepted[k] / n), "accuracy": float(right[k] / accepted[k]),
             "accepted": int(accepted[k])} for k in keep]


TARGET_ACCURACY_RULE = "must be in (0, 1], e.g. 0.99 for 99%"


def check_target_accuracy(target: float) -> float:
    """``target`` when it is a reachable accuracy (0 < target <= 1); else a UserError naming the rule."""
    if not 0.0 < target <= 1.0:  # NaN fails too
        raise UserError(f"--target-accuracy {TARGET_ACCURACY_RULE}; got {target}")
    return target


def threshold_for_accuracy(conf: torch.Tensor, correct: torch.Tensor, target: float) -> dict[str, Any]:
    """Lowest threshold whose accepted images (confidence >= threshold) reach ``target`` accuracy (0-1).

    Returns ``{threshold, coverage, accuracy, accepted, reachable}``; when even the most confident images miss
    the target the threshold is 1.0 (answer ``unknown`` to almost everything) and ``reachable`` is False.
    """
    check_target_accuracy(target)
    n = len(conf)
    if n:
        thr, accepted, right = _sorted_groups(conf, correct)
        good = np.nonzero(right / accepted >= target - 1e-12)[0]
        if len(good):
            k = int(good[-1])
            return {"threshold": float(thr[k]), "coverage": float(accepted[k] / n),
                    "accuracy": float(right[k] / accepted[k]), "accepted": int(accepted[k]), "reachable": True}
    return {"threshold": 1.0, "coverage": 0.0, "accuracy": float("nan"), "accepted": 0, "reachable": False}


def apply_threshold(conf: torch.Tensor, correct: torch.Tensor, threshold: float) -> dict[str, Any]:
    """Coverage, accuracy on the accepted images and their count at a given ``threshold``."""
    accept = conf >= threshold
    k = int(accept.sum())
    return {"threshold": float(threshold), "coverage": k / len(conf) if len(conf) else 0.0,
            "accuracy": float(correct[accept].double().mean()) if k else float("nan"), "accepted": k,
            "correct": int(correct[accept].sum())}


def plot_coverage(curve: list[dict[str, float]], chosen: dict[str, Any], target: float, out_png: str,
                  title: str = "") -> None:
    """Accuracy of the accepted images against coverage, with the target accuracy and the chosen threshold."""

    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.subplots()
    ax.plot([r["coverage"] * 100 for r in curve], [r["accuracy"] * 100 for r in curve], color="tab:blue",
            label="accepted images")
    ax.axhline(target * 100, color="grey", linestyle="--", linewidth=1, label=f"target {target * 100:g}%")
    if chosen.get("reachable"):
        ax.plot([chosen["coverage"] * 100], [chosen["accuracy"] * 100], "o", color="tab:red",
                label=f"threshold {chosen['threshold']:.3f}: coverage {chosen['coverage'] * 100:.1f}%")
    ax.set_xlabel("coverage (% of images answered)")
    ax.set_ylabel("accuracy on answered images (%)")
    ax.set_xlim(0, 100)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title or "coverage vs accuracy (calibrated confidence)", fontsize=9)
    _save_figure(fig, out_png)
