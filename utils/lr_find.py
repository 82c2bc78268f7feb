"""Learning-rate finder: a short exponential sweep of the learning rate on the run's real training setup.

``python train.py --lr-find`` builds everything a run would (model, data pipeline with its augmentation, frozen or
cached-features path, optimizer, precision) and hands the step context to :func:`run_lr_find`, which:

- raises the learning rate exponentially from ``start`` to ``end`` over ``steps`` optimizer steps (at most one
  epoch), one real :func:`utils.train_loop.train_step` per value, each param group at its ``lr_mult``;
- records the loss and an exponentially smoothed loss per learning rate, and stops early when the smoothed loss
  exceeds 4x its minimum (or a loss is NaN/inf): past that point the run has diverged and says nothing more;
- suggests a learning rate (:func:`suggest_lr`) and writes ``lr_find.csv`` and ``lr_find.png`` into the run folder;
- restores the model and optimizer state afterwards and writes no checkpoint: the sweep trains the network into
  divergence on purpose, and its weights must never pass for a trained model.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from tqdm import tqdm

from utils.errors import UserError
from utils.files import csv_text, write_text
from utils.plots import plot_lr_find
from utils.train_loop import train_step

DIVERGE_FACTOR = 4.0
# Smoothing of the recorded loss: 0.9 averages over ~10 steps, a tenth of a 100-step sweep (~0.6 decades from
# 1e-6 to 1). fastai's 0.98 averages over ~50 steps, which on a sweep this short shifts the minimum to the right.
SMOOTHING = 0.9
SKIP_START = 10  # ~1 / (1 - SMOOTHING): steps before the average means anything
# GradScaler (fp16) starts at a loss scale of 2**16 and halves it on every overflow: 24 halvings reach 2**-8, so
# more overflows in a row than that are gradients that are inf at any scale (the sweep has diverged)
MAX_SCALER_SKIPS = 24
MIN_STEPS_WARNING = 20
HOW_SUGGESTED = ("the learning rate at the minimum of the smoothed loss, divided by 10 (the minimum is where "
                 "training stops improving at all; a tenth of it still learns fast and is stable; unlike the "
                 "steepest slope, the minimum's position barely moves with the noise of a 100-step sweep)")


@dataclass
class LRFindResult:
    """One sweep: the learning rates tried, the loss at each, and the suggested value."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: Optional[float]  # None: the loss never fell below its value at the first step that counts
    min_loss_lr: float
    stopped: Optional[str]  # why the sweep ended before its last step (None: it ran all steps)
    planned_steps: int


def exponential_lrs(start: float, end: float, steps: int) -> list[float]:
    """``steps`` learning rates from ``start`` to ``end`` (both included), equally spaced on a log scale."""
    if not 0 < start < end:
        raise UserError(f"--lr-find-range {start:g} {end:g}: need 0 < START < END, e.g. 1e-6 1")
    if steps < 2:
        raise UserError(f"--lr-find-steps {steps}: the sweep needs at least 2 steps (one epoch here has {steps}); "
                        "pass a smaller --batch-size")
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction (the first values are not pulled towards 0)."""
    out, avg = [], 0.0
    for i, v in enumerate(losses):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest_lr(lrs: list[float], smoothed: list[float],
               skip: int = SKIP_START) -> tuple[Optional[float], float]:
    """(suggested lr, lr at the smoothed minimum): see :data:`HOW_SUGGESTED`; never below the sweep's start.

    The first ``skip`` steps (at most a quarter of the sweep) are not candidates for the minimum: the average
    has seen too few batches there, and one easy batch would win. A minimum at the first candidate means no rate
    of the sweep lowered the loss (a sweep of 3 steps on a small folder, or a START already too high): the
    suggestion is then None, not the bottom of the range, which would be a rate 10,000x too small passed as advice.
    """
    first = min(skip, len(smoothed) // 4)
    i = min(range(first, len(smoothed)), key=smoothed.__getitem__)
    return (None if i == first else max(lrs[i] / 10, lrs[0])), lrs[i]


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:  # same rule as WarmupCosine.apply: the backbone keeps its lr_mult
        group["lr"] = lr * group.get("lr_mult", 1.0)


def lr_sweep(ctx, loader: Iterable, lrs: list[float], *, diverge: float = DIVERGE_FACTOR,
             bar: bool = False) -> LRFindResult:
    """Run one :func:`train_step` per learning rate in ``lrs`` on ``loader``'s batches.

    The model's parameters and buffers, the optimizer state and the GradScaler's state are put back afterwards
    (also on an error), and the EMA, if any, is left alone: the caller's objects look as if the sweep never ran.
    A step GradScaler skipped (fp16 gradients overflowed; it lowers its scale) records nothing: its learning rate
    is tried again on the next batch, so every recorded loss follows a real update at the rate it is plotted at.
    """
    model, optimizer = ctx.trainable.model, ctx.optimizer
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    saved_scaler = ctx.scaler.state_dict() if ctx.scaler is not None else None  # fp16 on CUDA: its loss scale
    step_ctx = dataclasses.replace(ctx, ema=None)
    losses: list[float] = []
    smoothed: list[float] = []
    stopped = None
    skips = 0  # GradScaler skips in a row (fp16): each repeats the same learning rate on the next batch
    try:
        ctx.trainable.train()
        batches = iter(loader)
        with tqdm(total=len(lrs), desc="lr find", disable=not bar, leave=False, dynamic_ncols=True) as progress:
            while len(losses) < len(lrs):
                lr = lrs[len(losses)]
                images, targets = next(batches, (None, None))
                if images is None:
                    stopped = f"the epoch ended after {len(losses)} steps"
                    break
                _set_lr(optimizer, lr)
                scale = ctx.scaler.get_scale() if ctx.scaler is not None else None
                loss, _ = train_step(step_ctx, images, targets)
                value = float(loss)
                if not math.isfinite(value):
                    stopped = f"loss {value} at lr {lr:.3g}"
                    break
                if scale is not None and ctx.scaler.get_scale() < scale:
                    # fp16: the gradients overflowed at this loss scale, so GradScaler skipped the update and lowered
                    # the scale; the loss says nothing about this lr yet, so the same lr is tried on the next batch
                    skips += 1
                    if skips > MAX_SCALER_SKIPS:
                        stopped = f"gradients overflowed {skips} steps in a row at lr {lr:.3g}"
                        break
                    continue
                skips = 0
                losses.append(value)
                progress.update()
                smoothed = smooth(losses)
                if smoothed[-1] > diverge * min(smoothed):
                    stopped = f"smoothed loss {smoothed[-1]:.3g} > {diverge:g}x its minimum {min(smoothed):.3g} at lr {lr:.3g}"
                    break
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_opt)
        if saved_scaler is not None:
            ctx.scaler.load_state_dict(saved_scaler)
    if not losses:
        raise UserError(f"the learning-rate sweep recorded no finite loss ({stopped}); lower the START of "
                        "--lr-find-range")
    done = lrs[:len(losses)]
    suggestion, at_min = suggest_lr(done, smoothed)
    return LRFindResult(done, losses, smoothed, suggestion, at_min, stopped, len(lrs))


def write_csv(result: LRFindResult, path: str) -> None:
    """``step,lr,loss,smoothed_loss``, one row per step, written atomically."""
    rows = [[i, f"{lr:.6g}", f"{loss:.6g}", f"{sm:.6g}"]
            for i, (lr, loss, sm) in enumerate(zip(result.lrs, result.losses, result.smoothed))]
    write_text(path, csv_text(["step", "lr", "loss", "smoothed_loss"], rows))


def run_lr_find(ctx, data: Any, out: str, *, steps: int, lr_range: tuple[float, float] = (1e-6, 1.0),
                seed: int = 0, bar: bool = False, flag: str = "--lr", batch_size: int | None = None) -> dict[str, Any]:
    """train.py's ``--lr-find``: sweep, write ``out/lr_find.{csv,png}``, print the suggestion; returns a summary.

    ``data`` is train.py's data bundle (images, or cached features for a frozen backbone); ``steps`` is already
    capped at one epoch by the caller; ``flag`` is the option that sets the swept phase's rate (``--lr``, or
    ``--set head_lr=`` when the sweep ran on the classifier-only phase of a two-phase recipe). Only those two
    files are written in ``out``: no config, log or checkpoint. One process only: train.py refuses ``--lr-find``
    under torchrun. ``batch_size``: the sweep's batch, named in the advice (the best rate depends on it).
    """
    lrs = exponential_lrs(lr_range[0], lr_range[1], steps)
    if steps < MIN_STEPS_WARNING:
        print(f"warning: one epoch is only {steps} steps, so the sweep is coarse; a smaller --batch-size gives "
              "more steps")
    data.set_epoch(0)
    torch.manual_seed(seed)  # dropout and mixup draws: the same sweep twice gives the same curve
    print(f"lr find: {steps} steps from {lrs[0]:.3g} to {lrs[-1]:.3g} (x{lrs[1] / lrs[0]:.3f} per step); stops when the smoothed loss exceeds "
          f"{DIVERGE_FACTOR:g}x its minimum; the model and its checkpoints are left untouched")
    result = lr_sweep(ctx, data.train_loader, lrs, bar=bar)
    os.makedirs(out, exist_ok=True)
    csv_path, png_path = os.path.join(out, "lr_find.csv"), os.path.join(out, "lr_find.png")
    write_csv(result, csv_path)
    plot_lr_find(result.lrs, result.losses, result.smoothed, result.suggestion, result.min_loss_lr, png_path)
    ended = f"stopped early: {result.stopped}" if result.stopped else f"ran all {steps} steps"
    print(f"lr find: {len(result.lrs)} steps, {ended}; smoothed loss lowest ({min(result.smoothed):.4g}) at lr "
          f"{result.min_loss_lr:.3g}")
    if result.suggestion is None:
        print(f"no suggested lr: the smoothed loss never fell below its value at lr {result.min_loss_lr:.3g}, the "
              f"first step that counts, so this {len(result.lrs)}-step sweep found no rate that trains better; keep "
              "the recipe's rate, or sweep again with more steps (a smaller --batch-size) or a lower START of "
              "--lr-find-range")
        print(f"wrote {csv_path} and {png_path}")
    else:
        print(f"suggested lr {result.suggestion:.3g}: {HOW_SUGGESTED}")
        if not result.stopped and result.min_loss_lr >= result.lrs[-1]:
            print("warning: the loss was still falling at the end of the sweep, so the suggestion is a guess; "
                  "raise the END of --lr-find-range or look at the plot")
        # --set values are read as YAML, which takes 3e-05 for text: give a --set value a decimal point (3.0e-05)
        use = (f"{flag}{float(f'{result.suggestion:.2g}'):.1e}" if flag.endswith("=")
               else f"{flag} {result.suggestion:.2g}")
        # the best rate grows with the batch: a rate found at --batch-size 8 is several times too low at 64
        at = f" at --batch-size {batch_size}, the batch it was found at" if batch_size else ""
        print(f"wrote {csv_path} and {png_path}; use it with {use}{at}")
    return {"lr_find": {"suggestion": result.suggestion, "min_loss_lr": result.min_loss_lr, "steps": len(result.lrs),
                        "stopped": result.stopped, "csv": csv_path, "png": png_path}, "out": out}
