#!/usr/bin/env python
"""Measure speed: `benchmark.py data|train|infer|features ...` (see `benchmark.py MODE --help`).

- data:  decoded+augmented images/s of the input pipeline variants
- train: train.py's real training step vs a plain fp32 NCHW loop
- infer: params, MACs, size, latency and throughput of PyTorch / TorchScript / onnxruntime variants
- features: the frozen fine-tune feature pass (decode + backbone) per engine and per workers/threads split
All variants of one mode are measured interleaved in one run; results print as Markdown and save as CSV.
"""
from __future__ import annotations

import argparse
import importlib

from utils.errors import run_main

MODES = {
    "data": ("utils.bench.data", "input pipeline throughput (images/s)"),
    "train": ("utils.bench.train", "training step time: train.py's path vs plain fp32 NCHW"),
    "infer": ("utils.bench.infer", "inference latency/throughput of deployment variants"),
    "features": ("utils.bench.features", "frozen fine-tune feature pass (decode + backbone) per engine"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    modules = {}
    for mode, (modname, helptext) in MODES.items():
        mod = importlib.import_module(modname)
        p = sub.add_parser(mode, help=helptext, description=mod.__doc__)
        mod.add_arguments(p)
        modules[mode] = mod
    args = parser.parse_args()
    modules[args.mode].run(args)


if __name__ == "__main__":
    run_main(main)
