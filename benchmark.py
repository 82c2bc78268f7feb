#!/usr/bin/env python
"""Measure speed: `benchmark.py data|train|infer|features ...` (see `benchmark.py MODE --help`).

- data:  decoded+augmented images/s of the input pipeline variants
- train: train.py's real training step vs a plain fp32 NCHW loop
- infer: params, MACs, size, latency and throughput of PyTorch / TorchScript / onnxruntime variants
- features: the frozen fine-tune feature pass (decode + backbone) per engine and per workers/threads split
All variants of one mode are measured interleaved in one run; results print as Markdown and save as CSV.
The measuring code lives in utils/bench/ (one module per mode, each with add_arguments and run).
"""
from __future__ import annotations

import argparse
import sys

from utils.process import configure_process

# The training-speed modes measure train.py's step, so they run with train.py's process settings, which must be
# set before torch is imported (OpenMP reads them once).
if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] in ("train", "features"):
    configure_process("train")

from datasets.default import resolve_data_dir  # noqa: E402
from utils.bench import data as bench_data  # noqa: E402
from utils.bench import features as bench_features  # noqa: E402
from utils.bench import infer as bench_infer  # noqa: E402
from utils.bench import train as bench_train  # noqa: E402
from utils.errors import run_main  # noqa: E402

MODES = {
    "data": (bench_data, "input pipeline throughput (images/s)"),
    "train": (bench_train, "training step time: train.py's path vs plain fp32 NCHW"),
    "infer": (bench_infer, "inference latency/throughput of deployment variants"),
    "features": (bench_features, "frozen fine-tune feature pass (decode + backbone) per engine"),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True, metavar="MODE")
    for mode, (module, helptext) in MODES.items():
        module.add_arguments(sub.add_parser(mode, help=helptext, description=module.__doc__,
                                            formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    if args.mode == "train":
        bench_train.run(args, resolve_data_dir)
    else:
        MODES[args.mode][0].run(args)


if __name__ == "__main__":
    run_main(main)
