"""Feature networks of FID / IS: the shipped digits CNN, or Inception-v3 from a local file.

A feature network here is an ``nn.Module`` that torchmetrics takes as its custom feature
extractor (``FrechetInceptionDistance(feature=net)``, ``InceptionScore(feature=net.classifier())``):

- input: float images in [-1, 1], shape (N, C, H, W), the tensors our samplers return;
- ``forward(x)``: the FID features (digits: the CNN's 128-d penultimate activations;
  inception: the 2048-d pool features), and ``num_features``, which torchmetrics reads
  instead of probing the network with a dummy uint8 image;
- ``classifier()``: a view of the same weights whose ``forward`` gives class logits (digits:
  10 classes; inception: torch-fidelity's 1008 ``logits_unbiased``), the input of IS.

Every FID/IS number records :func:`feature_net_hash` (a sha256 prefix of the weights file),
so numbers from different feature networks are never compared by mistake.

The digits CNN (``scripts/make_digits_feature_net.py``) plays the role Inception plays for
ImageNet-like data (docs/architecture.md, Decisions: the embedded default). Inception needs the optional extra
``pip install 'distillkit[inception]'`` (torch-fidelity, which needs torchvision) and its
weights from a local file, ``eval.inception_weights=PATH``: nothing downloads at run time.
"""
from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from distillkit.errors import DistillError
from distillkit.metrics.images import to_uint8

FEATURE_NETS = ("digits", "inception")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DIGITS_WEIGHTS = WEIGHTS_DIR / "digits_cnn.safetensors"
HASH_LEN = 12

PathLike = Union[str, os.PathLike]


class FeatureNet(nn.Module):
    """Base of the feature networks: always in eval mode, no gradients."""

    num_features: int
    num_classes: int

    def train(self, mode: bool = True) -> "FeatureNet":
        return super().train(False)  # BatchNorm statistics must never change

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def classifier(self) -> nn.Module:
        """The IS input: a module whose forward gives this network's class logits."""
        return _Logits(self)


class _Logits(nn.Module):
    def __init__(self, net: FeatureNet):
        super().__init__()
        self.net = net
        self.num_features = net.num_classes

    def train(self, mode: bool = True) -> "_Logits":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.logits(x)


class DigitsFeatureNet(FeatureNet):
    """A trained :class:`~distillkit.models.cnn.DigitsCNN` on 1x8x8 digits in [-1, 1]."""

    image_shape = (1, 8, 8)

    def __init__(self, state_dict: dict[str, torch.Tensor]):
        super().__init__()
        from distillkit.models.cnn import DigitsCNN

        width = int(state_dict["block1.0.weight"].shape[0])
        num_classes = int(state_dict["fc.weight"].shape[0])
        self.cnn = DigitsCNN(width, num_classes=num_classes)
        self.cnn.load_state_dict(state_dict)
        self.cnn.requires_grad_(False)
        self.num_features = 4 * width
        self.num_classes = num_classes
        self.eval()

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            raise ValueError("the digits feature network takes float images in [-1, 1], got uint8")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"the digits feature network takes images of shape (N, 1, 8, 8), got {tuple(x.shape)}")
        return x.float()

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.cnn.features(self.cnn.block2(self.cnn.block1(self._check(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._trunk(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.cnn.fc(self._trunk(x))


class InceptionFeatureNet(FeatureNet):
    """torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's FeatureExtractorInceptionV3)
    behind an adapter: float [-1, 1] -> uint8 [0, 255], grayscale -> RGB; the network
    resizes to 299x299 itself."""

    num_features = 2048
    num_classes = 1008

    def __init__(self, weights: PathLike):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                                            feature_extractor_weights_path=str(weights))
        self.inception.requires_grad_(False)
        self.eval()

    @staticmethod
    def to_uint8(x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.uint8:
            x = to_uint8(x)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inception._torch_fidelity_forward(self.to_uint8(x))[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.inception._torch_fidelity_forward(self.to_uint8(x))[1]


def _check_name(name: str) -> None:
    if name not in FEATURE_NETS:
        raise DistillError(f"eval.feature_net={name!r}: allowed values are {', '.join(FEATURE_NETS)}")


def weights_path(name: str = "digits", path: Optional[PathLike] = None) -> Path:
    """The weights file a feature network loads (checked to exist)."""
    _check_name(name)
    if name == "digits":
        p = Path(path) if path is not None else DIGITS_WEIGHTS
        if not p.is_file():
            raise DistillError(f"digits feature network weights not found: {p} (the shipped file is made by "
                               "scripts/make_digits_feature_net.py)")
        return p
    if path is None:
        raise DistillError("eval.feature_net=inception needs the Inception-v3 weights from a local file: set "
                           "eval.inception_weights=PATH (torch-fidelity's pt_inception-2015-12-05 .pth); "
                           "nothing downloads at run time")
    p = Path(path)
    if not p.is_file():
        raise DistillError(f"eval.inception_weights={path}: no such file")
    return p


def load_feature_net(name: str = "digits", path: Optional[PathLike] = None) -> FeatureNet:
    """The feature network ``name`` in eval mode, from ``path`` or (digits) the shipped weights.

    ``net(x)`` gives FID features, ``net.classifier()(x)`` class logits for IS; ``x`` is
    float in [-1, 1], (N, C, H, W).
    """
    p = weights_path(name, path)
    if name == "digits":
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        return DigitsFeatureNet(sd)
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as e:
        raise DistillError("eval.feature_net=inception needs torch-fidelity (and torchvision): "
                           "pip install 'distillkit[inception]'; digits data use eval.feature_net=digits") from e
    return InceptionFeatureNet(p)


@lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def feature_net_hash(name: str = "digits", path: Optional[PathLike] = None) -> str:
    """The first 12 hex digits of the sha256 of the feature network's weights file."""
    p = weights_path(name, path)
    st = p.stat()
    return _file_sha256(str(p.resolve()), st.st_size, st.st_mtime_ns)[:HASH_LEN]


def feature_net_id(name: str = "digits", path: Optional[PathLike] = None) -> str:
    """``<name>:<hash>``, the string every FID/IS result records."""
    return f"{name}:{feature_net_hash(name, path)}"


def digits_sidecar() -> dict:
    """The shipped digits feature network's JSON sidecar (sha256, width, accuracy, command)."""
    return json.loads(DIGITS_WEIGHTS.with_suffix(".json").read_text())
