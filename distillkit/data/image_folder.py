"""Images in class-per-subfolder layout, ``data_dir/<class_name>/*.png|jpg|jpeg|bmp|webp``
(torchvision's ImageFolder convention), read with PIL.

Classes are the subfolder names in sorted order (label i is ``classes[i]``). Every image is
converted to L (``channels=1``) or RGB (``channels=3``), resized to ``image_size`` squared
(aspect ratio not kept) and scaled to [-1, 1], the range the digits data and the diffusion
models use. The train/val/test partition is fixed by ``split_seed``. Training augmentation is
a horizontal flip, plus a random crop of the image padded with black when ``crop_padding > 0``
(off by default: black borders are right for classifiers, wrong for diffusion training data).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from distillkit.data.base import DistillDataModule, check_split_fractions, UInt8Images, split_indices
from distillkit.data.transforms import random_crop_flip
from distillkit.errors import DistillError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_LAYOUT = ("expected data_dir/<class_name>/<image> with one subfolder per class and images "
           f"ending in {', '.join(IMAGE_EXTENSIONS)} (any case)")


def find_images(data_dir: str) -> tuple[list[str], list[tuple[Path, int]]]:
    """Sorted class names and the (path, label) of every image, in a fixed order."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset.data_dir={data_dir!r} does not exist or is not a folder: "
                                f"set dataset.data_dir to your image folder; {_LAYOUT}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"dataset.data_dir={data_dir!r} has no class subfolders: {_LAYOUT}")
    items: list[tuple[Path, int]] = []
    empty = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
        if not files:
            empty.append(name)
        items += [(p, label) for p in files]
    if not items:
        raise FileNotFoundError(f"dataset.data_dir={data_dir!r} has class subfolders "
                                f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}) "
                                f"but no images in them: {_LAYOUT}")
    if empty:
        raise FileNotFoundError(f"dataset.data_dir={data_dir!r}: class subfolders without images: "
                                f"{', '.join(empty)}; remove them or add images ({_LAYOUT})")
    return classes, items


def load_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One image as uint8 (C, image_size, image_size)."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


class ImageTensors(UInt8Images):
    """uint8 images, per item scaled to [-1, 1] and (augment) flipped / cropped."""

    def load(self, i: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Item i, augmented with ``generator``'s draws (the training loader seeds one per item)."""
        x = self.images[i].float().div_(127.5).sub_(1.0)
        if self.augment:
            x = random_crop_flip(x, padding=self.crop_padding, fill=-1.0, generator=generator)
        return x, self.labels[i]


class ImageFolderDataModule(DistillDataModule):
    data_range = (-1.0, 1.0)

    def __init__(self, data_dir: str, image_size: int = 32, channels: int = 3, augment: bool = True,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, crop_padding: int = 0, **kwargs):
        super().__init__(**kwargs)
        if channels not in (1, 3):
            raise ValueError(f"dataset.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if image_size < 1:
            raise ValueError(f"dataset.image_size must be positive, got {image_size}")
        check_split_fractions(val_fraction, test_fraction)
        self.data_dir = data_dir
        self.image_size = image_size
        self.channels = channels
        self.augment = augment
        self.crop_padding = crop_padding
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.classes, self._items = find_images(data_dir)  # fail at start, before any work
        self.num_classes = len(self.classes)
        self.image_shape = (channels, image_size, image_size)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        images, unreadable = [], []
        for p, _ in self._items:
            try:
                images.append(load_image(p, self.image_size, self.channels))
            except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
                unreadable.append(f"{p} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        if unreadable:
            shown = "\n  ".join(unreadable[:10]) + (f"\n  ... and {len(unreadable) - 10} more" if len(unreadable) > 10 else "")
            raise DistillError(f"dataset.data_dir={self.data_dir!r}: {len(unreadable)} of {len(self._items)} image files "
                               f"cannot be read as images:\n  {shown}\nRemove or replace them, then run again.")
        x = torch.from_numpy(np.stack(images))
        y = torch.tensor([label for _, label in self._items], dtype=torch.long)
        tr, va, te = split_indices(len(x), self.val_fraction, self.test_fraction, self.split_seed)
        if len(tr) == 0:
            raise DistillError(f"dataset.data_dir={self.data_dir!r} has {len(x)} images: too few for a "
                             "training split; add images or lower dataset.val_fraction / test_fraction")
        self.train_set = ImageTensors(x[tr], y[tr], self.augment, self.crop_padding)
        self.val_set = ImageTensors(x[va], y[va])
        self.test_set = ImageTensors(x[te], y[te])
