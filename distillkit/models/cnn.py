"""A small CNN for 1x8x8 digits: the digits KD teacher (width 64), student (width 8) and
the feature network of digits-FID/IS. ``features`` is the penultimate layer."""
from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 32, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        w = width
        self.block1 = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
        )
        self.block2 = nn.Sequential(
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
        )
        self.features = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, 4 * w), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(self.block2(self.block1(x))))
