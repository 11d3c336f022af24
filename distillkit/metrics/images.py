"""Image plumbing of evaluation: the real images of a split, the ``.npz`` sample exchange
format (uint8, N x H x W x C, key ``arr_0``: the ADM / EDM evaluation convention) and
PNG sample grids."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


def split_images(datamodule: Any, split: str = "train", batch_size: int = 512) -> torch.Tensor:
    """Every image of ``datamodule.<split>_set`` as one float tensor (N, C, H, W) in [-1, 1], in
    the dataset's order: the reference of FID / IS. Datasets of uint8 images (CIFAR, image
    folders) give their ``raw_images()``, neither augmented nor normalised for classifiers; a
    TensorDataset is read directly, others through a DataLoader."""
    ds: Dataset = getattr(datamodule, f"{split}_set", None)
    if ds is None:
        if hasattr(datamodule, "setup"):
            datamodule.setup("fit")
            ds = getattr(datamodule, f"{split}_set", None)
        if ds is None:
            raise ValueError(f"the datamodule has no {split}_set")
    if callable(getattr(ds, "raw_images", None)):
        return ds.raw_images().float() / 127.5 - 1.0
    if isinstance(ds, TensorDataset):
        return ds.tensors[0].float()
    xs = []
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False):
        xs.append((batch[0] if isinstance(batch, (list, tuple)) else batch).float())
    return torch.cat(xs)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8, rounded as diffusers' pipelines do
    (``(x / 2 + 0.5).clamp(0, 1)``, then ``(x * 255).round()``), on x's device and layout."""
    return ((x.detach().float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def to_uint8_nhwc(x: torch.Tensor) -> np.ndarray:
    """Float images in [-1, 1], (N, C, H, W) -> uint8 (N, H, W, C) (the ``.npz`` convention)."""
    return to_uint8(x.cpu()).permute(0, 2, 3, 1).contiguous().numpy()


def from_uint8_nhwc(a: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    t = torch.as_tensor(np.asarray(a))
    return t.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def image_grid(x: torch.Tensor, nrow: int = 0, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Float images in [-1, 1], (N, C, H, W) -> one uint8 (H', W', C) grid (C in 1, 3),
    ``nrow`` images per row (default: square), ``pad`` black pixels between them,
    each pixel repeated ``scale`` times (8x8 digits are unreadable at 1:1)."""
    n, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    imgs = to_uint8_nhwc(x)
    if scale > 1:
        imgs = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    grid = np.zeros((rows * h + (rows + 1) * pad, nrow * w + (nrow + 1) * pad, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + k * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = imgs[i]
    return grid


def save_png(grid: np.ndarray, path: Union[str, Path]) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path
