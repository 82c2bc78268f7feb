#!/usr/bin/env python
"""Build an imbalanced train/val folder from a raw class-folder dataset (symlinks), for docs/imbalance.md.

    python scripts/imbalanced_folder.py datasets/fashion_mnist/raw /tmp/imb \\
        --classes T-shirt_top,Pullover,Coat,Shirt --train 600,280,110,40 --val 100

Per class the files are shuffled with a seed (sorted names first, so the choice is the same on any machine);
the first ``train`` go to OUT/train/<class>, the next ``val`` to OUT/val/<class> (balanced val: the same number
for every class, so val top-1 and balanced accuracy are both meaningful).
"""
from __future__ import annotations

import argparse
import os
import random


def build(raw: str, out: str, classes: list[str], n_train: list[int], n_val: int, seed: int = 0) -> None:
    """Write OUT/{train,val}/<class>/ as absolute symlinks into RAW/<class>/."""
    if len(classes) != len(n_train):
        raise SystemExit(f"{len(classes)} classes but {len(n_train)} train counts")
    for k, (cls, n) in enumerate(zip(classes, n_train)):
        files = sorted(os.listdir(os.path.join(raw, cls)))
        random.Random(seed * 1000 + k).shuffle(files)
        if n + n_val > len(files):
            raise SystemExit(f"{cls}: {len(files)} files, {n} + {n_val} needed")
        for part, chosen in (("train", files[:n]), ("val", files[n:n + n_val])):
            os.makedirs(os.path.join(out, part, cls), exist_ok=True)
            for f in chosen:
                os.symlink(os.path.abspath(os.path.join(raw, cls, f)), os.path.join(out, part, cls, f))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("raw")
    p.add_argument("out")
    p.add_argument("--classes", required=True, help="comma-separated class folder names")
    p.add_argument("--train", required=True, help="comma-separated train image counts, one per class")
    p.add_argument("--val", type=int, default=100, help="val images per class (default 100)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    build(a.raw, a.out, a.classes.split(","), [int(x) for x in a.train.split(",")], a.val, a.seed)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
