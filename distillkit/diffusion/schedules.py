"""Noise schedules: the one place where alphas, sigmas and timestep grids are computed.

Notation (Kingma et al. 2021 "Variational Diffusion Models"; Salimans & Ho 2022):

    x_t = alpha_t x_0 + sigma_t eps,    eps ~ N(0, I)                               (1)

Variance preserving (VP) schedules have alpha_t^2 + sigma_t^2 = 1 with alpha_t^2 = alphas_cumprod[t]
over T discrete training timesteps t = 0 .. T-1. The tables come from diffusers'
``DDPMScheduler``; nothing here re-derives a beta schedule.

Final-alpha convention. A DDIM grid ends with a step from its last timestep to the *clean end*,
written t = -1, where alpha = 1 and sigma = 0. This is diffusers' ``set_alpha_to_one=True``
(``final_alpha_cumprod = 1``). ``NoiseSchedule.alpha(-1) == 1`` and ``sigma(-1) == 0``.

EDM / Karras schedules (Karras et al. 2022) are variance exploding, x = x_0 + sigma n, with the
sampling sigmas of their eq. (5).
"""
from __future__ import annotations

import numbers

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

SPACINGS = ("leading", "trailing", "linspace")

# Our config names -> diffusers' beta_schedule names, and the betas each is known by.
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2",
                  "squaredcos_cap_v2": "squaredcos_cap_v2"}
DEFAULT_BETAS = {"linear": (1e-4, 0.02),            # Ho et al. 2020 (DDPM)
                 "scaled_linear": (0.00085, 0.012)}  # Stable Diffusion


def expand_like(v, x: torch.Tensor) -> torch.Tensor:
    """Reshape a scalar or per-sample tensor of shape (B,) to (B, 1, ..., 1) so that it broadcasts
    against ``x`` (NVlabs/edm's ``sigma.reshape([-1, 1, 1, 1])``), on x's device and dtype."""
    v = torch.as_tensor(v, device=x.device).to(x.dtype)
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


class NoiseSchedule(nn.Module):
    """A discrete VP schedule with T training timesteps, built from diffusers' own tables.

    ``beta_schedule``: "linear" (DDPM), "scaled_linear" (Stable Diffusion), "cosine" (Nichol &
    Dhariwal 2021; diffusers' "squaredcos_cap_v2"). The table sits in a non-persistent buffer so
    the schedule follows its LightningModule across devices (but not dtype casts: it stays
    float64) and never enters a checkpoint.

    Every accessor takes integer timesteps ``t`` in {-1, 0, ..., T-1} (an int or a tensor of any
    shape) and returns a tensor of t's shape; with ``like=x`` it is reshaped by
    :func:`expand_like` to broadcast against ``x`` (per-sample t of shape (B,) -> (B, 1, 1, 1)).
    """

    def __init__(self, beta_schedule: str = "linear", num_train_timesteps: int = 1000,
                 beta_start: Optional[float] = None, beta_end: Optional[float] = None,
                 rescale_betas_zero_snr: bool = False):
        super().__init__()
        from diffusers import DDPMScheduler

        if beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule={beta_schedule!r}; allowed: {sorted(BETA_SCHEDULES)}")
        name = BETA_SCHEDULES[beta_schedule]
        start, end = DEFAULT_BETAS.get(name, (1e-4, 0.02))
        ddpm = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=name,
                             beta_start=start if beta_start is None else beta_start,
                             beta_end=end if beta_end is None else beta_end,
                             rescale_betas_zero_snr=rescale_betas_zero_snr)
        self.beta_schedule = name
        self.num_train_timesteps = num_train_timesteps
        # Index 0 holds t = -1, the clean end (alpha = 1, sigma = 0): diffusers' set_alpha_to_one.
        table = torch.cat([torch.ones(1, dtype=torch.float64), ddpm.alphas_cumprod.double()])
        self.register_buffer("_alphas_cumprod", table, persistent=False)

    def _apply(self, fn, recurse=True):
        # Follow device moves (.to(device), .cuda()) but keep the table float64: a module-wide
        # .half() / bf16-true cast would otherwise round alphas near 1 to a few digits.
        table = self._alphas_cumprod
        super()._apply(fn, recurse)
        self._alphas_cumprod = table.to(self._alphas_cumprod.device)
        return self

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """diffusers' ``alphas_cumprod`` (float64 copy), indexed by t = 0 .. T-1."""
        return self._alphas_cumprod[1:]

    def _ac(self, t) -> torch.Tensor:
        """alphas_cumprod[t] on t's device, with t = -1 -> 1. The range check runs on CPU only,
        so a training step on GPU never waits for it (CUDA indexing asserts on its own). A Python
        int (a sampler's grid point) is looked up where the table lives: no copy of it to the host
        and back at every step."""
        if isinstance(t, numbers.Integral):
            self._check_range(int(t), int(t))
            return self._alphas_cumprod[int(t) + 1]
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"timesteps must be integers, got {t.dtype}")
        if t.device.type == "cpu" and t.numel():
            self._check_range(int(t.min()), int(t.max()))
        return self._alphas_cumprod.to(t.device)[t.long() + 1]

    def _check_range(self, lo: int, hi: int) -> None:
        if lo < -1 or hi >= self.num_train_timesteps:
            raise IndexError(f"timesteps must lie in [-1, {self.num_train_timesteps - 1}], got {lo if lo < -1 else hi}")

    @staticmethod
    def _out(v: torch.Tensor, like: Optional[torch.Tensor]) -> torch.Tensor:
        return v if like is None else expand_like(v, like)

    def alpha(self, t, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """alpha_t = sqrt(alphas_cumprod[t]); alpha_{-1} = 1."""
        return self._out(self._ac(t).sqrt(), like)

    def sigma(self, t, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sigma_t = sqrt(1 - alphas_cumprod[t]); sigma_{-1} = 0."""
        return self._out((1 - self._ac(t)).sqrt(), like)

    def snr(self, t, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """SNR(t) = alpha_t^2 / sigma_t^2 (Kingma et al. 2021, eq. 2); inf at t = -1."""
        ac = self._ac(t)
        return self._out(ac / (1 - ac), like)

    def log_snr(self, t, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """lambda_t = log(alpha_t^2 / sigma_t^2), decreasing in t."""
        ac = self._ac(t)
        return self._out(ac.log() - (-ac).log1p(), like)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """Eq. (1): x_t = alpha_t x_0 + sigma_t eps, t per sample (B,) or one int."""
        return self.alpha(t, like=x0) * x0 + self.sigma(t, like=x0) * eps

    def timesteps(self, num_steps: int, spacing: str = "trailing", steps_offset: int = 0) -> torch.Tensor:
        """The descending int64 sampling grid of ``num_steps`` timesteps, exactly as diffusers'
        ``DDIMScheduler.set_timesteps`` makes it (Lin et al. 2024, "Common Diffusion Noise Schedules
        and Sample Steps are Flawed", Table 2). With T training steps and N = num_steps:

            leading:   t_i = floor(T / N) * i + steps_offset            (i = N-1 .. 0)
            trailing:  t_i = round(T - i T / N) - 1                     (i = 0 .. N-1)
            linspace:  t_i = round(linspace(0, T-1, N))                 (descending)

        Trailing always starts at T-1 (the noisiest timestep) and its grids nest when N halves
        (the N/2 grid is every other point of the N grid), which is why step distillation uses it.
        """
        T, N = self.num_train_timesteps, num_steps
        if not 1 <= N <= T:
            raise ValueError(f"num_steps={N} must lie in [1, {T}]")
        if spacing == "leading":
            ts = (np.arange(0, N) * (T // N)).round()[::-1].astype(np.int64) + steps_offset
        elif spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / N)).astype(np.int64) - 1
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, N).round()[::-1].astype(np.int64)
        else:
            raise ValueError(f"spacing={spacing!r}; allowed: {list(SPACINGS)}")
        return torch.from_numpy(ts.copy())

    def grid(self, num_steps: int, spacing: str = "trailing", steps_offset: int = 0) -> torch.Tensor:
        """``timesteps(...)`` followed by -1: the N + 1 points a DDIM sampler visits. Step i goes
        from grid[i] to grid[i + 1]; the last one lands on the clean end (alpha = 1, sigma = 0)."""
        ts = self.timesteps(num_steps, spacing, steps_offset)
        return torch.cat([ts, ts.new_tensor([-1])])

    def extra_repr(self) -> str:
        return f"beta_schedule={self.beta_schedule!r}, num_train_timesteps={self.num_train_timesteps}"


@dataclass
class KarrasSchedule:
    """EDM noise levels (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
    Generative Models"): variance exploding, x = x_0 + sigma n (Table 1, "Ours": s(t) = 1,
    sigma(t) = t). ``sigma_data`` is the data std used by the preconditioning of
    ``parameterization.edm_precond``; ``p_mean``, ``p_std`` the training distribution of sigma."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """Eq. (5): sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
        for i = 0 .. N-1, then sigma_N = 0. Returns N + 1 float64 values, descending."""
        ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        sigmas = (hi + ramp * (lo - hi)) ** self.rho
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    def add_noise(self, x0: torch.Tensor, n: torch.Tensor, sigma) -> torch.Tensor:
        """x = x_0 + sigma n (per-sample sigma of shape (B,) or one number)."""
        return x0 + expand_like(sigma, x0) * n

    def sample_sigma(self, n: int, generator: Optional[torch.Generator] = None,
                     device=None) -> torch.Tensor:
        """Training noise levels ln(sigma) ~ N(P_mean, P_std^2) (Table 1, "Ours"; edm/training/loss.py).

        Drawn in float64 on the generator's device (a CUDA generator draws on its GPU; without a
        generator, on ``device`` from its global RNG), then moved to ``device``. MPS has no float64:
        there the draw is float32."""
        where = torch.device(generator.device if generator is not None else (device or "cpu"))
        dtype = torch.float32 if where.type == "mps" else torch.float64
        z = torch.randn(n, generator=generator, dtype=dtype, device=where)
        return (z * self.p_std + self.p_mean).exp().to(device)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Table 1, "Ours")."""
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2


def make_schedule(name: str, **kw):
    """Config factory: "linear", "scaled_linear", "cosine" -> :class:`NoiseSchedule`;
    "edm" -> :class:`KarrasSchedule`. Keyword arguments go to the constructor."""
    if name == "edm":
        return KarrasSchedule(**kw)
    if name in ("linear", "scaled_linear", "cosine"):
        return NoiseSchedule(beta_schedule=name, **kw)
    raise ValueError(f"schedule name={name!r}; allowed: ['cosine', 'edm', 'linear', 'scaled_linear']")


__all__ = ["SPACINGS", "expand_like", "NoiseSchedule", "KarrasSchedule", "make_schedule"]
