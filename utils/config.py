"""One training config: dataclass defaults <- YAML recipe <- command-line flags <- ``--set key=value``.

Every key is a typed dataclass field, so an unknown key or a wrongly typed value is a ``UserError``
before any data is read or any model is built. The resolved config is saved as ``RUN/config.yaml``.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from models import available_models
from utils.errors import UserError
from utils.files import REPO_ROOT, write_text

DEFAULT_RECIPE = os.path.join(REPO_ROOT, "configs", "default.yaml")

# Choices of the string keys that only accept a fixed set of values.
CHOICES = {
    "optimizer": ("sgd", "adamw", "rmsprop"),
    "freeze": ("none", "features"),
    "amp": ("auto", "on", "off"),
    "channels_last": ("auto", "on", "off"),
    "compile": ("auto", "on", "off"),
    "cache": ("auto", "memory", "none"),
    "auto_augment": ("none", "trivial"),
    "class_balance": ("auto", "none", "loss", "sampler", "sqrt"),
    "select_metric": ("auto", "top1", "balanced_acc"),
    "resize_mode": ("auto", "crop", "squash"),
}


@dataclass
class TrainConfig:
    """All training settings. Field comments are the ``--help`` text of ``--set``."""

    # data
    data: str = "datasets/fashion_mnist/split"  # folder with train/ and val/ class folders
    img_size: int = 224  # training and validation crop size (px)
    resize_size: int = 0  # validation: shorter side before the center crop (0 = round(img_size / crop_pct))
    crop_pct: float = 0.875  # with resize_size 0: center crop / resized side (0.875 = 224/256; 1.0 = no border cut)
    resize_mode: str = "auto"  # non-square images: crop (square crops, aspect kept) | squash (whole image resized square) | auto (squash when the median training image is over 1.5:1)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # normalisation mean (RGB)
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])  # normalisation std (RGB)
    workers: int = -1  # data loader worker processes per training process (-1 = auto, see the run header)
    cache: str = "auto"  # keep decoded images in memory: auto (small datasets) | memory | none
    # augmentation
    scale_min: float = 0.08  # RandomResizedCrop scale lower bound (upper bound 1.0)
    hflip: float = 0.5  # horizontal flip probability
    color_jitter: float = 0.0  # brightness/contrast/saturation jitter strength
    rotation: float = 0.0  # random rotation range in degrees
    auto_augment: str = "none"  # none | trivial (TrivialAugmentWide)
    random_erasing: float = 0.0  # random erasing probability
    mixup_alpha: float = 0.0  # MixUp alpha (0 = off)
    cutmix_alpha: float = 0.0  # CutMix alpha (0 = off); with both on, one is picked per batch
    # model
    model: str = "mobilenet_v2"  # mobilenet_v1 | mobilenet_v2 | mobilenet_v3_large | mobilenet_v3_small
    width_mult: float = 1.0  # channel width multiplier
    dropout: float = 0.2  # dropout before the classifier
    small_input: bool = False  # stride-8 stem for 28-64 px inputs (about 16x the compute)
    pretrained: str = "none"  # imagenet | none | PATH to weights or a train.py checkpoint
    freeze: str = "none"  # features = train only the classifier (backbone in eval mode, no grad)
    head_epochs: int = 0  # with freeze=none: the first N epochs train only the classifier, then the whole network
    head_lr: float = 0.0  # peak learning rate of those head-only epochs (0 = lr)
    cache_features: bool = False  # while the backbone is frozen: compute pooled features once, train the head on them
    bn_adapt: bool = False  # pretrained weights: re-estimate BatchNorm statistics on train/ images first (AdaBN)
    freeze_bn: bool = False  # whole-network training keeps BatchNorm statistics fixed (pretrained ones) and in eval mode
    backbone_lr_mult: float = 1.0  # learning-rate multiplier of the backbone (fine-tuning: e.g. 0.1)
    sync_bn: bool = False  # SyncBatchNorm across torchrun processes
    # optimisation
    epochs: int = 10  # number of epochs (head_epochs included)
    time_budget: float = 0.0  # minutes of training: the last phase's epochs are fitted in its first half, trimmed in its second (0 = off)
    batch_size: int = 64  # images per step per process
    optimizer: str = "sgd"  # sgd | adamw | rmsprop
    lr: float = 0.1  # peak learning rate (after warmup)
    min_lr: float = 0.0  # learning rate at the end of the cosine decay
    warmup_epochs: float = 0.0  # linear warmup length in epochs (fractions allowed)
    momentum: float = 0.9  # SGD/RMSprop momentum
    nesterov: bool = False  # Nesterov momentum (SGD)
    weight_decay: float = 4e-5  # weight decay (decoupled for AdamW)
    no_wd_norm_bias: bool = False  # no weight decay on norm layers and biases
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    ema_decay: float = 0.0  # EMA of weights, e.g. 0.999 (0 = off); validation then uses the EMA weights
    clip_grad_norm: float = 0.0  # clip the gradient norm to this value (0 = off)
    # imbalanced classes (utils/balance.py; imbalanced = largest/smallest train class count >= 1.5)
    class_balance: str = "auto"  # none | loss (class-weighted CE) | sampler (classes drawn evenly) | sqrt (classes drawn in proportion to sqrt(count)) | auto (none if balanced, else the measured winner, docs/imbalance.md)
    select_metric: str = "auto"  # what picks best.pt: top1 | balanced_acc | auto (balanced_acc if imbalanced, else top1)
    logit_adjust: float = 0.0  # train on logits + tau*log(class share of the draw): favours rare classes, costs top-1 (0 = off; docs/imbalance.md)
    select_se: float = 0.0  # best.pt = the latest epoch within this many standard errors of the best one (0 = the best)
    # speed
    channels_last: str = "auto"  # NHWC memory format: auto (measured on a CPU, by GPU kind on CUDA) | on | off
    amp: str = "auto"  # mixed precision: auto (CPU: bf16 only where a probe measures it faster; CUDA: bf16 on sm_80+, else fp16) | on | off
    compile: str = "auto"  # torch.compile the model: auto (probed on runs long enough to repay compiling) | on | off
    # run
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # seed of initialisation, data order and augmentation
    out: str = "runs/default"  # run folder
    resume: str = ""  # checkpoint to continue from (RUN/last.pt)
    max_steps_per_epoch: int = 0  # stop each epoch after this many steps (0 = full epoch; for smoke tests)
    progress: bool = True  # tqdm progress bars


# Plain flags every recipe accepts: flag -> (config key, help).
FLAGS = {
    "--data": ("data", "folder with train/ and val/ class folders"),
    "--model": ("model", "model name (mobilenet_v1, mobilenet_v2, mobilenet_v3_large, mobilenet_v3_small)"),
    "--width-mult": ("width_mult", "channel width multiplier"),
    "--img-size": ("img_size", "training/validation image size in px"),
    "--epochs": ("epochs", "number of epochs"),
    "--batch-size": ("batch_size", "images per step per process"),
    "--lr": ("lr", "peak learning rate"),
    "--pretrained": ("pretrained", "imagenet | none | PATH to weights"),
    "--freeze": ("freeze", "features (train the classifier only) | none"),
    "--workers": ("workers", "data loader workers per process (-1 = auto: from cores, device and cache)"),
    "--device": ("device", "auto | cpu | cuda | cuda:N"),
    "--seed": ("seed", "random seed"),
    "--out": ("out", "run folder (config.yaml, log.csv, curves.png, last.pt, best.pt)"),
    "--resume": ("resume", "checkpoint to continue from, e.g. RUN/last.pt"),
    "--time-budget": ("time_budget", "train for about this many minutes: the epochs are fitted from the measured "
                      "time of the first full-network epoch, re-fitted after each epoch of the first half of "
                      "that phase, and cut short in the second half if epochs turn slower (at most 10x the "
                      "recipe's; 0 = use epochs)"),
}


def field_types() -> dict[str, Any]:
    """Config key -> resolved type annotation."""
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    """Check ``value`` against the field type ``tp``; ints are accepted for floats. UserError otherwise."""
    def bad() -> UserError:
        want = getattr(tp, "__name__", str(tp)).replace("typing.", "")
        return UserError(f"{source}: '{key}' must be {want}, got {value!r} ({type(value).__name__})")

    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad()
        return [_coerce(key, v, inner, source) for v in value]
    if origin is typing.Union:  # Optional[...]
        if value is None:
            return None
        return _coerce(key, value, [a for a in typing.get_args(tp) if a is not type(None)][0], source)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if key in CHOICES and "on" in CHOICES[key]:  # YAML 1.1 reads a bare on/off as a boolean; true/false too
            value = {True: "on", False: "off", "true": "on", "false": "off"}.get(
                value.lower() if isinstance(value, str) else value, value)
        if not isinstance(value, str):
            raise bad()
        if key in CHOICES and value not in CHOICES[key]:
            raise UserError(f"{source}: '{key}' must be one of {', '.join(CHOICES[key])}, got {value!r}")
        return value
    raise bad()


def apply_overrides(cfg: TrainConfig, values: dict[str, Any], source: str) -> TrainConfig:
    """Return ``cfg`` with ``values`` applied; unknown keys and wrong types raise ``UserError`` naming ``source``."""
    types = field_types()
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise UserError(
            f"{source}: unknown config key(s) {', '.join(unknown)}; valid keys are listed by `python train.py --help`"
        )
    checked = {}
    for k, v in values.items():
        if isinstance(v, _Raw):  # from --set: a string field keeps the text, others are parsed as YAML
            v = str(v) if types[k] is str else _parse_yaml_scalar(str(v))
        checked[k] = _coerce(k, v, types[k], source)
    return dataclasses.replace(cfg, **checked)


def read_yaml(path: str) -> dict[str, Any]:
    """Read a recipe file into a dict (an empty file is an empty recipe)."""
    if not os.path.isfile(path) and not os.path.isabs(path) and os.path.isfile(os.path.join(REPO_ROOT, path)):
        path = os.path.join(REPO_ROOT, path)  # `--config configs/x.yaml` works from any directory
    if not os.path.isfile(path):
        raise UserError(f"config file {path} not found; pass one of configs/*.yaml to --config")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of key: value lines, got {type(data).__name__}")
    return {k: v for k, v in data.items() if k not in RECORD_KEYS}


class _Raw(str):
    """A ``--set`` value as typed; parsed once the key's type is known."""


def _parse_yaml_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["lr=0.1", "nesterov=true"]`` -> ``{"lr": "0.1", "nesterov": "true"}``; values are parsed as YAML
    (``0.1`` -> float, ``true`` -> bool, ``[1, 2]`` -> list) except for string keys, which keep the text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set label_smoothing=0.1")
        out[key.strip()] = _Raw(raw.strip())
    return out


def validate(cfg: TrainConfig) -> None:
    """Range checks that types alone cannot express."""
    checks = [
        (cfg.epochs >= 1, "epochs must be at least 1"),
        (cfg.batch_size >= 1, "batch_size must be at least 1"),
        (16 <= cfg.img_size <= 1024, f"img_size={cfg.img_size}: use a size between 28 and 224 (16..1024 accepted)"),
        (cfg.lr > 0, "lr must be positive"),
        (cfg.workers >= -1, "workers must be 0 or more (or -1 = auto)"),
        (0 <= cfg.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
        (0 <= cfg.ema_decay < 1, "ema_decay must be in [0, 1)"),
        (0 < cfg.scale_min <= 1, "scale_min must be in (0, 1]"),
        (0 < cfg.crop_pct <= 1, "crop_pct must be in (0, 1] (1.0 = resize to img_size, no border cut)"),
        (cfg.resize_size == 0 or cfg.resize_size >= cfg.img_size,
         f"resize_size={cfg.resize_size} is smaller than img_size={cfg.img_size}; use resize_size >= img_size, or 0 "
         "(then it follows img_size / crop_pct)"),
        (len(cfg.mean) == 3 and len(cfg.std) == 3, "mean and std must have 3 values (RGB)"),
        (cfg.warmup_epochs >= 0, "warmup_epochs must be 0 or more"),
        (cfg.head_epochs >= 0, "head_epochs must be 0 or more"),
        (cfg.freeze == "features" or cfg.head_epochs < cfg.epochs,
         f"head_epochs={cfg.head_epochs} leaves no epoch for the whole network (epochs={cfg.epochs}); pass --epochs "
         f"{cfg.head_epochs + 1} or more, fewer classifier epochs (--set head_epochs={max(cfg.epochs - 1, 0)}), or "
         "train the classifier alone with --freeze features"),
        (cfg.head_lr >= 0, "head_lr must be 0 (= lr) or positive"),
        (cfg.time_budget >= 0, "time_budget must be 0 (off) or a number of minutes"),
        (cfg.logit_adjust >= 0, "logit_adjust must be 0 (off) or a positive tau (1 = fully balanced decisions)"),
        (cfg.select_se >= 0, "select_se must be 0 (best.pt = the best epoch) or a number of standard errors"),
        (cfg.model in available_models(), f"unknown model '{cfg.model}'; choose one of: {', '.join(available_models())}"),
        (cfg.width_mult > 0, "width_mult must be positive"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(f"config: {msg}")


def build_config(recipe: Optional[dict[str, Any]], recipe_source: str, flags: dict[str, Any], sets: list[str]) -> TrainConfig:
    """Merge defaults <- recipe <- flags <- ``--set`` items, validating each layer."""
    cfg = TrainConfig()
    if recipe:
        cfg = apply_overrides(cfg, recipe, recipe_source)
    cfg = apply_overrides(cfg, flags, "command line")
    cfg = apply_overrides(cfg, parse_set(sets), "--set")
    validate(cfg)
    if cfg.resize_size == 0:  # follows img_size, so --img-size on any recipe keeps the recipe's crop border
        cfg = dataclasses.replace(cfg, resize_size=int(round(cfg.img_size / cfg.crop_pct)))
    return cfg


def augment_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The train-time augmentation of ``cfg`` as ``utils.data.load_data(augment=...)`` takes it."""
    return {"scale": (cfg.scale_min, 1.0), "hflip": cfg.hflip, "color_jitter": cfg.color_jitter,
            "rotation": cfg.rotation, "auto_augment": None if cfg.auto_augment == "none" else cfg.auto_augment,
            "random_erasing": cfg.random_erasing}


def from_checkpoint(config: dict[str, Any] | None, source: str) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with (keys this version does not know are ignored)."""
    known = field_types()
    return apply_overrides(TrainConfig(), {k: v for k, v in (config or {}).items() if k in known}, source)


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain dict (YAML/checkpoint-safe)."""
    return dataclasses.asdict(cfg)


# Keys of a run's config.yaml that record what happened (e.g. the automatic speed choices), not settings:
# a run's config.yaml given back as --config ignores them.
RECORD_KEYS = ("speed", "phases", "time_budget_fit", "class_balance_used", "bn_adapted", "resize_mode_auto")


def save_config(cfg: TrainConfig, path: str, record: Optional[dict[str, Any]] = None) -> None:
    """Write the resolved config as YAML, atomically, followed by ``record`` (keys in RECORD_KEYS)."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if record:
        text += yaml.safe_dump(record, sort_keys=False)
    write_text(path, text)


def describe_keys() -> str:
    """One line per key: name, default, comment — the ``--help`` epilog."""

    src = inspect.getsource(TrainConfig)
    lines = []
    for m in re.finditer(r"^\s+(\w+): [^=]+= (.+?)(?:  # (.*))?$", src, re.M):
        name, default, comment = m.group(1), m.group(2), m.group(3) or ""
        if "default_factory" in default:
            default = str(getattr(TrainConfig(), name))
        lines.append(f"  {name} (default {default}): {comment}")
    return "\n".join(lines)
