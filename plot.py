#!/usr/bin/env python
"""Draw loss and accuracy curves (train vs val) from one or more train.py log.csv files; several runs share one
chart so recipes can be compared (utils/plots.py draws them).

    python plot.py RUN1/log.csv RUN2/log.csv --out curves.png
    python plot.py RUN1 RUN2 --labels baseline strong-aug --out compare.png   # run folders work too
"""
from __future__ import annotations

import argparse

from utils.errors import run_main
from utils.plots import plot_curves


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", metavar="LOG", help="RUN/log.csv files (or RUN folders containing log.csv)")
    p.add_argument("--out", default="curves.png", help="output PNG path (default: curves.png)")
    p.add_argument("--labels", nargs="+", default=None, help="one legend name per LOG (default: each run's folder name)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    plot_curves(args.logs, args.out, labels=args.labels)
    print(f"wrote {args.out} ({len(args.logs)} run{'s' if len(args.logs) > 1 else ''})")


if __name__ == "__main__":
    run_main(main)
