"""train.py's main with test hooks, for tests that launch it under torchrun (not a test module itself).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/torchrun_driver.py <train.py args>

:func:`launch` runs it so from a test (``nproc=1``: plain python, no torchrun).

Hooks, from environment variables:
- ``SIGINT_RANK`` and ``SIGINT_AT_STEP``: that rank sends itself a real SIGINT (what torchrun forwards on
  Ctrl-C) just before its ``SIGINT_AT_STEP``-th call of train_step (0-based, counted over the whole run);
  the other ranks get no signal.
- ``DUMP_FEATURES=DIR``: with ``--set cache_features=true``, each rank writes the cached feature tensors and
  how many images it encoded itself to ``DIR/rank<R>.pt``.
- ``SYNC_EVERY=K``: train_one_epoch reads loss/accuracy (and checks for Ctrl-C under torchrun) every K steps,
  as on a GPU, whatever the device.
- ``CLOCK_LAG=SECONDS``: rank 1 starts its run clock that many seconds earlier than it did (torchrun processes
  start a moment apart), and each rank writes the budget it handed the compile decision to
  ``COMPILE_RUN_S_DIR/rank<R>.txt``; compile itself is decided off there (no probe: it would compile for minutes).
- ``DETERMINISTIC=1``: deterministic GPU kernels and no cuDNN autotuning, for bit-exact comparisons between
  GPU runs (needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment), see :func:`deterministic`.
"""
import os
import signal
import subprocess
import sys

from utils.process import configure_process

if __name__ == "__main__":
    configure_process("train")  # as train.py does, before torch loads

import torch  # noqa: E402

import train  # noqa: E402
import utils.train_loop as tl  # noqa: E402
from utils.errors import run_main  # noqa: E402

RANK = int(os.environ.get("RANK", 0))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(args: list, nproc: int, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    """Run this driver with ``args`` in ``nproc`` processes (one OpenMP thread each); ``ok``: assert it succeeded."""
    # The repository root on the path: the driver runs from tests/ (an editable install does the same).
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **(env or {}))
    cmd = [sys.executable, os.path.abspath(__file__)] + list(args)
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def hook_sigint(rank: int, at_step: int) -> None:
    real_step, calls = tl.train_step, {"n": 0}

    def step(*a, **k):
        if RANK == rank and calls["n"] == at_step:
            os.kill(os.getpid(), signal.SIGINT)
        calls["n"] += 1
        return real_step(*a, **k)

    tl.train_step = step


def hook_feature_dump(folder: str) -> None:
    from utils.deploy.inference import ImageFiles  # the feature pass's dataset

    real_cache, real_getitem, encoded = train.cache_pooled_features, ImageFiles.__getitem__, {"n": 0}

    def getitem(self, i):
        encoded["n"] += 1
        return real_getitem(self, i)

    def cache(*a, **k):
        bundle = real_cache(*a, **k)
        os.makedirs(folder, exist_ok=True)
        torch.save({"train_x": bundle.train_loader.feats, "train_y": bundle.train_loader.labels,
                    "val_x": bundle.val_loader.feats, "val_y": bundle.val_loader.labels, "encoded": encoded["n"]},
                   os.path.join(folder, f"rank{RANK}.pt"))
        return bundle

    ImageFiles.__getitem__ = getitem
    train.cache_pooled_features = cache


def hook_clock_lag(lag_s: float, folder: str) -> None:
    import utils.machine as machine

    real_open, real_decide = train.open_run, machine.decide_compile

    def open_run(*a, **k):
        run, start_epoch = real_open(*a, **k)
        if RANK == 1:
            run.t0 -= lag_s
        return run, start_epoch

    def decide_compile(mode, best, *, run_s=None, **k):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"rank{RANK}.txt"), "a") as f:
            f.write(f"{run_s}\n")
        return real_decide("off", best, run_s=run_s, **k)

    train.open_run = open_run
    machine.decide_compile = decide_compile


def deterministic() -> None:
    """Same GPU results in every process: deterministic cuDNN/cuBLAS algorithms, and cuDNN autotuning kept off
    even if train.py turns it on (it times the candidate algorithms in each process and may pick a different
    one, with different rounding, in each). ``warn_only``: an op PyTorch flags as nondeterministic that has
    no alternative warns instead of stopping; in these models that is adaptive_avg_pool2d's backward, whose
    1x1 output adds each input gradient exactly once, so it is exact anyway."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    type(torch.backends.cudnn).benchmark = property(lambda self: False, lambda self, value: None)


def set_sync_every(k: int) -> None:
    real = train.train_one_epoch
    train.train_one_epoch = lambda *a, **kw: real(*a, sync_every=k, **kw)


if __name__ == "__main__":
    if "SYNC_EVERY" in os.environ:
        set_sync_every(int(os.environ["SYNC_EVERY"]))
    if "SIGINT_AT_STEP" in os.environ:
        hook_sigint(int(os.environ["SIGINT_RANK"]), int(os.environ["SIGINT_AT_STEP"]))
    if "DUMP_FEATURES" in os.environ:
        hook_feature_dump(os.environ["DUMP_FEATURES"])
    if "CLOCK_LAG" in os.environ:
        hook_clock_lag(float(os.environ["CLOCK_LAG"]), os.environ["COMPILE_RUN_S_DIR"])
    if os.environ.get("DETERMINISTIC") == "1":
        deterministic()
    run_main(lambda: train.main(sys.argv[1:]))
