"""Inference speed of deployment variants (eager, channels_last, TorchScript, onnxruntime fp32/int8).

(Being built: see export.py / utils/export.py.)
"""
from __future__ import annotations

import argparse

from utils.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `benchmark.py infer`."""
    parser.add_argument("checkpoint", nargs="?", help="train.py checkpoint to benchmark")


def run(args: argparse.Namespace) -> None:
    """Run the inference benchmark."""
    raise UserError("benchmark.py infer is not implemented yet")
