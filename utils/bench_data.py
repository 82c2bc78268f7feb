"""Input pipeline throughput: decoded+augmented images/s of the data pipeline variants."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `benchmark.py data` (filled in by the data issue)."""


def run(args: argparse.Namespace) -> None:
    """Run the data benchmark."""
    raise NotImplementedError("benchmark.py data is being built (issue 3)")
