"""The LightningDataModule every dataset shares: splits, loaders, and the resumable order."""
from __future__ import annotations

from typing import Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from distillkit.data.loader import ResumableLoader
from distillkit.errors import DistillError


class DistillDataModule(L.LightningDataModule):
    """Subclasses set ``train_set``, ``val_set``, ``test_set`` (and ``num_classes``,
    ``image_shape``) in :meth:`setup`; this class turns them into loaders."""

    num_classes: int = 0
    image_shape: tuple[int, int, int] = (0, 0, 0)
    # (low, high) of the pixel values when the images are scaled to a fixed range (None:
    # otherwise, e.g. mean/std-normalised); diffusion methods need (-1.0, 1.0)
    data_range: Optional[tuple[float, float]] = None

    def __init__(self, batch_size: int = 64, eval_batch_size: int = 256, num_workers: int = 0,
                 split_seed: int = 0, seed: int = 0):
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.split_seed = split_seed
        self.seed = seed
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    def _loader_kwargs(self) -> dict:
        # Pinned batches: a copy from pageable memory to the GPU first waits for all queued work
        # (CUDA's rule for pageable transfers), so an unpinned batch would stall every update.
        kw: dict = {"num_workers": self.num_workers, "pin_memory": torch.cuda.is_available()}
        if self.num_workers > 0:
            kw["persistent_workers"] = True
        return kw

    def check_batch_size(self) -> None:
        """After :meth:`setup`: a batch must fit in the training split (the loader drops the last,
        incomplete batch of each epoch, so a larger batch would never be drawn)."""
        assert self.train_set is not None, "call setup() first"
        if len(self.train_set) < self.batch_size:
            raise DistillError(
                f"dataset.batch_size={self.batch_size}: the training split has {len(self.train_set)} "
                f"examples, fewer than one batch; lower dataset.batch_size"
            )

    def train_dataloader(self) -> DataLoader:
        self.check_batch_size()
        return ResumableLoader(self.train_set, self.batch_size, seed=self.seed,
                               trainer=self.trainer, **self._loader_kwargs())

    def _eval_loader(self, ds: Optional[Dataset]) -> DataLoader:
        assert ds is not None, "call setup() first"
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)


class UInt8Images(Dataset):
    """uint8 images (N, C, H, W) and their labels, turned into float tensors per item by
    ``load(i, generator)``, which draws any augmentation from ``generator`` (the training loader
    seeds one per item: :mod:`distillkit.data.loader`)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False, crop_padding: int = 0):
        self.images = images
        self.labels = labels
        self.augment = augment
        self.crop_padding = crop_padding

    def __len__(self) -> int:
        return len(self.images)

    def raw_images(self) -> torch.Tensor:
        """uint8 (N, C, H, W): the images before augmentation and normalisation (FID's reference)."""
        return self.images

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.load(i)

    def load(self, i: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def check_split_fractions(val_fraction: float, test_fraction: float) -> None:
    """The held-out fractions of a dataset's fixed split: each at least 0, together below 1."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ValueError("dataset.val_fraction + dataset.test_fraction must be below 1, both at least 0 "
                         f"(got {val_fraction} + {test_fraction})")


def split_indices(n: int, val_fraction: float, test_fraction: float, split_seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed random train/val/test partition of range(n), determined by split_seed alone."""
    g = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(n, generator=g)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    return perm[n_test + n_val :], perm[n_test : n_test + n_val], perm[:n_test]
