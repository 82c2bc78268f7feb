"""Coverage of evaluate.py's 95% macro-F1 interval against a percentile bootstrap, by seeded simulation (docs/trust.md).

    python scripts/interval_coverage.py [--reps 200]

Four populations of 40,000 (target, prediction) pairs (3-10 classes in shares 1:3, per-class accuracy from a range);
from each, folders of 12, 40, 160 and 640 predictions are drawn. Coverage = the share of folders whose interval
holds the population's macro-F1. Numbers only; nothing is written.
"""
from __future__ import annotations

import argparse

import numpy as np

from utils.trust.uncertainty import _boot, _interval, _metrics, metric_intervals

POPULATIONS = ((10, (0.7, 0.95)), (4, (0.9, 0.99)), (3, (0.97, 1.0)), (4, (0.3, 0.95)))  # (classes, accuracy range)
SIZES = (12, 40, 160, 640)


def population(rng: np.random.Generator, k: int, accuracy: tuple[float, float], n: int = 40_000):
    """``n`` (target, prediction) pairs: classes in shares 1..3, class c right with probability accuracy[c]."""
    share = np.linspace(1, 3, k)
    target = rng.choice(k, n, p=share / share.sum())
    right = rng.random(n) < np.linspace(*accuracy, k)[target]
    return target, np.where(right, target, (target + rng.integers(1, k, n)) % k)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=200, help="folders drawn per population and size (default 200)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(1)
    print("| classes | accuracy | macro-F1 | images | bootstrap coverage | width | MOVER coverage | width |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for k, accuracy in POPULATIONS:
        target, pred = population(rng, k, accuracy)
        truth = float(_metrics(target[None], pred[None], list(range(k)))["macro_f1"][0])
        for n in SIZES:
            hits, widths = np.zeros(2), [[], []]
            for rep in range(args.reps):
                idx = rng.choice(len(target), n, replace=False)
                t, p = target[idx], pred[idx]
                labels = sorted(set(t.tolist()) | set(p.tolist()))
                boot, = _boot(t, [p], labels, 1000, rep)
                for i, (lo, hi) in enumerate((_interval(boot["macro_f1"]),
                                              metric_intervals(t, p, labels, [str(c) for c in range(k)])["macro_f1"]["ci"])):
                    hits[i] += lo <= truth <= hi
                    widths[i].append(hi - lo)
            print(f"| {k} | {accuracy[0]:g}-{accuracy[1]:g} | {truth:.3f} | {n} | {hits[0] / args.reps:.0%} | "
                  f"{np.mean(widths[0]):.3f} | {hits[1] / args.reps:.0%} | {np.mean(widths[1]):.3f} |", flush=True)


if __name__ == "__main__":
    main()
