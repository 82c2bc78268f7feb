"""Atomic checkpoint writes: never a half-written file, normal permissions, weights_only loading."""
import os
import stat

import pytest
import torch

from utils.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from utils.errors import UserError


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(str(path), {"model": {"w": torch.ones(2)}, "epoch": 1})

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), crash)
    assert load_checkpoint(str(path))["epoch"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint(str(tmp_path / "best.pt"), {"model": {}})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "best.pt").st_mode) == 0o644


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint .*missing.pt not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    torch.save({"w": torch.ones(1)}, tmp_path / "bare.pt")
    with pytest.raises(UserError, match="is not a train.py checkpoint .no 'model' entry."):
        load_checkpoint(str(tmp_path / "bare.pt"))
