"""scikit-learn's bundled digits (1,797 real 8x8 grayscale images, 10 classes): the
embedded default dataset, so every experiment and test runs offline.

Pixels (0..16) are scaled to [-1, 1]; the same tensors serve classifiers and diffusion
models, so a digits classifier can score generated samples directly (digits-FID/IS).
"""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from distillkit.data.base import DistillDataModule, check_split_fractions, split_indices


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (N, 1, 8, 8) float32 in [-1, 1] and (N,) int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y


class DigitsDataModule(DistillDataModule):
    num_classes = 10
    image_shape = (1, 8, 8)
    data_range = (-1.0, 1.0)

    def __init__(self, val_fraction: float = 0.15, test_fraction: float = 0.25,
                 train_fraction: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"dataset.train_fraction must be in (0, 1], got {train_fraction}")
        check_split_fractions(val_fraction, test_fraction)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.train_fraction = train_fraction

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_digits_tensors()
        tr, va, te = split_indices(len(x), self.val_fraction, self.test_fraction, self.split_seed)
        tr = tr[: max(1, int(round(len(tr) * self.train_fraction)))]
        self.train_set = TensorDataset(x[tr], y[tr])
        self.val_set = TensorDataset(x[va], y[va])
        self.test_set = TensorDataset(x[te], y[te])
