"""The data folder a recipe names; the default Fashion-MNIST split is prepared on first use."""
from __future__ import annotations

import os

from datasets.fashion_mnist.prepare import ensure_default_dataset
from utils.config import TrainConfig
from utils.distributed import barrier
from utils.errors import UserError
from utils.files import REPO_ROOT


def resolve_data_dir(cfg: TrainConfig, is_main: bool) -> str:
    """The data folder; the default Fashion-MNIST split is prepared on first use."""
    default = TrainConfig().data
    if cfg.data == default and not os.path.isdir(cfg.data):
        path = os.path.join(REPO_ROOT, default)
        if not os.path.isdir(os.path.join(path, "train")):
            if is_main:
                print("preparing the default dataset (Fashion-MNIST class folders, train/val split) ...")
                ensure_default_dataset(os.path.join(REPO_ROOT, "datasets", "fashion_mnist"), progress=cfg.progress)
            barrier()
        return path
    if not os.path.isdir(cfg.data):
        raise UserError(f"data folder {cfg.data} not found; pass --data DIR with train/ and val/ class folders "
                        "(make one with split_dataset.py)")
    return cfg.data
