"""Training step speed: train.py's real step (data loading included) vs a plain fp32 NCHW loop.

Both variants are timed interleaved in one run; the table prints as Markdown and is saved as CSV.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `benchmark.py train`."""
    parser.add_argument("--model", default="mobilenet_v2", help="model name (default: mobilenet_v2)")


def run(args: argparse.Namespace) -> None:
    """Run the benchmark (filled in with train.py)."""
    raise SystemExit("benchmark.py train: not implemented yet")
