#!/usr/bin/env python
"""Turn Fashion-MNIST (70,000 real 28x28 greyscale photos of clothes, 10 classes) into class folders of PNGs.

Reads the Debian package files in /usr/share/datasets/fashion-mnist (``apt-get install dataset-fashion-mnist``);
when they are missing it falls back to torchvision's download (needs internet). Output:
``OUT/<class>/{train,test}_<index>.png`` (index = position in the original IDX file), 7,000 per class.
The folder is written to a temporary sibling and renamed when complete; a complete folder is left untouched.
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torchvision.datasets
from PIL import Image
from tqdm import tqdm

from utils.data.split import split_dataset
from utils.errors import UserError, run_main
from utils.files import REPO_ROOT, temp_folder

ROOT = Path(REPO_ROOT)

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
# Official names with "/" and " " replaced so every name is a safe folder name on any OS.
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
PARTS = {"train": 60000, "test": 10000}
TOTAL = 70000
DEFAULT_ROOT = ROOT / "datasets" / "fashion_mnist"
DEFAULT_VAL = 1 / 7  # 10,000 val images: the size of the official test set, 1,000 per class


def _read_idx(path: str, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def _load_debian(src: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    parts = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(os.path.join(src, f"{prefix}-images-idx3-ubyte.gz"), 16).reshape(-1, 28, 28)
        labels = _read_idx(os.path.join(src, f"{prefix}-labels-idx1-ubyte.gz"), 8)
        if len(images) != PARTS[part] or len(labels) != PARTS[part]:
            raise UserError(f"{src}: {prefix} files hold {len(images)} images / {len(labels)} labels, expected "
                            f"{PARTS[part]}; reinstall the Debian package dataset-fashion-mnist")
        parts[part] = (images, labels)
    return parts


def _load_torchvision(cache: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    parts = {}
    try:
        for part in PARTS:
            ds = torchvision.datasets.FashionMNIST(cache, train=(part == "train"), download=True)
            parts[part] = (ds.data.numpy(), ds.targets.numpy().astype(np.uint8))
    except Exception as e:  # offline, proxy, checksum: all mean the same thing to the user
        raise UserError(f"Fashion-MNIST not found in {DEBIAN_DIR} and the torchvision download failed ({e}); "
                        "install it with `apt-get install dataset-fashion-mnist` or run once with internet access"
                        ) from None
    return parts


def load_arrays(src: str = DEBIAN_DIR) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images uint8 (60000,28,28), labels), "test": (...)}`` from the Debian files or torchvision."""
    if all(os.path.isfile(os.path.join(src, f"{p}-{k}-ubyte.gz"))
           for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")):
        return _load_debian(src)
    print(f"{src} not found: downloading with torchvision", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="fashion_mnist_dl_") as cache:
        return _load_torchvision(cache)


def is_complete(out: str) -> bool:
    """True when ``out`` holds the 10 class folders with 7,000 PNGs each."""
    try:
        return all(sum(1 for e in os.scandir(os.path.join(out, c)) if e.name.endswith(".png")) == TOTAL // 10
                   for c in CLASSES)
    except OSError:
        return False


def prepare_fashion_mnist(out: str = str(DEFAULT_ROOT / "raw"), src: str = DEBIAN_DIR, progress: bool = True) -> str:
    """Write ``out/<class>/*.png`` (70,000 files) unless already complete; returns ``out``."""

    out = os.path.abspath(out)
    if is_complete(out):
        return out
    if os.path.exists(out) and os.listdir(out):
        raise UserError(f"{out} exists but is not a complete Fashion-MNIST folder; delete it and run again")
    parts = load_arrays(src)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = temp_folder(parent, f".{os.path.basename(out)}.tmp-")
    try:
        for c in CLASSES:
            os.mkdir(os.path.join(tmp, c))
        with tqdm(total=TOTAL, desc="fashion-mnist -> png", unit="img", disable=not progress) as bar:
            for part, (images, labels) in parts.items():
                for i, (img, label) in enumerate(zip(images, labels)):
                    Image.fromarray(img, mode="L").save(os.path.join(tmp, CLASSES[label], f"{part}_{i:05d}.png"))
                    bar.update()
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_default_dataset(root: str = "datasets/fashion_mnist", progress: bool = True) -> str:
    """Make sure ``root/split/{train,val}`` exists (prepare ``root/raw`` first if needed); returns the split folder.

    A relative ``root`` is taken relative to the repository, so ``python train.py`` works from any directory.
    Split: val = 1/7 (1,000 of each class's 7,000), seed 0, hard links (fall back to copies).
    """

    root_path = Path(root) if os.path.isabs(root) else ROOT / root
    split_dir = root_path / "split"
    if (split_dir / "split.csv").is_file() and (split_dir / "train").is_dir() and (split_dir / "val").is_dir():
        return str(split_dir)
    raw = prepare_fashion_mnist(str(root_path / "raw"), progress=progress)
    split_dataset(raw, str(split_dir), val=DEFAULT_VAL, test=0.0, seed=0, mode="hardlink", overwrite=True,
                  progress=progress)
    return str(split_dir)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_ROOT / "raw"),
                        help="output folder of class sub-folders (default: %(default)s)")
    parser.add_argument("--src", default=DEBIAN_DIR,
                        help="folder with the four *-ubyte.gz files (default: %(default)s)")
    parser.add_argument("--split", action="store_true",
                        help="also create the default train/val split next to --out (../split, val 1/7, seed 0)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    out = prepare_fashion_mnist(args.out, args.src)
    print(f"{out}: {TOTAL} images in {len(CLASSES)} class folders")
    if args.split:
        print(ensure_default_dataset(str(Path(out).parent)))


if __name__ == "__main__":
    run_main(main)
