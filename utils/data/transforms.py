"""Named preprocessing: the evaluation transform (from a checkpoint's preprocess spec) and the per-image
train transform of the disk path."""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torchvision.transforms import v2 as T

from utils.data.images import to_rgb
from utils.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Longest side / shorter side an image keeps before its shorter side is resized: a 1 x 20,000 px strip would
# otherwise become 256 x 5,120,000 px (3.9 GB) on its way to a 224 px center crop. No photo or panorama comes
# near 16:1, so every real image is resized exactly as torchvision does.
MAX_ASPECT = 16
# How an image becomes square before the network sees it (a checkpoint's preprocess "resize_mode"):
# "crop" keeps the aspect ratio and crops (center at evaluation, random at training: ImageNet's way);
# "squash" resizes the whole image to a square, changing its aspect ratio (timm's crop_mode "squash", Keras'
# default), so a tall or wide object keeps both ends. train.py's "auto" picks one from the training images
# (utils/data/shape.py).
RESIZE_MODES = ("crop", "squash")


def resize_shorter(t: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 image tensor (..., C, H, W) with its shorter side resized to ``size`` (antialiased), as
    ``T.Resize(size)``; a side longer than ``MAX_ASPECT`` x the shorter one is first cut to that, centred
    (the center crop after the resize keeps only the middle anyway)."""
    h, w = t.shape[-2:]
    short = min(h, w)
    if max(h, w) > MAX_ASPECT * short:
        t = T.functional.center_crop(t, [min(h, MAX_ASPECT * short), min(w, MAX_ASPECT * short)])
    return T.functional.resize(t, size, antialias=True)


def resize_square(t: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 image tensor (..., C, H, W) resized (antialiased) to ``size`` x ``size``: the whole image, its aspect
    ratio changed (``resize_mode="squash"``)."""
    return T.functional.resize(t, [size, size], antialias=True)


def squash_side(h: int, w: int, keep: int) -> int:
    """Side of the square a training image is squashed to before its random crop: the shorter side, or the
    longer one up to ``keep`` px, so a small image loses no pixel along its long side and a large one is not
    blown up to its long side on every step."""
    return max(min(h, w), min(max(h, w), keep))


def squash_for_training(t: torch.Tensor, keep: int) -> torch.Tensor:
    """Train path of ``resize_mode="squash"``: ``t`` (..., C, H, W) squashed to a square (:func:`squash_side`)."""
    h, w = t.shape[-2:]
    return t if h == w else resize_square(t, squash_side(h, w, keep))


def resize_mode_of(preprocess: dict[str, Any]) -> str:
    """A preprocess dict's ``resize_mode`` ("crop" for files written before it existed)."""
    mode = preprocess.get("resize_mode", "crop")
    if mode not in RESIZE_MODES:
        raise UserError(f"preprocess resize_mode {mode!r}: use one of {', '.join(RESIZE_MODES)}")
    return mode


# --------------------------------------------------------------------------------------------- transforms
def build_eval_transform(preprocess: dict[str, Any]) -> Callable:
    """PIL image -> normalised float tensor (3, img_size, img_size), from a checkpoint's ``preprocess`` dict.

    Keys: ``img_size``, ``resize_size`` (shorter side before the center crop; with ``resize_mode`` "squash" both
    sides), ``mean``, ``std``, optional ``resize_mode`` (default "crop"). Greyscale/CMYK/RGBA/palette images
    become 3-channel RGB first.
    """
    resize = resize_square if resize_mode_of(preprocess) == "squash" else resize_shorter
    return T.Compose([
        T.Lambda(to_rgb),
        T.PILToTensor(),
        T.Lambda(functools.partial(resize, size=int(preprocess["resize_size"]))),  # picklable: spawn workers
        T.CenterCrop(int(preprocess["img_size"])),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(list(preprocess["mean"]), list(preprocess["std"])),
    ])


def _pil_to_uint8(img: Any) -> torch.Tensor:
    return img if isinstance(img, torch.Tensor) else T.functional.pil_to_tensor(img)


def build_train_transform(img_size: int, *, mean, std, scale=(0.08, 1.0), hflip: float = 0.5,
                          color_jitter: float = 0.0, rotation: float = 0.0, auto_augment: str | None = None,
                          random_erasing: float = 0.0, backend: str = "tensor", resize_mode: str = "crop",
                          squash_keep: int = 0) -> Callable:
    """Train augmentation: image -> float tensor (3, img_size, img_size), normalised with ``mean``/``std``.

    (``resize_mode="squash"``: the image first squashed to a square, :func:`squash_for_training` with
    ``squash_keep``, default ``img_size``) -> RandomResizedCrop(``scale``) -> horizontal flip (prob ``hflip``) -> ColorJitter(brightness, contrast and
    saturation = ``color_jitter``) -> RandomRotation(+-``rotation`` degrees) -> TrivialAugmentWide
    (``auto_augment="trivial"``) -> normalise -> RandomErasing (prob ``random_erasing``).
    ``backend="tensor"`` (default; with decode_rgb the fastest here, see README) takes a PIL image or a uint8
    CHW tensor and works on the tensor; ``"pil"`` crops/resizes the PIL image, then converts;
    Randomness comes from torch's global generator (seed it per image for reproducible runs).
    """
    if auto_augment not in (None, "trivial"):
        raise UserError(f"auto_augment={auto_augment!r}: use null/None or 'trivial'")
    scale = tuple(float(s) for s in scale)
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise UserError(f"scale={scale}: use two fractions 0 < min <= max <= 1, e.g. [0.08, 1.0]")
    if backend not in ("pil", "tensor"):
        raise ValueError(f"backend {backend!r}")
    if resize_mode not in RESIZE_MODES:
        raise UserError(f"resize_mode={resize_mode!r}: use one of {', '.join(RESIZE_MODES)}")
    ops = [T.Lambda(to_rgb)]
    if backend == "tensor" or resize_mode == "squash":
        ops.append(T.Lambda(_pil_to_uint8))
    if resize_mode == "squash":
        ops.append(T.Lambda(functools.partial(squash_for_training, keep=squash_keep or img_size)))
    ops.append(T.RandomResizedCrop(img_size, scale=scale, antialias=True))
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    if color_jitter > 0:
        ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    if rotation > 0:
        ops.append(T.RandomRotation(rotation))
    if auto_augment == "trivial":
        ops.append(T.TrivialAugmentWide())
    if backend == "pil" and resize_mode != "squash":
        ops.append(T.Lambda(_pil_to_uint8))
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    if random_erasing > 0:
        ops.append(T.RandomErasing(random_erasing))
    return T.Compose(ops)
