"""Reproducible order: per-image seeds and the epoch batch sampler (a pure function of seed and epoch,
cut DistributedSampler-style across ranks)."""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from utils.balance import epoch_order
from utils.errors import UserError

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
