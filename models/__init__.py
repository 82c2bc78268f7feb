"""MobileNet V1/V2/V3 model zoo: one factory, torchvision-compatible weights."""
from __future__ import annotations

from torch import nn

from utils.errors import UserError

from .complexity import count_macs, count_params
from .mobilenetv1 import MobileNetV1
from .mobilenetv2 import MobileNetV2
from .mobilenetv3 import MobileNetV3
from .pretrained import load_pretrained

_BUILDERS = {
    "mobilenet_v1": lambda **kw: MobileNetV1(**kw),
    "mobilenet_v2": lambda **kw: MobileNetV2(**kw),
    "mobilenet_v3_large": lambda **kw: MobileNetV3("large", **kw),
    "mobilenet_v3_small": lambda **kw: MobileNetV3("small", **kw),
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_BUILDERS)


def build_model(
    name: str,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    dropout: float = 0.2,
    small_input: bool = False,
) -> nn.Module:
    """Build a MobileNet by name, e.g. ``build_model("mobilenet_v2", num_classes=5, width_mult=0.5)``.

    The returned module remembers how it was built in ``model.arch`` (a dict), which checkpoints store.
    """

    if name not in _BUILDERS:
        raise UserError(f"unknown model '{name}'; choose one of: {', '.join(available_models())}")
    if num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {num_classes}")
    if width_mult <= 0:
        raise UserError(f"width_mult must be positive, got {width_mult}")
    model = _BUILDERS[name](num_classes=num_classes, width_mult=width_mult, dropout=dropout, small_input=small_input)
    model.arch = dict(name=name, num_classes=num_classes, width_mult=width_mult, dropout=dropout, small_input=small_input)
    return model


__all__ = [
    "MobileNetV1", "MobileNetV2", "MobileNetV3", "available_models", "build_model", "count_macs",
    "count_params", "load_pretrained",
]
