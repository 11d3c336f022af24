"""Pretrained pixel-space denoisers from a local diffusers folder (``model=unet_pretrained``,
``teacher=unet_pretrained``): ``UNet2DModel.from_pretrained(path)`` wrapped as ``net(x_t, t)``.

Nothing is downloaded at run time: ``pretrained`` is a folder on disk holding ``config.json`` and
the weights (``diffusion_pytorch_model.safetensors`` or ``.bin``), e.g. a download of
google/ddpm-celebahq-256 (its UNet sits at the repository root) or of a pipeline whose UNet is
in ``unet/`` (found automatically).
"""
from __future__ import annotations

from pathlib import Path

from distillkit.errors import DistillError
from distillkit.models.unet import DiffusersUNet


def unet_folder(pretrained: str) -> Path:
    """The folder holding the UNet's config.json: ``pretrained`` itself or its ``unet/``."""
    p = Path(str(pretrained)).expanduser()
    for cand in (p, p / "unet"):
        if (cand / "config.json").is_file():
            return cand
    raise DistillError(f"pretrained={pretrained}: no diffusers UNet folder there (config.json and weights, or a "
                       "pipeline folder with unet/). Set model.pretrained / teacher.pretrained to a local folder, "
                       "e.g. a download of google/ddpm-celebahq-256; nothing is downloaded at run time")


def pretrained_unet(pretrained: str) -> DiffusersUNet:
    """``DiffusersUNet.from_pretrained`` of the local folder (``local_files_only``)."""
    return DiffusersUNet.from_pretrained(unet_folder(pretrained))
