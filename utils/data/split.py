"""Split a raw folder of class sub-folders into train/val[/test], exactly, reproducibly and without leakage.

Rules (README "Data" explains them to users):
- A class is a top-level sub-folder of RAW. Images in nested sub-folders belong to that class and keep their
  relative path. Files directly in RAW, hidden files/folders (``.DS_Store``, ``._x``, ``.git``), files that are
  not images (by extension), empty files and images that do not fully decode are skipped, each with a reason.
- Every kept file lands in exactly one split. The order before shuffling is the content hash (sha256), so the
  split does not depend on file names, listing order or the machine; the shuffle is seeded per class.
- Byte-identical files inside one class move together (one unit). Identical bytes in several classes are a
  labelling conflict: every copy is kept in its class, all of them in train (never val/test), and reported.
- A class with too few distinct images for one image per requested split is kept entirely in train (warned).
- OUT is built in a temporary sibling folder and renamed at the end; RAW is only read.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import random
import shutil
import tempfile
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from tqdm import tqdm

from utils.data.folders import IMAGE_EXTENSIONS, describe_error, is_image_file, is_loop_link, open_image, walk_tree
from utils.data.shape import shape_line
from utils.errors import UserError
from utils.files import temp_folder

SPLITS = ("train", "val", "test")


@dataclass
class ImageFile:
    """One kept input file."""
    source: str        # path relative to RAW ("/"-separated)
    cls: str
    relpath: str       # path inside the class folder
    sha256: str
    mode: str          # PIL mode (RGB, L, P, RGBA, CMYK, ...)
    split: str = ""
    aspect: float = 1.0  # long side / short side


@dataclass
class SplitResult:
    """What ``split_dataset`` did: kept files (with their split), skipped files, notes and per-class counts."""
    files: list[ImageFile]
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (source, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)     # (source or class, note) for kept files
    classes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, Counter]:
        """``{class: Counter(split -> n)}``."""
        out: dict[str, Counter] = {c: Counter() for c in self.classes}
        for f in self.files:
            out[f.cls][f.split] += 1
        return out

    def table(self, splits: tuple[str, ...] = SPLITS) -> str:
        """Markdown per-class table of counts per split, with a total row."""
        counts = self.counts()
        width = max([5] + [len(c) for c in self.classes])
        lines = [f"| {'class':<{width}} | " + " | ".join(f"{s:>6}" for s in splits) + " |  total |",
                 f"|{'-' * (width + 2)}|" + "|".join("-" * 8 for _ in splits) + "|--------|"]
        tot = Counter()
        for c in self.classes:
            tot.update(counts[c])
            lines.append(f"| {c:<{width}} | " + " | ".join(f"{counts[c][s]:>6}" for s in splits)
                         + f" | {sum(counts[c].values()):>6} |")
        lines.append(f"| {'total':<{width}} | " + " | ".join(f"{tot[s]:>6}" for s in splits)
                     + f" | {sum(tot.values()):>6} |")
        return "\n".join(lines)


def _sort_key(path: str) -> str:
    # NFC so macOS (NFD) and Linux listings of the same names sort identically.
    return unicodedata.normalize("NFC", path)


def _check_image(data: bytes) -> tuple[str | None, str, float]:
    """(error or None, PIL mode, long side / short side). Fully decodes, so truncated files are caught."""
    try:
        with open_image(io.BytesIO(data)) as im:  # refuses an image over the pixel limit, as training does
            mode, (w, h) = im.mode, im.size
            if im.format == "JPEG":
                im.draft("RGB", (64, 64))  # DCT-domain downscale: much faster, still reads every byte
            im.load()
        return None, mode, max(w, h) / max(min(w, h), 1)
    except Exception as e:  # PIL raises many types for bad files; each becomes a reported reason
        return f"unreadable image ({describe_error(e)})", "", 1.0


def scan_folder(raw: str, progress: bool = False) -> SplitResult:
    """Find every class and every usable image under ``raw``; everything else is listed with a reason."""
    if not os.path.isdir(raw):
        raise UserError(f"{raw} is not a folder; pass the folder that holds one sub-folder per class")
    files: list[ImageFile] = []
    skipped: list[tuple[str, str]] = []
    notes: list[tuple[str, str]] = []
    entries = sorted(os.scandir(raw), key=lambda e: _sort_key(e.name))
    class_dirs = []
    for e in entries:
        if e.name.startswith("."):
            skipped.append((e.name, "hidden file or folder"))
        elif e.is_dir() and is_loop_link(e.path, raw):
            skipped.append((f"{e.name}/", f"link to {raw} itself or a folder above it (a loop): not read"))
        elif e.is_dir():
            class_dirs.append(e.name)
        else:
            skipped.append((e.name, "file outside any class folder"))
    todo: list[tuple[str, str, str]] = []  # (class, relpath in class, absolute path)
    for cls in class_dirs:
        base = os.path.join(raw, cls)
        for dirpath, dirnames, filenames in walk_tree(base):
            rel_dir = os.path.relpath(dirpath, base)
            rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            for d in sorted(dirnames):
                if d.startswith("."):
                    skipped.append((f"{cls}/{rel_dir}{d}/", "hidden folder (not read)"))
                elif is_loop_link(os.path.join(dirpath, d), base):
                    skipped.append((f"{cls}/{rel_dir}{d}/", "link to its class folder or a folder above it (a loop): "
                                                            "not read"))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames, key=_sort_key):
                rel = rel_dir + name
                src = f"{cls}/{rel}"
                if name.startswith("."):
                    skipped.append((src, "hidden file (e.g. .DS_Store or a macOS ._ resource fork)"))
                elif not is_image_file(name):
                    skipped.append((src, f"not an image file (extension '{os.path.splitext(name)[1]}'; "
                                         f"accepted: {' '.join(IMAGE_EXTENSIONS)})"))
                else:
                    todo.append((cls, rel, os.path.join(dirpath, name)))
    iterator = todo
    if progress:
        iterator = tqdm(todo, desc="checking images", unit="img")
    for cls, rel, path in iterator:
        src = f"{cls}/{rel}"
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            skipped.append((src, f"cannot read file ({e.strerror})"))
            continue
        if not data:
            skipped.append((src, "empty file (0 bytes)"))
            continue
        err, mode, aspect = _check_image(data)
        if err:
            skipped.append((src, err))
            continue
        if "/" in rel:
            notes.append((src, "in a nested sub-folder: kept in its top-level class, relative path kept"))
        if mode.startswith("I") or mode == "F":
            notes.append((src, f"colour mode {mode} (more than 8 bits per pixel): scaled to 8-bit greyscale when "
                               "loaded"))
        elif mode not in ("RGB", "L"):
            notes.append((src, f"colour mode {mode}: converted to RGB when loaded"))
        files.append(ImageFile(src, cls, rel, hashlib.sha256(data).hexdigest(), mode, aspect=aspect))
    classes = sorted({f.cls for f in files}, key=_sort_key)
    for cls in class_dirs:
        if cls not in classes:
            skipped.append((f"{cls}/", "class folder with no usable image (left out)"))
    return SplitResult(files, skipped, notes, classes)


def _split_counts(n: int, val: float, test: float) -> tuple[int, int, int] | None:
    """(train, val, test) unit counts for a class of n units, or None when it is too small to split."""
    want_val, want_test = val > 0, test > 0
    if n < 1 + want_val + want_test:
        return None
    n_val = max(int(want_val), int(n * val + 0.5)) if want_val else 0
    n_test = max(int(want_test), int(n * test + 0.5)) if want_test else 0
    if n - n_val - n_test < 1:
        return None
    return n - n_val - n_test, n_val, n_test


def assign_splits(result: SplitResult, val: float, test: float, seed: int) -> SplitResult:
    """Set ``split`` on every file (see module docstring); appends notes for duplicates and small classes."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise UserError(f"--val {val} and --test {test} must be fractions in [0, 1) with a sum below 1")
    classes_of_hash: dict[str, set[str]] = defaultdict(set)
    conflicted: dict[str, int] = defaultdict(int)  # class -> its files also filed under another class
    for f in result.files:
        classes_of_hash[f.sha256].add(f.cls)
    by_class: dict[str, dict[str, list[ImageFile]]] = defaultdict(lambda: defaultdict(list))
    for f in result.files:
        if len(classes_of_hash[f.sha256]) > 1:
            f.split = "train"
            conflicted[f.cls] += 1
            others = ", ".join(sorted(classes_of_hash[f.sha256] - {f.cls}, key=_sort_key))
            result.notes.append((f.source, f"identical bytes also in class(es) {others}: labelling conflict, "
                                           "kept in train only"))
        else:
            by_class[f.cls][f.sha256].append(f)
    for cls in result.classes:
        units = by_class.get(cls, {})
        for h, group in units.items():
            if len(group) > 1:
                names = ", ".join(sorted((g.source for g in group), key=_sort_key))
                result.notes.append((cls, f"{len(group)} byte-identical files kept together in one split: {names}"))
        hashes = sorted(units)  # content order: independent of names and listing order
        # str seeds are hashed with sha512 by random.seed: the same on every machine and Python run.
        random.Random(f"split:{seed}:{cls}").shuffle(hashes)
        counts = _split_counts(len(hashes), val, test)
        if counts is None:
            counts = (len(hashes), 0, 0)
            if val > 0 or test > 0:
                also = (f" besides {conflicted[cls]} also filed under another class (in train, see their notes)"
                        if conflicted[cls] else "")
                result.notes.append((cls, f"only {len(hashes)} distinct image(s){also}: too few to split, all kept "
                                          "in train"))
        n_train, n_val, _ = counts
        for i, h in enumerate(hashes):
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            for f in units[h]:
                f.split = split
    return result


def _place(src: str, dst: str, mode: str) -> str:
    """Copy/symlink/hardlink ``src`` to ``dst``; returns the mode used (hardlink falls back to copy)."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    if mode == "symlink":
        os.symlink(os.path.abspath(src), dst)
    elif mode == "hardlink":
        try:
            os.link(src, dst)
        except OSError:  # other filesystem, or links not allowed
            shutil.copy2(src, dst)
            return "copy"
    else:
        shutil.copy2(src, dst)
    return mode


def _inside(a: str, b: str) -> bool:
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def split_dataset(raw: str, out: str, *, val: float = 0.2, test: float = 0.0, seed: int = 0, mode: str = "copy",
                  overwrite: bool = False, progress: bool = False) -> SplitResult:
    """Split ``raw`` into ``out/{train,val[,test]}/<class>/...`` plus ``out/split.csv`` and ``out/report.csv``.

    ``out`` appears only when complete (built in a temporary sibling, then renamed). Returns the result.
    """
    if mode not in ("copy", "symlink", "hardlink"):
        raise UserError(f"--mode {mode!r}: choose copy, symlink or hardlink")
    raw, out = os.path.abspath(raw), os.path.abspath(out)
    if not os.path.isdir(raw):
        raise UserError(f"{raw} is not a folder; pass the folder that holds one sub-folder per class")
    if _inside(out, raw) or _inside(raw, out):
        raise UserError(f"output {out} and input {raw} overlap; choose an output folder outside the input")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"{out} exists and is a file; choose another output folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise UserError(f"{out} is not empty; pass --overwrite to replace it, or choose another output folder")
    result = assign_splits(scan_folder(raw, progress), val, test, seed)
    if len(result.classes) < 2:
        raise UserError(f"{raw}: found {len(result.classes)} class folder(s) with usable images; a classifier "
                        "needs at least 2 (one sub-folder of images per class)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = temp_folder(parent, f".{os.path.basename(out)}.tmp-")
    try:
        used = Counter()
        files = sorted(result.files, key=lambda f: (f.split, _sort_key(f.cls), _sort_key(f.relpath)))
        iterator = files
        if progress:
            iterator = tqdm(files, desc=f"{mode} -> {os.path.basename(out)}", unit="img")
        for f in iterator:
            used[_place(os.path.join(raw, f.source), os.path.join(tmp, f.split, f.cls, f.relpath), mode)] += 1
        if mode == "hardlink" and used["copy"]:
            result.notes.append(("(all)", f"hard links not possible for {used['copy']} file(s): copied instead"))
        for s in SPLITS:  # every class folder exists in every used split, so ImageFolder class lists match
            if s == "train" or (s == "val" and val > 0) or (s == "test" and test > 0):
                for c in result.classes:
                    os.makedirs(os.path.join(tmp, s, c), exist_ok=True)
        # surrogateescape: a file name that is not valid UTF-8 (old Latin-1 archives) is written back byte for byte
        with open(os.path.join(tmp, "split.csv"), "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "class", "split", "sha256", "source"])
            for f in files:
                w.writerow([f"{f.split}/{f.cls}/{f.relpath}", f.cls, f.split, f.sha256, f.source])
        with open(os.path.join(tmp, "report.csv"), "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
            w = csv.writer(fh)
            w.writerow(["item", "status", "reason"])
            for src, reason in result.skipped:
                w.writerow([src, "skipped", reason])
            for src, note in result.notes:
                w.writerow([src, "kept", note])
        if os.path.isdir(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rename(out, os.path.join(old, "x"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def format_report(result: SplitResult, max_lines: int = 50) -> str:
    """Human summary: per-class table, colour modes, then skipped files and notes (first ``max_lines`` each)."""
    used = [s for s in SPLITS if any(f.split == s for f in result.files)] or ["train"]
    lines = [result.table(tuple(used)), ""]
    modes = Counter(f.mode for f in result.files)
    lines.append("colour modes: " + ", ".join(f"{m} {n}" for m, n in sorted(modes.items()))
                 + " (all converted to RGB when loaded)")
    if result.files:
        lines.append(shape_line([f.aspect for f in result.files if f.split == "train"]
                                or [f.aspect for f in result.files]))
    for title, items in (("skipped", result.skipped), ("notes", result.notes)):
        lines.append(f"{title}: {len(items)}")
        for src, reason in items[:max_lines]:
            lines.append(f"  {src}: {reason}")
        if len(items) > max_lines:
            lines.append(f"  ... {len(items) - max_lines} more in report.csv")
    return "\n".join(lines)
