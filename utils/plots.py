"""Figures: training curves from log.csv files, confusion matrices, grids of mistakes (Agg, no display).
Figures are drawn on ``matplotlib.figure.Figure`` objects and saved with the Agg canvas: no pyplot, no global
backend, no display needed. ``plot.py`` is the command that re-draws or compares curves.
"""
from __future__ import annotations

import csv
import math
import os
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from utils.data.images import load_pil_rgb
from utils.errors import UserError
from utils.files import atomic_write
from utils.log import COLUMNS as LOG_COLUMNS
from utils.metrics import row_normalize


def _save_figure(fig: Figure, out_png: str, dpi: int = 110) -> None:
    """Write ``fig`` as PNG atomically (temp file + rename), so readers never see half an image."""
    FigureCanvasAgg(fig)  # the headless canvas, whatever matplotlib's default backend is
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))


def _to_float(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def read_log(csv_path: str) -> dict[str, list[float]]:
    """Read a train.py ``log.csv`` into ``{column: [values per epoch]}`` (missing/blank cells -> NaN)."""
    if os.path.isdir(csv_path):
        csv_path = os.path.join(csv_path, "log.csv")
    if not os.path.isfile(csv_path):
        raise UserError(f"log file {csv_path} not found; pass RUN/log.csv written by train.py (or the RUN folder)")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in ("epoch", "train_loss", "val_loss") if c not in header]
        if missing:
            raise UserError(f"{csv_path} is not a train.py log.csv (missing columns: {', '.join(missing)}); "
                            f"expected columns {','.join(LOG_COLUMNS)}")
        rows = list(reader)
    return {col: [_to_float(r.get(col)) for r in rows] for col in LOG_COLUMNS}


def _default_labels(csv_paths: Sequence[str]) -> list[str]:
    """Name each run after its folder (RUN/log.csv -> RUN); fall back to the path when names clash."""
    names = []
    for p in csv_paths:
        folder = p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))
        names.append(os.path.basename(os.path.normpath(folder)) or p)
    if len(set(names)) < len(names):
        names = [os.path.normpath(p) for p in csv_paths]
    return names


def plot_curves(csv_paths: list[str], out_png: str, labels: list[str] | None = None) -> None:
    """Draw loss and accuracy curves (train solid, val dashed) of one or more runs into ``out_png``.

    ``csv_paths`` are train.py ``log.csv`` files (or run folders holding one); each run gets one colour,
    so several runs on one chart compare recipes. Accuracies are in percent. The PNG is written atomically.
    """
    if isinstance(csv_paths, str):
        csv_paths = [csv_paths]
    if not csv_paths:
        raise UserError("no log.csv given; pass at least one RUN/log.csv")
    if labels is not None and len(labels) != len(csv_paths):
        raise UserError(f"{len(labels)} labels for {len(csv_paths)} log files; give one label per log file")
    labels = list(labels) if labels is not None else _default_labels(csv_paths)
    logs = [read_log(p) for p in csv_paths]

    fig = Figure(figsize=(11, 4.2))
    ax_loss, ax_acc = fig.subplots(1, 2)
    colours = matplotlib.colormaps["tab10"]
    for i, (log, label) in enumerate(zip(logs, labels)):
        c = colours(i % 10)
        ep = log["epoch"]
        ax_loss.plot(ep, log["train_loss"], color=c, ls="-", marker=".", label=f"{label} train")
        ax_loss.plot(ep, log["val_loss"], color=c, ls="--", marker=".", label=f"{label} val")
        ax_acc.plot(ep, log["train_acc"], color=c, ls="-", marker=".", label=f"{label} train")
        ax_acc.plot(ep, log["val_top1"], color=c, ls="--", marker=".", label=f"{label} val top-1")
        # an imbalanced val split: what best.pt is chosen by there (on a balanced one it equals top-1: not drawn)
        if any(math.isfinite(b) and b != t for b, t in zip(log["val_bal_acc"], log["val_top1"])):
            ax_acc.plot(ep, log["val_bal_acc"], color=c, ls=":", marker=".", label=f"{label} val balanced acc")
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    _save_figure(fig, out_png)


def plot_confusion_matrix(cm, class_names: list[str], out_png: str, title: str = "") -> None:
    """Two seaborn heatmaps side by side: raw counts and the row-normalised matrix (recall per true class).

    Rows are true classes, columns predicted ones. Cells are annotated while the matrix stays readable.
    """
    import seaborn as sns  # noqa: PLC0415  (lazy: optional/heavy dependency)


    cm = np.asarray(cm)
    n = len(class_names)
    side = min(max(5.0, 0.5 * n + 2.5), 40.0)
    fig = Figure(figsize=(2 * side + 1, side))
    ax_raw, ax_norm = fig.subplots(1, 2)
    annot = n <= 25
    ticks = class_names if n <= 80 else False
    sns.heatmap(cm, ax=ax_raw, annot=annot, fmt="d", cmap="Blues", square=True, cbar=True,
                xticklabels=ticks, yticklabels=ticks, annot_kws={"fontsize": 8})
    sns.heatmap(row_normalize(cm), ax=ax_norm, annot=annot, fmt=".2f", cmap="Blues", vmin=0.0, vmax=1.0,
                square=True, cbar=True, xticklabels=ticks, yticklabels=ticks, annot_kws={"fontsize": 7})
    ax_raw.set(title="Counts", xlabel="predicted", ylabel="true")
    ax_norm.set(title="Row-normalised (recall)", xlabel="predicted", ylabel="true")
    for ax in (ax_raw, ax_norm):
        ax.tick_params(axis="x", labelrotation=90)
        ax.tick_params(axis="y", labelrotation=0)
    if title:
        fig.suptitle(title)
    _save_figure(fig, out_png)


def plot_mistakes(mistakes: list[dict], out_png: str, max_images: int = 25, columns: int = 5) -> None:
    """Grid of the first ``max_images`` mistakes (dicts with file, true, predicted, confidence).

    Pass them most confident first: those are the ones worth looking at (label noise, look-alike classes).
    """

    shown = mistakes[:max_images]
    if not shown:
        fig = Figure(figsize=(4, 1.5))
        fig.text(0.5, 0.5, "no mistakes", ha="center", va="center", fontsize=14)
        _save_figure(fig, out_png)
        return
    cols = min(columns, len(shown))
    rows = -(-len(shown) // cols)
    fig = Figure(figsize=(2.4 * cols, 2.75 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, m in zip(axes.flat, shown):
        try:
            im = load_pil_rgb(m["file"])  # the decoder training used: upright, 16-bit scaled
            im.thumbnail((256, 256))
            ax.imshow(im)
        except Exception:  # an image that vanished since evaluation still gets its caption
            pass
        ax.set_title(f"true: {m['true']}\npred: {m['predicted']} ({float(m['confidence']):.2f})", fontsize=8)
    fig.suptitle(f"Most confident mistakes ({len(shown)} of {len(mistakes)})")
    _save_figure(fig, out_png)


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float],
                 suggestion: float | None, min_loss_lr: float, out_png: str) -> None:
    """Loss against learning rate (log axis) of a ``train.py --lr-find`` sweep: raw loss faint, smoothed loss
    solid, the smoothed minimum and the suggested learning rate (when there is one) marked."""
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    ax.plot(lrs, losses, color="tab:blue", alpha=0.3, lw=1, label="loss per step")
    ax.plot(lrs, smoothed, color="tab:blue", lw=2, label="smoothed loss")
    ax.axvline(min_loss_lr, color="tab:grey", ls=":", label=f"smoothed minimum (lr {min_loss_lr:.2g})")
    if suggestion is not None:
        ax.axvline(suggestion, color="tab:red", ls="--", label=f"suggested lr {suggestion:.2g} (minimum / 10)")
    ax.set_xscale("log")
    lo, hi = min(smoothed), max(smoothed)  # the raw loss of the last, diverging steps would flatten the curve
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.25 * (hi - lo + 1e-9))
    ax.set(title="Learning-rate sweep", xlabel="learning rate", ylabel="training loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save_figure(fig, out_png)
