"""Which epoch should best.pt hold? Rules compared on held-out images (docs/finetune.md, "Which epoch becomes best.pt").

DATA must have train/, val/ and test/ (``split_dataset.py RAW DATA --val 0.2 --test 0.2``). For each seed the same
training runs twice (same seed, same train/, so the same weights every epoch; checked on train_loss): once
validating on val/, once on test/. Each rule picks an epoch from the val run's log.csv (select_se=1 from its
best.pt, which train.py wrote by that rule); the table gives that epoch's accuracy from the test run's log.csv.

    python scripts/select_study.py --data tops3 --seeds 0 1 2 3 4 -- --freeze features --epochs 30
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys

from utils.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = {"best balanced acc": "val_bal_acc", "best top-1": "val_top1", "best macro-F1": "val_macro_f1"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="split folder with train/, val/ and test/")
    p.add_argument("--out", default="runs/select_study", help="work and result folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="one pair of runs per seed")
    p.add_argument("extra", nargs="*", help="train.py flags after --, on top of configs/finetune.yaml")
    return p


def test_view(data: str, out: str) -> str:
    """A folder whose val/ is DATA/test/ (symlinks), so train.py validates on the test images."""
    view = os.path.join(out, "test_view")
    if not os.path.isdir(view):
        os.makedirs(view)
        os.symlink(os.path.abspath(os.path.join(data, "train")), os.path.join(view, "train"))
        os.symlink(os.path.abspath(os.path.join(data, "test")), os.path.join(view, "val"))
    return view


def train_once(data: str, out: str, seed: int, extra: list[str]) -> list[dict]:
    if not os.path.exists(os.path.join(out, "best.pt")):
        subprocess.run([sys.executable, "train.py", "--config", "configs/finetune.yaml", "--data", data, "--out", out,
                        "--seed", str(seed), "--overwrite", "--set", "progress=false", "--set", "select_se=1", *extra],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "log.csv")) as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> list[str]:
    args = get_args_parser().parse_args(argv)
    picks: dict[str, list[tuple[float, float, float, int]]] = {}
    for seed in args.seeds:
        val_run, test_run = (os.path.join(args.out, f"seed{seed}_{v}") for v in ("val", "test"))
        a = train_once(args.data, val_run, seed, args.extra)
        b = train_once(test_view(args.data, args.out), test_run, seed, args.extra)
        if [r["train_loss"] for r in a] != [r["train_loss"] for r in b]:
            raise SystemExit(f"seed {seed}: the two runs trained differently; the comparison would not hold")
        epochs = {rule: max(range(len(a)), key=lambda j, k=key: (float(a[j][k]), -j)) + 1 for rule, key in RULES.items()}
        epochs["last epoch"] = len(a)
        kept = load_checkpoint(os.path.join(val_run, "best.pt"))["best_kept"]
        epochs["select_se 1 (latest within 1 SE of the best balanced acc)"] = kept["epoch"]
        for rule, e in epochs.items():
            r = b[e - 1]
            picks.setdefault(rule, []).append((float(r["val_top1"]), float(r["val_bal_acc"]),
                                               100 * float(r["val_macro_f1"]), e))
    lines = [f"{args.data}, seeds {args.seeds}, train.py flags: {' '.join(args.extra) or '-'}", "",
             "| best.pt picked on val by | test top-1 | test balanced acc | test macro-F1 | epochs picked |",
             "|---|---:|---:|---:|---|"]
    for rule, rows in picks.items():
        means = [statistics.mean(r[i] for r in rows) for i in range(3)]
        lines.append(f"| {rule} | {means[0]:.2f} | {means[1]:.2f} | {means[2]:.2f} | "
                     f"{', '.join(str(r[3]) for r in rows)} |")
    print("\n".join(lines))
    with open(os.path.join(args.out, "select_study.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
