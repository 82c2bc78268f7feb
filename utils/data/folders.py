"""Image files and class folders without decoding them: which files are images, listing a folder tree and its
class sub-folders, opening one (Pillow's pixel limit raised for the user's own large photos), naming and counting
unreadable files. Imports no torch, so split_dataset.py starts in a fraction of a second."""
from __future__ import annotations

import io
import os
import re
import sys
import warnings
from typing import Any, Iterator, Sequence

from PIL import Image

from utils.errors import UserError

# torchvision ImageFolder's list plus .gif (scraped folders hold them; an animated one is read as its first frame)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


def is_image_file(path: str) -> bool:
    """True for a non-hidden file whose name has an image extension (case-insensitive): the one test every
    tool uses (training folders, evaluation, predict, export calibration, split_dataset)."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def class_folders(root: str) -> list[str]:
    """The class sub-folders of an ImageFolder split ``root``: non-hidden folders, sorted by name (as
    torchvision's ImageFolder sorts them)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def unreadable_line(path: str, error: str) -> str:
    """The one line every tool prints for a skipped file: ``skipped unreadable image PATH (Error: reason)``."""
    return f"skipped unreadable image {path} ({error.strip().splitlines()[0][:160] if error.strip() else 'error'})"


def report_unreadable(path: str, error: str) -> None:
    """Print :func:`unreadable_line` to stderr (one plain line: a warning would add its source line)."""
    print(f"warning: {unreadable_line(path, error)}", file=sys.stderr, flush=True)


def damaged_line(path: str, messages: Sequence[str]) -> str:
    """The one line for an image whose decoder warned but still gave pixels (a JPEG with corrupt data decodes with
    grey or smeared blocks): ``damaged image PATH decoded anyway (libjpeg: first warning[; N more])``."""
    more = f"; {len(messages) - 1} more" if len(messages) > 1 else ""
    return (f"damaged image {path} decoded anyway, it may show grey or smeared blocks "
            f"(libjpeg: {messages[0].strip()[:160]}{more}); re-save or delete it")


_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


# Pillow warns above 89 MP and refuses above 179 MP: a guard for services decoding untrusted uploads, which also
# turned a user's own 108 or 200 MP phone photo or a large line-scan image into an "unreadable" file. The files
# here are the user's own, so the limit is 1 gigapixel (3 GB as RGB); training decodes large JPEGs reduced anyway.
LARGEST_IMAGE_PIXELS = 1 << 30


class ImageTooLarge(OSError):
    """An image with more pixels than the limit (:func:`pixel_limit`): refused by every decoder alike, before its
    pixels are decoded (1.6 gigapixels took 18 GB to resize)."""


def pixel_limit() -> int | None:
    """Most pixels one image may have: :data:`LARGEST_IMAGE_PIXELS`, or Pillow's ``MAX_IMAGE_PIXELS`` when the
    user's own code set it higher (None: no limit). The first call in a process raises Pillow's limit to ours and
    silences its warning between the limit and twice the limit: :func:`check_pixels` refuses those images itself,
    with their size, so every decoder (PIL, libpng, libjpeg) skips the same files with the same line."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < LARGEST_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = LARGEST_IMAGE_PIXELS
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    return Image.MAX_IMAGE_PIXELS


def check_pixels(width: int, height: int) -> None:
    """Raise :class:`ImageTooLarge` for an image of ``width`` x ``height`` over :func:`pixel_limit`."""
    limit = pixel_limit()
    if limit is not None and width * height > limit:
        raise ImageTooLarge(f"{width}x{height} pixels ({_megapixels(width * height)}) is over the "
                            f"{_megapixels(limit)} limit for one image; downscale it")


def open_image(source: Any) -> Any:
    """``PIL.Image.open(source)`` (lazy: nothing is decoded yet) with the pixel limit of :func:`pixel_limit`:
    a larger image raises :class:`ImageTooLarge` (Pillow's own limit is 89 MP, a guard for services decoding
    hostile uploads that made a user's 200 MP phone photo "unreadable")."""
    limit = pixel_limit()
    try:
        img = Image.open(source)
    except Image.DecompressionBombError as e:  # over twice the limit: Pillow refuses it before we see its size
        pixels = _PILLOW_PIXELS.search(str(e))
        size = _megapixels(int(pixels.group(1))) if pixels else "its size"
        raise ImageTooLarge(f"{size} is over the {_megapixels(limit or 0)} limit for one image; "
                            "downscale it") from None
    try:
        check_pixels(*img.size)
    except ImageTooLarge:
        img.close()
        raise
    return img


def _megapixels(n: int) -> str:
    return f"{n / 1e6:,.0f} MP" if n >= 10 ** 7 else f"{n / 1e6:.3g} MP"


_PILLOW_PIXELS = re.compile(r"\((\d+) pixels\)")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_encoded_size(data: bytes) -> None:
    """Raise :class:`ImageTooLarge` when the encoded image in ``data`` declares more pixels than the limit, from
    its header alone (before a libpng/libjpeg decode that has no limit of its own). PNG: the IHDR fields (no
    Pillow call, the hot path of 70,000 small PNGs); other formats: Pillow's header parse. A file neither can
    read is left to the decoder, which says why."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        check_pixels(int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"))
        return
    try:
        open_image(io.BytesIO(data)).close()
    except ImageTooLarge:
        raise
    except Exception:  # not an image Pillow knows: the decoder reports it
        pass


def describe_error(e: BaseException) -> str:
    """``Type: message`` of a decoder error, as the skip lines and reports show it. PIL names an in-memory file
    by its address (``<_io.BytesIO object at 0x7f...>``), which changes every run: that becomes words."""
    return _BUFFER_REPR.sub("(not an image, or a format Pillow cannot read)", f"{type(e).__name__}: {e}").strip()


class SkippedFiles:
    """Unreadable files met by one or more passes over images: each is named in one line the first time it is
    met (:func:`report_unreadable`) and counted once, however often it comes round again."""

    def __init__(self, report: bool = True) -> None:
        self.errors: dict[str, str] = {}  # path -> error, in the order met
        self.report = report

    def add(self, failed: list[tuple[str, str]]) -> None:
        """Record ``[(path, error)]``; new files are reported."""
        for path, error in failed:
            if path not in self.errors:
                self.errors[path] = error
                if self.report:
                    report_unreadable(path, error)

    def merge(self, paths: "set[str] | list[str]", error: str) -> None:
        """Count files another pass has already reported (e.g. a DataBundle's), without naming them again."""
        for path in paths:
            self.errors.setdefault(path, error)

    def __len__(self) -> int:
        return len(self.errors)

    @property
    def paths(self) -> list[str]:
        return list(self.errors)

    def records(self) -> list[dict[str, str]]:
        """``[{"file", "error"}]`` for JSON reports."""
        return [{"file": p, "error": e} for p, e in self.errors.items()]


def is_loop_link(path: str, top: str) -> bool:
    """True when the folder ``path`` resolves to ``top`` itself or a folder above it: walking it would list
    ``top`` again (``Bag/up -> ..`` lists every class's images as Bags; ``RAW/all -> .`` makes a class of all)."""
    return _same_or_above(os.path.realpath(path), os.path.realpath(top))


def _same_or_above(real: str, top_real: str) -> bool:
    """Resolved paths: ``real`` is ``top_real`` or one of the folders above it."""
    return real == top_real or top_real.startswith(real.rstrip(os.sep) + os.sep)


def walk_tree(folder: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(folder)`` that follows symbolic links to folders, as torchvision's ImageFolder (train.py) does,
    so every tool lists the same files; a link back to a folder already walked, or to ``folder`` itself or a
    folder above it (a loop: ``Bag/up -> ..`` would list every other class's images as Bags), is not entered.
    The caller may prune ``dirnames`` in place, as with os.walk."""
    top = os.path.realpath(folder)
    seen = {top}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        yield dirpath, dirnames, filenames
        keep = []
        for d in dirnames:
            real = os.path.realpath(os.path.join(dirpath, d))
            if real not in seen and not _same_or_above(real, top):
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep


def images_under(folder: str) -> list[str]:
    """Every image file under ``folder`` (recursive, following folder links, hidden files and folders skipped),
    in sorted order."""
    found = []
    for dirpath, dirnames, filenames in walk_tree(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f)]
    return found


def scan_class_folders(root: str) -> tuple[dict[str, list[str]], list[str]]:
    """Read an ImageFolder split ``root/<class>/*``: ``({class: [image paths]}, [class folders without images])``.

    Classes are sorted by name (as torchvision's ImageFolder does); images anywhere under a class folder count.
    """
    if not os.path.isdir(root):
        raise UserError(f"data folder {root} not found; pass a split folder with one sub-folder per class "
                        "(e.g. DATA/val) or a split name of the run (train, val, test)")
    class_dirs = class_folders(root)
    per_class = {c: images_under(os.path.join(root, c)) for c in class_dirs}
    empty = [c for c, files in per_class.items() if not files]
    per_class = {c: files for c, files in per_class.items() if files}
    if not per_class:
        loose = [f for f in os.listdir(root) if is_image_file(f)]
        hint = (f" (it holds {len(loose)} loose images: evaluation needs them sorted into one sub-folder per class; "
                "use predict.py for unlabelled images)") if loose else ""
        raise UserError(f"no images found in {root}{hint}; expected {root}/<class name>/<image files>")
    return per_class, empty


def list_labelled_images(root: str, classes: Sequence[str]) -> list[tuple[str, int]]:
    """``root/<class>/*`` images with the checkpoint's class index, listed as :func:`scan_class_folders` lists them
    (a class folder without images is ignored, as evaluate.py ignores it); a folder of images whose class the model
    doesn't know is an error."""
    if not os.path.isdir(root):
        raise UserError(f"validation folder {root} not found; pass --val-data DIR with one sub-folder per class")
    per_class, _ = scan_class_folders(root)
    index = {c: i for i, c in enumerate(classes)}
    for name in per_class:
        if name not in index:
            raise UserError(f"{os.path.join(root, name)}: class '{name}' is not one of the checkpoint's classes "
                            f"({', '.join(classes)}); pass the validation folder of the data the model was trained on "
                            "(--val-data)")
    return [(p, index[name]) for name, files in per_class.items() for p in files]
