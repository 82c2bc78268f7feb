#!/usr/bin/env python
"""Prune a trained checkpoint: remove a fraction of the expanded channels, re-estimate BatchNorm, fine-tune briefly,
and report MACs, parameters, accuracy and latency before and after (utils/pruning.py does the work).

    python prune.py RUN/best.pt --ratio 0.4 --steps 300      # -> RUN/pruned/{pruned.pt, prune.json}
    python export.py RUN/pruned/pruned.pt                     # export/verify it like any checkpoint
"""
from __future__ import annotations

import argparse
from typing import Any

from utils.errors import UserError, run_main
from utils.pruning import prune_checkpoint


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="train.py checkpoint to prune (e.g. RUN/best.pt)")
    p.add_argument("--ratio", type=float, default=0.4,
                   help="fraction of the expanded (1x1 -> depthwise) channels to remove (default 0.4)")
    p.add_argument("--steps", type=int, default=300, help="fine-tune steps after pruning; 0 skips it (default 300)")
    p.add_argument("--lr", type=float, default=None,
                   help="fine-tune learning rate at the start, cosine to 0 (default: the checkpoint's peak lr / 10)")
    p.add_argument("--batch-size", type=int, default=None, help="fine-tune batch size (default: the checkpoint's)")
    p.add_argument("--data", help="data folder with train/ and val/ class folders "
                                  "(default: the 'data' entry of the checkpoint's config)")
    p.add_argument("--bn-images", type=int, default=512,
                   help="training images used to re-estimate BatchNorm statistics right after pruning (default 512)")
    p.add_argument("--val-limit", type=int, default=2000,
                   help="validation images used for accuracy, spread over all classes; 0 = all (default 2000)")
    p.add_argument("--repeats", type=int, default=30, help="timed batch-1 runs per variant (default 30)")
    p.add_argument("--workers", type=int, default=2, help="data loader worker processes (default 2)")
    p.add_argument("--out", help="output folder (default: the checkpoint's folder + /pruned)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide the progress bar of the fine-tune steps")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    if args.steps < 0:
        raise UserError(f"--steps must be 0 (no fine-tuning) or more, got {args.steps}")
    return prune_checkpoint(args.checkpoint, ratio=args.ratio, steps=args.steps, lr=args.lr,
                            batch_size=args.batch_size, data=args.data, bn_images=args.bn_images,
                            val_limit=args.val_limit, repeats=args.repeats, workers=args.workers, out=args.out,
                            progress=args.progress)


if __name__ == "__main__":
    run_main(main)
