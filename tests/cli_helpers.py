"""Run several independent command lines at once (not a test module itself).

Most of a short command's time here is Python importing torch and torchvision on one core; on the 2-core CI box two
such commands side by side take little more than one. Each keeps its own output, exit code and timeout.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_together(commands: Sequence[Sequence[str]], cwd: str = ROOT, env: dict | None = None,
                 timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Start every ``python <args>`` in ``commands`` at once, wait for all; results in the order given."""
    env = dict(os.environ, OMP_NUM_THREADS="1") if env is None else env
    procs = [subprocess.Popen([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    done = []
    try:
        for args, p in zip(commands, procs):
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess([sys.executable, *args], p.returncode, out, err))
    finally:
        for p in procs:  # a timeout or a failed assertion leaves no process behind
            if p.poll() is None:
                p.kill()
                p.communicate()
    return done
