"""The training and validation loops train.py runs, and the pieces they need (AMP choice, EMA, frozen
backbone, mixup/cutmix). ``benchmark.py train`` times :func:`train_step`, the very step train.py runs.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2
from tqdm import tqdm

from utils import machine
from utils.balance import epoch_order
from utils.config import TrainConfig
from utils.data import (
    SkippedFiles,
    build_eval_transform,
    load_split,
    unreadable_line,
    worker_ignores_ctrl_c,
)
from utils.deploy.engine import fast_forward
from utils.deploy.inference import ImageFiles, collate_readable
from utils.distributed import (
    all_reduce_sum,
    broadcast_object,
    gather_rows,
    is_main_process,
    local_batchnorm,
    shard_indices,
)
from utils.errors import UserError
from utils.machine import Choice, decide_forward_threads
from utils.metrics import class_summary, confusion_counts, standard_errors, topk_correct
from utils.schedule import WarmupCosine


def training_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else is checked and used as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    return dev


class EMA:
    """Exponential moving average of a model's weights: ``ema = decay * ema + (1 - decay) * w`` after each
    step; buffers (BatchNorm statistics) are copied. ``state_dict()`` loads straight into the model.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = [p for p in self.module.parameters()]
        cur_p = [p.detach() for p in model.parameters()]
        floats = [(e, c) for e, c in zip(ema_p, cur_p) if e.dtype.is_floating_point]
        if floats:
            torch._foreach_lerp_([e for e, _ in floats], [c for _, c in floats], 1.0 - self.decay)
        ema_b = list(self.module.buffers())
        if ema_b:  # one fused copy, not one kernel launch per BatchNorm buffer
            torch._foreach_copy_(ema_b, [b.detach() for b in model.buffers()])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


class Trainable:
    """How a training step calls the network.

    - unfrozen: ``net(x)`` where ``net`` is the model (or its DDP / compiled wrapper);
    - frozen backbone: ``model.features`` runs in eval mode under ``torch.no_grad()`` (no activations
      kept, BatchNorm statistics untouched), only ``head`` (the classifier, maybe DDP-wrapped) trains;
    - cached features (``inputs_are_features``): the batches already are pooled features.
    """

    def __init__(self, model: nn.Module, net: Optional[nn.Module] = None, frozen: bool = False,
                 head: Optional[nn.Module] = None, inputs_are_features: bool = False,
                 compiled_batch: int = 0, freeze_bn: bool = False) -> None:
        self.model = model
        self.net = net if net is not None else model
        self.frozen = frozen
        self.head = head if head is not None else model.classifier
        self.inputs_are_features = inputs_are_features
        # A compiled ``net`` runs batches of this size; any other size (an epoch's last batch, a batch that lost
        # an unreadable image) runs eagerly instead of paying a recompile, possibly into slower dynamic shapes.
        self.compiled_batch = compiled_batch
        # BatchNorm layers keep their (pretrained) running statistics and normalise with them while the weights
        # train: the features the head learned on stay the same when the backbone unfreezes.
        self.freeze_bn = freeze_bn

    def train(self) -> None:
        self.model.train()
        if self.frozen:
            self.model.features.eval()
        elif self.freeze_bn:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.inputs_are_features:
            return self.head(x)
        if self.frozen:
            with torch.no_grad():
                feats = self.model.forward_features(x)
            return self.head(feats)
        if self.compiled_batch and x.shape[0] != self.compiled_batch:
            return getattr(self.net, "_orig_mod", self.net)(x)
        return self.net(x)


def build_mixup(mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> Optional[Callable]:
    """torchvision v2 MixUp / CutMix (one picked per batch when both are on), or None."""

    ops = []
    if mixup_alpha > 0:
        ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


@dataclass
class StepContext:
    """Everything one optimizer step needs besides the batch."""

    trainable: Trainable
    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    device: torch.device
    amp_dtype: Optional[torch.dtype] = None
    scaler: Optional["torch.amp.GradScaler"] = None
    ema: Optional[EMA] = None
    mixup: Optional[Callable] = None
    clip_grad_norm: float = 0.0
    channels_last: bool = True
    params: list = field(default_factory=list)  # trainable parameters (for clipping)


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """Autocast context for ``dtype`` on ``device`` (a no-op for fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    if channels_last and images.dim() == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


def train_step(ctx: StepContext, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on one batch; returns (loss, logits), both detached."""
    images = to_device(images, ctx.device, ctx.channels_last)
    targets = targets.to(ctx.device, non_blocking=True)
    soft = targets
    if ctx.mixup is not None:
        images, soft = ctx.mixup(images, targets)
    with autocast(ctx.device, ctx.amp_dtype):
        logits = ctx.trainable(images)
        loss = ctx.criterion(logits.float(), soft)
    ctx.optimizer.zero_grad(set_to_none=True)
    if ctx.scaler is not None:
        ctx.scaler.scale(loss).backward()
        if ctx.clip_grad_norm > 0:
            ctx.scaler.unscale_(ctx.optimizer)
            nn.utils.clip_grad_norm_(ctx.params, ctx.clip_grad_norm)
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    else:
        loss.backward()
        if ctx.clip_grad_norm > 0:
            nn.utils.clip_grad_norm_(ctx.params, ctx.clip_grad_norm)
        ctx.optimizer.step()
    if ctx.ema is not None:
        ctx.ema.update(ctx.trainable.model)
    return loss.detach(), logits.detach()


def make_probe_step(model: nn.Module, *, frozen: bool, device: torch.device, batch: int, img_size: int,
                    num_classes: int, full_batch: int = 0) -> Callable:
    """``factory(variant) -> step``: one real training step of a copy of ``model`` on random images, for
    utils.machine's speed probe (the model itself, its optimizer and the RNG stay untouched).

    ``variant`` is ``(channels_last, amp_dtype)``, run on ``batch`` images, or ``(channels_last, amp_dtype,
    compiled)``, run on ``full_batch`` images (the run's batch: the compile made here is the one the run needs,
    so the run finds it in torch's compile caches)."""
    criterion = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    inputs = {n: (torch.randn(n, 3, img_size, img_size, generator=gen), torch.arange(n) % num_classes)
              for n in {batch, full_batch or batch}}

    def factory(variant: tuple) -> Callable[[], None]:
        channels_last, dtype = variant[0], variant[1]
        compiled = len(variant) > 2 and bool(variant[2])
        x, y = inputs[full_batch or batch] if len(variant) > 2 else inputs[batch]
        # process groups of synced BatchNorm cannot be copied (nor should they be): the copy gets None
        memo = {id(g): None for m in model.modules() for g in (getattr(m, "group", None),
                                                               getattr(m, "process_group", None))
                if g is not None and not isinstance(g, (nn.Module, torch.Tensor))}
        net = local_batchnorm(copy.deepcopy(model, memo)).to(device)  # one process: no collectives with the others
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9)
        trainable = Trainable(net, torch.compile(net) if compiled else None, frozen=frozen)
        ctx = StepContext(trainable, opt, criterion, device, dtype,
                          torch.amp.GradScaler("cuda") if dtype == torch.float16 else None,
                          channels_last=channels_last, params=params)

        def step() -> None:
            with torch.random.fork_rng(devices=[]):  # dropout draws must not shift the run's random stream
                train_step(ctx, x, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        return step

    return factory


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Seed of the global RNG (dropout, mixup) for one epoch: resuming at an epoch start replays it exactly."""
    return (seed * 1_000_003 + epoch * 7919 + rank) % (2**63)


class NonFiniteLoss(Exception):
    """The loss became NaN or inf; carries where it happened."""

    def __init__(self, epoch: int, batch: int, step: int, value: float) -> None:
        super().__init__(f"loss is {value} at epoch {epoch}, step {batch} of the epoch (global step {step})")
        self.epoch, self.batch, self.step, self.value = epoch, batch, step, value


# Steps between host reads of the running loss/accuracy on a GPU (each read waits for the GPU to finish, and
# under torchrun is also where a Ctrl-C is noticed: 20 steps of 1 s stay within torchrun's 30 s shutdown grace).
DEVICE_SYNC_EVERY = 20


@dataclass
class EpochProgress:
    """Mutable position inside an epoch, readable after a Ctrl-C: batches done, global step, sums.

    ``ranks`` is set only for a mid-epoch checkpoint: every process's RNG state and sums (utils.rank_state).
    """

    batches_done: int = 0
    step: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    ranks: Optional[list] = None


class PendingSums:
    """Per-step loss and correct-count tensors the host has not read yet.

    On a GPU, reading a value waits for every queued kernel, so the loop only queues these tiny tensors and
    reads them every few steps. :meth:`flush_into` then adds them in step order, exactly as a per-step read
    would (float32 loss -> Python float, times the batch size), so the logged numbers do not depend on when.
    """

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        self.correct: list[torch.Tensor] = []
        self.where: list[tuple[int, int, int]] = []  # (batch index in the epoch, global step, batch size)

    def __len__(self) -> int:
        return len(self.losses)

    def add(self, batch: int, step: int, loss: torch.Tensor, correct: torch.Tensor, size: int) -> None:
        self.losses.append(loss.reshape(()))
        self.correct.append(correct.reshape(()))
        self.where.append((batch, step, size))

    def flush_into(self, progress: EpochProgress, epoch: int) -> None:
        """Read the pending values (one device-to-host copy) into ``progress``.

        Raises :class:`NonFiniteLoss` at the first NaN/inf loss, naming that step; the sums before it are kept.
        """
        if not self.losses:
            return
        values = torch.stack([torch.stack(self.losses).double(), torch.stack(self.correct).double()]).tolist()
        where = self.where
        self.losses, self.correct, self.where = [], [], []
        for loss_v, correct, (batch, step, size) in zip(values[0], values[1], where):
            if not math.isfinite(loss_v):
                raise NonFiniteLoss(epoch, batch, step, loss_v)
            progress.loss_sum += loss_v * size
            progress.correct += int(correct)
            progress.seen += size


def train_one_epoch(ctx: StepContext, loader: Iterable, schedule: WarmupCosine, epoch: int,
                    progress: EpochProgress, *, max_steps: int = 0, bar: bool = False,
                    total: Optional[int] = None, sync_every: int = 0,
                    stop: Optional[Callable[[], None]] = None) -> dict[str, float]:
    """Train one epoch from ``progress.batches_done`` (non-zero when resuming mid-epoch).

    The lr is set per iteration from the global step. Loss and accuracy stay on the device and are read
    every ``sync_every`` steps (0: every step on a CPU, where reading costs nothing, and every
    :data:`DEVICE_SYNC_EVERY` steps elsewhere), on progress-bar refreshes (at most once a second), at the end
    and on an interrupt. :class:`NonFiniteLoss` is raised when a NaN/inf loss is read: on a CPU right after the
    bad step, on a GPU up to ``sync_every - 1`` steps later (the message names the bad step either way; no
    checkpoint is written after it). ``stop`` (torchrun: :class:`utils.rank_state.StopRequest`) is called
    after every step in one process (reading its flag costs nothing) and under torchrun every ``sync_every`` steps,
    on every process at the same steps (there it is a collective); it raises a KeyboardInterrupt to end the epoch
    there. Returns this process's sums plus the all-reduced means.
    """

    ctx.trainable.train()
    skip = progress.batches_done
    every = sync_every or (1 if ctx.device.type == "cpu" else DEVICE_SYNC_EVERY)
    stop_every = every if getattr(stop, "collective", False) else 1
    n = total if total is not None else (len(loader) if hasattr(loader, "__len__") else None)
    if max_steps:
        n = min(n, max_steps) if n is not None else max_steps
    pbar = tqdm(total=n, initial=skip, desc=f"epoch {epoch}", disable=not bar, leave=False, dynamic_ncols=True)
    t0 = last_read = time.perf_counter()
    lr = schedule.lr_at(progress.step)
    pending = PendingSums()
    try:
        for i, (images, targets) in enumerate(loader):
            if max_steps and i >= max_steps:
                break
            if i < skip:  # already trained on before the interruption
                continue
            lr = schedule.apply(ctx.optimizer, progress.step)
            targets = targets.to(ctx.device, non_blocking=True)  # once here; train_step's .to is then a no-op
            loss, logits = train_step(ctx, images, targets)
            pending.add(i, progress.step, loss, (logits.argmax(1) == targets).sum(), targets.shape[0])
            progress.batches_done = i + 1
            progress.step += 1
            done = i + 1 - skip
            if len(pending) >= every or (bar and time.perf_counter() - last_read >= 1.0):
                pending.flush_into(progress, epoch)
                last_read = time.perf_counter()
                if bar:
                    pbar.set_postfix(loss=f"{progress.loss_sum / max(progress.seen, 1):.4f}",
                                     acc=f"{100 * progress.correct / max(progress.seen, 1):.2f}", lr=f"{lr:.4g}",
                                     refresh=False)
            pbar.update(1)
            if stop is not None and done % stop_every == 0:
                stop()
        pending.flush_into(progress, epoch)
    except KeyboardInterrupt:
        pending.flush_into(progress, epoch)  # a mid-epoch checkpoint must hold the sums of every batch done
        progress.seconds += time.perf_counter() - t0
        raise
    finally:
        pbar.close()
    progress.seconds += time.perf_counter() - t0
    loss_sum, correct, seen = all_reduce_sum([progress.loss_sum, progress.correct, progress.seen], ctx.device)
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": 100.0 * correct / max(seen, 1),
            "images": seen, "lr": lr}


@torch.no_grad()
def validate(model: Callable[[torch.Tensor], torch.Tensor], loader: Iterable, criterion: nn.Module,
             device: torch.device, *, amp_dtype: Optional[torch.dtype] = None, channels_last: bool = True,
             bar: bool = False, desc: str = "val", num_classes: int = 0) -> dict[str, float]:
    """Mean loss, top-1/top-5 accuracy, balanced accuracy (percent) and macro-F1 (0-1) over ``loader``, summed over
    all processes. The last two come from the confusion matrix through utils.metrics.class_summary, as in
    evaluate.py; ``val_top1_se`` / ``val_bal_acc_se`` are their standard errors (utils.metrics.standard_errors).
    Pass ``num_classes`` under torchrun (a process without val images must all-reduce as many counts as the
    others); else it is read from the logits."""

    if isinstance(model, nn.Module):
        model.eval()  # BatchNorm/dropout in inference mode (train_one_epoch switches back via Trainable.train)
    loss_sum, top1, top5, n = 0.0, 0, 0, 0
    cm = torch.zeros(num_classes ** 2, dtype=torch.int64, device=device) if num_classes else None  # flattened
    for images, targets in tqdm(loader, desc=desc, disable=not bar, leave=False, dynamic_ncols=True):
        images = to_device(images, device, channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        loss_sum += float(criterion(logits, targets)) * targets.shape[0]
        c1, c5 = topk_correct(logits, targets, (1, 5))
        top1, top5, n = top1 + c1, top5 + c5, n + targets.shape[0]
        k = logits.shape[1]
        counts = confusion_counts(targets, logits.argmax(1), k)
        cm = counts if cm is None else cm + counts
    k = int(round(len(cm) ** 0.5)) if cm is not None else 0
    cells = cm.tolist() if cm is not None else []
    loss_sum, top1, top5, n, *cells = all_reduce_sum([loss_sum, top1, top5, n, *cells], device)
    n = max(n, 1)
    cm = np.asarray(cells, dtype=np.float64).reshape(k, k)
    summary, se = class_summary(cm), standard_errors(cm)
    return {"val_loss": loss_sum / n, "val_top1": 100.0 * top1 / n, "val_top5": 100.0 * top5 / n,
            "val_bal_acc": summary["balanced_acc"], "val_macro_f1": summary["macro_f1"],
            "val_top1_se": se["top1"], "val_bal_acc_se": se["balanced_acc"]}


class FeatureBatches:
    """Batches of cached (features, label) tensors; shuffled per epoch from (seed, epoch), sharded by rank; with
    ``weights``, each epoch is ``n`` draws with replacement in proportion to them (utils.balance.epoch_order)."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.feats, self.labels, self.batch_size = feats, labels, batch_size
        self.shuffle, self.seed, self.rank, self.world = shuffle, seed, rank, world_size
        self.epoch = 0
        self.weights: Optional[torch.Tensor] = None  # class-balanced draw (utils.balance.use_balanced_sampler)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        if not self.shuffle:
            return torch.arange(self.rank, n, self.world)  # every sample exactly once over all ranks
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = epoch_order(n, g, self.weights)
        usable = n - n % self.world  # equal share per rank for the gradient all-reduce
        return order[:usable][self.rank::self.world]

    def __len__(self) -> int:
        return math.ceil(len(self._indices()) / self.batch_size)

    def __iter__(self):
        idx = self._indices()
        for i in range(0, len(idx), self.batch_size):
            j = idx[i:i + self.batch_size]
            yield self.feats[j], self.labels[j]


@dataclass
class FeatureBundle:
    """Same attributes as utils.data.DataBundle, over cached features."""

    train_loader: FeatureBatches
    val_loader: FeatureBatches
    classes: list
    num_train: int
    num_val: int
    engine: Optional[Choice] = None  # what ran the backbone over the images, and why (utils/deploy/engine.py)
    skipped_files: list = field(default_factory=list)  # unreadable train + val images left out, over all processes

    def set_epoch(self, epoch: int) -> None:
        self.train_loader.set_epoch(epoch)

    def skipped_everywhere(self) -> set[str]:
        """Unreadable images skipped by all processes: already global (the feature pass gathers them)."""
        return set(self.skipped_files)


@torch.no_grad()
def encode_pooled(model: nn.Module, samples: list, transform: Callable, batch_size: int, workers: int, *,
                  fwd=None, engine: str = "auto", threads: Optional[int] = None, desc: str = "",
                  bar: bool = False, stop: Optional[Callable[[], None]] = None,
                  ) -> tuple[torch.Tensor, object, torch.Tensor, list[tuple[str, str]]]:
    """Pooled backbone features (float32, CPU) of the readable image files among ``samples`` ([(path, label)]),
    in order (``torch.empty(0)`` when there are none); the forward engine that computed them (``fwd`` when
    given, else the one utils.deploy.engine.fast_forward picks on the first real batch); a bool mask over ``samples``
    of the files that were read; and ``[(path, error)]`` of the unreadable ones (utils.deploy.inference.ImageFiles).
    ``stop`` is called after every batch and raises to end the pass (train.py's Ctrl-C, one process only)."""


    paths = [p for p, _ in samples]
    loader = torch.utils.data.DataLoader(ImageFiles(paths, transform), batch_size=batch_size, num_workers=workers,
                                         collate_fn=collate_readable, worker_init_fn=worker_ignores_ctrl_c)
    feats, read, failed = [], torch.zeros(len(paths), dtype=torch.bool), []
    for x, idx, bad in tqdm(loader, desc=desc, disable=not bar, leave=False):
        failed += [(paths[i], err) for i, err in bad]
        if x is None:  # every file of this batch was unreadable
            continue
        read[idx] = True
        if fwd is None:
            fwd = fast_forward(model, x, method="forward_features", images=len(samples), engine=engine,
                               threads=threads)
            feats.append(fwd.first.float().cpu())
        else:
            feats.append(fwd.run(x).float().cpu())
        if stop is not None:
            stop()
    return (torch.cat(feats) if feats else torch.empty(0)), fwd, read, failed


@torch.no_grad()
def cache_pooled_features(model: nn.Module, data_dir: str, preprocess: dict, batch_size: int, workers: int,
                          device: torch.device, seed: int, rank: int = 0, world_size: int = 1,
                          bar: bool = False, engine: str = "auto",
                          stop: Optional[Callable[[], None]] = None) -> FeatureBundle:
    """Run the frozen backbone once over train/ and val/ (eval transform, no augmentation) and keep the
    pooled features, so a frozen-backbone run trains only the classifier, on tensors, in seconds.

    Under torchrun each process encodes only its :func:`utils.distributed.shard_indices` rows and
    :func:`utils.distributed.gather_rows` gives every process the full tensors, in file order. Unreadable files
    are named in one line by the process that met them and left out; the bundle's ``skipped`` counts them over
    all processes (the same number on each). The backbone runs
    on the fastest engine this machine has (utils/deploy/engine.py: onnxruntime on a CPU when it matches PyTorch on the
    first batch; ``engine`` forces ``pytorch`` or ``onnxruntime``); the bundle's ``engine`` says which and why.
    ``stop``: see :func:`encode_pooled` (one process only: the processes' shares end at different batches).
    """


    transform = build_eval_transform(preprocess)
    model.eval()
    threads = decide_forward_threads(workers)
    fwd = None  # chosen on the first real batch
    out = {}
    skipped: list[str] = []
    splits = load_split(data_dir)  # val labelled with train's classes
    classes = list(splits[0].classes)
    for split, ds in zip(("train", "val"), splits):
        samples = list(ds.samples)
        mine = [samples[i] for i in shard_indices(len(samples), rank, world_size)]
        feats, fwd, read, failed = encode_pooled(model, mine, transform, batch_size, workers, fwd=fwd,
                                                 engine=engine, threads=threads.value,
                                                 desc=f"caching {split} features", bar=bar, stop=stop)
        SkippedFiles().add(failed)  # each process names the files of its own share
        # Every process contributes all its rows (zeros where unreadable) plus a mask, so the gather stays aligned.
        if len(feats) < len(mine):
            row = feats.shape[1:] if len(feats) else model.forward_features(
                torch.zeros(1, 3, preprocess["img_size"], preprocess["img_size"],
                            device=next(model.parameters()).device)).shape[1:]
            full = torch.zeros((len(mine), *row))
            full[read] = feats
            feats = full
        keep = gather_rows(read.float(), len(samples)) > 0
        labels = torch.tensor([label for _, label in samples], dtype=torch.int64)
        if not keep.any():
            first = f" (first: {unreadable_line(*failed[0])})" if failed else ""
            raise UserError(f"{os.path.join(data_dir, split)}: none of its {len(samples)} images could be "
                            f"read{first}; fix or remove them")
        skipped += [samples[i][0] for i in torch.nonzero(~keep).flatten().tolist()]
        out[split] = (gather_rows(feats, len(samples))[keep], labels[keep])
    return FeatureBundle(
        FeatureBatches(*out["train"], batch_size, shuffle=True, seed=seed, rank=rank, world_size=world_size),
        FeatureBatches(*out["val"], batch_size, shuffle=False, rank=rank, world_size=world_size),
        classes, len(out["train"][1]), len(out["val"][1]),
        fwd.choice if fwd else None, skipped_files=skipped)


def speed_plan(cfg: TrainConfig, model: nn.Module, device: torch.device, cache: str, threads: machine.Choice,
               workers: machine.Choice, num_classes: int, resumed: dict | None,
               run_steps: int = 0, run_s: float | None = None) -> machine.SpeedPlan:
    """The run's automatic speed choices (utils/machine.py). On a CPU, precision and memory format come from a
    short probe of this very model's training step; a resumed run on the same machine reuses the probe it
    recorded, so it continues with the same choices (and bit for bit). ``run_steps`` (optimizer steps left), or
    ``run_s`` (seconds left under a time budget), decides whether torch.compile is worth probing."""
    frozen = cfg.freeze == "features"
    recorded = (resumed or {}).get("speed") or {}
    batch = machine.probe_batch(cfg.batch_size, cfg.img_size)

    def measure(variants):
        old = recorded.get("probe_s_per_step") or {}
        if recorded.get("machine") == machine.describe_machine(device) and all(machine.variant_name(v) in old
                                                                            for v in variants):
            return old, True
        factory = make_probe_step(model, frozen=frozen, device=device, batch=batch, img_size=cfg.img_size,
                                  num_classes=num_classes, full_batch=cfg.batch_size)
        full = any(len(v) > 2 for v in variants)  # the compile probe runs at the real batch size
        what = {"model": dict(model.arch), "img_size": cfg.img_size, "batch": cfg.batch_size if full else batch,
                "frozen": frozen, "small_input": cfg.small_input, "device": machine.describe_machine(device)}
        return machine.probe_variants(factory, variants, machine.cpu_info(), what)

    def probe(variants):  # rank 0 measures, every torchrun process trains with its choice
        result = None
        if is_main_process():
            try:
                result = measure(variants)
            except Exception as e:  # e.g. torch.compile without a C++ compiler: every rank must hear of it
                result = RuntimeError(f"{type(e).__name__}: {e}")
        result = broadcast_object(result)
        if isinstance(result, Exception):
            raise result
        return result

    return machine.plan_training(device=device, amp=cfg.amp, channels_last=cfg.channels_last, cache=cache,
                                 workers=workers, threads=threads, probe=probe, compile=cfg.compile, run_steps=run_steps,
                                 batch_scale=cfg.batch_size / batch, images_per_step=cfg.batch_size, run_s=run_s)
