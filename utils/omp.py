"""How idle OpenMP threads wait, set before torch is imported (OpenMP reads it once, at start-up).

PyTorch's CPU kernels end every parallel region in a barrier. Busy-waiting threads there make a quiet machine
faster and a shared one much slower; a short spin then sleep is the measured middle (mobilenet_v2 x0.5 training
step, 48 px, batch 256, 2-core CPU, images/s):

| idle OpenMP threads                  | quiet machine | one other busy process |
|--------------------------------------|--------------:|-----------------------:|
| libgomp default (spin ~300k rounds)  | 1,820         | 466                    |
| OMP_WAIT_POLICY=PASSIVE (sleep)      | 1,383         | 837                    |
| GOMP_SPINCOUNT=3000 (used here)      | 1,770         | 675                    |
"""
from __future__ import annotations

import os

SPINCOUNT = "3000"


def short_openmp_spin() -> bool:
    """Set ``GOMP_SPINCOUNT`` unless the user chose a wait policy; True when the environment changed."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPINCOUNT
    return True
