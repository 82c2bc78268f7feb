"""Parameter and multiply-add counts (MACs via torch.utils.flop_counter, no extra dependency)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, img_size: int = 224) -> int:
    """Multiply-adds of one forward pass on a single ``img_size`` x ``img_size`` RGB image.

    FlopCounterMode counts 2 FLOPs per multiply-add for convolutions and matmuls.
    """
    was_training = model.training
    model.eval()
    p = next(model.parameters())
    x = torch.zeros(1, 3, img_size, img_size, dtype=p.dtype, device=p.device)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() // 2
