#!/usr/bin/env python
"""Fine-tuning schedules compared at equal training minutes on a real split folder (train/ and val/).

Each variant is `train.py --config configs/finetune.yaml --data DATA --time-budget MINUTES` plus a few flags,
run one after the other (never two at once: they would share the cores), then `evaluate.py` on its best.pt:

  head-only      the classifier alone on cached features (--freeze features)
  head-then-full finetune.yaml as shipped: classifier epochs on cached features, then the whole network
  full           the whole network from the first epoch (--set head_epochs=0)
  old-recipe     finetune.yaml before head_epochs existed: head only, 15 epochs at lr 0.05, no class balancing
                 no warmup, best.pt = the epoch with the best val top-1 (select_se did not exist), square
                 crops of tall or wide photos (resize_mode did not exist) and no time budget (it stops when its
                 epochs are done)

Extra flags for every variant follow `--` (e.g. `-- --img-size 160`). Writes OUT/variants.md and OUT/variants.csv
with top-1, balanced accuracy (mean per-class recall), macro-F1, the minutes used and the machine, measured on
DATA/val, or with `--eval-split test` on DATA/test: images no epoch was chosen on (split_dataset.py --test 0.2).

    python scripts/finetune_variants.py --data /path/to/split --minutes 8
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "head-only": ["--freeze", "features"],
    "head-then-full": [],
    "full": ["--set", "head_epochs=0"],
    "old-recipe": ["--freeze", "features", "--epochs", "15", "--lr", "0.05", "--set", "class_balance=none",
                   "--set", "select_metric=top1", "--set", "select_se=0", "--set", "warmup_epochs=0",
                   "--set", "time_budget=0", "--set", "resize_mode=crop"],
}


def machine_line() -> str:
    """CPU model and the features that decide speed (or the GPU)."""
    out = subprocess.run([sys.executable, "-c", "from utils.machine import describe_machine; print(describe_machine())"],
                         cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown machine"


def run_variant(name: str, args: argparse.Namespace, extra: list[str]) -> dict:
    """Train and evaluate one variant; returns its row of the table."""
    run = os.path.join(args.out, name)
    if os.path.isdir(run):
        shutil.rmtree(run)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "finetune.yaml"),
           "--data", args.data, "--out", run, "--time-budget", str(args.minutes), "--set", "progress=false",
           *VARIANTS[name], *extra]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    with open(os.path.join(run, "log.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), os.path.join(run, "best.pt"),
                    os.path.join(args.data, args.eval_split), "--out", os.path.join(run, "eval"), "--no-progress"],
                   check=True, capture_output=True)
    with open(os.path.join(run, "eval", "metrics.json")) as f:
        m = json.load(f)
    return {"variant": name, "epochs": len(rows), "wall_minutes": round(wall / 60, 2),
            "top1": round(m["top1"], 2), "balanced_acc": round(100 * m["macro_recall"], 2),
            "macro_f1": round(100 * m["macro_f1"], 2),
            "min_class_recall": round(100 * min(r["recall"] for r in m["per_class"]), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="split folder with train/ and val/ class folders")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "finetune_variants"), help="work and result folder")
    p.add_argument("--minutes", type=float, default=8.0, help="training budget per variant (default 8)")
    p.add_argument("--eval-split", default="val", choices=["val", "test"],
                   help="split of DATA that best.pt is evaluated on (test: held out from the choice of epoch)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="what to run")
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    os.makedirs(args.out, exist_ok=True)
    results = [run_variant(v, args, extra) for v in args.variants]
    cols = list(results[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in results]
    text = (f"{args.data}, {args.minutes:g} min budget per variant, best.pt evaluated on {args.eval_split}/, "
            f"extra flags: {' '.join(extra) or '-'}\n"
            f"machine: {machine_line()}\n\n" + "\n".join(lines) + "\n")
    print(text)
    with open(os.path.join(args.out, "variants.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "variants.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(results)


if __name__ == "__main__":
    main()
