"""CIFAR ResNets (He et al., 2016) as used throughout the knowledge-distillation literature.

He, Zhang, Ren, Sun. "Deep Residual Learning for Image Recognition", CVPR 2016
(arXiv:1512.03385), section 4.2: the 6n+2-layer CIFAR networks with three stages of
16/32/64 filters. The ``x4`` variants (32/64/128/256 filters) are those introduced by CRD
(Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020).

The definitions follow RepDistiller (``HobbitLong/RepDistiller``, ``models/resnet.py``) and
mdistiller (``megvii-research/mdistiller``, ``mdistiller/models/cifar/resnet.py``) module for
module, so every ``state_dict`` key and shape is identical and their published CIFAR-100
checkpoints (``{"model": state_dict}``) load with ``load_state_dict(strict=True)``.

Differences from those files, none of which touch the parameters:

* every constructor takes ``num_classes`` (default 100) and ``in_channels`` (default 3);
* ``forward(x)`` returns logits only. Intermediate features are taken elsewhere with forward
  hooks on module paths: ``layer1``/``layer2``/``layer3`` give the stage outputs (RepDistiller's
  ``f1..f3``), ``relu`` gives ``f0``, ``avgpool`` the pooled feature, and
  ``layerK.<last>.preact`` (a parameter-free ``nn.Identity``) the pre-ReLU block output that
  RepDistiller returns with ``preact=True``;
* no in-place operations act on a module's output (``nn.ReLU()`` is not in-place and the
  residual sum is out of place), so a tensor captured by a hook is never overwritten later in
  the forward pass. The arithmetic is the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
    "CIFAR_RESNETS",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a (projection) shortcut; ReLU after the sum (post-activation)."""

    expansion = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.preact = nn.Identity()  # hook point for the pre-ReLU output
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x if self.downsample is None else self.downsample(x)
        out = self.preact(out + residual)
        return F.relu(out)


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 bottleneck block with expansion 4; ReLU after the sum."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.preact = nn.Identity()  # hook point for the pre-ReLU output
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        out = self.preact(out + residual)
        return F.relu(out)


class ResNet(nn.Module):
    """CIFAR ResNet: a 3x3 stem, three stages (strides 1, 2, 2), 8x8 average pool, linear head.

    Args:
        depth: total depth; ``6n+2`` for ``"basicblock"``, ``9n+2`` for ``"bottleneck"``.
        num_filters: channels of the stem and of the three stages, e.g. ``[16, 16, 32, 64]``.
        block_name: ``"basicblock"`` or ``"bottleneck"`` (case-insensitive).
        num_classes: size of the linear head.
        in_channels: input image channels.

    The average pool is a fixed 8x8 window, as in the reference: inputs are 32x32.
    """

    def __init__(
        self,
        depth: int,
        num_filters: Sequence[int],
        block_name: str = "BasicBlock",
        num_classes: int = 100,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if block_name.lower() == "basicblock":
            if (depth - 2) % 6 != 0:
                raise ValueError(f"with BasicBlock, depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
            n = (depth - 2) // 6
            block: type[BasicBlock] | type[Bottleneck] = BasicBlock
        elif block_name.lower() == "bottleneck":
            if (depth - 2) % 9 != 0:
                raise ValueError(f"with Bottleneck, depth must be 9n+2 (29, 47, 56, 110), got {depth}")
            n = (depth - 2) // 9
            block = Bottleneck
        else:
            raise ValueError(f"block_name must be 'basicblock' or 'bottleneck', got {block_name!r}")
        if len(num_filters) != 4:
            raise ValueError(f"num_filters needs 4 entries (stem + 3 stages), got {list(num_filters)}")

        self.stage_channels = list(num_filters)
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(in_channels, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(block, num_filters[1], n)
        self.layer2 = self._make_layer(block, num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(block, num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3] * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int = 1
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # 32x32
        x = self.layer1(x)  # 32x32
        x = self.layer2(x)  # 16x16
        x = self.layer3(x)  # 8x8
        x = self.avgpool(x)
        return self.fc(x.flatten(1))


_THIN = [16, 16, 32, 64]
_WIDE = [32, 64, 128, 256]


def resnet8(*, num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-8 (16/32/64 filters, 1 block per stage)."""
    return ResNet(8, _THIN, "basicblock", num_classes=num_classes, in_channels=in_channels)


def resnet14(*, num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-14 (16/32/64 filters, 2 blocks per stage)."""
    return ResNet(14, _THIN, "basicblock", num_classes=num_classes, in_channels=in_channels)


def resnet20(*, num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-20 (16/32/64 filters, 3 blocks per stage)."""
    return ResNet(20, _THIN, "basicblock", num_classes=num_classes, in_channels=in_channels)


def resnet32(*, num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-32 (16/32/64 filters, 5 blocks per stage)."""
    return ResNet(32, _THIN, "basicblock", num_classes=num_classes, in_channels=in_channels)


def resnet44(*, num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-44 (16/32/64 filters, 7 blocks per stage)."""
    return ResNet(44, _THIN, "basicblock", num_classes=num_classes, in_channels=in_channels)


def resnet56(*, num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-56 (16/32/64 filters, 9 blocks per stage)."""
    return ResNet(56, _THIN, "basicblock", num_classes=num_classes, in_channels=in_channels)


def resnet110(*, num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-110 (16/32/64 filters, 18 blocks per stage)."""
    return ResNet(110, _THIN, "basicblock", num_classes=num_classes, in_channels=in_channels)


def resnet8x4(*, num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-8x4 (32 stem, 64/128/256 filters, 1 block per stage), the CRD student."""
    return ResNet(8, _WIDE, "basicblock", num_classes=num_classes, in_channels=in_channels)


def resnet32x4(*, num_classes: int = 100, in_channels: int = 3) -> ResNet:
    """ResNet-32x4 (32 stem, 64/128/256 filters, 5 blocks per stage), the CRD teacher."""
    return ResNet(32, _WIDE, "basicblock", num_classes=num_classes, in_channels=in_channels)


#: name -> constructor, for every network in this module.
CIFAR_RESNETS = {
    f.__name__: f
    for f in (resnet8, resnet14, resnet20, resnet32, resnet44, resnet56, resnet110, resnet8x4, resnet32x4)
}
