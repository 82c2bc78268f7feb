"""MobileNetV3 Large and Small (Howard et al., 2019) with torchvision-compatible module names."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .mobilenetv2 import ConvBNReLU, _init_weights, _make_divisible

# torchvision's V3 uses these BatchNorm settings; the ImageNet statistics depend on them.
BatchNormV3 = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


class SqueezeExcitation(nn.Module):
    """Channel attention: global pool -> 1x1 reduce -> ReLU -> 1x1 expand -> hard-sigmoid gate."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


@dataclass
class BlockConfig:
    """One bottleneck row of the paper's tables (channels already scaled by the width multiplier)."""

    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    use_hs: bool
    stride: int


class InvertedResidualV3(nn.Module):
    """Optional 1x1 expansion -> depthwise kxk -> optional SE -> linear 1x1 projection."""

    def __init__(self, cnf: BlockConfig) -> None:
        super().__init__()
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        act = nn.Hardswish if cnf.use_hs else nn.ReLU
        conv = partial(ConvBNReLU, norm_layer=BatchNormV3)
        layers: list[nn.Module] = []
        if cnf.expanded_channels != cnf.input_channels:
            layers.append(conv(cnf.input_channels, cnf.expanded_channels, kernel_size=1, activation=act))
        layers.append(
            conv(cnf.expanded_channels, cnf.expanded_channels, kernel_size=cnf.kernel, stride=cnf.stride,
                 groups=cnf.expanded_channels, activation=act)
        )
        if cnf.use_se:
            layers.append(SqueezeExcitation(cnf.expanded_channels, _make_divisible(cnf.expanded_channels // 4, 8)))
        layers.append(conv(cnf.expanded_channels, cnf.out_channels, kernel_size=1, activation=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cnf.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


# (input, kernel, expanded, output, SE, hard-swish, stride): Tables 1 and 2 of the paper.
V3_LARGE = [
    (16, 3, 16, 16, False, False, 1),
    (16, 3, 64, 24, False, False, 2),
    (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2),
    (40, 5, 120, 40, True, False, 1),
    (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2),
    (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1),
    (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2),
    (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1),
]
V3_SMALL = [
    (16, 3, 16, 16, True, False, 2),
    (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1),
    (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
]


class MobileNetV3(nn.Module):
    """MobileNetV3 classifier; ``arch`` is ``"large"`` or ``"small"``.

    ``small_input`` keeps resolution for 28-64 px images: stem and first stride-2 block at stride 1.
    """

    def __init__(
        self,
        arch: str = "large",
        num_classes: int = 1000,
        width_mult: float = 1.0,
        dropout: float = 0.2,
        small_input: bool = False,
    ) -> None:
        super().__init__()
        table, last = {"large": (V3_LARGE, 1280), "small": (V3_SMALL, 1024)}[arch]

        def ch(c: int) -> int:
            return _make_divisible(c * width_mult, 8)

        rows = [BlockConfig(ch(i), k, ch(e), ch(o), se, hs, s) for i, k, e, o, se, hs, s in table]
        if small_input:
            first_down = next(r for r in rows if r.stride == 2)
            first_down.stride = 1

        conv = partial(ConvBNReLU, norm_layer=BatchNormV3)
        stem = rows[0].input_channels
        layers: list[nn.Module] = [conv(3, stem, kernel_size=3, stride=1 if small_input else 2, activation=nn.Hardswish)]
        layers += [InvertedResidualV3(r) for r in rows]
        last_in = rows[-1].out_channels
        layers.append(conv(last_in, 6 * last_in, kernel_size=1, activation=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.last_channel = ch(last)
        self.classifier = nn.Sequential(
            nn.Linear(6 * last_in, self.last_channel),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(self.last_channel, num_classes),
        )
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone + global average pool: (N, 3, H, W) -> (N, 6 * last block channels)."""
        return torch.flatten(self.avgpool(self.features(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))
