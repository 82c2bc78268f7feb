"""A train.py run stopped by a real Ctrl-C (not a test module itself)."""
from __future__ import annotations

import os
import signal

import pytest

import train
import utils.train_loop as tl


def train_cut_at_step(monkeypatch: pytest.MonkeyPatch, argv: list[str], step: int) -> None:
    """``train.main(argv)`` with a real SIGINT sent just before its ``step``-th train_step call (0-based, counted over
    the whole run): the run saves last.pt after that step and stops with KeyboardInterrupt."""
    train_interrupted_at(monkeypatch, argv, "train_step", step)


def train_interrupted_at(monkeypatch: pytest.MonkeyPatch, argv: list[str], name: str, call: int) -> int:
    """``train.main(argv)`` with a real SIGINT sent just before the ``call``-th call (0-based) of
    ``utils.train_loop.<name>``; it must stop with KeyboardInterrupt. Returns how often ``name`` was called. Python's
    own SIGINT handler is put in place for the run, even when SIGINT was inherited as ignored (a shell's background
    job)."""
    real, calls = getattr(tl, name), {"n": 0}

    def call_then_interrupt(*a, **k):
        if calls["n"] == call:
            os.kill(os.getpid(), signal.SIGINT)
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(tl, name, call_then_interrupt)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train.main(argv)
    finally:
        signal.signal(signal.SIGINT, previous)
        monkeypatch.setattr(tl, name, real)
    return calls["n"]
