"""CIFAR-10/100 data modules on tiny fake datasets written in the official pickle layout."""
from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from distillkit.data.cifar import CifarDataModule, load_pickle
from distillkit.data.transforms import Normalize, random_crop_flip

C100_MEAN, C100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
C10_MEAN, C10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class _Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2 ``str`` opcodes (BINSTRING), as in the real CIFAR files
    (written by Python 2's cPickle); Python 3 would write ``_codecs.encode`` calls instead."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        op = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(op + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = lambda self, obj: self._save_py2_str(obj.encode("latin-1"))


def _dump(obj: dict, path: Path) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # numpy.core globals, as in the real files (numpy 2 writes numpy._core).
    path.write_bytes(buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def _images(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)
    x[0, 0] = 255      # image 0: red channel, pixel (0, 0)
    x[0, 1024] = 0     # image 0: green channel, pixel (0, 0)
    return x


def write_cifar100(root: Path, n_train: int = 20, n_test: int = 10) -> Path:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        fine = [(i * 7 + seed) % 100 for i in range(n)]
        _dump({b"filenames": [f"img_{i}.png".encode() for i in range(n)],
               b"batch_label": f"{name}ing batch 1 of 1".encode(),
               b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine],
               b"data": _images(n, seed)}, d / name)
    _dump({b"fine_label_names": [f"class{i}".encode() for i in range(100)],
           b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}, d / "meta")
    return d


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 10) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        n = n_test if name == "test_batch" else per_batch
        _dump({b"batch_label": f"batch {k}".encode(), b"labels": [(i + k) % 10 for i in range(n)],
               b"data": _images(n, k), b"filenames": [f"f{k}_{i}.png".encode() for i in range(n)]}, d / name)
    _dump({b"num_cases_per_batch": per_batch, b"label_names": [f"c{i}".encode() for i in range(10)],
           b"num_vis": 3072}, d / "batches.meta")
    return d


@pytest.fixture
def c100(tmp_path: Path) -> Path:
    return write_cifar100(tmp_path)


@pytest.fixture
def c10(tmp_path: Path) -> Path:
    return write_cifar10(tmp_path)


def test_cifar100_shapes_labels_and_normalisation(c100: Path):
    dm = CifarDataModule(str(c100.parent), num_classes=100, seed=0)
    dm.setup()
    assert dm.num_classes == 100 and dm.image_shape == (3, 32, 32)
    assert len(dm.train_set) == 20 and len(dm.test_set) == 10
    assert dm.val_set is dm.test_set  # the official test set, as in the KD literature
    assert dm.classes == [f"class{i}" for i in range(100)]
    x, y = dm.test_set[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.long and int(y) == (3 * 7 + 1) % 100
    # Untransformed training image: pixel values map through (v / 255 - mean) / std.
    dm_plain = CifarDataModule(str(c100), num_classes=100, augment=False, seed=0)
    dm_plain.setup()
    x0, y0 = dm_plain.train_set[0]
    assert int(y0) == 0
    assert x0[0, 0, 0].item() == pytest.approx((1.0 - C100_MEAN[0]) / C100_STD[0], abs=1e-5)
    assert x0[1, 0, 0].item() == pytest.approx((0.0 - C100_MEAN[1]) / C100_STD[1], abs=1e-5)
    raw = _images(20, 0).reshape(20, 3, 32, 32)
    mean, std = torch.tensor(C100_MEAN).view(3, 1, 1), torch.tensor(C100_STD).view(3, 1, 1)
    expect = (torch.from_numpy(raw[5]).float() / 255 - mean) / std
    torch.testing.assert_close(dm_plain.train_set[5][0], expect)


def test_cifar10_batches_and_stats(c10: Path):
    dm = CifarDataModule(str(c10), num_classes=10, augment=False, seed=0)
    dm.setup()
    assert len(dm.train_set) == 20 and len(dm.test_set) == 10  # five batches of 4
    assert dm.classes == [f"c{i}" for i in range(10)]
    x, y = dm.train_set[0]  # batch 1, image 0
    assert int(y) == 0 and x.shape == (3, 32, 32)
    assert x[0, 0, 0].item() == pytest.approx((1.0 - C10_MEAN[0]) / C10_STD[0], abs=1e-5)
    assert int(dm.train_set[4][1]) == 1  # batch 2 starts with label (0 + 1) % 10
    labels = torch.stack([dm.train_set[i][1] for i in range(20)])
    assert labels.min() >= 0 and labels.max() < 10


@pytest.mark.parametrize("which", ["parent", "folder", "tilde"])
def test_both_data_dir_conventions(c100: Path, which: str, monkeypatch):
    if which == "tilde":
        monkeypatch.setenv("HOME", str(c100.parent))
        data_dir = "~/cifar-100-python"
    else:
        data_dir = str(c100.parent if which == "parent" else c100)
    dm = CifarDataModule(data_dir, num_classes=100, seed=0)
    assert dm.folder == c100
    dm.setup()
    assert len(dm.train_set) == 20


def test_augmentation_train_only_and_reproducible(c100: Path):
    aug = CifarDataModule(str(c100), augment=True, seed=0)
    plain = CifarDataModule(str(c100), augment=False, seed=0)
    aug.setup()
    plain.setup()
    torch.manual_seed(0)
    first = torch.stack([aug.train_set[i][0] for i in range(20)])
    torch.manual_seed(0)
    again = torch.stack([aug.train_set[i][0] for i in range(20)])
    torch.testing.assert_close(first, again)  # same global seed, same augmentation
    base = torch.stack([plain.train_set[i][0] for i in range(20)])
    changed = [not torch.equal(first[i], base[i]) for i in range(20)]
    assert sum(changed) >= 15  # unchanged only for crop offset (4, 4) without flip: p = 1/162
    torch.manual_seed(1)
    assert not torch.equal(torch.stack([aug.train_set[i][0] for i in range(20)]), first)
    # The test set is never augmented.
    t1 = torch.stack([aug.test_set[i][0] for i in range(10)])
    t2 = torch.stack([aug.test_set[i][0] for i in range(10)])
    torch.testing.assert_close(t1, t2)
    torch.testing.assert_close(t1, torch.stack([plain.test_set[i][0] for i in range(10)]))


def test_padding_is_black_in_pixel_space(c100: Path):
    """Zero padding happens before normalisation, as in torchvision's RandomCrop + Normalize."""
    dm = CifarDataModule(str(c100), augment=True, seed=0)
    dm.setup()
    black = (-torch.tensor(C100_MEAN) / torch.tensor(C100_STD)).view(3, 1)
    torch.manual_seed(0)
    found = 0
    for i in range(20):
        x = dm.train_set[i][0]
        cols = x[:, :, 0], x[:, :, -1]
        for c in cols:  # a padded column is black in every row
            if torch.allclose(c, black.expand_as(c), atol=1e-5):
                found += 1
    assert found > 0


def test_random_crop_flip_is_a_window_of_the_padded_image():
    x = torch.arange(2 * 6 * 5, dtype=torch.float32).view(2, 6, 5) + 1
    g = torch.Generator().manual_seed(0)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = set()
    for _ in range(40):
        out = random_crop_flip(x, padding=2, generator=g)
        assert out.shape == x.shape
        hits = [(i, j, f) for i in range(5) for j in range(5) for f in (False, True)
                if torch.equal(out, (lambda w: w.flip(-1) if f else w)(padded[:, i:i + 6, j:j + 5]))]
        assert hits
        flips.update(f for *_, f in hits)
    assert flips == {False, True}
    out = random_crop_flip(x, padding=0)
    assert torch.equal(out, x) or torch.equal(out, x.flip(-1))
    assert random_crop_flip(x, padding=3, fill=-1.0).min() >= -1.0


def test_normalize_round_trip():
    n = Normalize((0.5, 0.25), (0.5, 2.0))
    x = torch.rand(4, 2, 3, 3)
    torch.testing.assert_close(n(x)[:, 1], (x[:, 1] - 0.25) / 2.0)
    torch.testing.assert_close(n.inverse(n(x)), x)


def test_train_dataloader_batch(c100: Path):
    dm = CifarDataModule(str(c100), seed=0, batch_size=4)
    dm.setup()
    loader = dm.train_dataloader()
    assert len(loader) == 5
    batches = list(loader)
    assert len(batches) == 5
    x, y = batches[0]
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (4,) and y.dtype == torch.long
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == sorted(int(dm.train_set[i][1]) for i in range(20))  # one epoch
    xe, ye = next(iter(dm.test_dataloader()))
    assert xe.shape == (10, 3, 32, 32)


def _trainer_at(epoch: int, batches_done: int):
    """What ResumableLoader reads of a trainer restored at (epoch, batches done in it)."""
    from types import SimpleNamespace as NS

    progress = NS(current=NS(processed=batches_done))
    return NS(current_epoch=epoch, global_rank=0, world_size=1, fit_loop=NS(epoch_loop=NS(batch_progress=progress)))


def _epoch(dm: CifarDataModule, epoch: int, batches_done: int = 0) -> list:
    loader = dm.train_dataloader()
    loader.trainer = _trainer_at(epoch, batches_done)
    return [b[0] for b in loader]


def test_augmentation_is_a_function_of_seed_epoch_and_example(c100: Path):
    """The training loader's crops and flips do not depend on worker processes, on where a
    resumed run creates its iterator, or on the global RNG; they change from epoch to epoch."""
    from distillkit.data.loader import item_generator

    dm = CifarDataModule(str(c100), seed=0, batch_size=4)
    dm.setup()
    uninterrupted = [_epoch(dm, e) for e in (0, 1)]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    resumed = _epoch(dm, 1, batches_done=2)  # a run restored after two batches of epoch 1
    assert torch.equal(torch.get_rng_state(), before)
    assert len(resumed) == 3 and all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[1][2:]))
    dm_workers = CifarDataModule(str(c100), seed=0, batch_size=4, num_workers=2)
    dm_workers.setup()
    for e in (0, 1):
        assert all(torch.equal(a, b) for a, b in zip(_epoch(dm_workers, e), uninterrupted[e]))
    ds = dm.train_set
    views = {i: [ds.load(i, item_generator(0, e, i))[0] for e in range(4)] for i in range(5)}
    assert any(not torch.equal(v[0], w) for v in views.values() for w in v[1:])  # epochs differ


def test_schema_fields_instantiate(c100: Path):
    """The constructor takes every field of CifarConfig (what Hydra passes), plus seed."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from distillkit.config import CifarConfig

    cfg = OmegaConf.structured(CifarConfig)
    cfg._target_ = "distillkit.data.cifar.CifarDataModule"
    cfg.data_dir = str(c100)
    cfg.num_workers = 0
    dm = instantiate(cfg, seed=3)
    assert isinstance(dm, CifarDataModule) and dm.num_classes == 100 and dm.seed == 3


def test_missing_data_dir_message(tmp_path: Path):
    bad = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        dm = CifarDataModule(str(bad), num_classes=100)
        dm.setup()
    msg = str(e.value)
    assert "dataset.data_dir" in msg and str(bad) in msg
    assert "cifar-100-python" in msg and "download" in msg.lower()


def test_empty_data_dir_message(tmp_path: Path):
    with pytest.raises(FileNotFoundError) as e:
        dm = CifarDataModule(str(tmp_path), num_classes=100)
        dm.setup()
    msg = str(e.value)
    assert "dataset.data_dir" in msg and str(tmp_path) in msg
    assert "train" in msg and "test" in msg and "empty" in msg
    with pytest.raises(FileNotFoundError) as e:
        CifarDataModule(str(tmp_path), num_classes=10)
    assert "data_batch_1" in str(e.value) and "cifar-10-batches-py" in str(e.value)


def test_incomplete_folder_message(c10: Path):
    os.remove(c10 / "data_batch_3")
    with pytest.raises(FileNotFoundError) as e:
        CifarDataModule(str(c10), num_classes=10)
    assert "dataset.data_dir" in str(e.value) and f"{c10} lacks data_batch_3." in str(e.value)


def test_wrong_dataset_hints_num_classes(c10: Path):
    with pytest.raises(FileNotFoundError) as e:
        CifarDataModule(str(c10.parent), num_classes=100)
    assert "dataset.data_dir" in str(e.value) and "dataset.num_classes=10" in str(e.value)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="dataset.num_classes"):
        CifarDataModule("/does/not/matter", num_classes=50)


def test_pickle_with_foreign_objects_is_refused(tmp_path: Path):
    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    p = tmp_path / "train"
    p.write_bytes(pickle.dumps({b"data": Evil()}, protocol=2))
    with pytest.raises(ValueError, match="unexpected object .*getcwd"):
        load_pickle(p)


@pytest.mark.parametrize("damage", ["junk", "truncated", "empty", "not_a_dict"])
def test_a_damaged_batch_file_is_named(c10: Path, damage: str):
    """A batch file that is not a whole CIFAR pickle (a download cut short, another file under
    its name) is one ValueError naming it, which the CLI reports as 'distill: error: dataset: ...'."""
    f = c10 / "data_batch_2"
    if damage == "junk":
        f.write_bytes(b"junk\n")
    elif damage == "truncated":
        f.write_bytes(f.read_bytes()[:200])
    elif damage == "empty":
        f.write_bytes(b"")
    else:
        f.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    dm = CifarDataModule(str(c10), num_classes=10)
    with pytest.raises(ValueError, match="data_batch_2 (is not a CIFAR batch file|holds a list)"):
        dm.setup()



@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_files_pickled_by_python3_load_too(tmp_path: Path, protocol: int):
    obj = {b"data": _images(3, 0), b"fine_labels": [1, 2, 3], b"filenames": [b"a", b"b", b"c"]}
    p = tmp_path / "train"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    d = load_pickle(p)
    assert np.array_equal(d[b"data"], obj[b"data"]) and d[b"fine_labels"] == [1, 2, 3]


def test_diffusion_view_and_fid_reference(c10: Path):
    """normalize=minus_one_one scales pixels to [-1, 1], crop_padding=0 only flips; whatever the
    training view, FID's reference (split_images) is the raw pixels in [-1, 1], unaugmented."""
    from distillkit.metrics.images import split_images

    raw = CifarDataModule(str(c10), num_classes=10, augment=False, normalize="minus_one_one")
    raw.setup()
    pixels = raw.train_set.raw_images()
    assert raw.data_range == (-1.0, 1.0) and pixels.dtype == torch.uint8
    torch.testing.assert_close(torch.stack([raw.train_set[i][0] for i in range(len(pixels))]),
                               pixels.float() / 255 * 2 - 1)
    flips = CifarDataModule(str(c10), num_classes=10, normalize="minus_one_one", crop_padding=0)
    flips.setup()
    for i in range(len(pixels)):
        x, y = pixels[i].float() / 255 * 2 - 1, flips.train_set[i][0]
        assert torch.allclose(y, x, atol=1e-6) or torch.allclose(y, x.flip(-1), atol=1e-6)
    classifier = CifarDataModule(str(c10), num_classes=10)  # mean/std, crops and flips
    classifier.setup()
    assert classifier.data_range is None
    assert torch.equal(split_images(classifier, "train"), pixels.float() / 127.5 - 1)
    with pytest.raises(ValueError, match="dataset.normalize"):
        CifarDataModule(str(c10), num_classes=10, normalize="zero_one")


TINY_UNET = ["block_out_channels=[8,8,8,8]", "layers_per_block=1", "norm_num_groups=4"]


def test_cifar10_diffusion_experiments_run(cli, c10: Path, tmp_path: Path):
    """experiment=cifar10_diffusion_teacher and cifar10_progressive (its teacher) through the CLI
    on fake CIFAR-10 with a tiny UNet; a diffusion method on classifier-normalised CIFAR is refused."""
    runs = tmp_path / "runs"
    smoke = [f"dataset.data_dir={c10}", f"runs_dir={runs}", "debug=smoke", "callbacks.progress=none",
             "dataset.batch_size=4", "dataset.eval_batch_size=4", *(f"model.{o}" for o in TINY_UNET)]
    r = cli("experiment=cifar10_diffusion_teacher", *smoke, "dataset.normalize=mean_std")
    assert r.returncode == 2 and "dataset.normalize=minus_one_one" in r.output, r.output
    r = cli("experiment=cifar10_diffusion_teacher", *smoke, "trainer.max_steps=2", "name=default")
    assert r.returncode == 0, r.output
    teacher = runs / "cifar10_diffusion_teacher" / "default" / "last.ckpt"
    assert teacher.is_file()
    r = cli("experiment=cifar10_progressive", *smoke, *(f"teacher.{o}" for o in TINY_UNET),
            "method.teacher_steps=4", "method.updates_per_round=1", "name=pd")
    assert r.returncode == 0, r.output
    run = runs / "cifar10_progressive" / "pd"
    assert [(run / f"round_{k}.ckpt").is_file() for k in (1, 2)] == [True, True]
