"""Data pipeline: transforms, datasets and loaders. (Owned by the data issue; grows there.)"""
from __future__ import annotations

from typing import Any

from torchvision.transforms import v2 as T
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_eval_transform(preprocess: dict[str, Any]):
    """PIL image -> normalised float tensor (3, img_size, img_size), from a checkpoint's ``preprocess`` dict.

    Keys: ``img_size``, ``resize_size`` (shorter side before the center crop), ``mean``, ``std``.
    Greyscale/CMYK/RGBA/palette images become 3-channel RGB first.
    """
    return T.Compose([
        T.Lambda(lambda im: im.convert("RGB") if getattr(im, "mode", "RGB") != "RGB" else im),
        T.PILToTensor(),
        T.Resize(int(preprocess["resize_size"]), antialias=True),
        T.CenterCrop(int(preprocess["img_size"])),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(list(preprocess["mean"]), list(preprocess["std"])),
    ])
