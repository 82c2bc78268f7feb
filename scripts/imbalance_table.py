#!/usr/bin/env python
"""Markdown table of class_balance runs for docs/imbalance.md, from each RUN/log.csv (and RUN/eval_last/per_class.csv
when `evaluate.py RUN/last.pt val` was run).

    python scripts/imbalance_table.py /tmp/imbruns/tops_none_s0 /tmp/imbruns/tops_loss_s0 ...

Columns: final-epoch val top-1, balanced accuracy and macro-F1, the best balanced accuracy of any epoch, and with
the per-class file the final recall of each class plus top-1 re-weighted to the training class proportions (what
top-1 would be on a val split as imbalanced as train).
"""
from __future__ import annotations

import csv
import os
import sys

import yaml


def row(run: str) -> str:
    with open(os.path.join(run, "log.csv"), newline="") as f:
        log = list(csv.DictReader(f))
    with open(os.path.join(run, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    used = cfg["class_balance_used"]
    last = log[-1]
    cells = [os.path.basename(run), used["class_balance"], str(cfg["seed"]), f"{float(last['val_top1']):.2f}",
             f"{float(last['val_bal_acc']):.2f}", f"{float(last['val_macro_f1']):.3f}",
             f"{max(float(r['val_bal_acc']) for r in log):.2f}"]
    per_class = os.path.join(run, "eval_last", "per_class.csv")
    if os.path.isfile(per_class):
        with open(per_class, newline="") as f:
            recall = {r["class"]: float(r["recall"]) for r in csv.DictReader(f)}
        counts = used["train_counts"]
        total = sum(counts.values())
        order = sorted(counts, key=lambda c: -counts[c])
        cells.append(" / ".join(f"{100 * recall[c]:.0f}" for c in order))
        cells.append(f"{100 * sum(counts[c] / total * recall[c] for c in counts):.2f}")
    else:
        cells += ["", ""]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    print("| run | class_balance | seed | val top-1 | val bal-acc | val macro-F1 | best bal-acc (any epoch) | "
          "recall per class, largest to smallest (%) | top-1 at train proportions |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in sys.argv[1:]:
        print(row(run))


if __name__ == "__main__":
    main()
