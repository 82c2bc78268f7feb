"""Stopping an epoch half-way under torchrun and continuing it: every process stops after the same step
(:class:`StopRequest`), and each one's RNG states and running sums are saved and restored.

Under torchrun every process draws its own dropout / mixup randomness (seeded at each epoch start from
``(seed, epoch, rank)``) and sums its own share of the epoch's loss and accuracy. A mid-epoch checkpoint
therefore keeps one entry per process in ``checkpoint["partial_epoch"]["ranks"]`` (gathered to rank 0, which
writes the file) and each process restores its own entry on resume. The top-level ``partial_epoch`` sums and
``checkpoint["rng"]`` stay rank 0's, so the format is a superset of the single-process one, and checkpoints
written before ``"ranks"`` existed (one process) still resume.

A mid-epoch checkpoint continues exactly only with the number of processes that wrote it (the batches each
process has trained on depend on it); epoch-end checkpoints resume with any number, as before.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist

from utils.distributed import all_reduce_sum
from utils.errors import UserError
from utils.train_loop import EpochProgress

SUMS = ("loss_sum", "correct", "seen", "seconds")


class StopRequested(KeyboardInterrupt):
    """Raised on every torchrun process after the same step because one of them got Ctrl-C (SIGINT)."""


class StopRequest:
    """Ctrl-C turned into a stop after a whole step (on every process under torchrun).

    A KeyboardInterrupt raised mid-step leaves the model half-stepped: the forward pass has already moved the
    BatchNorm running statistics, or only some parameter groups were updated, and a checkpoint of that state
    does not resume exactly. Under torchrun, where SIGINT reaches each process at a slightly different moment,
    it would also leave them inside different collectives (a hang until torchrun kills them). While installed,
    SIGINT only sets a flag; calling the object (a collective under torchrun: every process calls it at the same
    steps, see utils.train_loop.train_one_epoch) raises :class:`StopRequested` everywhere as soon as any process
    has the flag, so all can save one consistent mid-epoch checkpoint. In one process a second Ctrl-C stops at
    once (``KeyboardInterrupt``), for a step or a data pass that takes too long.
    """

    def __init__(self, device: torch.device, collective: bool = True) -> None:
        self.device = device
        self.collective = collective
        self.requested = False
        self._previous = None

    def install(self) -> "StopRequest":
        """Take over SIGINT (main thread only: elsewhere Python does not deliver signals). Returns self."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Give SIGINT its previous handler back."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _on_signal(self, signum, frame) -> None:
        if self.requested and not self.collective:  # the second Ctrl-C: at once
            self.uninstall()
            raise KeyboardInterrupt
        first = not self.requested
        self.requested = True  # before any output: a write can fail inside a signal handler
        if first and not self.collective:
            try:  # os.write, not print: print would re-enter a stderr write the signal interrupted
                os.write(2, b"\nCtrl-C: stopping after this step to save last.pt (Ctrl-C again to stop at once, "
                            b"without saving)\n")
            except OSError:
                pass

    def requested_anywhere(self) -> bool:
        """Collective: True on every process when any of them got SIGINT."""
        return all_reduce_sum([1.0 if self.requested else 0.0], self.device)[0] > 0

    def __call__(self) -> None:
        """Collective: raise :class:`StopRequested` on every process when any of them got SIGINT."""
        if self.requested_anywhere():
            raise StopRequested


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's CPU RNG state, plus its GPU's when it trains on one."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`rng_state`. Also takes the older ``"cuda"`` list of every GPU's state."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if device.type != "cuda" or cuda is None:
        return
    if isinstance(cuda, (list, tuple)):  # torch.cuda.get_rng_state_all() of a single-process run
        index = device.index or 0
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def local_state(progress: EpochProgress, device: torch.device) -> dict[str, Any]:
    """This process's entry: RNG states and partial-epoch sums (plain tensors and numbers)."""
    return {"rng": rng_state(device), "loss_sum": float(progress.loss_sum), "correct": int(progress.correct),
            "seen": int(progress.seen), "seconds": float(progress.seconds)}


def gather_rank_states(progress: EpochProgress, device: torch.device) -> list[dict[str, Any]] | None:
    """Collective: every process's :func:`local_state` in rank order on rank 0, None on the others."""
    mine = local_state(progress, device)
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, states, dst=0)
    return states


def partial_epoch_entry(progress: EpochProgress) -> dict[str, Any]:
    """``checkpoint["partial_epoch"]``: batches done, rank 0's sums (the single-process format), and with
    ``progress.ranks`` set (:func:`gather_rank_states`) every process's entry and their number."""
    entry = {"batches_done": progress.batches_done, "loss_sum": progress.loss_sum, "correct": progress.correct,
             "seen": progress.seen, "seconds": progress.seconds}
    if progress.ranks is not None:
        entry.update(world_size=len(progress.ranks), ranks=list(progress.ranks))
    return entry


def saved_world_size(partial: dict[str, Any]) -> int:
    """How many processes wrote a ``partial_epoch`` entry (1 for the older, single-process format)."""
    return int(partial.get("world_size", 1))


def check_resume_world(ckpt: dict[str, Any], world_size: int, path: str) -> None:
    """UserError when a mid-epoch checkpoint was written by a different number of processes than resume it."""
    partial = ckpt.get("partial_epoch")
    if not partial:
        return
    saved = saved_world_size(partial)
    if saved != world_size:
        how = "python train.py" if saved == 1 else f"torchrun --nproc_per_node={saved} train.py"
        raise UserError(f"{path} was saved half-way through an epoch by {saved} process(es), and this run has "
                        f"{world_size}: each process's share of that epoch depends on their number; resume it "
                        f"with `{how} --resume {path}`, or resume the checkpoint of a finished epoch")


def restore_partial(ckpt: dict[str, Any], rank: int, device: torch.device, step: int) -> EpochProgress:
    """Set this process's RNG states from a mid-epoch checkpoint; return its position and sums in the epoch."""
    partial = ckpt["partial_epoch"]
    ranks = partial.get("ranks")
    if ranks is None:  # single-process format: the sums at the top, the RNG state in ckpt["rng"]
        mine = {"rng": ckpt["rng"], **{k: partial[k] for k in SUMS}}
    else:
        mine = ranks[rank]
    set_rng_state(mine["rng"], device)
    return EpochProgress(int(partial["batches_done"]), step, float(mine["loss_sum"]), int(mine["correct"]),
                         int(mine["seen"]), float(mine["seconds"]))
