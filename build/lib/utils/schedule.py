"""Learning-rate schedule (linear warmup then cosine, per iteration) and the optimizer builder."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from utils.errors import UserError


class WarmupCosine:
    """Per-iteration learning rate: linear warmup to ``base_lr``, then cosine decay to ``min_lr``.

    With ``W = warmup_steps`` and ``T = total_steps``:
    - ``step < W``:  ``lr = base_lr * (step + 1) / W``   (never exactly 0, so the first step learns)
    - ``step >= W``: ``lr = min_lr + (base_lr - min_lr) * (1 + cos(pi * (step - W) / (T - W))) / 2``
    Steps past ``T`` stay at ``min_lr``.
    """

    def __init__(self, base_lr: float, total_steps: int, warmup_steps: int = 0, min_lr: float = 0.0,
                 start_step: int = 0) -> None:
        if total_steps < 1:
            raise ValueError("total_steps must be at least 1")
        self.base_lr = float(base_lr)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(min(max(warmup_steps, 0), total_steps))
        self.min_lr = float(min_lr)
        self.start_step = int(start_step)  # global step where this schedule begins (a later training phase)

    def lr_at(self, step: int) -> float:
        """Learning rate used for optimizer step ``step`` (0-based, global: ``start_step`` is this schedule's 0)."""
        step -= self.start_step
        w, t = self.warmup_steps, self.total_steps
        if step < w:
            return self.base_lr * (step + 1) / w
        if t == w:
            return self.base_lr
        progress = min(step - w, t - w) / (t - w)
        return self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every param group's lr for ``step`` (times the group's ``lr_mult``); returns the base lr."""
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        return lr

    def state_dict(self) -> dict[str, Any]:
        """Its settings (the position is the checkpoint's global ``step``)."""
        return {"base_lr": self.base_lr, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "min_lr": self.min_lr, "start_step": self.start_step}


def param_groups(model: nn.Module, weight_decay: float, no_wd_norm_bias: bool = False,
                 backbone_lr_mult: float = 1.0) -> list[dict[str, Any]]:
    """Split trainable parameters into groups by (backbone or head) x (decayed or not).

    Norm-layer weights and all biases skip weight decay when ``no_wd_norm_bias`` (they set scale and
    offset, and decaying them only hurts). Parameters under ``model.features`` get ``backbone_lr_mult``.
    """
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    no_decay: set[int] = set()
    if no_wd_norm_bias:
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, norm_types) or name == "bias":
                    no_decay.add(id(p))
    backbone = {id(p) for p in model.features.parameters()} if hasattr(model, "features") else set()
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in backbone, id(p) in no_decay), []).append(p)
    return [
        {"params": ps, "weight_decay": 0.0 if nd else weight_decay, "lr_mult": backbone_lr_mult if bb else 1.0}
        for (bb, nd), ps in sorted(groups.items())
    ]


def build_optimizer(model: nn.Module, name: str, lr: float, *, momentum: float = 0.9, nesterov: bool = False,
                    weight_decay: float = 0.0, no_wd_norm_bias: bool = False,
                    backbone_lr_mult: float = 1.0) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov), AdamW or RMSprop over :func:`param_groups`."""
    groups = param_groups(model, weight_decay, no_wd_norm_bias, backbone_lr_mult)
    if not groups:
        raise UserError("no trainable parameters: with freeze=features the classifier must stay trainable")
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "rmsprop":
        # TF-style settings of the MobileNet papers: alpha 0.9, eps 0.0316 (sqrt of 1e-3)
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, eps=0.0316, momentum=momentum)
    raise UserError(f"unknown optimizer '{name}'; choose sgd, adamw or rmsprop")
