"""Atomic checkpoint files: plain dicts that ``torch.load(weights_only=True)`` can read."""
from __future__ import annotations

import os
from typing import Any

import torch

from utils.errors import UserError
from utils.files import atomic_write  # noqa: F401  (re-exported: callers import it from here)


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; never runs code stored in the file."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found; pass a .pt file written by train.py (e.g. RUN/best.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot read checkpoint {path} ({first}); it must be a .pt file written by train.py") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} is not a train.py checkpoint (no 'model' entry); for bare weights use --pretrained {path}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], use_ema: bool = True) -> torch.nn.Module:
    """Rebuild the network a checkpoint describes (``ckpt["arch"]``) and load its weights, in eval mode.

    When the checkpoint carries EMA weights they are the ones validation used, so they are preferred.
    """
    from models import build_model  # local import: models imports utils.errors

    arch = ckpt.get("arch")
    if not isinstance(arch, dict) or "name" not in arch:
        raise UserError("checkpoint has no 'arch' entry (model name, classes, width); re-save it with train.py")
    model = build_model(**arch)
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    if ckpt.get("pruned"):  # utils/deploy/prune.py removed channels: give the fresh model the stored (smaller) shapes
        from utils.deploy.prune import shrink_to_state_dict

        shrink_to_state_dict(model, weights)
    model.load_state_dict(weights, strict=True)
    return model.eval()
