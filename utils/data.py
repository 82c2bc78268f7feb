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

import contextlib
import io
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.io
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2 as T

from utils.balance import epoch_order
from utils.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
AUGMENT_KEYS = ("scale", "hflip", "color_jitter", "rotation", "auto_augment", "random_erasing")
MEMORY_BUDGET = 2 * 1024 ** 3  # "auto" caches in RAM when the decoded train+val images fit in this


# --------------------------------------------------------------------------------------------- unreadable files
def unreadable_line(path: str, error: str) -> str:
    """The one line every tool prints for a skipped file: ``skipped unreadable image PATH (Error: reason)``."""
    return f"skipped unreadable image {path} ({error.strip().splitlines()[0][:160] if error.strip() else 'error'})"


def report_unreadable(path: str, error: str) -> None:
    """Print :func:`unreadable_line` to stderr (one plain line: a warning would add its source line)."""
    print(f"warning: {unreadable_line(path, error)}", file=sys.stderr, flush=True)


def describe_error(e: BaseException) -> str:
    """``Type: message`` of a decoder error, as the skip lines and reports show it."""
    return f"{type(e).__name__}: {e}".strip()


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


# --------------------------------------------------------------------------------------------- transforms
def to_rgb(img: Any) -> Any:
    """PIL image in any mode (L, P, RGBA, CMYK, I;16 ...) or uint8 CHW tensor -> 3-channel RGB of the same kind."""
    if isinstance(img, torch.Tensor):
        if img.shape[-3] == 1:
            return img.expand(*img.shape[:-3], 3, *img.shape[-2:])
        return img[..., :3, :, :] if img.shape[-3] == 4 else img
    return img.convert("RGB") if img.mode != "RGB" else img


def build_eval_transform(preprocess: dict[str, Any]) -> Callable:
    """PIL image -> normalised float tensor (3, img_size, img_size), from a checkpoint's ``preprocess`` dict.

    Keys: ``img_size``, ``resize_size`` (shorter side before the center crop), ``mean``, ``std``.
    Greyscale/CMYK/RGBA/palette images become 3-channel RGB first.
    """
    return T.Compose([
        T.Lambda(to_rgb),
        T.PILToTensor(),
        T.Resize(int(preprocess["resize_size"]), antialias=True),
        T.CenterCrop(int(preprocess["img_size"])),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(list(preprocess["mean"]), list(preprocess["std"])),
    ])


def _pil_to_uint8(img: Any) -> torch.Tensor:
    return img if isinstance(img, torch.Tensor) else T.functional.pil_to_tensor(img)


def build_train_transform(img_size: int, *, mean, std, scale=(0.08, 1.0), hflip: float = 0.5,
                          color_jitter: float = 0.0, rotation: float = 0.0, auto_augment: str | None = None,
                          random_erasing: float = 0.0, backend: str = "tensor") -> Callable:
    """Train augmentation: image -> float tensor (3, img_size, img_size), normalised with ``mean``/``std``.

    RandomResizedCrop(``scale``) -> horizontal flip (prob ``hflip``) -> ColorJitter(brightness, contrast and
    saturation = ``color_jitter``) -> RandomRotation(+-``rotation`` degrees) -> TrivialAugmentWide
    (``auto_augment="trivial"``) -> normalise -> RandomErasing (prob ``random_erasing``).
    ``backend="tensor"`` (default; with decode_rgb the fastest here, see README) takes a PIL image or a uint8
    CHW tensor and works on the tensor; ``"pil"`` crops/resizes the PIL image, then converts;
    ``"v1"`` is the same recipe with the legacy ``torchvision.transforms`` (kept for the benchmark).
    Randomness comes from torch's global generator (seed it per image for reproducible runs).
    """
    if auto_augment not in (None, "trivial"):
        raise UserError(f"auto_augment={auto_augment!r}: use null/None or 'trivial'")
    scale = tuple(float(s) for s in scale)
    if not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise UserError(f"scale={scale}: use two fractions 0 < min <= max <= 1, e.g. [0.08, 1.0]")
    if backend == "v1":
        from torchvision import transforms as V1
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
    if backend not in ("pil", "tensor"):
        raise ValueError(f"backend {backend!r}")
    ops = [T.Lambda(to_rgb)]
    if backend == "tensor":
        ops.append(T.Lambda(_pil_to_uint8))
    ops.append(T.RandomResizedCrop(img_size, scale=scale, antialias=True))
    if hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    if color_jitter > 0:
        ops.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    if rotation > 0:
        ops.append(T.RandomRotation(rotation))
    if auto_augment == "trivial":
        ops.append(T.TrivialAugmentWide())
    if backend == "pil":
        ops.append(T.Lambda(_pil_to_uint8))
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(list(mean), list(std))]
    if random_erasing > 0:
        ops.append(T.RandomErasing(random_erasing))
    return T.Compose(ops)


# --------------------------------------------------------------------------------------------- folders
def _is_image_file(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def load_pil_rgb(path: str):
    """Open ``path`` fully decoded as an RGB PIL image (raises on corrupt files)."""
    from PIL import Image
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return to_rgb(img)


_IO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_IO_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"


def decode_rgb(path: str) -> torch.Tensor:
    """Decode ``path`` to a uint8 RGB tensor (3, H, W); raises on corrupt files.

    JPEG/PNG/WebP go through torchvision.io (libjpeg-turbo/libpng/libwebp on the bytes: the fastest decoder
    here, see README; pixels identical to PIL's RGB conversion for grey, palette, RGBA and CMYK files);
    anything else (BMP, TIFF, 16-bit PNG, ...) or anything it rejects goes through PIL.
    """
    with open(path, "rb") as f:
        data = f.read()
    if path.lower().endswith(_IO_EXTENSIONS) and data:
        try:
            with warnings.catch_warnings():  # torchvision 0.29 marks these decoders deprecated, once per call
                warnings.filterwarnings("ignore", message=_IO_DEPRECATION, category=DeprecationWarning)
                t = torchvision.io.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                                mode=torchvision.io.ImageReadMode.RGB)
            if t.dtype == torch.uint8:
                return t
        except (RuntimeError, AttributeError):  # corrupt (PIL then says why) or a torchvision without image.io
            pass
    from PIL import Image
    img = Image.open(io.BytesIO(data))
    img.load()
    return T.functional.pil_to_tensor(to_rgb(img))


class ImageFolderRGB(ImageFolder):
    """torchvision ImageFolder that ignores hidden folders/files (``.DS_Store``, ``._x``, ``.ipynb_checkpoints``)
    and returns RGB images whatever their mode."""

    def __init__(self, root: str, transform: Callable | None = None):
        super().__init__(root, transform=transform, loader=load_pil_rgb, is_valid_file=_is_image_file,
                         allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        return classes, {c: i for i, c in enumerate(classes)}


def load_image_folder(root: str) -> ImageFolderRGB:
    """The ImageFolder at ``root`` (``root/<class>/**/*.jpg``), checked: UserError if it is missing, has no
    class sub-folders, no images, or fewer than 2 classes."""
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
    if len(ds.classes) < 2:
        raise UserError(f"{root} has {len(ds.classes)} class folder ({ds.classes[0]}); a classifier needs at "
                        "least 2 classes")
    return ds


# --------------------------------------------------------------------------------------------- randomness
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic): a fast, portable counter-based hash."""
    with np.errstate(over="ignore"):
        z = z.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_seeds(seed: int, epoch: int, indices) -> np.ndarray:
    """uint64 augmentation seed of each image index for this (seed, epoch): the same in any process."""
    base = _splitmix(_splitmix(np.array([seed & 0xFFFFFFFF], np.uint64)) ^ np.array([epoch], np.uint64))
    return _splitmix(base ^ np.asarray(indices, dtype=np.uint64))


def _uniforms(seeds: np.ndarray, n: int, stream: int) -> np.ndarray:
    """(len(seeds), n) uniforms in [0, 1), a pure function of each seed (and ``stream``, to keep draws apart)."""
    k = np.arange(n, dtype=np.uint64) + np.uint64(stream * 64)
    z = _splitmix(seeds[:, None] ^ _splitmix(k)[None, :])
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


class EpochBatchSampler:
    """Batches of indices, DistributedSampler-style, reproducible per ``(seed, epoch)``.

    Train (``shuffle=True``): permutation of ``torch.Generator().manual_seed(seed + epoch)``, cut into global
    batches of ``batch_size * world``; rank ``r`` takes positions ``r, r+world, ...`` of each. An incomplete
    last global batch is kept (small photo folders would otherwise lose up to a batch of images every epoch),
    wrapped round to a multiple of ``world`` so all ranks step together, unless it would give a rank fewer than
    2 images (BatchNorm cannot train on one); then it is dropped. Items are ``(index, augmentation seed)``.
    Val (``shuffle=False``): indices in order, rank ``r`` takes ``r::world`` (no padding, so metrics summed
    over ranks count each image exactly once); items are plain indices.
    ``weights`` (train, set by utils.balance.use_balanced_sampler): the epoch's order is ``n`` draws with
    replacement in proportion to them instead of the permutation, cut the same way.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1):
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size}: use a positive batch size")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world, self.epoch = rank, world, 0
        self.weights: torch.Tensor | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batch(self) -> int:
        return self.batch_size * self.world

    def _chunk_sizes(self) -> list[int]:
        """Sizes of the global train batches of one epoch (see the class docstring)."""
        gb = self._global_batch()
        sizes = [gb] * (self.n // gb)
        rest = math.ceil((self.n % gb) / self.world) * self.world
        if rest and (rest // self.world >= 2 or not sizes):
            sizes.append(rest)
        return sizes

    def __len__(self) -> int:
        if self.shuffle:
            return len(self._chunk_sizes())
        return math.ceil(len(range(self.rank, self.n, self.world)) / self.batch_size)

    def __iter__(self) -> Iterator[list]:
        if not self.shuffle:
            mine = list(range(self.rank, self.n, self.world))
            for i in range(0, len(mine), self.batch_size):
                yield mine[i:i + self.batch_size]
            return
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = epoch_order(self.n, g, self.weights)
        wrapped = perm.repeat(2 + self._global_batch() // max(1, self.n))  # source for the wrap-round
        start, chunks = 0, []
        for size in self._chunk_sizes():
            chunks.append(wrapped[start:start + size])
            start += size
        for chunk in chunks:
            idx = chunk[self.rank::self.world].tolist()
            seeds = sample_seeds(self.seed, self.epoch, idx).tolist()
            yield list(zip(idx, seeds))


# --------------------------------------------------------------------------------------------- disk path
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


class _TrainFiles(Dataset):
    """(index, seed) -> (augmented tensor, label), or (None, path) when the file cannot be decoded."""

    def __init__(self, samples: list[tuple[str, int]], transform: Callable):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        path, label = self.samples[index]
        try:
            img = decode_rgb(path)
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


class _ValFiles(Dataset):
    def __init__(self, samples: list[tuple[str, int]], transform: Callable):
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            img = decode_rgb(path)
        except Exception as e:  # any decoder error: skip this image, the loader counts it
            return None, (path, describe_error(e))
        with single_thread():
            return self.transform(img), label


def _collate_skipping(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Stack the decoded items; unreadable ones come back as ``[(path, error)]``."""
    good = [b for b in batch if b[0] is not None]
    bad = [b[1] for b in batch if b[0] is None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.int64), bad
    return torch.stack([b[0] for b in good]), torch.tensor([b[1] for b in good], dtype=torch.int64), bad


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
    from PIL import Image
    try:
        with open(path, "rb") as f:
            data = f.read()
        if path.lower().endswith(".png"):
            # libpng through torchvision.io: 2x faster than PIL here, and lossless, so the same pixels.
            # Alpha, 16-bit or odd PNGs take the PIL route below for PIL's exact RGB conversion.
            try:
                t = torchvision.io.decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                if t.dtype == torch.uint8 and t.shape[0] in (1, 3):
                    return t
            except (RuntimeError, AttributeError):  # odd file, or a torchvision without image.io
                pass
        img = Image.open(io.BytesIO(data))
        img.load()
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        return T.functional.pil_to_tensor(img)
    except Exception as e:  # any decoder error: reported and skipped by the caller
        return describe_error(e)


def _decode_all(samples: list[tuple[str, int]], desc: str, progress: bool) -> tuple[list, list[tuple[str, str]]]:
    """Decode every file (2 threads: PIL decodes without the GIL); corrupt files give None and ``(path, error)``."""
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm

    # torchvision 0.29 marks its image decoders deprecated (one warning per call); the PIL fallback stays exact.
    warnings.filterwarnings("ignore", message=_IO_DEPRECATION, category=DeprecationWarning)
    paths = [p for p, _ in samples]
    chunks = [paths[i:i + 512] for i in range(0, len(paths), 512)]
    out: list = []
    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool, \
            tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for decoded in pool.map(lambda chunk: [_decode_one(p) for p in chunk], chunks):
            out += decoded
            bar.update(len(decoded))
    bad = [(p, d) for p, d in zip(paths, out) if isinstance(d, str)]
    return [None if isinstance(d, str) else d for d in out], bad


def _stack_uniform(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """Stack same-sized images into (N, C, H, W) uint8 (C=1 only if all are greyscale); None if sizes differ."""
    sizes = {tuple(t.shape[1:]) for t in tensors}
    if len(sizes) != 1:
        return None
    channels = max(t.shape[0] for t in tensors)
    return torch.stack([t.expand(channels, -1, -1) for t in tensors])


def _square(t: torch.Tensor, size: int) -> torch.Tensor:
    return T.functional.center_crop(T.functional.resize(t, size, antialias=True), [size, size])


@dataclass
class AugmentConfig:
    """Keyword arguments of build_train_transform besides img_size/mean/std, validated."""
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.0
    rotation: float = 0.0
    auto_augment: str | None = None
    random_erasing: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "AugmentConfig":
        d = dict(d or {})
        unknown = sorted(set(d) - set(AUGMENT_KEYS))
        if unknown:
            raise UserError(f"unknown augment option(s) {', '.join(unknown)}; known: {', '.join(AUGMENT_KEYS)}")
        cfg = cls(**d)
        cfg.scale = tuple(float(s) for s in cfg.scale)
        build_train_transform(8, mean=IMAGENET_MEAN, std=IMAGENET_STD, **cfg.__dict__)  # validates values
        return cfg


def augment_batch(x: torch.Tensor, seeds: np.ndarray, img_size: int, cfg: AugmentConfig, mean, std) -> torch.Tensor:
    """Batched train augmentation (see ``_augment_batch``), run with one intra-op thread.

    Its tensors are small: on a busy 2-core machine a second thread only waits on the training step's threads
    (measured: median 22k img/s with 1 thread vs 5.8k with 2 at 32 px, batch 128, under load).
    """
    with single_thread():
        return _augment_batch(x, seeds, img_size, cfg, mean, std)


def _augment_batch(x: torch.Tensor, seeds: np.ndarray, img_size: int, cfg: AugmentConfig, mean, std) -> torch.Tensor:
    """Batched train augmentation of uint8 images (B, C, H, W) -> normalised float (B, 3, img_size, img_size).

    Same recipe and parameter distributions as build_train_transform, computed for all images at once: the crop
    box, flip and rotation become one affine ``grid_sample`` (bilinear), jitter and erasing are vectorised.
    Every random number comes from the image's seed, so an image's augmentation is independent of its batch.
    Differences from the per-image path: bilinear resampling without antialiasing (only matters when a crop
    is shrunk by more than 2x), jitter always in the order brightness, contrast, saturation, and rotation samples
    real image content (not black) where the rotated crop stays inside the image.
    """
    b, c, h, w = x.shape
    lo, hi = cfg.scale
    u = _uniforms(seeds, 24, stream=0)
    # RandomResizedCrop, torchvision's algorithm: 10 tries of (area, log aspect), else a centred fallback.
    area = h * w * (lo + (hi - lo) * u[:, 0:10])
    logr = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 10:20]
    cw = np.rint(np.sqrt(area * np.exp(logr)))
    ch = np.rint(np.sqrt(area / np.exp(logr)))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.argmax(1)
    rows = np.arange(b)
    in_ratio = w / h
    if in_ratio < 3 / 4:
        fw, fh = w, round(w / (3 / 4))
    elif in_ratio > 4 / 3:
        fw, fh = round(h * 4 / 3), h
    else:
        fw, fh = w, h
    has = ok.any(1)
    cw = np.where(has, cw[rows, first], fw)
    ch = np.where(has, ch[rows, first], fh)
    top = np.where(has, np.floor(u[:, 20] * (h - ch + 1)), (h - ch) // 2)
    left = np.where(has, np.floor(u[:, 21] * (w - cw + 1)), (w - cw) // 2)
    flip = np.where(u[:, 22] < cfg.hflip, -1.0, 1.0)
    angle = np.deg2rad((2 * u[:, 23] - 1) * cfg.rotation) if cfg.rotation > 0 else np.zeros(b)
    cos, sin = np.cos(angle), np.sin(angle)
    cx = 2 * (left + cw / 2) / w - 1
    cy = 2 * (top + ch / 2) / h - 1
    theta = np.stack([np.stack([cos * flip * cw / w, -sin * ch / w, cx], 1),
                      np.stack([sin * flip * cw / h, cos * ch / h, cy], 1)], 1)
    dev = x.device  # a CUDA batch is augmented on the GPU; the parameters above are drawn on the CPU either way
    theta_t = torch.from_numpy(theta).float().to(dev)
    # Same grid as F.affine_grid(align_corners=False), built by broadcasting (affine_grid is slower on CPU).
    lin = (torch.arange(img_size, dtype=torch.float32, device=dev) * 2 + 1) / img_size - 1
    xs, ys = lin.view(1, 1, img_size), lin.view(1, img_size, 1)
    th = theta_t[:, :, :, None, None]
    grid = torch.stack([th[:, 0, 0] * xs + th[:, 0, 1] * ys + th[:, 0, 2],
                        th[:, 1, 0] * xs + th[:, 1, 1] * ys + th[:, 1, 2]], -1)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.expand(b, 3, img_size, img_size) if c == 1 else out
    out = out * (1 / 255)
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        f = torch.from_numpy(max(0.0, 1 - j) + (1 + j - max(0.0, 1 - j)) * _uniforms(seeds, 3, stream=1)).float().to(dev)
        out = (out * f[:, 0, None, None, None]).clamp_(0, 1)
        grey = (0.299 * out[:, 0] + 0.587 * out[:, 1] + 0.114 * out[:, 2]).unsqueeze(1)
        m = grey.mean((1, 2, 3), keepdim=True)
        out = ((out - m) * f[:, 1, None, None, None] + m).clamp_(0, 1)
        grey = (0.299 * out[:, 0] + 0.587 * out[:, 1] + 0.114 * out[:, 2]).unsqueeze(1)
        out = ((out - grey) * f[:, 2, None, None, None] + grey).clamp_(0, 1)
    if cfg.auto_augment == "trivial":
        ta = T.TrivialAugmentWide()
        u8 = (out * 255).round_().to(torch.uint8)
        state = torch.get_rng_state()
        try:
            for i in range(b):
                torch.random.default_generator.manual_seed(int(seeds[i] & np.uint64(0x7FFFFFFFFFFFFFFF)))
                u8[i] = ta(u8[i])
        finally:
            torch.set_rng_state(state)
        out = u8.float().mul_(1 / 255)
    out = T.functional.normalize(out, list(mean), list(std))
    if cfg.random_erasing > 0:
        e = _uniforms(seeds, 41, stream=2)
        s = img_size
        ea = s * s * (0.02 + (0.33 - 0.02) * e[:, 0:10])
        elr = math.log(0.3) + (math.log(3.3) - math.log(0.3)) * e[:, 10:20]
        eh = np.rint(np.sqrt(ea * np.exp(elr)))
        ew = np.rint(np.sqrt(ea / np.exp(elr)))
        eok = (eh < s) & (ew < s)
        efirst = eok.argmax(1)
        do = (e[:, 40] < cfg.random_erasing) & eok.any(1)
        eh, ew = eh[rows, efirst], ew[rows, efirst]
        ei = np.floor(e[rows, 20 + efirst] * (s - eh + 1))
        ej = np.floor(e[rows, 30 + efirst] * (s - ew + 1))
        ar = torch.arange(s, device=dev)
        t = lambda a: torch.from_numpy(a).float().to(dev)[:, None]  # noqa: E731
        rmask = (ar[None] >= t(ei)) & (ar[None] < t(ei + eh))
        cmask = (ar[None] >= t(ej)) & (ar[None] < t(ej + ew))
        mask = (rmask[:, :, None] & cmask[:, None, :]) & torch.from_numpy(do).to(dev)[:, None, None]
        out = out.masked_fill(mask[:, None], 0.0)
    return out


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

    def skipped_total(self) -> int:
        """Distinct corrupt images skipped so far by all processes together; the same number on every process.

        Under torchrun this is a collective (call it on every process): with cache none each process meets only
        its share of the files, and a bad train file may be met by different processes in different epochs, so
        the per-process sets are united, not summed. The memory path decodes everything on every process.
        """
        files = self.skipped_paths()
        if self.cache == "none" and torch.distributed.is_available() and torch.distributed.is_initialized():
            every: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, sorted(files))
            files = set().union(*every)
        return len(files)


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
    from PIL import Image
    if not samples:
        return 0
    for path, _ in samples[:8]:  # a corrupt first file must not decide the cache (it is skipped later anyway)
        try:
            with Image.open(path) as im:
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
    """``data_dir/train`` and ``data_dir/val`` as image folders with the same classes, or a UserError saying
    what is wrong with the folder."""
    for part in ("train", "val"):
        if not os.path.isdir(os.path.join(data_dir, part)):
            raise UserError(f"{os.path.join(data_dir, part)} not found; {data_dir} must hold train/ and val/ "
                            "folders of class sub-folders (make them with split_dataset.py RAW OUT)")
    train_ds = load_image_folder(os.path.join(data_dir, "train"))
    val_ds = load_image_folder(os.path.join(data_dir, "val"))
    if train_ds.classes != val_ds.classes:
        only_t = sorted(set(train_ds.classes) - set(val_ds.classes))
        only_v = sorted(set(val_ds.classes) - set(train_ds.classes))
        raise UserError(f"{data_dir}: train/ and val/ have different class folders (only in train: {only_t}; "
                        f"only in val: {only_v}); re-split with split_dataset.py so both have every class")
    return train_ds, val_ds


def load_data(data_dir: str, *, img_size: int, resize_size: int, mean, std, batch_size: int, workers: int,
              augment: dict, cache: str = "auto", distributed: bool = False, seed: int = 0,
              pin_memory: bool = False, progress: bool = True, augment_device: torch.device | None = None) -> DataBundle:
    """Train/val loaders for ``data_dir/{train,val}`` (ImageFolder layout), see the module docstring.

    ``batch_size`` is per process. ``cache``: "memory" (decode once into RAM), "none" (decode every step in
    ``workers`` DataLoader processes) or "auto" (memory when all images share one size, at most twice
    ``resize_size``, and the decoded train+val set is under 2 GB; else none). With an explicit "memory", images of
    different sizes are stored resized (shorter side ``max(resize_size, img_size)``) and center-cropped square.
    ``progress`` shows a bar while caching (rank 0 only). ``augment_device``: a CUDA device makes the memory
    path send uint8 batches there and augment them on the GPU (utils.machine.decide_augment_device).
    """
    if not 8 <= img_size <= 1024:
        raise UserError(f"img_size={img_size}: use a size between 28 and 224 (8..1024 accepted)")
    if resize_size < img_size:
        raise UserError(f"resize_size={resize_size} is smaller than img_size={img_size}; use resize_size >= img_size")
    if cache not in ("auto", "memory", "none"):
        raise UserError(f"cache={cache!r}: use auto, memory or none")
    cfg = AugmentConfig.from_dict(augment)
    train_ds, val_ds = load_split(data_dir)
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
                                device=augment_device, report=rank == 0)
        if bundle is not None:
            return bundle
    train_tf = build_train_transform(img_size, mean=mean, std=std, **cfg.__dict__)
    val_tf = build_eval_transform({"img_size": img_size, "resize_size": resize_size, "mean": mean, "std": std})
    common = dict(num_workers=workers, pin_memory=pin, persistent_workers=workers > 0,
                  collate_fn=_collate_skipping)
    train_loader = DataLoader(_TrainFiles(train_ds.samples, train_tf), batch_sampler=train_sampler, **common)
    val_loader = DataLoader(_ValFiles(val_ds.samples, val_tf), batch_sampler=val_sampler, **common)
    return DataBundle(SkippingLoader(train_loader, min_size=min(2, batch_size),
                                                 keep_steps=world > 1), SkippingLoader(val_loader),
                      list(train_ds.classes), len(train_ds), len(val_ds), cache="none")


def _memory_bundle(train_ds, val_ds, train_sampler, val_sampler, img_size, resize_size, cfg, mean, std, pin,
                   require_uniform: bool, progress: bool, device: torch.device | None = None,
                   report: bool = True) -> DataBundle | None:
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
            stacked = torch.stack([to_rgb(_square(t, side)) for t in tensors])
        parts[name] = (stacked, labels)
    SkippedFiles(report).add(skipped)  # reported only now: after a None above, the disk path meets them
    train_x, train_y = parts["train"]
    val_x, val_y = parts["val"]
    # Val: exactly build_eval_transform's uint8 ops (resize shorter side, center crop), done once.
    val_x = T.functional.center_crop(T.functional.resize(val_x, resize_size, antialias=True), [img_size, img_size])
    train_sampler.n, val_sampler.n = len(train_y), len(val_y)
    return DataBundle(MemoryTrainLoader(train_x, train_y, train_sampler, img_size, cfg, mean, std, pin, device),
                      MemoryValLoader(val_x.contiguous(), val_y, val_sampler, mean, std, pin, device),
                      list(train_ds.classes), len(train_y), len(val_y), cache="memory",
                      skipped_at_load=[path for path, _ in skipped])
