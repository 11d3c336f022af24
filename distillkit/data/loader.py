"""A training DataLoader whose order is a pure function of (seed, epoch, batch index).

Lightning checkpoints its own loop counters (epoch, batches processed in the epoch); this
loader reads them when an epoch's iterator is created, so a run restored from a mid-epoch
checkpoint continues with exactly the batches an uninterrupted run would have seen next.
No sampler state needs saving, and Lightning's one-batch prefetch cannot put a saved
position off by one. Nothing may iterate the loader before Lightning restores its loop
state (``trainer.estimated_stepping_batches`` does, so methods size their schedules with
:func:`distillkit.methods.base.DistillMethod.total_steps` instead). Under DDP each rank takes a strided share of the same permutation
(Lightning's own distributed sampler is switched off: ``use_distributed_sampler=False``).

Augmentation is a pure function of (seed, epoch, example) too. A dataset that draws random
augmentations implements ``load(i, generator)``; the loader then asks for ``(epoch, i)`` and
passes a generator seeded from (seed, epoch, i) (:func:`item_generator`). Neither the worker
processes (``num_workers > 0``: their RNG streams restart with every iterator, so they cannot be
checkpointed) nor the global RNG are used, so a resumed run augments exactly as an uninterrupted
one, and ``dataset.num_workers`` does not change what a run computes.
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of example ``index``'s augmentation in ``epoch`` of a run seeded ``seed``."""
    key = ((int(seed) * 1_000_003 + int(epoch)) * 2_147_483_647 + int(index)) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(key)


class SeededItems(Dataset):
    """``dataset`` read by ``(epoch, i)`` keys: item i with its augmentation drawn from
    :func:`item_generator` (``dataset.load(i, generator)``)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, i = key
        return self.dataset.load(i, item_generator(self.seed, epoch, i))  # type: ignore[attr-defined]


class EpochSeededSampler(Sampler[int]):
    def __init__(self, dataset_len: int, seed: int, drop_last: bool, batch_size: int, keyed: bool = False):
        self.keyed = keyed  # yield (epoch, index) for SeededItems
        self.n = dataset_len
        self.seed = seed
        self.drop_last = drop_last
        self.batch_size = batch_size
        self.epoch = 0
        self.start_batch = 0
        self.rank = 0
        self.world_size = 1

    def _indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        per_rank = math.ceil(self.n / self.world_size)
        perm += perm[: per_rank * self.world_size - self.n]  # pad so every rank gets as many
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        idx = self._indices()[self.start_batch * self.batch_size :]
        return iter([(self.epoch, i) for i in idx] if self.keyed else idx)

    def __len__(self) -> int:
        per_rank = math.ceil(self.n / self.world_size)
        return per_rank - self.start_batch * self.batch_size


class ResumableLoader(DataLoader):
    """Shuffled training loader that resumes mid-epoch from Lightning's loop state."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, trainer: Any = None, **kwargs: Any):
        drop_last = kwargs.pop("drop_last", True)
        keyed = callable(getattr(dataset, "load", None))  # draws augmentations: seeded per item
        sampler = EpochSeededSampler(len(dataset), seed, drop_last, batch_size, keyed=keyed)
        if keyed:
            dataset = SeededItems(dataset, seed)
        # Creating an iterator draws a base seed from ``generator``; with the default (None)
        # that draw comes from the global RNG, at a different point in a resumed run than in
        # an uninterrupted one, and would shift every later random draw of training.
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, **kwargs)
        self.trainer = trainer

    def _position(self) -> tuple[int, int, int, int]:
        t = self.trainer
        if t is None:
            return 0, 0, 0, 1
        # "processed", not "completed": a checkpoint written in on_train_batch_end has the
        # batch processed but not yet completed, and Lightning counts it as done on restart.
        done = t.fit_loop.epoch_loop.batch_progress.current.processed
        return t.current_epoch, done, t.global_rank, t.world_size

    def __iter__(self) -> Iterator[Any]:
        s: EpochSeededSampler = self.sampler  # type: ignore[assignment]
        s.epoch, s.start_batch, s.rank, s.world_size = self._position()
        return super().__iter__()

    def __len__(self) -> int:
        # Lightning sizes the epoch from len(); it is the full epoch, not what is left of it.
        s: EpochSeededSampler = self.sampler  # type: ignore[assignment]
        per_rank = math.ceil(s.n / (self.trainer.world_size if self.trainer is not None else 1))
        return per_rank // s.batch_size if self.drop_last else math.ceil(per_rank / s.batch_size)

    # Lightning treats loaders with these two methods as resumable; the position itself
    # comes from the restored loop counters (see module docstring).
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
