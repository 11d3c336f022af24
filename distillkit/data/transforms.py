"""Torch-only image transforms for (C, H, W) tensors: the standard CIFAR training
augmentation (random crop with padding, horizontal flip) and per-channel normalisation.

Randomness comes from torch's global RNG unless a ``generator`` is given; the training loader
gives one per example, seeded from (seed, epoch, example), which is what makes augmentation
repeatable and resumable (:mod:`distillkit.data.loader`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: Optional[torch.Generator] = None,
                     fill: float = 0.0) -> torch.Tensor:
    """Pad ``x`` (C, H, W) by ``padding`` pixels of value ``fill`` on every side, take a random
    H x W crop, then flip it horizontally with probability 0.5 (torchvision's
    ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip()``)."""
    _, h, w = x.shape
    if padding > 0:
        x = F.pad(x, (padding, padding, padding, padding), value=fill)
    i, j = torch.randint(0, 2 * padding + 1, (2,), generator=generator).tolist()
    x = x[:, i : i + h, j : j + w]
    if torch.rand((), generator=generator).item() < 0.5:
        x = x.flip(-1)
    return x


class Normalize:
    """``(x - mean) / std`` per channel, for (C, H, W) or (N, C, H, W) tensors."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"
