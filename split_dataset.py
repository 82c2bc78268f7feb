#!/usr/bin/env python
"""Split a raw folder of class sub-folders (RAW/<class>/*.jpg) into OUT/train, OUT/val [, OUT/test].

Stratified per class and reproducible: the same --seed gives the same split on any machine and for any
file-listing order. Every readable image lands in exactly one split; byte-identical images never end up in two
splits. Unreadable, empty, hidden and non-image files are skipped and listed with the reason in OUT/report.csv;
OUT/split.csv lists every kept image (path, class, split, sha256, source). RAW is never modified.

example: python split_dataset.py ~/flower_photos data/flowers --val 0.2 --test 0.1
"""
from __future__ import annotations

import argparse
import sys

from utils.data.split import format_report, split_dataset
from utils.errors import run_main
from utils.imbalance import imbalance_paragraph


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", metavar="RAW", help="input folder with one sub-folder of images per class")
    parser.add_argument("out", metavar="OUT", help="output folder (must be empty or missing unless --overwrite)")
    parser.add_argument("--val", type=float, default=0.2, help="fraction of each class for validation (default 0.2)")
    parser.add_argument("--test", type=float, default=0.0, help="fraction of each class for a test split (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")
    parser.add_argument("--mode", choices=("copy", "symlink", "hardlink"), default="copy",
                        help="how files reach OUT: copy (default, safest), symlink (absolute links, no extra "
                             "space) or hardlink (no extra space; falls back to copy across filesystems)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT (only after success)")
    parser.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                        help="no progress bars (as in train.py, evaluate.py and predict.py; --quiet is the old name)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    sys.stdout.reconfigure(errors="backslashreplace")  # file names that are not valid UTF-8 still print
    result = split_dataset(args.raw, args.out, val=args.val, test=args.test, seed=args.seed, mode=args.mode,
                           overwrite=args.overwrite, progress=not args.no_progress)
    print(format_report(result))
    train = {c: n["train"] for c, n in result.counts().items()}
    if train and min(train.values()) > 0:  # what train.py will do about the imbalance (utils/balance.py)
        print(imbalance_paragraph(list(train.values()), list(train)))
    print(f"wrote {args.out} (split.csv: every kept image; report.csv: every skipped or noted file)")
    if args.val == 0:
        print("note: no val/ split (--val 0); train.py needs one to choose best.pt and report accuracy: split again "
              "with --val 0.2 before training on this folder")


if __name__ == "__main__":
    run_main(main)
