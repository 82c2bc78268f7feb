"""MobileNetV1 (Howard et al., 2017): a stem conv then 13 depthwise-separable blocks."""
from __future__ import annotations

import torch
from torch import nn

from .mobilenetv2 import ConvBNReLU, _init_weights, _make_divisible

# (output channels, stride) of each depthwise-separable block, Table 1 of the paper.
V1_SETTINGS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


class DepthwiseSeparable(nn.Sequential):
    """Depthwise 3x3 conv-BN-ReLU followed by pointwise 1x1 conv-BN-ReLU."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__(
            ConvBNReLU(inp, inp, stride=stride, groups=inp, activation=nn.ReLU),
            ConvBNReLU(inp, oup, kernel_size=1, activation=nn.ReLU),
        )
        self.out_channels = oup


class MobileNetV1(nn.Module):
    """MobileNetV1 classifier with a width multiplier.

    ``small_input`` keeps resolution for 28-64 px images: stem and first stride-2 block at stride 1.
    """

    def __init__(
        self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2, small_input: bool = False
    ) -> None:
        super().__init__()
        inp = _make_divisible(32 * width_mult, 8)
        layers: list[nn.Module] = [ConvBNReLU(3, inp, stride=1 if small_input else 2, activation=nn.ReLU)]
        first_down = True
        for c, s in V1_SETTINGS:
            if s == 2 and small_input and first_down:
                s, first_down = 1, False
            oup = _make_divisible(c * width_mult, 8)
            layers.append(DepthwiseSeparable(inp, oup, s))
            inp = oup
        self.features = nn.Sequential(*layers)
        self.last_channel = inp
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(inp, num_classes))
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone + global average pool: (N, 3, H, W) -> (N, last_channel)."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))
