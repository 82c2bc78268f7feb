#!/usr/bin/env python
"""Transfer learning vs training from scratch, at equal wall-clock budgets, on real class folders.

Builds a small "user-sized" dataset from the real Fashion-MNIST class folders (N images per class, the size of
a typical photo folder), splits it with split_dataset.py, then trains MobileNetV2 three ways with train.py,
each given the same budget of training minutes:

  scratch      random init, all layers trained
  finetune     ImageNet-pretrained, all layers trained (backbone lr x0.1)
  frozen-head  ImageNet-pretrained backbone frozen, pooled features cached, only the classifier trained

The number of epochs of each run is chosen from a one-epoch probe's wall time so that it fits the budget (the
cosine schedule then ends on time), capped at --max-epochs. The table reports val top-1 reached by 1/4, 1/2 and all of the budget (read off
each run's log.csv cumulative epoch_seconds) and is written to OUT/transfer.md and OUT/transfer.csv.

    .venv/bin/python scripts/transfer_learning.py --minutes 4 --per-class 100 --img-size 96
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils.errors import UserError, run_main  # noqa: E402

VARIANTS = {
    "scratch": ["--pretrained", "none", "--freeze", "none", "--lr", "0.05", "--set", "cache_features=false"],
    "finetune": ["--pretrained", "imagenet", "--freeze", "none", "--lr", "0.01", "--set", "backbone_lr_mult=0.1",
                 "--set", "cache_features=false"],
    "frozen-head": ["--pretrained", "imagenet", "--freeze", "features", "--lr", "0.05",
                    "--set", "cache_features=true"],
}


def make_subset(raw: str, out: str, per_class: int) -> None:
    """Hard-link the first ``per_class`` images (sorted names) of every class of ``raw`` into ``out``."""
    for cls in sorted(os.listdir(raw)):
        src = os.path.join(raw, cls)
        if not os.path.isdir(src):
            continue
        os.makedirs(os.path.join(out, cls), exist_ok=True)
        for name in sorted(os.listdir(src))[:per_class]:
            dst = os.path.join(out, cls, name)
            if not os.path.exists(dst):
                try:
                    os.link(os.path.join(src, name), dst)
                except OSError:
                    shutil.copy2(os.path.join(src, name), dst)


def train(data: str, run: str, variant: str, epochs: int, args: argparse.Namespace) -> tuple[list[dict], float]:
    """Run train.py for one variant; return its log rows and the whole process's wall-clock seconds."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "finetune.yaml"),
           "--data", data, "--out", run, "--img-size", str(args.img_size), "--epochs", str(epochs),
           "--batch-size", "32", "--set", f"resize_size={args.img_size}", "--set", "warmup_epochs=0",
           "--set", "progress=false", *VARIANTS[variant]]
    if os.path.isdir(run):
        shutil.rmtree(run)
    t0 = time.perf_counter()
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"train.py failed for the {variant} run (its message is above): {' '.join(cmd)}")
    wall = time.perf_counter() - t0
    with open(os.path.join(run, "log.csv"), newline="") as f:
        return list(csv.DictReader(f)), wall


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def acc_by(rows: list[dict], seconds: float) -> float | None:
    """Best val top-1 among epochs finished within ``seconds`` of training (None if none finished)."""
    t, best = 0.0, None
    for r in rows:
        t += float(r["epoch_seconds"])
        if t > seconds:
            break
        best = max(best or 0.0, float(r["val_top1"]))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", default=os.path.join(ROOT, "datasets", "fashion_mnist", "raw"),
                   help="real class folders to sample from (default: Fashion-MNIST, prepared if missing)")
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "transfer"), help="work and result folder")
    p.add_argument("--per-class", type=int, default=100, help="images per class before the split (default 100)")
    p.add_argument("--img-size", type=int, default=96, help="training/validation image size (default 96)")
    p.add_argument("--minutes", type=float, default=4.0, help="training budget per variant (default 4)")
    p.add_argument("--max-epochs", type=int, default=60, help="epoch cap for fast variants (default 60)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="what to run")
    args = p.parse_args()

    if not os.path.isdir(args.raw):
        from datasets.fashion_mnist.prepare import prepare_fashion_mnist

        prepare_fashion_mnist(args.raw)
    subset, data = os.path.join(args.out, "subset_raw"), os.path.join(args.out, "data")
    make_subset(args.raw, subset, args.per_class)
    if not os.path.isdir(os.path.join(data, "train")):
        subprocess.run([sys.executable, os.path.join(ROOT, "split_dataset.py"), subset, data, "--val", "0.3",
                        "--seed", "0", "--quiet"], check=True)

    budget = args.minutes * 60
    results = []
    for variant in args.variants:
        # The probe's whole wall time (start-up, caching, validation, checkpoints) bounds one epoch's cost.
        _, epoch_s = train(data, os.path.join(args.out, f"{variant}-probe"), variant, 1, args)
        epochs = max(1, min(args.max_epochs, int(budget // epoch_s)))
        print(f"{variant}: {epoch_s:.1f} s/epoch -> {epochs} epochs in {args.minutes:g} min")
        rows, wall = train(data, os.path.join(args.out, variant), variant, epochs, args)
        results.append({
            "variant": variant, "epochs": epochs, "probe_seconds": round(epoch_s, 1),
            "train_minutes": round(sum(float(r["epoch_seconds"]) for r in rows) / 60, 2),
            "wall_minutes": round(wall / 60, 2),  # incl. start-up and (frozen-head) feature caching
            **{f"top1_at_{f * args.minutes:g}min": _round(acc_by(rows, budget * f)) for f in (0.25, 0.5, 1.0)},
            "best_top1": round(max(float(r["val_top1"]) for r in rows), 1),
        })

    cols = list(results[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |" for r in results]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.out, "transfer.md"), "w") as f:
        f.write(f"MobileNetV2, {args.per_class} images/class (70/30 split), {args.img_size} px, "
                f"{args.minutes:g} min budget per variant\n\n{table}\n")
    with open(os.path.join(args.out, "transfer.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(results)


if __name__ == "__main__":
    run_main(main)
