"""Wide Residual Networks (Zagoruyko & Komodakis, 2016) for CIFAR.

Zagoruyko, Komodakis. "Wide Residual Networks", BMVC 2016 (arXiv:1605.07146): WRN-d-k has
depth ``d = 6n+4`` and widening factor ``k``; stages of ``16k/32k/64k`` channels built from
pre-activation (BN-ReLU-conv) basic blocks.

The definitions follow RepDistiller (``HobbitLong/RepDistiller``, ``models/wrn.py``) and
mdistiller (``megvii-research/mdistiller``, ``mdistiller/models/cifar/wrn.py``) module for
module, so ``state_dict`` keys (``conv1``, ``block1.layer.0.bn1``, ..., ``bn1``, ``fc``) and
shapes are identical and their published checkpoints load with ``load_state_dict(strict=True)``.

Differences from those files, none of which touch the parameters:

* constructors take ``num_classes`` (default 100) and ``in_channels`` (default 3);
* ``forward(x)`` returns logits only; features are taken with forward hooks on module paths
  (``block1``/``block2``/``block3`` give RepDistiller's ``f1..f3``, ``conv1`` gives ``f0``,
  ``block2.layer.0.bn1``/``block3.layer.0.bn1``/``bn1`` the pre-activation features);
* ReLUs are not in-place, so a tensor captured by a hook is never overwritten later.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "NetworkBlock", "WideResNet", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "WRNS"]


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus the shortcut.

    When the channel count changes, the 1x1 projection shortcut (``convShortcut``) is applied to
    the activated input ``relu1(bn1(x))``, exactly as in the reference.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, dropRate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = dropRate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """One stage: ``nb_layers`` blocks in ``self.layer``; the first one carries the stride."""

    def __init__(
        self,
        nb_layers: int,
        in_planes: int,
        out_planes: int,
        block: type[BasicBlock],
        stride: int,
        dropRate: float = 0.0,
    ) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *[
                block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropRate)
                for i in range(nb_layers)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs.

    Args:
        depth: ``6n+4`` (16, 22, 28, 40, ...).
        num_classes: size of the linear head.
        widen_factor: channel multiplier ``k`` of the three stages.
        dropRate: dropout between the two convolutions of each block (0 in the KD benchmarks).
        in_channels: input image channels.
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 100,
        widen_factor: int = 1,
        dropRate: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4 (16, 22, 28, 40), got {depth}")
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stage_channels = channels
        self.nChannels = channels[3]
        self.conv1 = nn.Conv2d(in_channels, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], BasicBlock, 1, dropRate)
        self.block2 = NetworkBlock(n, channels[1], channels[2], BasicBlock, 2, dropRate)
        self.block3 = NetworkBlock(n, channels[2], channels[3], BasicBlock, 2, dropRate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(channels[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block1(out)
        out = self.block2(out)
        out = self.block3(out)
        out = self.relu(self.bn1(out))
        out = F.avg_pool2d(out, 8)
        return self.fc(out.reshape(-1, self.nChannels))


def wrn_16_1(*, num_classes: int = 100, in_channels: int = 3, dropRate: float = 0.0) -> WideResNet:
    """WRN-16-1."""
    return WideResNet(16, num_classes, widen_factor=1, dropRate=dropRate, in_channels=in_channels)


def wrn_16_2(*, num_classes: int = 100, in_channels: int = 3, dropRate: float = 0.0) -> WideResNet:
    """WRN-16-2."""
    return WideResNet(16, num_classes, widen_factor=2, dropRate=dropRate, in_channels=in_channels)


def wrn_40_1(*, num_classes: int = 100, in_channels: int = 3, dropRate: float = 0.0) -> WideResNet:
    """WRN-40-1."""
    return WideResNet(40, num_classes, widen_factor=1, dropRate=dropRate, in_channels=in_channels)


def wrn_40_2(*, num_classes: int = 100, in_channels: int = 3, dropRate: float = 0.0) -> WideResNet:
    """WRN-40-2."""
    return WideResNet(40, num_classes, widen_factor=2, dropRate=dropRate, in_channels=in_channels)


#: name -> constructor, for every network in this module.
WRNS = {f.__name__: f for f in (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2)}
