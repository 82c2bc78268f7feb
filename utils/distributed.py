"""torchrun helpers: initialise from the environment, ask who is rank 0, all-reduce metric sums, split rows
between processes and gather them back."""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # gloo's default; NCCL's is 10 minutes


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK); a no-op when run plainly.

    Backend: nccl for CUDA, gloo for CPU. Both wait up to ``COLLECTIVE_TIMEOUT`` in a collective: rank 0 alone
    measures the speed probes (a torch.compile probe compiles for minutes on a slow host) while the others wait
    in a broadcast, and NCCL's own default would abort them after 10 minutes.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return DistInfo()
    info = DistInfo(True, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return info


def is_main_process() -> bool:
    """True in the single process, or on rank 0 under torchrun."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum each number over all processes (identity when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every process (``obj`` itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for all processes (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_indices(n: int, rank: int, world: int) -> range:
    """The rows of ``n`` that process ``rank`` of ``world`` computes: ``rank, rank + world, ...``."""
    return range(rank, n, world)


def interleave_shards(shards: list[torch.Tensor], n: int) -> torch.Tensor:
    """Inverse of :func:`shard_indices`: shard ``r`` fills rows ``r, r + world, ...`` of an ``(n, ...)`` tensor."""
    world = len(shards)
    ref = max(shards, key=len)
    out = ref.new_empty((n, *ref.shape[1:]))
    for r, shard in enumerate(shards):
        out[r::world] = shard
    return out


GATHER_CHUNK_BYTES = 64 * 2**20  # per process and exchange: the GPU holds world x 64 MB at a time, not every row


def gather_rows(local: torch.Tensor, n_total: int, chunk_bytes: int = GATHER_CHUNK_BYTES) -> torch.Tensor:
    """Collective: the full ``(n_total, ...)`` tensor, in row order, on every process, from each process's
    :func:`shard_indices` rows (``local``; ``torch.empty(0)`` for a process with no rows). Returned on the CPU.

    Shards are padded to one length and exchanged with ``all_gather`` (on the GPU under nccl), in pieces of at
    most ``chunk_bytes`` per process, each moved to the CPU before the next: cached features of a large folder
    (5 KB per image for MobileNetV2) would otherwise sit on every GPU, once per process, all at once.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if len(local) != n_total:
            raise ValueError(f"{len(local)} rows but {n_total} expected (not distributed: nothing to gather)")
        return local
    rank, world = dist.get_rank(), dist.get_world_size()
    counts = [len(shard_indices(n_total, r, world)) for r in range(world)]
    if len(local) != counts[rank]:
        raise ValueError(f"rank {rank} holds {len(local)} rows, shard_indices gives it {counts[rank]}")
    shape, dtype = local.shape[1:], local.dtype
    if min(counts) == 0:  # fewer rows than processes: an empty shard cannot tell the row shape
        metas = [None] * world
        dist.all_gather_object(metas, (tuple(shape), dtype) if len(local) else None)
        shape, dtype = next(m for m in metas if m is not None)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    row_bytes = max(1, math.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    step = max(1, chunk_bytes // row_bytes)  # the same on every process: shape, dtype and counts are shared
    pieces: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, max(counts), step):
        stop = min(start + step, max(counts))
        padded = torch.zeros((stop - start, *shape), dtype=dtype, device=device)
        mine = local[start:stop]
        if len(mine):
            padded[:len(mine)] = mine.to(device)
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        for r, p in enumerate(parts):
            pieces[r].append(p[:max(0, min(stop, counts[r]) - start)].cpu())
    return interleave_shards([torch.cat(p) if p else torch.zeros((0, *shape), dtype=dtype) for p in pieces],
                             n_total)


class CPUSyncBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are computed over the whole global batch (all processes),
    for CPU/gloo runs: PyTorch's nn.SyncBatchNorm only supports GPUs. The per-channel sums go through
    ``torch.distributed.nn.functional.all_reduce``, which is differentiable, so gradients are exact too.
    Its all-reduces run on their own process group: sharing DDP's group, they could interleave with DDP's
    asynchronous gradient buckets in a different order on each process and pair up the wrong tensors.
    """

    group = None  # set by convert_sync_batchnorm
    synced = True  # False: plain per-process statistics (a speed probe running on one process only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.synced and self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)

        c = x.shape[1]
        xf = x.float()
        # Sums in float64: var = E[x^2] - E[x]^2 cancels catastrophically in float32 when |mean| >> std.
        xd = xf.double()
        count = torch.full((1,), xf.numel() / c, dtype=torch.float64, device=x.device)
        with warnings.catch_warnings():  # deprecated in favour of functional collectives; still the
            warnings.simplefilter("ignore", FutureWarning)  # differentiable one that works with gloo
            stats = all_reduce(torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)), count]),
                               group=self.group or dist.group.WORLD)
        n = stats[-1]
        mean64 = stats[:c] / n
        var64 = (stats[c:2 * c] / n - mean64 * mean64).clamp_min(0)
        mean, var = mean64.float(), var64.float()
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_((var64 * n / (n - 1).clamp_min(1)).float().detach(), m)
        shape = (1, c, 1, 1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(model: torch.nn.Module, device_type: str) -> torch.nn.Module:
    """Swap BatchNorm layers for synchronised ones: ``nn.SyncBatchNorm`` on GPUs, :class:`CPUSyncBatchNorm`
    on CPU. Parameter and buffer names are unchanged, so checkpoints stay plain MobileNet state dicts.
    Every process must call it (the CPU version creates a process group)."""
    if device_type != "cpu":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    group = dist.new_group(backend="gloo") if dist.is_available() and dist.is_initialized() else None
    _swap_bn(model, group)
    return model


def _batchnorm_like(cls: type, bn: torch.nn.modules.batchnorm._BatchNorm) -> torch.nn.Module:
    """A ``cls`` BatchNorm with ``bn``'s settings, parameters, statistics, mode and device."""
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    new.load_state_dict(bn.state_dict())
    return new.train(bn.training).to(next(bn.buffers(), torch.empty(0)).device)


def _swap_bn(module: torch.nn.Module, group) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.BatchNorm2d) and not isinstance(child, CPUSyncBatchNorm):
            new = _batchnorm_like(CPUSyncBatchNorm, child)
            new.group = group
            setattr(module, name, new)
        else:
            _swap_bn(child, group)


def local_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every synchronised BatchNorm computing per-process statistics, in place: for a copy that
    runs on one process while the others wait (train.py's speed probe). ``nn.SyncBatchNorm`` in training mode
    joins a collective of the whole group, which on a GPU waits forever for ranks that never join; it becomes a
    plain ``BatchNorm2d`` with the same state. :class:`CPUSyncBatchNorm` stops syncing."""
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.SyncBatchNorm):
            setattr(module, name, _batchnorm_like(torch.nn.BatchNorm2d, child))
        elif isinstance(child, CPUSyncBatchNorm):
            child.synced = False
        else:
            local_batchnorm(child)
    return module


def local_world_size(dist: DistInfo) -> int:
    """Processes sharing this machine's cores (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if dist.enabled else 1
