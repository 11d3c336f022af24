"""The embedded digits data module: sizes, splits, value range, train_fraction."""
from __future__ import annotations

import pytest
import torch

from distillkit.data.base import split_indices
from distillkit.data.digits import DigitsDataModule, load_digits_tensors


@pytest.fixture(scope="module")
def tensors():
    return load_digits_tensors()


def _setup(**kw) -> DigitsDataModule:
    dm = DigitsDataModule(**kw)
    dm.setup()
    return dm


def test_all_images(tensors):
    x, y = tensors
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.long
    assert x.min() == -1.0 and x.max() == 1.0
    assert sorted(y.unique().tolist()) == list(range(10))


def test_split_sizes_and_values():
    dm = _setup()
    n_test, n_val = round(1797 * 0.25), round(1797 * 0.15)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (1797 - n_test - n_val, n_val, n_test)
    assert dm.num_classes == 10 and dm.image_shape == (1, 8, 8)
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        x, y = ds.tensors
        assert x.shape[1:] == (1, 8, 8)
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert y.min() >= 0 and y.max() <= 9


def test_splits_disjoint_and_cover(tensors):
    x, _ = tensors
    tr, va, te = split_indices(1797, 0.15, 0.25, split_seed=0)
    all_idx = torch.cat([tr, va, te])
    assert len(all_idx) == 1797 and len(all_idx.unique()) == 1797
    dm = _setup(split_seed=0)
    torch.testing.assert_close(dm.train_set.tensors[0], x[tr])
    torch.testing.assert_close(dm.val_set.tensors[0], x[va])
    torch.testing.assert_close(dm.test_set.tensors[0], x[te])


def test_split_depends_on_split_seed_only():
    a, b, c = _setup(split_seed=0, seed=0), _setup(split_seed=0, seed=7), _setup(split_seed=1, seed=0)
    for name in ("train_set", "val_set", "test_set"):
        assert torch.equal(getattr(a, name).tensors[0], getattr(b, name).tensors[0])
    assert not torch.equal(a.test_set.tensors[0], c.test_set.tensors[0])
    assert not torch.equal(a.train_set.tensors[0], c.train_set.tensors[0])


def test_train_fraction_keeps_val_and_test():
    full, half = _setup(), _setup(train_fraction=0.5)
    assert len(half.train_set) == round(len(full.train_set) * 0.5)
    torch.testing.assert_close(half.train_set.tensors[0], full.train_set.tensors[0][: len(half.train_set)])
    for name in ("val_set", "test_set"):
        assert torch.equal(getattr(half, name).tensors[0], getattr(full, name).tensors[0])
    with pytest.raises(ValueError, match="dataset.train_fraction"):
        DigitsDataModule(train_fraction=0.0)
    with pytest.raises(ValueError, match="dataset.val_fraction"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.5)


def test_train_dataloader():
    dm = _setup(batch_size=32, seed=0)
    loader = dm.train_dataloader()
    x, y = next(iter(loader))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    assert len(loader) == len(dm.train_set) // 32
    x2, _ = next(iter(_setup(batch_size=32, seed=0).train_dataloader()))
    assert torch.equal(x, x2)  # the order is a function of the seed
    x3, _ = next(iter(_setup(batch_size=32, seed=1).train_dataloader()))
    assert not torch.equal(x, x3)


@pytest.mark.parametrize("cuda", [False, True])
def test_loaders_pin_batches_when_a_gpu_is_there_even_without_workers(monkeypatch, cuda):
    # an unpinned batch's copy to the GPU waits for all queued work: a stall every update
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    dm = _setup(batch_size=32, num_workers=0)
    assert dm.train_dataloader().pin_memory is cuda and dm.val_dataloader().pin_memory is cuda
