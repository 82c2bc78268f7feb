"""Per-epoch CSV log of a run (RUN/log.csv) that survives resumes, plus the console summary line."""
from __future__ import annotations

import csv
import io
import os
from typing import Any

from utils.files import write_text

COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_top1", "val_top5", "val_bal_acc", "val_macro_f1",
           "epoch_seconds", "images_per_s",
           "skipped_images"]  # skipped_images: unreadable images skipped so far in this run
# val_bal_acc: balanced accuracy (mean per-class recall, percent); val_macro_f1: macro-F1 (0-1); both over the val
# classes that have images (utils.metrics.class_summary, as evaluate.py)


class CSVLogger:
    """One row per epoch. The whole file is rewritten atomically on each row (it is tiny), so a crash
    never leaves a half-written line; on resume, rows of epochs after the checkpoint are dropped so the
    log matches an uninterrupted run.
    """

    def __init__(self, path: str, keep_epochs_upto: int = 0) -> None:
        self.path = path
        self.rows: list[dict[str, str]] = []
        if keep_epochs_upto > 0 and os.path.isfile(path):
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= keep_epochs_upto]
        self._write()

    def log(self, row: dict[str, Any]) -> None:
        """Append one epoch's row (keys = :data:`COLUMNS`)."""
        self.rows.append({k: _fmt(row.get(k, 0 if k == "skipped_images" else "")) for k in COLUMNS})
        self._write()

    def _write(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", restval="", extrasaction="ignore")
        w.writeheader()
        w.writerows(self.rows)
        write_text(self.path, buf.getvalue())


def plural_s(n: int) -> str:
    """The plural ending of a count's noun: "1 step", "2 steps"."""
    return "" if n == 1 else "s"


def seconds_text(seconds: float) -> str:
    """A duration for a log line: "0.6 s" below 10 s (a tiny folder's epochs), else whole seconds ("48 s")."""
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def rate_text(per_second: float) -> str:
    """A rate for a log line: "0.3" below 10 (one large photo), else whole numbers ("2208")."""
    return f"{per_second:.1f}" if per_second < 9.95 else f"{per_second:.0f}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def summary_line(row: dict[str, Any], epochs: int) -> str:
    """``epoch 3/10  lr 0.0812  train loss 0.412 acc 85.1%  val loss 0.351 top1 87.9% top5 99.6% bal-acc 86.0%
    macro-F1 0.857  41.2s 1456 img/s``."""
    return (f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.4g}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.2f}%  val loss {row['val_loss']:.4f} top1 {row['val_top1']:.2f}% "
            f"top5 {row['val_top5']:.2f}% bal-acc {row['val_bal_acc']:.2f}% macro-F1 {row['val_macro_f1']:.3f}  "
            f"{row['epoch_seconds']:.1f}s {row['images_per_s']:.0f} img/s")
