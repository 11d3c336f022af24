"""FID and IS through torchmetrics, with our feature networks and cached real statistics.

The maths is torchmetrics': ``FrechetInceptionDistance(feature=net)`` (Heusel et al. 2017,
``||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2)``) and ``InceptionScore(feature=net)``
(Salimans et al. 2016, ``exp E_x KL(p(y|x) || p(y))`` over 10 splits). This module only
feeds them: our feature network takes float images in [-1, 1] directly (torchmetrics does
not rescale or convert the input of a custom network when ``normalize=False``, and reads
``net.num_features`` instead of probing it with a dummy uint8 image).

Real statistics are the FID metric's own real-side state (feature sum, feature outer
product sum, count) and are cached on disk, keyed by dataset, split, number of images,
feature-network hash and a fingerprint of the images themselves::

    <cache_dir>/<dataset>-<split>-n<N>-<net hash>-<data hash>.pt     (torch.save of tensors)

``cache_dir`` defaults to ``$DISTILLKIT_CACHE/fid_stats``, else
``$XDG_CACHE_HOME/distillkit/fid_stats`` (``~/.cache/distillkit/fid_stats``).

Under DDP each rank scores its own share of the generated images and torchmetrics sums
the states across ranks in ``compute()`` (every rank must call it). The real state is
loaded on rank 0 only (zeros elsewhere), so the sum is the real state once.

FID is biased by the number of generated images: digits numbers are always made with
:data:`DIGITS_NUM_SAMPLES` images, the size of the held-out set of the floor
(:func:`digits_floor`: real held-out digits scored against the training digits).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from distillkit.errors import DistillError
from distillkit.metrics.features import FeatureNet, PathLike, feature_net_hash, load_feature_net
from distillkit.metrics.images import split_images

# The number of generated images behind every reported digits-FID (and the floor's).
DIGITS_NUM_SAMPLES = 700
IS_SPLITS = 10


def default_cache_dir() -> Path:
    if os.environ.get("DISTILLKIT_CACHE"):
        return Path(os.environ["DISTILLKIT_CACHE"]) / "fid_stats"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "distillkit" / "fid_stats"


def fid_metric(net: nn.Module) -> Any:
    """torchmetrics' FID on ``net``'s features; the real state survives ``reset()``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=net, reset_real_features=False, normalize=False)


def is_metric(net: FeatureNet, splits: int = IS_SPLITS) -> Any:
    """torchmetrics' Inception Score on ``net``'s class logits."""
    from torchmetrics.image.inception import InceptionScore

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        return InceptionScore(feature=net.classifier(), splits=splits, normalize=False)


def data_fingerprint(images: torch.Tensor) -> str:
    """8 hex digits of the sha256 of the images' float32 bytes: a different split (other
    fractions or split seed) never reuses another split's statistics."""
    return hashlib.sha256(images.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:8]


def real_stats_path(cache_dir: Optional[PathLike], dataset: str, split: str, num_samples: int,
                    net_hash: str, data_hash: str) -> Path:
    d = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return d / f"{dataset}-{split}-n{num_samples}-{net_hash}-{data_hash}.pt"


def _batches(x: torch.Tensor, batch_size: int):
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size]


@torch.no_grad()
def real_statistics(images: torch.Tensor, net: FeatureNet, *, dataset: str, split: str, net_hash: str,
                    cache_dir: Optional[PathLike] = None, batch_size: int = 256,
                    device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
    """The FID real-side state of ``images`` (float in [-1, 1]), read from the cache or
    computed once through the metric and written there (atomically)."""
    path = real_stats_path(cache_dir, dataset, split, len(images), net_hash, data_fingerprint(images))
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    fid = fid_metric(net).to(device)
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        for b in _batches(images, batch_size):
            fid.update(b.to(device), real=True)
    return save_real_state(fid, path)


def save_real_state(fid: Any, path: Path) -> dict[str, torch.Tensor]:
    """The real-side state of a FID metric, written to the cache file ``path`` atomically."""
    stats = {"features_sum": fid.real_features_sum.cpu(), "features_cov_sum": fid.real_features_cov_sum.cpu(),
             "num_samples": fid.real_features_num_samples.cpu()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(stats, tmp)
    os.replace(tmp, path)
    return stats


def _world_sum(n: int, device: torch.device) -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(n, device=device)
        dist.all_reduce(t)
        return int(t)
    return n


class SampleScorer:
    """FID and IS of generated images against cached real statistics.

        scorer = SampleScorer("digits")
        stats = scorer.reference(train_images, dataset="digits", split="train")
        scorer.score(samples, stats)   # {"fid": ..., "is": ..., "is_std": ..., "num_samples": ..., "feature_net": ...}
    """

    def __init__(self, feature_net: str = "digits", weights: Optional[PathLike] = None, batch_size: int = 256,
                 is_splits: int = IS_SPLITS):
        self.feature_net_name = feature_net
        self.net = load_feature_net(feature_net, weights)
        self.net_hash = feature_net_hash(feature_net, weights)
        self.net_id = f"{feature_net}:{self.net_hash}"
        self.batch_size = int(batch_size)
        self.is_splits = int(is_splits)

    def class_accuracy(self, images: torch.Tensor, labels: torch.Tensor,
                       device: Union[str, torch.device, None] = None) -> float:
        """:func:`class_accuracy` with this scorer's feature network."""
        return class_accuracy(self.net, images, labels, self.batch_size, device)

    def reference(self, images: torch.Tensor, dataset: str, split: str = "train",
                  cache_dir: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu") -> dict[str, torch.Tensor]:
        return real_statistics(images, self.net, dataset=dataset, split=split, net_hash=self.net_hash,
                               cache_dir=cache_dir, batch_size=self.batch_size, device=device)

    @torch.no_grad()
    def score(self, fake: torch.Tensor, real_stats: Optional[dict[str, torch.Tensor]], seed: int = 0,
              device: Union[str, torch.device, None] = None) -> dict[str, Any]:
        """FID and IS of ``fake`` (float in [-1, 1], (N, C, H, W): under DDP this rank's share).

        ``real_stats``: from :meth:`reference`; ``None`` on ranks other than 0 under DDP.
        ``seed`` fixes IS's random split of the images; the global RNG is left untouched.
        """
        device = torch.device(device) if device is not None else fake.device
        fid = fid_metric(self.net).to(device)
        isc = is_metric(self.net, self.is_splits).to(device)
        if real_stats is not None:
            fid.real_features_sum = real_stats["features_sum"].to(device, torch.float64)
            fid.real_features_cov_sum = real_stats["features_cov_sum"].to(device, torch.float64)
            fid.real_features_num_samples = real_stats["num_samples"].to(device, torch.long)
        with torch.autocast(device_type=device.type, enabled=False):
            for b in _batches(fake, self.batch_size):
                b = b.to(device)
                fid.update(b, real=False)
                isc.update(b)
        fid_value = float(fid.compute())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            is_mean, is_std = isc.compute()
        return {"fid": fid_value, "is": float(is_mean), "is_std": float(is_std),
                "num_samples": _world_sum(len(fake), device), "feature_net": self.net_id}


def class_accuracy(net: FeatureNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                   device: Union[str, torch.device, None] = None) -> float:
    """The fraction of ``images`` that the feature network's classifier assigns to the class in
    ``labels`` (all ranks together under DDP): how well a class-conditional model draws the class asked for."""
    device = torch.device(device) if device is not None else images.device
    correct = 0
    with torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
        for b, y in zip(_batches(images, batch_size), _batches(labels, batch_size)):
            correct += int((net.logits(b.to(device).float()).argmax(1) == y.to(device)).sum())
    total = _world_sum(len(images), device)
    return _world_sum(correct, device) / max(1, total)


def heldout_images(datamodule: Any, num_samples: int) -> torch.Tensor:
    """The first ``num_samples`` images of val + test (a random order already)."""
    held = torch.cat([split_images(datamodule, "val"), split_images(datamodule, "test")])
    if num_samples > len(held):
        raise DistillError(f"num_samples={num_samples} is more than the {len(held)} held-out (val + test) images")
    return held[:num_samples]


def floor_scores(datamodule: Any, dataset: str, num_samples: int, scorer: Optional[SampleScorer] = None,
                 cache_dir: Optional[PathLike] = None, seed: int = 0) -> dict[str, Any]:
    """The floor: FID of ``num_samples`` held-out real images against the training split
    (the best a generator can do at that sample count), and IS of those real images."""
    scorer = scorer or SampleScorer()
    real = split_images(datamodule, "train")
    stats = scorer.reference(real, dataset, "train", cache_dir)
    out = scorer.score(heldout_images(datamodule, num_samples), stats, seed=seed)
    out["reference"] = f"{dataset}/train n={len(real)}"
    return out


def digits_floor(num_samples: int = DIGITS_NUM_SAMPLES, cache_dir: Optional[PathLike] = None,
                 seed: int = 0) -> dict[str, Any]:
    """:func:`floor_scores` of the digits (default split, shipped feature network)."""
    from distillkit.data.digits import DigitsDataModule

    dm = DigitsDataModule()
    dm.setup("fit")
    return floor_scores(dm, "digits", num_samples, cache_dir=cache_dir, seed=seed)
