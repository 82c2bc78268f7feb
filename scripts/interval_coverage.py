"""Coverage of evaluate.py's 95% intervals against the stratified percentile bootstrap they replaced, by seeded
simulation (docs/trust.md).

    python scripts/interval_coverage.py [--reps 200] [--only single|paired]

single: one model's macro-F1 (``metric_intervals``). Four populations of 40,000 (target, prediction) pairs (3-10
classes in shares 1:3, per-class accuracy from a range); folders of 12, 40, 160 and 640 predictions are drawn.
paired: ``evaluate.py --compare``, the difference A - B of balanced accuracy and of macro-F1 (``paired_difference``).
B is A with a share of its predictions re-drawn by an independent model of other per-class accuracies; folders
of 20, 60, 200 and 800 images. Coverage = the share of folders whose interval holds the population's value.
Numbers only; nothing is written.
"""
from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from utils.trust.uncertainty import _metrics, metric_intervals, paired_difference

POPULATIONS = ((10, (0.7, 0.95)), (4, (0.9, 0.99)), (3, (0.97, 1.0)), (4, (0.3, 0.95)))  # (classes, accuracy range)
SIZES = (12, 40, 160, 640)
# (classes, A's accuracy range, B's accuracy range for the re-drawn images, share re-drawn)
PAIRS = ((4, (0.6, 0.95), (0.8, 0.9), 0.3), (10, (0.7, 0.95), (0.7, 0.95), 0.1), (3, (0.9, 0.99), (0.85, 1.0), 0.05))
PAIRED_SIZES = (20, 60, 200, 800)


def population(rng: np.random.Generator, k: int, accuracy: tuple[float, float], n: int = 40_000):
    """``n`` (target, prediction) pairs: classes in shares 1..3, class c right with probability accuracy[c]."""
    share = np.linspace(1, 3, k)
    target = rng.choice(k, n, p=share / share.sum())
    return target, predict(rng, target, k, accuracy)


def predict(rng: np.random.Generator, target: np.ndarray, k: int, accuracy: tuple[float, float]) -> np.ndarray:
    """A model's predictions of ``target``: class c right with probability accuracy[c], else another class."""
    right = rng.random(len(target)) < np.linspace(*accuracy, k)[target]
    return np.where(right, target, (target + rng.integers(1, k, len(target))) % k)


def bootstrap(target: np.ndarray, preds: Sequence[np.ndarray], labels: Sequence[int], seed: int,
              n_boot: int = 1000) -> list[dict[str, np.ndarray]]:
    """The replaced method: the metrics of each prediction array over the same ``n_boot`` stratified resamples
    (every class's images drawn with replacement within the class)."""
    rng = np.random.default_rng(seed)
    idx = np.empty((n_boot, len(target)), dtype=np.int64)
    start = 0
    for c in np.unique(target):
        members = np.nonzero(target == c)[0]
        idx[:, start:start + len(members)] = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
        start += len(members)
    return [_metrics(target[idx], p[idx], labels) for p in preds]


def percentile(values: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def single(rng: np.random.Generator, reps: int) -> None:
    print("| classes | accuracy | macro-F1 | images | bootstrap coverage | width | MOVER coverage | width |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for k, accuracy in POPULATIONS:
        target, pred = population(rng, k, accuracy)
        truth = float(_metrics(target[None], pred[None], list(range(k)))["macro_f1"][0])
        for n in SIZES:
            hits, widths = np.zeros(2), [[], []]
            for rep in range(reps):
                idx = rng.choice(len(target), n, replace=False)
                t, p = target[idx], pred[idx]
                labels = sorted(set(t.tolist()) | set(p.tolist()))
                boot, = bootstrap(t, [p], labels, rep)
                for i, (lo, hi) in enumerate((percentile(boot["macro_f1"]),
                                              metric_intervals(t, p, labels, [str(c) for c in range(k)])["macro_f1"]["ci"])):
                    hits[i] += lo <= truth <= hi
                    widths[i].append(hi - lo)
            print(f"| {k} | {accuracy[0]:g}-{accuracy[1]:g} | {truth:.3f} | {n} | {hits[0] / reps:.0%} | "
                  f"{np.mean(widths[0]):.3f} | {hits[1] / reps:.0%} | {np.mean(widths[1]):.3f} |", flush=True)


def paired_population(rng: np.random.Generator, k: int, acc_a: tuple[float, float], acc_b: tuple[float, float],
                      share: float, n: int = 40_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(target, A, B): B keeps A's prediction except on a random ``share`` of images, re-drawn with ``acc_b``."""
    target, a = population(rng, k, acc_a, n)
    b = np.where(rng.random(n) < share, predict(rng, target, k, acc_b), a)
    return target, a, b


def paired(rng: np.random.Generator, reps: int) -> None:
    print("| classes | images re-drawn | difference | images | bootstrap coverage | width | closed form coverage "
          "| width |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for k, acc_a, acc_b, share in PAIRS:
        target, a, b = paired_population(rng, k, acc_a, acc_b, share)
        ma, mb = (_metrics(target[None], p[None], list(range(k))) for p in (a, b))
        truth = {m: float(ma[m][0] - mb[m][0]) for m in ("balanced_acc", "macro_f1")}
        for n in PAIRED_SIZES:
            hits = {m: np.zeros(2) for m in truth}
            widths: dict[str, list[list[float]]] = {m: [[], []] for m in truth}
            for rep in range(reps):
                idx = rng.choice(len(target), n, replace=False)
                t, pa, pb = target[idx], a[idx], b[idx]
                labels = sorted(set(t.tolist()) | set(pa.tolist()) | set(pb.tolist()))
                ba, bb = bootstrap(t, [pa, pb], labels, rep)
                closed = paired_difference(t, pa, pb, labels)
                for m in truth:
                    for i, (lo, hi) in enumerate((percentile(ba[m] - bb[m]), closed[m]["ci"])):
                        hits[m][i] += lo <= truth[m] <= hi
                        widths[m][i].append(hi - lo)
            for m, unit in (("balanced_acc", "{:+.1f} points balanced"), ("macro_f1", "{:+.3f} macro-F1")):
                print(f"| {k} | {share:.0%} | {unit.format(truth[m])} | {n} | {hits[m][0] / reps:.0%} | "
                      f"{np.mean(widths[m][0]):.3g} | {hits[m][1] / reps:.0%} | {np.mean(widths[m][1]):.3g} |",
                      flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=200, help="folders drawn per population and size (default 200)")
    parser.add_argument("--only", choices=("single", "paired"), help="one of the two tables (default: both)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(1)
    if args.only in (None, "single"):
        single(rng, args.reps)
    if args.only in (None, "paired"):
        paired(np.random.default_rng(2), args.reps)


if __name__ == "__main__":
    main()
