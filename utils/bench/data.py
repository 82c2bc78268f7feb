"""Input pipeline throughput: decoded + augmented train images/s, per pipeline variant.

Image sets: JPEG photos at --photo-size (224 px; default the 12 committed photos, or e.g. the 100 photos of
`pip download --no-deps ai-benchmark`) and Fashion-MNIST PNGs at --fmnist-size (32 px).
Variants: (1) v1-pil: PIL decode and torchvision.transforms v1 on the PIL image. (2) v2-pil: PIL decode,
transforms v2 crop and flip on the PIL image, then to tensor. (3) v2-tensor: PIL decode, to uint8 tensor,
transforms v2 on the tensor. (4) io-v2-tensor: torchvision.io decode_jpeg/decode_png on the file bytes
(utils.data.decode_rgb), transforms v2 on the tensor; the default of load_data(cache="none").
(5) memory: images decoded once into a uint8 tensor, batched augmentation (utils.data.augment_batch); the
default of load_data(cache="auto") for small same-sized sets such as Fashion-MNIST.
Per-image variants run in this process (workers=0) and in --workers DataLoader processes. All variants are
timed interleaved (round-robin) and reported as medians. Prints Markdown under the machine line; writes
OUT/data_bench.csv and .md (both name the machine).
"""
from __future__ import annotations

import argparse
import os
import warnings
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as V1

from utils.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    EpochBatchSampler,
    MemoryTrainLoader,
    build_train_transform,
    decode_rgb,
    load_pil_rgb,
    single_thread,
    to_rgb,
)
from utils.data.augment import _square, _stack_uniform
from utils.data.loaders import _decode_all
from utils.errors import UserError
from utils.files import REPO_ROOT, csv_text, write_text
from utils.machine import describe_machine
from utils.timing import interleaved_timings, median

ROOT = REPO_ROOT
RECIPE = {"scale": (0.08, 1.0), "hflip": 0.5}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``benchmark.py data``."""
    parser.add_argument("--photos", default=os.path.join(ROOT, "tests", "assets", "photos"),
                        help="folder of JPEG photos (searched recursively; default: the committed test photos)")
    parser.add_argument("--fmnist", default=None,
                        help="folder of Fashion-MNIST PNGs (default: datasets/fashion_mnist/split/train if present, "
                             "else the committed sample)")
    parser.add_argument("--photo-size", type=int, default=224, help="train crop size for the photos (default 224)")
    parser.add_argument("--fmnist-size", type=int, default=32, help="train crop size for Fashion-MNIST (default 32)")
    parser.add_argument("--images", type=int, default=64,
                        help="photos per timed call (default 64; Fashion-MNIST: 4x as many); the memory variant "
                             "iterates its train loader over them in batches of 128")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per variant (default 7)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for the '+workers' rows (default 2)")
    parser.add_argument("--out", default="runs/bench_data", help="folder for data_bench.csv/.md (default %(default)s)")


def _files(folder: str, exts: tuple[str, ...], limit: int) -> list[str]:
    found = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.lower().endswith(exts))
    if not found:
        raise UserError(f"no {'/'.join(exts)} files under {folder}; pass a folder of images")
    return [found[i % len(found)] for i in range(limit)]  # repeat small sets to fill a timed call


def v1_train_transform(img_size: int, *, mean, std, scale=(0.08, 1.0), hflip: float = 0.5, color_jitter: float = 0.0,
                       rotation: float = 0.0, auto_augment: str | None = None,
                       random_erasing: float = 0.0) -> Callable:
    """utils.data.build_train_transform's recipe with the legacy ``torchvision.transforms`` on PIL images: the
    baseline row of this benchmark (the library itself uses transforms v2)."""
    build_train_transform(img_size, mean=mean, std=std, scale=scale, auto_augment=auto_augment)  # same checks
    scale = tuple(float(s) for s in scale)
    ops: list = [V1.Lambda(to_rgb), V1.RandomResizedCrop(img_size, scale=scale, antialias=True)]
    if hflip > 0:
        ops.append(V1.RandomHorizontalFlip(hflip))
    if color_jitter > 0:
        ops.append(V1.ColorJitter(color_jitter, color_jitter, color_jitter))
    if rotation > 0:
        ops.append(V1.RandomRotation(rotation))
    if auto_augment == "trivial":
        ops.append(V1.TrivialAugmentWide())
    ops += [V1.PILToTensor(), V1.ConvertImageDtype(torch.float32), V1.Normalize(list(mean), list(std))]
    if random_erasing > 0:
        ops.append(V1.RandomErasing(random_erasing))
    return V1.Compose(ops)


class _Bench(Dataset):
    """files -> augmented tensors, with one of the per-image variants."""

    def __init__(self, files: list[str], variant: str, size: int):
        self.files, self.variant, self.load = files, variant, load_pil_rgb
        if variant == "v1-pil":
            self.tf = v1_train_transform(size, mean=IMAGENET_MEAN, std=IMAGENET_STD, **RECIPE)
        else:
            backend = {"v2-pil": "pil", "v2-tensor": "tensor", "io-v2-tensor": "tensor"}[variant]
            self.tf = build_train_transform(size, mean=IMAGENET_MEAN, std=IMAGENET_STD, backend=backend, **RECIPE)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.variant == "io-v2-tensor":
            img = decode_rgb(self.files[i])
        else:
            img = self.load(self.files[i])
        with single_thread():  # as the training path does (DataLoader workers already use one thread)
            return self.tf(img)


def _memory_fn(files: list[str], size: int, batch: int):
    """The memory path end to end (sampler, gather, batched augmentation) over images decoded once (not timed)."""
    decoded, _ = _decode_all([(f, 0) for f in files], "decode", False)
    stacked = _stack_uniform(decoded)
    if stacked is None:
        stacked = torch.stack([_square(t, max(size, int(size * 8 / 7))) for t in decoded])
    sampler = EpochBatchSampler(len(stacked), min(batch, len(stacked)), shuffle=True)
    loader = MemoryTrainLoader(stacked, torch.zeros(len(stacked), dtype=torch.int64), sampler, size,
                               AugmentConfig(**RECIPE), IMAGENET_MEAN, IMAGENET_STD, pin_memory=False)
    state = {"epoch": 0}

    def run() -> None:
        state["epoch"] += 1
        sampler.set_epoch(state["epoch"])
        for _ in loader:
            pass
    return run


def run(args: argparse.Namespace) -> None:
    """Time every variant on both image sets; print Markdown, write CSV + Markdown into ``args.out``."""

    fmnist = args.fmnist or next((p for p in (os.path.join(ROOT, "datasets", "fashion_mnist", "split", "train"),
                                              os.path.join(ROOT, "tests", "assets", "fashion_mnist_sample"))
                                  if os.path.isdir(p)))
    sets = {"photos-jpeg": (_files(args.photos, (".jpg", ".jpeg"), args.images), args.photo_size),
            "fmnist-png": (_files(fmnist, (".png",), args.images * 4), args.fmnist_size)}
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
    fns, meta, loaders = {}, {}, []
    for set_name, (files, size) in sets.items():
        n = len(files)
        for variant in ("v1-pil", "v2-pil", "v2-tensor", "io-v2-tensor"):
            ds = _Bench(files, variant, size)
            fns[(set_name, variant, 0)] = lambda ds=ds: [ds[i] for i in range(len(ds))]
            if args.workers > 0:
                dl = DataLoader(ds, batch_size=16, num_workers=args.workers, persistent_workers=True)
                loaders.append(dl)
                fns[(set_name, variant, args.workers)] = lambda dl=dl: [b for b in dl]
            meta[(set_name, variant, 0)] = meta[(set_name, variant, args.workers)] = n
        fns[(set_name, "memory", 0)] = _memory_fn(files, size, 128)
        meta[(set_name, "memory", 0)] = n
    times = interleaved_timings(fns, repeats=args.repeats, warmup=1)
    rows = []
    for key, ts in times.items():
        set_name, variant, workers = key
        ips = meta[key] / median(ts)
        rows.append({"images": set_name, "size": sets[set_name][1], "variant": variant, "workers": workers,
                     "images_per_s": round(ips, 1), "ms_per_image": round(1000 / ips, 3)})
    for set_name in sets:
        best = max((r for r in rows if r["images"] == set_name and r["workers"] == 0 and r["variant"] != "memory"),
                   key=lambda r: r["images_per_s"])
        for r in rows:
            if r["images"] == set_name:
                r["vs_v1_same_workers"] = round(r["images_per_s"] / next(
                    x["images_per_s"] for x in rows if x["images"] == set_name and x["variant"] == "v1-pil"
                    and x["workers"] == r["workers"]), 2)
        best["fastest_per_image_1proc"] = "yes"
    machine = describe_machine("cpu")  # the input pipeline runs on the CPU whatever trains
    for r in rows:
        r["machine"] = machine
    header = ["images", "size", "variant", "workers", "images_per_s", "ms_per_image", "vs_v1_same_workers"]
    md = [f"machine: {machine}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(r.get(h, "")) for h in header) + " |" for r in rows]
    text = "\n".join(md)
    print(text)
    print(f"(medians of {args.repeats} interleaved calls; {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} CPUs; memory = batched augmentation of images decoded once)")
    os.makedirs(args.out, exist_ok=True)
    header = header + ["machine"]
    write_text(os.path.join(args.out, "data_bench.csv"), csv_text(header, rows))
    write_text(os.path.join(args.out, "data_bench.md"), text + "\n")
    print(f"wrote {os.path.join(args.out, 'data_bench.csv')} and data_bench.md")
