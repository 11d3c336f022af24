"""Pixel-space denoisers: a diffusers ``UNet2DModel`` called as ``net(x_t, t) -> tensor``.

The diffusers model is the attribute ``unet`` (so ``net.unet.save_pretrained(dir)`` writes the
standard ``config.json`` + ``diffusion_pytorch_model.safetensors`` that ``UNet2DModel.from_pretrained``
and ``DDIMPipeline`` read); :meth:`DiffusersUNet.save_pretrained` / :meth:`from_pretrained` do
the same from the wrapper. ``t`` is whatever the sampler passes: integer timesteps of a VP
schedule (shape (B,) or a scalar) or EDM's float c_noise = ln(sigma) / 4; the UNet's sinusoidal
embedding takes either.

Options: ``model=unet_digits`` (1x8x8, small enough to train in minutes on two CPU cores) and
``model=unet`` (DDPM's CIFAR-10 layout, Ho et al. 2020, App. B; set sample_size / in_channels for
other image sizes). ``lora_rank``: a LoRA adapter on ``lora_target_modules`` trains instead of the
whole network (distillkit.models.lora).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from distillkit.models.lora import DEFAULT_LORA_TARGETS


class DiffusersUNet(nn.Module):
    """``UNet2DModel`` with a plain-tensor output. ``down_block_types`` / ``up_block_types``
    default to plain ResNet blocks at every resolution."""

    def __init__(self, sample_size: int = 32, in_channels: int = 3, out_channels: Optional[int] = None,
                 block_out_channels: Sequence[int] = (128, 256, 256, 256), layers_per_block: int = 2,
                 down_block_types: Optional[Sequence[str]] = None,
                 up_block_types: Optional[Sequence[str]] = None,
                 attention_head_dim: Optional[int] = None, norm_num_groups: int = 32,
                 dropout: float = 0.0, add_attention: bool = True, num_classes: Optional[int] = None,
                 lora_rank: Optional[int] = None, lora_alpha: Optional[float] = None,
                 lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS):
        super().__init__()
        from diffusers import UNet2DModel

        n = len(block_out_channels)
        down = tuple(down_block_types) if down_block_types else ("DownBlock2D",) * n
        up = tuple(up_block_types) if up_block_types else ("UpBlock2D",) * n
        if len(down) != n or len(up) != n:
            raise ValueError(f"model: down_block_types ({len(down)}) and up_block_types ({len(up)}) need "
                             f"one entry per block_out_channels ({n})")
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise ValueError(f"model: block_out_channels {list(block_out_channels)} must all be divisible "
                             f"by norm_num_groups={norm_num_groups}")
        self.unet = UNet2DModel(
            sample_size=sample_size, in_channels=in_channels,
            out_channels=in_channels if out_channels is None else out_channels,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            down_block_types=down, up_block_types=up, attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups, dropout=dropout, add_attention=add_attention,
            # class-conditional: one embedding per class and a last one, the null class of
            # classifier-free guidance (distillkit.models.denoiser)
            num_class_embeds=None if num_classes is None else int(num_classes) + 1,
        )
        # LoRA (distillkit.models.lora): added by the Denoiser wrapping this network (as_denoiser), after
        # which the method copies the teacher into the frozen base
        self.lora_settings = None if not lora_rank else \
            (int(lora_rank), float(lora_alpha or lora_rank), list(lora_target_modules))

    def forward(self, x: torch.Tensor, t, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.unet(x, t, class_labels=class_labels).sample

    @property
    def config(self):
        return self.unet.config

    def save_pretrained(self, path: str | Path, **kw) -> None:
        """diffusers' folder format: config.json + diffusion_pytorch_model.safetensors."""
        self.unet.save_pretrained(str(path), **kw)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kw) -> "DiffusersUNet":
        """Wrap ``UNet2DModel.from_pretrained(path)`` (a local folder; nothing is downloaded)."""
        from diffusers import UNet2DModel

        net = cls.__new__(cls)
        nn.Module.__init__(net)
        kw.setdefault("local_files_only", True)
        net.unet = UNet2DModel.from_pretrained(str(path), **kw)
        return net
