"""ImageFolderDataModule on a few PNG/JPEG files written with PIL."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from distillkit.data.image_folder import ImageFolderDataModule


def write_folder(root: Path) -> Path:
    """zebra/: 5 solid red images of assorted sizes and modes; ant/: 5 solid white ones."""
    (root / "zebra").mkdir(parents=True)
    (root / "ant").mkdir()
    for i in range(5):
        Image.new("RGB", (40 + i, 30), (255, 0, 0)).save(root / "zebra" / f"z{i}.png")
    Image.new("RGBA", (16, 16), (255, 255, 255, 255)).save(root / "ant" / "a0.png")
    Image.new("L", (32, 32), 255).save(root / "ant" / "a1.PNG")
    Image.new("RGB", (32, 32), (255, 255, 255)).save(root / "ant" / "a2.JPG", quality=100)
    Image.new("RGB", (64, 64), (255, 255, 255)).save(root / "ant" / "a3.bmp")
    (root / "ant" / "sub").mkdir()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(root / "ant" / "sub" / "a4.png")
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()  # not a class
    return root


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "imgs")


def _all(ds):
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.stack(ys)


def test_loading_classes_and_values(folder: Path):
    dm = ImageFolderDataModule(str(folder), image_size=16, channels=3, augment=False,
                               val_fraction=0.2, test_fraction=0.2, seed=0)
    assert dm.classes == ["ant", "zebra"] and dm.num_classes == 2
    assert dm.image_shape == (3, 16, 16)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (6, 2, 2)
    x, y = _all(torch.utils.data.ConcatDataset([dm.train_set, dm.val_set, dm.test_set]))
    assert x.shape == (10, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert sorted(y.tolist()) == [0] * 5 + [1] * 5
    red = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16)
    for xi, yi in zip(x, y):
        if yi == 1:  # zebra: solid red
            torch.testing.assert_close(xi, red, atol=0.02, rtol=0)
        else:        # ant: solid white (JPEG may be a shade off)
            assert xi.min() > 0.95


def test_grayscale(folder: Path):
    dm = ImageFolderDataModule(str(folder), image_size=8, channels=1, val_fraction=0.1,
                               test_fraction=0.1, seed=0)
    dm.setup()
    assert dm.image_shape == (1, 8, 8)
    x, y = dm.train_set[0]
    assert x.shape == (1, 8, 8)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (8, 1, 1)


def test_split_fixed_by_split_seed(folder: Path):
    def split(split_seed: int, seed: int):
        dm = ImageFolderDataModule(str(folder), image_size=8, augment=False, split_seed=split_seed, seed=seed)
        dm.setup()
        return _all(dm.train_set)[1].tolist(), _all(dm.test_set)[1].tolist(), dm

    a_tr, a_te, a = split(0, 0)
    b_tr, b_te, b = split(0, 5)  # the run seed does not move the split
    assert (a_tr, a_te) == (b_tr, b_te)
    torch.testing.assert_close(a.train_set.images, b.train_set.images)
    different = [not torch.equal(split(s, 0)[2].train_set.images, a.train_set.images) for s in range(1, 6)]
    assert any(different)


def test_augment_flips_train_only(tmp_path: Path):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            im = Image.new("L", (8, 8), 0)
            im.paste(255, (0, 0, 4, 8))  # left half white: not symmetric
            im.save(root / c / f"{i}.png")
    aug = ImageFolderDataModule(str(root), image_size=8, channels=1, augment=True, seed=0)
    aug.setup()
    torch.manual_seed(0)
    xs = torch.stack([aug.train_set[0][0] for _ in range(20)])
    left_white = xs[:, 0, 0, 0] > 0
    assert left_white.any() and (~left_white).any()  # both flipped and unflipped
    torch.manual_seed(0)
    torch.testing.assert_close(torch.stack([aug.train_set[0][0] for _ in range(20)]), xs)
    t = aug.test_set[0][0]
    assert all(torch.equal(aug.test_set[0][0], t) for _ in range(10))
    assert t[0, 0, 0] > 0  # original orientation


def test_crop_padding_pads_with_black(folder: Path):
    dm = ImageFolderDataModule(str(folder), image_size=8, augment=True, crop_padding=2, seed=0)
    dm.setup()
    torch.manual_seed(0)
    xs = torch.stack([dm.train_set[i % len(dm.train_set)][0] for i in range(30)])
    assert xs[:, 0].min() == -1.0  # red channel is 1 in every image: -1 only from black padding
    assert xs.shape[1:] == (3, 8, 8)


def test_train_dataloader(folder: Path):
    dm = ImageFolderDataModule(str(folder), image_size=8, seed=0, batch_size=4)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and y.shape == (4,)


def test_schema_fields_instantiate(folder: Path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from distillkit.config import ImageFolderConfig

    cfg = OmegaConf.structured(ImageFolderConfig)
    cfg._target_ = "distillkit.data.image_folder.ImageFolderDataModule"
    cfg.data_dir = str(folder)
    dm = instantiate(cfg, seed=1)
    assert isinstance(dm, ImageFolderDataModule) and dm.image_shape == (3, 32, 32)


def test_errors(tmp_path: Path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as e:
        ImageFolderDataModule(str(missing))
    assert "dataset.data_dir" in str(e.value) and str(missing) in str(e.value)
    assert "<class_name>" in str(e.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        ImageFolderDataModule(str(empty))
    assert "dataset.data_dir" in str(e.value) and "no class subfolders" in str(e.value)

    (empty / "a").mkdir()
    (empty / "a" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as e:
        ImageFolderDataModule(str(empty))
    assert "dataset.data_dir" in str(e.value) and "no images" in str(e.value)

    (empty / "b").mkdir()
    Image.new("RGB", (4, 4)).save(empty / "b" / "x.png")
    with pytest.raises(FileNotFoundError) as e:
        ImageFolderDataModule(str(empty))
    assert "dataset.data_dir" in str(e.value) and "without images: a;" in str(e.value)

    with pytest.raises(ValueError, match="dataset.channels"):
        ImageFolderDataModule(str(empty), channels=4)
    with pytest.raises(ValueError, match="dataset.val_fraction"):
        ImageFolderDataModule(str(empty), val_fraction=0.5, test_fraction=0.5)


def test_unreadable_images_are_listed_before_training(tmp_path: Path):
    """A file with an image extension that PIL cannot read (a failed download, a text file) is
    named in one message at setup, with the others like it, not PIL's traceback for the first."""
    from distillkit.errors import DistillError

    (tmp_path / "a").mkdir()
    for i in range(4):
        Image.new("RGB", (4, 4)).save(tmp_path / "a" / f"{i}.png")
    (tmp_path / "a" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "a" / "empty.jpg").write_bytes(b"")
    dm = ImageFolderDataModule(str(tmp_path), image_size=4)
    with pytest.raises(DistillError) as e:
        dm.setup("fit")
    msg = str(e.value)
    assert "2 of 6 image files cannot be read" in msg and "broken.png" in msg and "empty.jpg" in msg
    assert "0.png" not in msg
