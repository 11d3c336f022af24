"""An MLP denoiser for low-dimensional data (``model=mlp2d``, the toy2d mixture): ``net(x_t, t)``.

The timestep enters through the sinusoidal embedding of Vaswani et al. 2017 as DDPM uses it
(diffusers' ``get_timestep_embedding``), followed by a two-layer MLP, and is added to every
residual block's input. ``t`` may be integer timesteps (VP schedules) or EDM's float
c_noise = ln(sigma) / 4; ``time_scale`` multiplies it first (the embedding's fastest frequency
is 1 per unit of t, so small-range inputs such as c_noise want a larger scale).
"""
from __future__ import annotations

import torch
from torch import nn


class MLPDenoiser(nn.Module):
    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_embed_dim: int = 64,
                 time_scale: float = 1.0):
        super().__init__()
        self.dim = dim
        self.time_embed_dim = time_embed_dim
        self.time_scale = time_scale
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        from diffusers.models.embeddings import get_timestep_embedding

        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        emb = get_timestep_embedding(t.float() * self.time_scale, self.time_embed_dim, flip_sin_to_cos=True,
                                     downscale_freq_shift=0)
        temb = self.time_mlp(emb.to(x.dtype))
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h + temb)
        return self.out(h)
