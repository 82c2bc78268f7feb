"""Image files and class folders without decoding them: which files are images, listing a folder tree and its
class sub-folders, opening one (Pillow's pixel limit raised for the user's own large photos), naming and counting
unreadable files. Imports no torch, so split_dataset.py starts in a fraction of a second."""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Iterator, Sequence

from PIL import Image

from utils.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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


_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


# Pillow warns above 89 MP and refuses above 179 MP: a guard for services decoding untrusted uploads, which also
# turned a user's own 108 or 200 MP phone photo or a large line-scan image into an "unreadable" file. The files
# here are the user's own, so the limit is 1 gigapixel (3 GB as RGB); training decodes large JPEGs reduced anyway.
LARGEST_IMAGE_PIXELS = 1 << 30


def open_image(source: Any) -> Any:
    """``PIL.Image.open(source)`` (lazy: nothing is decoded yet) with Pillow's pixel limit raised to
    :data:`LARGEST_IMAGE_PIXELS` (set on first use in each process, DataLoader workers included; a higher limit
    or none, set by the user's own code, is kept). Above it Pillow warns; above twice it raises."""
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < LARGEST_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = LARGEST_IMAGE_PIXELS
    return Image.open(source)


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


def walk_tree(folder: str) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(folder)`` that follows symbolic links to folders, as torchvision's ImageFolder (train.py) does,
    so every tool lists the same files; a link back to a folder already walked (a loop) is not entered.
    The caller may prune ``dirnames`` in place, as with os.walk."""
    seen = {os.path.realpath(folder)}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        yield dirpath, dirnames, filenames
        keep = []
        for d in dirnames:
            real = os.path.realpath(os.path.join(dirpath, d))
            if real not in seen:
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
