"""The automatic ``resize_mode`` of train.py: crop or squash, decided from the shape of the training images.

A square center crop keeps ``1 / aspect`` of an image (aspect = long side / short side): 75% of a 4:3 photo, the
ImageNet convention the pretrained weights were trained with, but half of a 2:1 crop of a traffic light, whose
class sits at one end. Past ``SQUASH_ASPECT`` the whole image is resized to a square instead (measured on real
2:1 photo crops: docs/finetune.md, "Tall images")."""
from __future__ import annotations

import statistics
from typing import Any, Sequence

from utils.data.folders import open_image

SQUASH_ASPECT = 1.5  # median long/short side above which a center crop would drop over a third of the image
SAMPLE = 1000  # images whose header is read (evenly spaced over the sorted list, so every class is seen)


def median_aspect(paths: Sequence[str], limit: int = SAMPLE) -> tuple[float | None, int]:
    """Median of long side / short side over up to ``limit`` of ``paths`` (headers only, nothing decoded) and
    the number of images read; unreadable files are passed over (the loaders skip and count them)."""
    if len(paths) > limit:
        paths = [paths[round(i * (len(paths) - 1) / (limit - 1))] for i in range(limit)]
    ratios = []
    for path in paths:
        try:
            with open_image(path) as im:
                w, h = im.size
        except Exception:
            continue
        if min(w, h) > 0:
            ratios.append(max(w, h) / min(w, h))
    return (statistics.median(ratios) if ratios else None), len(ratios)


def choose_resize_mode(paths: Sequence[str]) -> dict[str, Any]:
    """``{"resize_mode": "crop" | "squash", "median_aspect", "images_read", "squash_above"}`` for training
    images ``paths``: squash when the median image is more than ``SQUASH_ASPECT`` times as long as wide."""
    aspect, n = median_aspect(paths)
    mode = "squash" if aspect is not None and aspect > SQUASH_ASPECT else "crop"
    return {"resize_mode": mode, "median_aspect": None if aspect is None else round(aspect, 3), "images_read": n,
            "squash_above": SQUASH_ASPECT}


def resize_mode_line(decision: dict[str, Any]) -> str:
    """The one line train.py prints about the decision."""
    aspect = decision["median_aspect"]
    shape = "no readable image" if aspect is None else \
        f"median training image {aspect:.2f}:1 ({decision['images_read']} read)"
    if decision["resize_mode"] == "squash":
        return (f"resize_mode auto -> squash: {shape}, a square center crop would keep {100 / aspect:.0f}% of it; "
                "each image is resized whole to a square (--set resize_mode=crop to crop instead)")
    return f"resize_mode auto -> crop: {shape}, at most {decision['squash_above']:g}:1 (center / random square crops)"


def shape_line(aspects: Sequence[float]) -> str:
    """split_dataset.py's line about the images' shape and what train.py's resize_mode auto will make of it."""
    aspect = round(statistics.median(aspects), 3)  # as choose_resize_mode records it: both lines say the same
    if aspect > SQUASH_ASPECT:
        return (f"image shape: median {aspect:.2f}:1 (long / short side): train.py (resize_mode auto) will resize each "
                f"image whole to a square rather than crop its middle {100 / aspect:.0f}%")
    return f"image shape: median {aspect:.2f}:1 (long / short side): train.py (resize_mode auto) will use square crops"
