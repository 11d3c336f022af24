"""CIFAR-10 / CIFAR-100 from a local folder in the official python-pickle layout.

Nothing is downloaded: get "CIFAR-10/100 python version" from
https://www.cs.toronto.edu/~kriz/cifar.html, extract it, and point ``dataset.data_dir`` at
``cifar-10-batches-py`` / ``cifar-100-python`` or at the folder that contains it.

Images are normalised with the usual per-channel mean/std; training images get the standard
augmentation (random 32x32 crop of the image zero-padded by 4 px, then a horizontal flip with
probability 0.5), applied in pixel space before normalisation as torchvision's
``RandomCrop(32, 4)`` / ``RandomHorizontalFlip`` / ``Normalize`` pipeline does. Diffusion models
take ``dataset.normalize=minus_one_one`` (pixels scaled to [-1, 1]) and ``dataset.crop_padding=0``
(flips only, as DDPM and progressive distillation train on CIFAR-10). Validation and test are
both the official 10,000-image test set, as in the KD literature (Hinton et al. 2015; CRD, Tian
et al. 2020; DKD, Zhao et al. 2022), so numbers compare with published tables; there is no
held-out split for model selection.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from distillkit.data.base import DistillDataModule, UInt8Images
from distillkit.data.transforms import Normalize, random_crop_flip


NORMALIZATIONS = ("mean_std", "minus_one_one")


@dataclass(frozen=True)
class CifarSpec:
    name: str
    archive: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def files(self) -> tuple[str, ...]:
        return self.train_files + self.test_files


SPECS = {
    10: CifarSpec("CIFAR-10", "cifar-10-python.tar.gz", "cifar-10-batches-py",
                  tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
                  b"labels", b"label_names", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: CifarSpec("CIFAR-100", "cifar-100-python.tar.gz", "cifar-100-python", ("train",), ("test",),
                   "meta", b"fine_labels", b"fine_label_names",
                   (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR files and nothing else: only the globals a numpy array needs
    (a pickle from outside may otherwise run arbitrary code)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR file")
        return super().find_class(module, name)


def load_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, IndexError) as e:
        raise ValueError(f"{path} is not a CIFAR batch file ({type(e).__name__}: {str(e)[:120]}): is it the python "
                         "version of the dataset, downloaded and extracted in full?") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} holds a {type(d).__name__}, not a CIFAR batch: is it the python version of the dataset?")
    return d


def find_cifar_dir(data_dir: str, spec: CifarSpec) -> Path:
    """The folder holding ``spec``'s files: ``data_dir/<spec.folder>`` or ``data_dir`` itself."""
    root = Path(data_dir).expanduser()
    todo = (f"download {spec.name} (python version, {spec.archive}) from "
            "https://www.cs.toronto.edu/~kriz/cifar.html, extract it, and set "
            f"dataset.data_dir=/path/to/{spec.folder} (or the folder containing it)")
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset.data_dir={data_dir!r} does not exist or is not a folder; it should hold "
            f"{spec.folder}/{{{','.join(spec.files)}}} or those files directly. To fix: {todo}")
    for cand in (root / spec.folder, root):
        if all((cand / f).is_file() for f in spec.files):
            return cand
    if not any(root.iterdir()):
        found = "the folder is empty"
    else:
        cand = root / spec.folder if (root / spec.folder).is_dir() else root
        found = f"{cand} lacks {', '.join(f for f in spec.files if not (cand / f).is_file())}"
    hint = ""
    n = 10 if spec is SPECS[100] else 100
    other = SPECS[n]
    if (root / other.folder).is_dir() or all((root / f).is_file() for f in other.files):
        hint = f" (it holds {other.name}: set dataset=cifar{n} or dataset.num_classes={n})"
    raise FileNotFoundError(
        f"dataset.data_dir={data_dir!r} has no {spec.name} data{hint}: looked for "
        f"{', '.join(spec.files)} in {root / spec.folder} and in {root}, and {found}. To fix: {todo}"
    )


def load_split(folder: Path, files: tuple[str, ...], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated images (N, 3, 32, 32) uint8 and labels (N,) int64 of the given batch files."""
    xs, ys = [], []
    for name in files:
        d = load_pickle(folder / name)
        if b"data" not in d or label_key not in d:
            raise ValueError(f"{folder / name} lacks the keys b'data' and {label_key!r}: "
                             "is it the python version of the dataset?")
        x = np.asarray(d[b"data"], dtype=np.uint8)
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(d[label_key]) != len(x):
            raise ValueError(f"{folder / name}: expected data of shape (N, 3072) and N labels, "
                             f"got {x.shape} and {len(d[label_key])}")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


class CifarImages(UInt8Images):
    """uint8 images, transformed per item: [0, 1] -> (augment) -> normalise."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, normalize: Normalize, augment: bool,
                 crop_padding: int = 4):
        super().__init__(images, labels, augment, crop_padding)
        self.normalize = normalize

    def load(self, i: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Item i, augmented with ``generator``'s draws (the training loader seeds one per item)."""
        x = self.images[i].float().div_(255.0)
        if self.augment:
            x = random_crop_flip(x, padding=self.crop_padding, generator=generator)
        return self.normalize(x), self.labels[i]


class CifarDataModule(DistillDataModule):
    """CIFAR-10 (``num_classes=10``) or CIFAR-100 (``num_classes=100``) from ``data_dir``;
    val and test are both the official test set (see the module docstring)."""

    image_shape = (3, 32, 32)

    def __init__(self, data_dir: str, num_classes: int = 100, augment: bool = True, normalize: str = "mean_std",
                 crop_padding: int = 4, **kwargs):
        super().__init__(**kwargs)
        if num_classes not in SPECS:
            raise ValueError(f"dataset.num_classes must be 10 (CIFAR-10) or 100 (CIFAR-100), got {num_classes}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"dataset.normalize={normalize!r}: allowed values are {', '.join(NORMALIZATIONS)}")
        if crop_padding < 0:
            raise ValueError(f"dataset.crop_padding={crop_padding}: must be >= 0 (0: flip only)")
        self.spec = SPECS[num_classes]
        self.data_dir = data_dir
        self.num_classes = num_classes
        self.augment = augment
        self.folder = find_cifar_dir(data_dir, self.spec)  # fail at start, before any work
        self.crop_padding = int(crop_padding)
        if normalize == "minus_one_one":  # (x - 0.5) / 0.5 = 2x - 1
            self.normalize = Normalize((0.5,) * 3, (0.5,) * 3)
            self.data_range = (-1.0, 1.0)
        else:
            self.normalize = Normalize(self.spec.mean, self.spec.std)
        self.classes: Optional[list[str]] = None

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        s = self.spec
        x_tr, y_tr = load_split(self.folder, s.train_files, s.label_key)
        x_te, y_te = load_split(self.folder, s.test_files, s.label_key)
        for y in (y_tr, y_te):
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"labels in {self.folder} go up to {int(y.max())}, outside "
                                 f"0..{self.num_classes - 1}: check dataset.num_classes")
        meta = self.folder / s.meta_file
        if meta.is_file():
            names = load_pickle(meta).get(s.names_key)
            if names is not None:
                self.classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        self.train_set = CifarImages(x_tr, y_tr, self.normalize, self.augment, self.crop_padding)
        self.test_set = CifarImages(x_te, y_te, self.normalize, augment=False)
        self.val_set = self.test_set
