"""How imbalanced a training folder is and what train.py does about it (``class_balance`` / ``select_metric``
``auto``); the remedies themselves are in utils/balance.py. Plain Python, no torch: split_dataset.py prints the
same decision train.py makes.

- :func:`imbalance` / :func:`is_imbalanced`: largest / smallest training-class count; a folder is *imbalanced* when
  that ratio is at least :data:`IMBALANCE_RATIO` (1.5).
- ``class_balance`` ``auto``: none on a balanced folder, else :data:`AUTO_IMBALANCED` (measured, docs/imbalance.md).
- ``select_metric`` (which validation number picks best.pt): ``auto`` = balanced accuracy on an imbalanced folder,
  else top-1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

IMBALANCE_RATIO = 1.5  # largest / smallest class count at which a training folder counts as imbalanced
# class_balance=auto on an imbalanced folder: the measured winner (docs/imbalance.md). The square-root draw beat the
# even one on every folder measured: from scratch, mean val balanced accuracy 74.1% vs 72.6% (none 71.1%) over
# 2 folders x 2 seeds; fine-tuning on a 4-class 58/27/11/4 % folder, balanced accuracy 74.4 vs 73.9 and top-1
# 88.7 vs 86.8 (head, 2 seeds), 74.4 / 88.0 vs 73.8 / 86.8 (finetune.yaml, 10 minutes).
AUTO_IMBALANCED = "sqrt"
AUTO_REASON = ("drawing classes in proportion to the square root of their counts measured the best balanced accuracy "
               "without the top-1 loss of an even draw on imbalanced real folders, docs/imbalance.md")
SELECT_NAMES = {"top1": "val top-1", "balanced_acc": "val balanced accuracy"}


@dataclass
class Decision:
    """One setting as used (``value``) and why (``reason``)."""

    value: str
    reason: str


def imbalance(counts: Sequence[int]) -> tuple[int, int, float]:
    """(index of the largest class, index of the smallest, largest / smallest count); inf if a class is empty."""
    big = max(range(len(counts)), key=lambda i: (counts[i], -i))
    small = min(range(len(counts)), key=lambda i: (counts[i], i))
    ratio = counts[big] / counts[small] if counts[small] > 0 else float("inf")
    return big, small, ratio


def is_imbalanced(counts: Sequence[int]) -> bool:
    """True when largest / smallest class count >= :data:`IMBALANCE_RATIO`."""
    return imbalance(counts)[2] >= IMBALANCE_RATIO


def describe_counts(counts: Sequence[int], names: Sequence[str]) -> str:
    """``largest Sandal 600, smallest Bag 40: ratio 15.0 (>= 1.5: imbalanced)``; ``every class 1200 images: ratio
    1.0 (< 1.5: balanced)`` when all counts are equal (not "largest Bag 1200, smallest Bag 1200")."""
    big, small, ratio = imbalance(counts)
    if counts[big] == counts[small]:
        return (f"every class {counts[big]} image{'s' if counts[big] != 1 else ''}: ratio 1.0 "
                f"(< {IMBALANCE_RATIO:g}: balanced)")
    verdict = f">= {IMBALANCE_RATIO:g}: imbalanced" if ratio >= IMBALANCE_RATIO else f"< {IMBALANCE_RATIO:g}: balanced"
    return (f"largest {names[big]} {counts[big]}, smallest {names[small]} {counts[small]}: ratio {ratio:.1f} "
            f"({verdict})")


def decide_class_balance(setting: str, counts: Sequence[int]) -> Decision:
    """``class_balance`` as used: an explicit setting stays; ``auto`` -> none (balanced) or AUTO_IMBALANCED."""
    if setting != "auto":
        return Decision(setting, "set in the config")
    if not is_imbalanced(counts):
        return Decision("none", f"auto: balanced training folder (class ratio < {IMBALANCE_RATIO:g})")
    return Decision(AUTO_IMBALANCED, f"auto: imbalanced training folder; {AUTO_REASON}")


def decide_select_metric(setting: str, counts: Sequence[int]) -> Decision:
    """``select_metric`` as used: ``auto`` -> balanced_acc on an imbalanced folder (top-1 would reward ignoring the
    small classes), else top1."""
    if setting != "auto":
        return Decision(setting, "set in the config")
    if is_imbalanced(counts):
        return Decision("balanced_acc", f"auto: imbalanced training folder (class ratio >= {IMBALANCE_RATIO:g})")
    return Decision("top1", f"auto: balanced training folder (class ratio < {IMBALANCE_RATIO:g})")


def imbalance_paragraph(counts: Sequence[int], names: Sequence[str]) -> str:
    """What split_dataset.py prints about the training split: the imbalance and what train.py will do."""
    balance = decide_class_balance("auto", counts)
    select = decide_select_metric("auto", counts)
    if balance.value == "none":
        todo = (f"train.py (class_balance=auto) trains as is (class_balance=none) and keeps the epoch with the best "
                f"{SELECT_NAMES[select.value]} as best.pt (select_metric=auto -> {select.value})")
    else:
        how = {"loss": "class-weighted cross-entropy", "sampler": "a class-balanced sampler",
               "sqrt": "a sampler drawing classes in proportion to the square root of their counts"}[balance.value]
        todo = (f"train.py (class_balance=auto) uses {how} (class_balance={balance.value}) and keeps the epoch with the "
                f"best {SELECT_NAMES[select.value]} as best.pt (select_metric=auto -> {select.value}); "
                f"override with --set class_balance=none|loss|sampler|sqrt --set select_metric=top1|balanced_acc")
    return f"class balance of train: {describe_counts(counts, names)}; {todo}."
