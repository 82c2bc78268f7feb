"""Process-wide settings, applied once by a command (never by a library module on import).

How idle OpenMP threads wait must be set before torch is imported (OpenMP reads it once, at start-up).
PyTorch's CPU kernels end every parallel region in a barrier. Busy-waiting threads there make a quiet machine
faster and a shared one much slower; a short spin then sleep is the measured middle for training (mobilenet_v2
x0.5 training step, 48 px, batch 256, 2-core CPU, images/s):

| idle OpenMP threads                  | quiet machine | one other busy process |
|--------------------------------------|--------------:|-----------------------:|
| libgomp default (spin ~300k rounds)  | 1,820         | 466                    |
| OMP_WAIT_POLICY=PASSIVE (sleep)      | 1,383         | 837                    |
| GOMP_SPINCOUNT=3000 (used to train)  | 1,770         | 675                    |

Evaluation and prediction let idle threads sleep at once, so DataLoader decode workers (and other jobs) get
the cores: measured 20 vs 3 images/s (predict, 224 px) and 1134 vs 753 (evaluate, 32 px) on a busy 2-core CPU.
A value the user set always wins. This module imports nothing but the standard library.
"""
from __future__ import annotations

import os
import sys

SPINCOUNT = "3000"
PROFILES = ("train", "infer")


def short_openmp_spin() -> bool:
    """Set ``GOMP_SPINCOUNT`` unless the user chose a wait policy; True when the environment changed."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
    return True


def configure_process(profile: str, restart: bool = False) -> bool:
    """Apply the process settings of a command: ``train`` (short OpenMP spin: train.py, the training benchmarks)
    or ``infer`` (idle OpenMP threads sleep: evaluate.py, predict.py). Call it before importing torch.

    ``restart``: when torch is already loaded (a benchmark mode chosen after its imports) and the setting
    changed, start the process again with it (OpenMP would ignore it now). Returns True when it changed.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown process profile {profile!r}; one of {PROFILES}")
    if profile == "train":
        changed = short_openmp_spin()
    else:
        changed = "OMP_WAIT_POLICY" not in os.environ
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if changed and "torch" in sys.modules:  # too late: OpenMP has read its settings already
        if not restart:
            raise RuntimeError("configure_process() must run before torch is imported (OpenMP reads its "
                               "settings once); import it first and call it before any module that loads torch")
        os.execv(sys.executable, [sys.executable] + sys.argv)
    return changed
