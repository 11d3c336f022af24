"""Building networks from config and loading their weights from local files.

Accepted weight files (nothing is downloaded): a distillkit Lightning checkpoint (``.ckpt``,
the student's weights, EMA ones when the run kept an EMA), a plain state dict or one wrapped
as ``{"model": ...}`` / ``{"state_dict": ...}`` (RepDistiller and mdistiller save them so),
or a ``.safetensors`` file. Everything from outside is read with ``weights_only=True``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distillkit.errors import DistillError

STUDENT_PREFIX = "student."
EMA_PREFIX = "ema.module."  # torch.optim.swa_utils.AveragedModel keeps the copy as .module


def read_state_dict(path: str | Path, key: str = "teacher.checkpoint") -> dict[str, torch.Tensor]:
    """The network weights in ``path``, whatever the supported format; errors name ``key``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DistillError(
            f"{key}={path}: no such file. Point {key} at a weights file: a distillkit "
            f"last.ckpt, a .pt/.pth state dict or a .safetensors file."
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(p)))
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or not a weights file at all
        raise DistillError(
            f"{key}={path}: cannot read weights from this file ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). Is it complete, and a checkpoint or state dict?"
        ) from None
    return _unwrap(obj, key, path)


def _unwrap(obj: Any, key: str, path: Any) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise DistillError(f"{key}={path}: the file holds a {type(obj).__name__}, not a state dict")
    if "distillkit" in obj and "state_dict" in obj:  # one of our checkpoints
        sd = obj["state_dict"]
        ema = {k[len(EMA_PREFIX):]: v for k, v in sd.items() if k.startswith(EMA_PREFIX)}
        return ema or {k[len(STUDENT_PREFIX):]: v for k, v in sd.items() if k.startswith(STUDENT_PREFIX)}
    for k in ("state_dict", "model", "net", "student"):
        if k in obj and isinstance(obj[k], Mapping):
            obj = obj[k]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise DistillError(f"{key}={path}: the file holds no tensors")
    # Lightning modules of other projects prefix the network's keys ("model.", "module.").
    for prefix in ("module.", "model.", "student."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_weights(net: nn.Module, path: str | Path, key: str) -> None:
    sd = read_state_dict(path, key)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise DistillError(
            f"{key}={path}: the weights do not fit the configured architecture "
            f"({len(missing)} missing keys, e.g. {missing[:3]}; {len(unexpected)} unexpected, "
            f"e.g. {unexpected[:3]}). Check that the architecture option matches the file."
        )


def build_model(cfg: DictConfig | Mapping, key: str = "model") -> nn.Module:
    """Instantiate ``cfg`` (a model/teacher group node) and load ``cfg.checkpoint`` if set."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    ckpt = c.pop("checkpoint", None)
    try:
        net = instantiate(c, _convert_="all")
    except Exception as e:
        raise DistillError(f"{key}: cannot build {c.get('_target_')}: {e}") from None
    if ckpt:
        load_weights(net, ckpt, f"{key}.checkpoint")
    return net


def build_teacher(cfg: DictConfig) -> nn.Module | None:
    """The frozen teacher: eval mode, no gradients (DESIGN: the teacher is frozen)."""
    if cfg.get("_target_") is None:
        return None
    teacher = build_model(cfg, key="teacher")
    teacher.eval().requires_grad_(False)
    return teacher
