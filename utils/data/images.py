"""Reading images: PIL and tensor decoders (RGB, upright, large training JPEGs at a reduced scale), the checked
ImageFolder of a split and the evaluation dataset that skips unreadable files. Which files are images, and the
skip lines and counts: utils/data/folders.py."""
from __future__ import annotations

import contextlib
import io
import math
import os
import signal
import sys
import tempfile
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torchvision.io
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2 as T

from utils.data.folders import (
    IMAGE_EXTENSIONS,
    check_encoded_size,
    class_folders,
    damaged_line,
    describe_error,
    images_under,
    is_image_file,
    open_image,
)
from utils.errors import UserError


def to_8bit(img: Image.Image) -> Image.Image:
    """A PIL image whose pixels are wider than 8 bits (16-bit greyscale PNG/TIFF ``I;16``, 32-bit ``I``, float
    ``F``) -> greyscale ``L`` scaled to 0-255; any other mode unchanged.

    PIL's own ``convert("L"/"RGB")`` clips these values at 255, so a 16-bit scan becomes all white. Scaling:
    ``I;16`` divides by 257 (65535 -> 255); ``I`` and ``F`` divide by 257 when a pixel exceeds 255 (16-bit data
    in a wider mode), multiply by 255 for ``F`` in 0..1, else keep the values.
    """
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        a = a / 257
    elif a.size and a.max() > 255:
        a = a / 257
    elif img.mode == "F" and a.size and a.max() <= 1.0:
        a = a * 255
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Any) -> Any:
    """PIL image in any mode (L, P, RGBA, CMYK, 16-bit I;16 ...) or uint8 CHW tensor -> 3-channel RGB of the
    same kind (wide greyscale scaled to 8 bits by :func:`to_8bit`, not clipped)."""
    if isinstance(img, torch.Tensor):
        if img.shape[-3] == 1:
            return img.expand(*img.shape[:-3], 3, *img.shape[-2:])
        return img[..., :3, :, :] if img.shape[-3] == 4 else img
    return to_8bit(img).convert("RGB") if img.mode != "RGB" else img


def worker_ignores_ctrl_c(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a terminal's Ctrl-C reaches the workers too, and a worker that ends on it
    leaves the loader without its next batch; the main process decides what Ctrl-C means (train.py finishes the
    step and saves) and shuts its workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run small tensor ops with one intra-op thread, then restore the previous thread count."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------- folders
def pil_from_bytes(data: bytes) -> Image.Image:
    """The fully decoded PIL image (any mode) in a file's bytes; raises on a corrupt or empty file."""
    if not data:
        raise OSError("empty file (0 bytes)")
    img = open_image(io.BytesIO(data))
    img.load()
    upright(img)
    return img


def upright(img: Image.Image) -> None:
    """Turn a photo upright in place by its EXIF orientation tag (a phone stores a portrait photo sideways plus
    the tag), so every tool sees it as a photo viewer shows it; a broken EXIF block leaves the pixels as stored."""
    try:
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # malformed EXIF: the pixels themselves are fine
        pass


def load_pil(path: str) -> Image.Image:
    """Open ``path`` fully decoded as a PIL image in its own mode (raises on corrupt or empty files)."""
    with open(path, "rb") as f:
        return pil_from_bytes(f.read())


def load_pil_rgb(path: str) -> Image.Image:
    """Open ``path`` fully decoded as an RGB PIL image (raises on corrupt or empty files)."""
    return to_rgb(load_pil(path))


_IO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_IO_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"


def decode_rgb(path: str, min_side: int | None = None) -> torch.Tensor:
    """Decode ``path`` to a uint8 RGB tensor (3, H, W); raises on corrupt files.

    JPEG/PNG/WebP go through torchvision.io (libjpeg-turbo/libpng/libwebp on the bytes: the fastest decoder
    here, see README; pixels identical to PIL's RGB conversion for grey, palette, RGBA and CMYK files; EXIF
    orientation applied, as :func:`upright` does for PIL);
    anything else (BMP, TIFF, 16-bit PNG, ...) or anything it rejects goes through PIL.

    ``min_side`` (training only): a JPEG at least twice that size on its shorter side is decoded at 1/2, 1/4 or
    1/8 scale in the DCT domain (libjpeg's scaled decode), as small as keeps the shorter side >= ``min_side``.
    A 12 MP phone photo then costs a fraction of a full decode; other files decode in full.
    """
    with open(path, "rb") as f:
        data = f.read()
    if min_side and data[:3] == b"\xff\xd8\xff":
        reduced = _decode_jpeg_reduced(data, min_side)
        if reduced is not None:
            return reduced
    if path.lower().endswith(_IO_EXTENSIONS) and data:
        check_encoded_size(data)  # libjpeg/libpng have no pixel limit of their own
        try:
            with warnings.catch_warnings(), _c_stderr_captured(data[:3] == b"\xff\xd8\xff") as printed:
                # torchvision 0.29 marks these decoders deprecated, once per call
                warnings.filterwarnings("ignore", message=_IO_DEPRECATION, category=DeprecationWarning)
                t = torchvision.io.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                                mode=torchvision.io.ImageReadMode.RGB, apply_exif_orientation=True)
            _name_damaged(path, printed)
            if t.dtype == torch.uint8 and t.ndim == 3:  # an animated GIF/WebP under a .jpg name: (frames, 3, H, W)
                return t                                # -> PIL below, which takes the first frame as every path does
        except (RuntimeError, AttributeError):  # corrupt (PIL then says why) or a torchvision without image.io
            pass
    return T.functional.pil_to_tensor(to_rgb(pil_from_bytes(data)))


@contextlib.contextmanager
def _c_stderr_captured(active: bool) -> Iterator[list[str]]:
    """Lines C code prints on file descriptor 2 inside the block, collected instead of shown (when ``active``).

    libjpeg prints a JPEG's corrupt-data warnings there itself ("Corrupt JPEG data: 42 extraneous bytes before
    marker 0xd9"), with no file name, at every decode: once per epoch per damaged file. Only for callers that
    decode in one thread (DataLoader workers, or the main process with workers=0): the descriptor is the
    process's, so another thread's output in that window would be taken for libjpeg's.
    """
    printed: list[str] = []
    if not active:
        yield printed
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable descriptor 2 (a service, a notebook kernel): leave it alone
        yield printed
        return
    tmp = _capture_file()
    os.dup2(tmp.fileno(), 2)
    try:
        yield printed
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        if tmp.tell():
            tmp.seek(0)
            printed += [line for line in tmp.read().decode(errors="replace").splitlines() if line.strip()]
            tmp.seek(0)
            tmp.truncate()


_CAPTURE: dict[int, Any] = {}  # process id -> its capture file (a forked worker must not share its parent's)
_DAMAGED_NAMED: set[str] = set()  # files already named by this process: one line per file, not one per epoch


def _capture_file() -> Any:
    """This process's unnamed temporary file for :func:`_c_stderr_captured` (one per process: 70 us saved per
    decode against a new file each time)."""
    pid = os.getpid()
    if pid not in _CAPTURE:
        _CAPTURE.clear()
        _CAPTURE[pid] = tempfile.TemporaryFile()
    return _CAPTURE[pid]


def _name_damaged(path: str, printed: list[str]) -> None:
    """Name a damaged JPEG in one line (once per process), instead of libjpeg's own lines without a file name."""
    if printed and path not in _DAMAGED_NAMED:
        _DAMAGED_NAMED.add(path)
        print(f"warning: {damaged_line(path, printed)}", file=sys.stderr, flush=True)


def _decode_jpeg_reduced(data: bytes, min_side: int) -> torch.Tensor | None:
    """The JPEG in ``data`` decoded at the smallest DCT scale whose shorter side is still >= ``min_side``; None
    when the file is under twice that (no smaller scale exists) or PIL cannot read it (the full decoder decides)."""
    try:
        img = open_image(io.BytesIO(data))
        if min(img.size) < 2 * min_side:
            return None
        img.draft("RGB", (min_side, min_side))  # picks the scale: both sides stay >= min_side
        img.load()
    except Exception:  # corrupt: the full decoder raises with its own message
        return None
    upright(img)
    return T.functional.pil_to_tensor(to_rgb(img))


def train_decode_side(img_size: int, scale_min: float) -> int:
    """Shorter side a training image needs so that every RandomResizedCrop (area >= ``scale_min`` of the image,
    aspect 3/4..4/3, torchvision's default) still covers >= ``img_size`` pixels on its shorter side: decoding a
    larger photo at that size loses nothing the crop would keep after it is resized to ``img_size``."""
    return math.ceil(img_size / math.sqrt(scale_min * 3 / 4))


class ImageFolderRGB(ImageFolder):
    """torchvision ImageFolder that ignores hidden folders/files (``.DS_Store``, ``._x``, ``.ipynb_checkpoints``)
    and returns RGB images whatever their mode."""

    def __init__(self, root: str, transform: Callable | None = None):
        super().__init__(root, transform=transform, loader=load_pil_rgb, is_valid_file=is_image_file,
                         allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = class_folders(directory)
        return classes, {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(directory: str, class_to_idx: dict[str, int], extensions: Any = None,
                     is_valid_file: Any = None, allow_empty: bool = False) -> list[tuple[str, int]]:
        # The listing evaluate/predict/export use (images_under), so training sees exactly the files they see:
        # hidden sub-folders (.ipynb_checkpoints) skipped, folder links followed once.
        return [(p, i) for c, i in sorted(class_to_idx.items()) for p in images_under(os.path.join(directory, c))]


def load_image_folder(root: str, min_classes: int = 2) -> ImageFolderRGB:
    """The ImageFolder at ``root`` (``root/<class>/**/*.jpg``), checked: UserError if it is missing, has no
    class sub-folders, no images, or fewer than ``min_classes`` classes (a val split may hold just one)."""
    fix = "it must hold one sub-folder of images per class (make one with split_dataset.py)"
    if not os.path.exists(root):
        raise UserError(f"{root} does not exist; {fix}")
    if not os.path.isdir(root):
        raise UserError(f"{root} is a file, not a folder; {fix}")
    if not any(e.is_dir() and not e.name.startswith(".") for e in os.scandir(root)):
        raise UserError(f"{root} has no class sub-folders; {fix}")
    ds = ImageFolderRGB(root)
    if not ds.samples:
        raise UserError(f"{root} has class folders ({', '.join(ds.classes[:5])}...) but no images with "
                        f"extensions {' '.join(IMAGE_EXTENSIONS)}; {fix}")
    if len(ds.classes) < min_classes:
        raise UserError(f"{root} has {len(ds.classes)} class folder ({ds.classes[0]}); a classifier needs at "
                        "least 2 classes")
    return ds


class ImageFiles(Dataset):
    """Images by path, for evaluation (no augmentation); an unreadable file yields ``None`` and its error instead
    of stopping the run. ``decode``: path -> image for ``transform`` (default: the PIL image, what evaluate.py,
    predict.py and export.py use; train.py's validation passes :func:`decode_rgb`, the training decoder)."""

    def __init__(self, paths: Sequence[str], transform, decode: Callable[[str], Any] | None = None) -> None:
        self.paths = list(paths)
        self.transform = transform
        self.decode = decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str | None]:
        try:
            if self.decode is not None:
                img = self.decode(self.paths[i])
                with single_thread():  # per-image ops are small (workers already run with one thread)
                    return self.transform(img), i, None
            return self.transform(load_pil(self.paths[i])), i, None
        except Exception as e:  # any decode failure: report it and carry on with the other images
            return None, i, describe_error(e)


def collate_readable(batch: list[tuple[torch.Tensor | None, int, str | None]]):
    """Stack the readable images; return ``(x or None, indices of x, [(index, error)])``."""
    ok = [(x, i) for x, i, err in batch if err is None]
    failed = [(i, err) for x, i, err in batch if err is not None]
    x = torch.stack([t for t, _ in ok]) if ok else None
    return x, torch.tensor([i for _, i in ok], dtype=torch.long), failed


