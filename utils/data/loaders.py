"""Data pipeline: transforms, image folders, reproducible samplers and the train/val loaders.

Reproducibility contract: the batches of epoch ``e`` (which images, in which order, and every random
augmentation) are a pure function of ``(seed, e)``. Order comes from ``torch.randperm`` seeded with
``seed + e`` and cut DistributedSampler-style (rank ``r`` of ``R`` takes every R-th image of each global batch),
so the union of R ranks' step-i batches equals the one-process step-i batch at R times the batch size. Every
image's augmentation is seeded from ``(seed, e, image index)``, so neither ``workers`` nor resuming changes it.

Two paths:
- ``cache="memory"``: every image is decoded once into a uint8 tensor in RAM; train augmentation (random
  resized crop, flip, rotation as one affine ``grid_sample``; colour jitter and random erasing vectorised) runs
  batched on tensors. The Fashion-MNIST fast path.
- ``cache="none"``: images are decoded per step by DataLoader workers (torchvision.io decoders, PIL for other
  formats, then transforms v2 on uint8 tensors); a corrupt file is skipped with a warning and counted
  (``DataBundle.skipped``).
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterator

import numpy as np
import torch
import torchvision.io
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T
from tqdm import tqdm

from utils.data.augment import AugmentConfig, _augment_batch, _square, _stack_uniform
from utils.data.folders import SkippedFiles, check_encoded_size, describe_error, open_image, unreadable_line
from utils.data.images import (
    _IO_DEPRECATION,
    ImageFiles,
    ImageFolderRGB,
    decode_rgb,
    load_image_folder,
    pil_from_bytes,
    single_thread,
    to_8bit,
    to_rgb,
    train_decode_side,
    worker_ignores_ctrl_c,
)
from utils.data.samplers import EpochBatchSampler
from utils.data.transforms import (
    RESIZE_MODES,
    build_eval_transform,
    build_train_transform,
    resize_shorter,
    resize_square,
    squash_for_training,
)
from utils.errors import UserError

MEMORY_BUDGET = 2 * 1024 ** 3  # "auto" caches in RAM when the decoded train+val images fit in this


# --------------------------------------------------------------------------------------------- disk path
class _TrainFiles(Dataset):
    """(index, seed) -> (augmented tensor, label), or (None, path) when the file cannot be decoded."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable, min_side: int | None = None):
        self.samples, self.transform, self.min_side = samples, transform, min_side  # min_side: decode_rgb's

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        path, label = self.samples[index]
        try:
            img = decode_rgb(path, self.min_side)
        except Exception as e:  # any decoder error: skip this image, the loader counts it
            return None, (path, describe_error(e))
        state = torch.get_rng_state()  # keep the caller's RNG untouched when workers=0
        # The CPU generator only (torch.manual_seed would also reseed every CUDA device, per image).
        torch.random.default_generator.manual_seed(seed & 0x7FFFFFFFFFFFFFFF)
        try:
            with single_thread():  # per-image ops are small (workers already run with one thread)
                return self.transform(img), label
        finally:
            torch.set_rng_state(state)


def _collate_skipping(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Stack the decoded items; unreadable ones come back as ``[(path, error)]``."""
    good = [b for b in batch if b[0] is not None]
    bad = [b[1] for b in batch if b[0] is None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), bad
    return torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good], dtype=torch.int64), bad


class _LabelledCollate:
    """:class:`ImageFiles` items of ``samples`` -> what ``_collate_skipping`` returns: (images, labels,
    ``[(path, error)]``). A class, not a closure, so DataLoader workers can pickle it."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples

    def __call__(self, batch: list) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
        return _collate_skipping([(x, self.samples[i][1]) if err is None else (None, (self.samples[i][0], err))
                                  for x, i, err in batch])


class SkippingLoader:
    """Iterates a DataLoader built with ``_collate_skipping``: yields (images, labels); each corrupt file is
    reported in one line the first time it is met and counted once (``skipped``, ``skipped_files``: a bad val
    image is met again every epoch).

    A batch left with fewer than ``min_size`` images is not trained on (2 for train: BatchNorm cannot train on
    one image). ``keep_steps`` (train under torchrun, where every process must take the same number of
    optimizer steps or DDP's all-reduce hangs): such a batch is replaced by this process's previous usable batch
    (or, before the first one, by the first one), so the step count never changes.
    """

    def __init__(self, loader: DataLoader, min_size: int = 1, keep_steps: bool = False):
        self.loader = loader
        self.batch_sampler = loader.batch_sampler
        self.min_size, self.keep_steps = min_size, keep_steps
        self.log = SkippedFiles()

    @property
    def skipped_files(self) -> list[str]:
        return self.log.paths

    @property
    def skipped(self) -> int:
        return len(self.log)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        last, owed = None, 0  # owed: unusable batches met before the first usable one (keep_steps)
        for x, y, bad in self.loader:
            self.log.add(bad)
            if len(y) >= self.min_size:
                last = (x, y)
                for _ in range(owed + 1):
                    yield last
                owed = 0
            elif self.keep_steps:
                if last is not None:
                    yield last
                else:
                    owed += 1
        if owed:
            raise UserError(f"every image of this process's share of an epoch was unreadable ({self.skipped} "
                            "unreadable files so far); fix or remove them (split_dataset.py's report.csv lists them)")


# --------------------------------------------------------------------------------------------- memory path
def _decode_one(path: str) -> torch.Tensor | str:
    """uint8 CHW tensor (1 channel for greyscale, else RGB), or an error description (``Type: message``)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if path.lower().endswith(".png") and data:  # an empty file gets PIL's route and its fixed message
            check_encoded_size(data)  # libpng has no pixel limit of its own
            # libpng through torchvision.io: 2x faster than PIL here, and lossless, so the same pixels.
            # Alpha, 16-bit or odd PNGs take the PIL route below for PIL's exact RGB conversion.
            try:
                t = torchvision.io.decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                              apply_exif_orientation=True)
                if t.dtype == torch.uint8 and t.shape[0] in (1, 3):
                    return t
            except (RuntimeError, AttributeError):  # odd file, or a torchvision without image.io
                pass
        img = to_8bit(pil_from_bytes(data))  # 16-bit greyscale -> L, scaled (PIL's convert would clip it to white)
        return T.functional.pil_to_tensor(img if img.mode in ("L", "RGB") else to_rgb(img))
    except Exception as e:  # any decoder error: reported and skipped by the caller
        return describe_error(e)


def _decode_all(samples: list[tuple[str, int]], desc: str, progress: bool) -> tuple[list, list[tuple[str, str]]]:
    """Decode every file (2 threads: PIL decodes without the GIL); corrupt files give None and ``(path, error)``."""
    paths = [p for p, _ in samples]
    chunks = [paths[i:i + 512] for i in range(0, len(paths), 512)]
    out: list = []
    with warnings.catch_warnings(), ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool, \
            tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        # torchvision 0.29 marks its image decoders deprecated (one warning per call): silenced while decoding only.
        warnings.filterwarnings("ignore", message=_IO_DEPRECATION, category=DeprecationWarning)
        for decoded in pool.map(lambda chunk: [_decode_one(p) for p in chunk], chunks):
            out += decoded
            bar.update(len(decoded))
    bad = [(p, d) for p, d in zip(paths, out) if isinstance(d, str)]
    return [None if isinstance(d, str) else d for d in out], bad


def _to_augment_device(x: torch.Tensor, y: torch.Tensor, device: torch.device | None):
    """A uint8 batch and its labels on the device that augments it: pinned, then one asynchronous copy (uint8 is
    a quarter of the float32 bytes)."""
    if device is None or device.type == "cpu":
        return x, y
    return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)


class MemoryTrainLoader:
    """Train batches from an in-RAM uint8 tensor, augmented batched in the main process: on the CPU, or on the
    GPU when ``device`` is one (the gathered uint8 batch crosses over, augmentation runs there)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, sampler: EpochBatchSampler, img_size: int,
                 cfg: AugmentConfig, mean, std, pin_memory: bool, device: torch.device | None = None):
        self.images, self.labels, self.batch_sampler = images, labels, sampler
        self.img_size, self.cfg, self.mean, self.std, self.pin_memory = img_size, cfg, mean, std, pin_memory
        self.device = device
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.batch_sampler:
            idx = torch.tensor([i for i, _ in batch])
            seeds = np.array([s for _, s in batch], dtype=np.uint64)
            with single_thread():  # gathering 128 small images is slower with two threads on a busy machine
                x, y = _to_augment_device(self.images[idx], self.labels[idx], self.device)
                x = _augment_batch(x, seeds, self.img_size, self.cfg, self.mean, self.std)
            yield (x.pin_memory(), y.pin_memory()) if self.pin_memory and x.device.type == "cpu" else (x, y)


class MemoryValLoader:
    """Val batches from precomputed uint8 crops (resize + center crop done once, exactly as build_eval_transform)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, sampler: EpochBatchSampler, mean, std,
                 pin_memory: bool, device: torch.device | None = None):
        self.images, self.labels, self.batch_sampler = images, labels, sampler
        self.mean, self.std, self.pin_memory = mean, std, pin_memory
        self.device = device
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in self.batch_sampler:
            with single_thread():
                x, y = _to_augment_device(self.images[idx], self.labels[idx], self.device)
                x = to_rgb(x).float().mul_(1 / 255)
                x = T.functional.normalize(x, list(self.mean), list(self.std))
            yield (x.pin_memory(), y.pin_memory()) if self.pin_memory and x.device.type == "cpu" else (x, y)


# --------------------------------------------------------------------------------------------- bundle
@dataclass
class DataBundle:
    """Train/val loaders and what the training loop needs to know about them."""
    train_loader: Any
    val_loader: Any
    classes: list[str]
    num_train: int
    num_val: int
    cache: str = "none"                  # the path actually used: "memory" or "none"
    skipped_at_load: list[str] = field(default_factory=list)  # paths of corrupt files dropped while caching

    def set_epoch(self, epoch: int) -> None:
        """Select epoch ``epoch``'s order and augmentations; call at the start of every epoch."""
        self.train_loader.batch_sampler.set_epoch(epoch)

    def skipped_paths(self) -> set[str]:
        """Paths of the corrupt images this process has skipped so far (while caching and during iteration)."""
        files = set(self.skipped_at_load)
        for loader in (self.train_loader, self.val_loader):
            files.update(getattr(loader, "skipped_files", []))
        return files

    @property
    def skipped(self) -> int:
        """How many distinct corrupt images this process has skipped so far."""
        return len(self.skipped_paths())

    def skipped_everywhere(self) -> set[str]:
        """Paths of the distinct corrupt images skipped so far by all processes together; the same set on every
        process.

        Under torchrun this is a collective (call it on every process): with cache none each process meets only
        its share of the files, and a bad train file may be met by different processes in different epochs, so
        the per-process sets are united, not summed. The memory path decodes everything on every process.
        """
        files = self.skipped_paths()
        if self.cache == "none" and torch.distributed.is_available() and torch.distributed.is_initialized():
            every: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, sorted(files))
            files = set().union(*every)
        return files


def _dist_info(distributed: bool) -> tuple[int, int]:
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if distributed:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return 0, 1


def _estimate_bytes(samples: list[tuple[str, int]], resize_size: int) -> int | None:
    """Decoded size of all ``samples`` judged by the first readable image (RGB), or None when the memory path
    does not suit them: images more than 2x ``resize_size`` would need an antialiased resize, which the batched
    bilinear crop does not do (and decoding per step is as fast there, see README)."""
    if not samples:
        return 0
    for path, _ in samples[:8]:  # a corrupt first file must not decide the cache (it is skipped later anyway)
        try:
            with open_image(path) as im:
                w, h = im.size
            break
        except Exception:
            continue
    else:
        return None
    if max(w, h) > 2 * resize_size:
        return None
    return len(samples) * 3 * w * h


def load_split(data_dir: str) -> tuple[ImageFolderRGB, ImageFolderRGB]:
    """``data_dir/train`` and ``data_dir/val`` as image folders labelled with train's classes, or a UserError
    saying what is wrong with the folder.

    val/ may lack a class: split_dataset.py keeps a class too small to share in train only, with an empty val/
    folder that git or zip can drop. Its val labels are then train's indices. A class only in val/ is an error:
    the model cannot learn it."""
    for part in ("train", "val"):
        if not os.path.isdir(os.path.join(data_dir, part)):
            raise UserError(f"{os.path.join(data_dir, part)} not found; {data_dir} must hold train/ and val/ "
                            "folders of class sub-folders (make them with split_dataset.py RAW OUT --val 0.2)")
    train_ds = load_image_folder(os.path.join(data_dir, "train"))
    empty = sorted(set(train_ds.classes) - {train_ds.classes[y] for y in train_ds.targets})
    if empty:  # it would become a class the model is never shown, yet predicts and counts in balanced accuracy
        raise UserError(f"{os.path.join(data_dir, 'train')}: class folder(s) without images: {', '.join(empty)}; "
                        "add images to them or delete them from every split (split_dataset.py leaves them out)")
    val_ds = load_image_folder(os.path.join(data_dir, "val"), min_classes=1)  # train/ holds the classes
    only_val = sorted(set(val_ds.classes) - set(train_ds.classes))
    if only_val:
        raise UserError(f"{data_dir}: val/ has class folders that train/ lacks ({', '.join(only_val)}); the model "
                        "learns only classes with training images: move some of their images to train/, or "
                        "re-split with split_dataset.py")
    if val_ds.classes != train_ds.classes:
        names, index = val_ds.classes, train_ds.class_to_idx
        val_ds.samples = val_ds.imgs = [(p, index[names[y]]) for p, y in val_ds.samples]
        val_ds.targets = [y for _, y in val_ds.samples]
        val_ds.classes, val_ds.class_to_idx = list(train_ds.classes), dict(index)
    return train_ds, val_ds


def load_data(data_dir: str, *, img_size: int, resize_size: int, mean, std, batch_size: int, workers: int,
              augment: dict, cache: str = "auto", distributed: bool = False, seed: int = 0,
              pin_memory: bool = False, progress: bool = True, augment_device: torch.device | None = None,
              known_unreadable: Collection[str] = (), resize_mode: str = "crop") -> DataBundle:
    """Train/val loaders for ``data_dir/{train,val}`` (ImageFolder layout), see the module docstring.

    ``batch_size`` is per process. ``cache``: "memory" (decode once into RAM), "none" (decode every step in
    ``workers`` DataLoader processes) or "auto" (memory when all images share one size, at most twice
    ``resize_size``, and the decoded train+val set is under 2 GB; else none). With an explicit "memory", images of
    different sizes are stored resized (shorter side ``max(resize_size, img_size)``) and center-cropped square.
    ``progress`` shows a bar while caching (rank 0 only). ``augment_device``: a CUDA device makes the memory
    path send uint8 batches there and augment them on the GPU (utils.machine.decide_augment_device).
    ``known_unreadable``: files an earlier phase of the run found unreadable (train.py): left out without a second
    warning and counted as skipped, so both phases train on, count and report the same images.
    ``resize_mode``: "crop" (aspect kept, crops) or "squash" (whole image resized square), as build_eval_transform.
    """
    if not 8 <= img_size <= 1024:
        raise UserError(f"img_size={img_size}: use a size between 28 and 224 (8..1024 accepted)")
    if resize_size < img_size:
        raise UserError(f"resize_size={resize_size} is smaller than img_size={img_size}; use resize_size >= img_size")
    if cache not in ("auto", "memory", "none"):
        raise UserError(f"cache={cache!r}: use auto, memory or none")
    if resize_mode not in RESIZE_MODES:
        raise UserError(f"resize_mode={resize_mode!r}: use one of {', '.join(RESIZE_MODES)}")
    cfg = AugmentConfig.from_dict(augment)
    train_ds, val_ds = load_split(data_dir)
    known = _leave_out(known_unreadable, train_ds, val_ds)
    rank, world = _dist_info(distributed)
    train_sampler = EpochBatchSampler(len(train_ds), batch_size, shuffle=True, seed=seed, rank=rank, world=world)
    val_sampler = EpochBatchSampler(len(val_ds), batch_size, shuffle=False, rank=rank, world=world)
    pin = pin_memory and torch.cuda.is_available()

    use_memory = cache == "memory"
    if cache == "auto":
        est = [_estimate_bytes(ds.samples, resize_size) for ds in (train_ds, val_ds)]
        use_memory = None not in est and sum(est) < MEMORY_BUDGET
    if use_memory:
        bundle = _memory_bundle(train_ds, val_ds, train_sampler, val_sampler, img_size, resize_size, cfg, mean,
                                std, pin, require_uniform=(cache == "auto"), progress=progress and rank == 0,
                                device=augment_device, report=rank == 0, resize_mode=resize_mode)
        if bundle is not None:
            bundle.skipped_at_load += known
            return bundle
    train_tf = build_train_transform(img_size, mean=mean, std=std, **cfg.__dict__, resize_mode=resize_mode,
                                     squash_keep=resize_size)
    val_tf = build_eval_transform({"img_size": img_size, "resize_size": resize_size, "mean": mean, "std": std,
                                   "resize_mode": resize_mode})
    common = dict(num_workers=workers, pin_memory=pin, persistent_workers=workers > 0,
                  collate_fn=_collate_skipping, worker_init_fn=worker_ignores_ctrl_c)
    # Each loader draws its workers' base seed from its own generator: without one it takes a number from the
    # global RNG when its workers start (epoch 1, or the resume epoch), which shifts dropout and mixup draws of
    # a resumed run. The images' augmentation is seeded per image (_TrainFiles), not from the workers' seed.
    # Large JPEGs decode at a reduced DCT scale that every random crop can afford (train only: validation,
    # evaluate.py and the exported files see the full decode and the same resize).
    min_side = train_decode_side(img_size, cfg.scale[0])
    train_loader = DataLoader(_TrainFiles(train_ds.samples, train_tf, min_side), batch_sampler=train_sampler,
                              generator=torch.Generator().manual_seed(seed), **common)
    val_files = ImageFiles([p for p, _ in val_ds.samples], val_tf, decode=decode_rgb)
    val_loader = DataLoader(val_files, batch_sampler=val_sampler, generator=torch.Generator().manual_seed(seed),
                            **{**common, "collate_fn": _LabelledCollate(val_ds.samples)})
    return DataBundle(SkippingLoader(train_loader, min_size=min(2, batch_size),
                                                 keep_steps=world > 1), SkippingLoader(val_loader),
                      list(train_ds.classes), len(train_ds), len(val_ds), cache="none", skipped_at_load=known)


def _leave_out(paths: Collection[str], *datasets: ImageFolderRGB) -> list[str]:
    """Drop ``paths`` from the datasets' samples (in place); returns the paths that were there."""
    paths = set(paths)
    if not paths:
        return []
    found = []
    for ds in datasets:
        found += [p for p, _ in ds.samples if p in paths]
        ds.samples = ds.imgs = [s for s in ds.samples if s[0] not in paths]
        ds.targets = [y for _, y in ds.samples]
    return found


def _memory_bundle(train_ds, val_ds, train_sampler, val_sampler, img_size, resize_size, cfg, mean, std, pin,
                   require_uniform: bool, progress: bool, device: torch.device | None = None,
                   report: bool = True, resize_mode: str = "crop") -> DataBundle | None:
    """Decode both splits into RAM; None (caller falls back to disk) if ``require_uniform`` and sizes differ.
    Corrupt files are dropped here, each named in one line when ``report`` (rank 0: every process decodes all)."""
    parts = {}
    skipped: list[tuple[str, str]] = []
    for name, ds in (("train", train_ds), ("val", val_ds)):
        decoded, bad = _decode_all(ds.samples, f"caching {name} images", progress)
        skipped += bad
        keep = [i for i, t in enumerate(decoded) if t is not None]
        tensors = [decoded[i] for i in keep]
        labels = torch.tensor([ds.samples[i][1] for i in keep], dtype=torch.int64)
        if not tensors:
            raise UserError(f"{ds.root}: none of its {len(ds.samples)} images could be decoded (first: "
                            f"{unreadable_line(*bad[0])}); fix or remove them")
        stacked = _stack_uniform(tensors)
        if stacked is None:
            if require_uniform:
                return None
            side = max(resize_size, img_size)
            square = resize_square if resize_mode == "squash" else _square
            stacked = torch.stack([to_rgb(square(t, side)) for t in tensors])
        elif resize_mode == "squash" and name == "train":  # once here, not on every step (val: below)
            stacked = squash_for_training(stacked, resize_size)
        parts[name] = (stacked, labels)
    SkippedFiles(report).add(skipped)  # reported only now: after a None above, the disk path meets them
    train_x, train_y = parts["train"]
    val_x, val_y = parts["val"]
    # Val: exactly build_eval_transform's uint8 ops (resize shorter side or squash, center crop), done once.
    resize = resize_square if resize_mode == "squash" else resize_shorter
    val_x = T.functional.center_crop(resize(val_x, resize_size), [img_size, img_size])
    train_sampler.n, val_sampler.n = len(train_y), len(val_y)
    return DataBundle(MemoryTrainLoader(train_x, train_y, train_sampler, img_size, cfg, mean, std, pin, device),
                      MemoryValLoader(val_x.contiguous(), val_y, val_sampler, mean, std, pin, device),
                      list(train_ds.classes), len(train_y), len(val_y), cache="memory",
                      skipped_at_load=[path for path, _ in skipped])
