"""The checkpoint format, owned here: one module builds, saves, loads and rebuilds a model from it.

A checkpoint is a plain dict that ``torch.load(weights_only=True)`` can read (written atomically):

- ``model`` / ``ema``: state dicts (``ema`` None without EMA); ``arch``: ``build_model`` keyword arguments;
- ``classes``: class names in label order; ``preprocess``: a :class:`Preprocess` as a dict;
- ``optimizer``, ``scheduler``, ``scaler``, ``rng``, ``epoch``, ``step``, ``best_acc``, ``best_metric``,
  ``config`` (the run's TrainConfig as a dict), ``speed``, ``class_balance_used``, ``versions``, ``phase``,
  ``elapsed_s``, ``time_budget_fit``, ``partial_epoch`` (set only when Ctrl-C stopped an epoch half-way),
  ``best_se`` (standard error of ``best_acc``) and ``best_kept`` (``{"epoch", "value"}`` of the epoch in best.pt);
- ``pruned``: present on checkpoints written by prune.py (smaller channel counts, see shrink_to_state_dict).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torchvision
from torch import nn

from models import build_model
from utils.data.transforms import RESIZE_MODES
from utils.errors import UserError, torch_load_problem
from utils.files import atomic_write

PREPROCESS_KEYS = ("img_size", "resize_size", "mean", "std")  # required; "resize_mode" optional (default crop)
CALIBRATION_KEY = "calibration"  # checkpoint key / metadata name: temperature + reject threshold (utils/trust)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the network's input at evaluation: resize the shorter side to ``resize_size``
    (``resize_mode`` "crop") or the whole image to ``resize_size`` x ``resize_size`` ("squash"), center-crop
    ``img_size``, scale to [0, 1], normalise with ``mean``/``std``. Checkpoints and exported files carry it as a
    dict (:meth:`as_dict`); a dict without ``resize_mode`` (files from before it existed) means "crop"."""

    img_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str = "crop"

    @classmethod
    def from_config(cls, cfg: Any) -> "Preprocess":
        """The preprocessing of a TrainConfig (``img_size``, ``resize_size``, ``mean``, ``std``, ``resize_mode``,
        which train.py has decided by then when the recipe says "auto")."""
        if cfg.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {cfg.resize_mode!r} is not decided yet (train.py decide_resize_mode)")
        return cls(int(cfg.img_size), int(cfg.resize_size), tuple(float(v) for v in cfg.mean),
                   tuple(float(v) for v in cfg.std), cfg.resize_mode)

    @classmethod
    def from_dict(cls, d: Any, where: str = "the checkpoint", fix: str = "") -> "Preprocess":
        """Read the dict form; a UserError names ``where`` it came from and the ``fix`` when keys are missing."""
        if not isinstance(d, dict) or any(k not in d for k in PREPROCESS_KEYS):
            raise UserError(f"{where} carries no preprocessing (metadata 'preprocess' needs "
                            f"{', '.join(PREPROCESS_KEYS)}){'; ' + fix if fix else ''}")
        mode = d.get("resize_mode", "crop")
        if mode not in RESIZE_MODES:
            raise UserError(f"{where}: preprocess resize_mode {mode!r} is not one of {', '.join(RESIZE_MODES)} (a "
                            f"newer version wrote it?){'; ' + fix if fix else ''}")
        return cls(int(d["img_size"]), int(d["resize_size"]), tuple(float(v) for v in d["mean"]),
                   tuple(float(v) for v in d["std"]), mode)

    def as_dict(self) -> dict[str, Any]:
        """``{"img_size", "resize_size", "mean": [...], "std": [...]}`` plus ``"resize_mode": "squash"`` when
        squashed, the form stored in files (a crop file reads as it always has, to any reader)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.resize_mode == "crop":
            del d["resize_mode"]
        return d


def training_state(*, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, ema: Any, epoch: int,
                   step: int, best_acc: float, config: dict[str, Any], classes: Sequence[str], preprocess: Preprocess,
                   speed: dict[str, Any], balance: dict | None = None,
                   partial_epoch: dict | None = None) -> dict[str, Any]:
    """The checkpoint dict train.py saves: everything needed to continue bit for bit."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "epoch": epoch, "step": step, "best_acc": best_acc, "config": config, "classes": list(classes),
        "preprocess": preprocess.as_dict(),
        "arch": dict(model.arch), "rng": rng, "speed": speed,
        "class_balance_used": balance, "best_metric": (balance or {}).get("select_metric", "top1"),
        "versions": {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__)},
        "partial_epoch": partial_epoch,
    }


def pruned_state(ckpt: dict[str, Any], model: nn.Module, best_acc: float, source: str, ratio: float,
                 fine_tune_steps: int) -> dict[str, Any]:
    """The checkpoint of a pruned copy of ``ckpt``: the smaller weights, no optimizer state, a ``pruned`` entry."""
    state = {k: v for k, v in ckpt.items() if k not in ("optimizer", "scheduler", "scaler", "rng")}
    state.update(model={k: v.detach().cpu() for k, v in model.state_dict().items()}, ema=None, optimizer=None,
                 scheduler=None, scaler=None, best_acc=best_acc, rng={},
                 pruned={"source": os.path.abspath(source), "ratio": ratio, "fine_tune_steps": fine_tune_steps})
    state["versions"] = {"torch": str(torch.__version__),
                         **{k: v for k, v in (ckpt.get("versions") or {}).items() if k != "torch"}}
    return state


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
        raise UserError(f"cannot read checkpoint {path} ({torch_load_problem(path, e)}); it must be a .pt file "
                        "written by train.py") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} is not a train.py checkpoint (no 'model' entry); for bare weights use --pretrained {path}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], use_ema: bool = True) -> torch.nn.Module:
    """Rebuild the network a checkpoint describes (``ckpt["arch"]``) and load its weights, in eval mode.

    When the checkpoint carries EMA weights they are the ones validation used, so they are preferred.
    """
    arch = ckpt.get("arch")
    if not isinstance(arch, dict) or "name" not in arch:
        raise UserError("checkpoint has no 'arch' entry (model name, classes, width); re-save it with train.py")
    model = build_model(**arch)
    weights = ckpt["ema"] if use_ema and ckpt.get("ema") is not None else ckpt["model"]
    if ckpt.get("pruned"):  # utils/pruning.py removed channels: give the fresh model the stored (smaller) shapes

        shrink_to_state_dict(model, weights)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def shrink_to_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Resize every Conv2d/BatchNorm2d/Linear of a freshly built model to the shapes stored in ``state``.

    This is how a pruned checkpoint is loaded: the architecture is the same, only channel counts differ.
    Depthwise convolutions stay depthwise (groups follow the channel count).
    """
    for name, m in model.named_modules():
        w = state.get(f"{name}.weight")
        if w is None:
            continue
        if isinstance(m, nn.Conv2d):
            depthwise = m.groups > 1 and m.groups == m.in_channels
            m.out_channels = w.shape[0]
            m.groups = w.shape[0] if depthwise else m.groups
            m.in_channels = w.shape[1] * m.groups
            m.weight = nn.Parameter(torch.empty_like(w))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(w.shape[0]))
        elif isinstance(m, nn.BatchNorm2d):
            n = w.shape[0]
            m.num_features = n
            m.weight, m.bias = nn.Parameter(torch.empty(n)), nn.Parameter(torch.empty(n))
            m.running_mean, m.running_var = torch.zeros(n), torch.ones(n)
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = w.shape
            m.weight = nn.Parameter(torch.empty_like(w))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(w.shape[0]))
    return model


def read_calibration(path: str, value: Any) -> dict[str, Any] | None:
    """Validate a model file's ``calibration`` entry (dict or JSON text); None when absent."""
    if value in (None, "", b""):
        return None
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}: metadata '{CALIBRATION_KEY}' is not valid JSON; re-export it with export.py") from None
    t = value.get("temperature") if isinstance(value, dict) else None
    if not isinstance(t, (int, float)) or not t > 0:
        raise UserError(f"{path}: metadata '{CALIBRATION_KEY}' has no positive 'temperature'; refit it with evaluate.py "
                        "--write-calibration, or re-export")
    thr = value.get("threshold")
    if thr is not None and not (isinstance(thr, (int, float)) and 0.0 <= thr <= 1.0):
        raise UserError(f"{path}: metadata '{CALIBRATION_KEY}' threshold {thr!r} is not a probability between 0 and 1")
    return dict(value)


def model_metadata(classes: Sequence[str], preprocess: dict[str, Any],
                   calibration: dict[str, Any] | None = None) -> dict[str, str]:
    """What every exported file carries, as JSON strings (ONNX metadata_props, TorchScript extra files, .pt2 extra
    files, .pte constant methods): class names, preprocessing and, once fitted, the calibration entry."""
    meta = {"classes": json.dumps(list(classes)), "preprocess": json.dumps(dict(preprocess))}
    if calibration:  # temperature + reject threshold travel like the class names
        meta[CALIBRATION_KEY] = json.dumps(dict(calibration))
    return meta
