"""Samplers: differentiable single steps and the loops built from them.

Nothing here knows which method trained the network. A VP sampler takes
``model_fn(x_t, t) -> network output`` with t an int64 tensor of shape (B,) (one batched call per
step) and the output's prediction type; an EDM sampler takes ``denoiser(x, sigma) -> x0_hat`` with
sigma a tensor of shape (B,). No loop runs under ``torch.no_grad()``: callers that do not
backpropagate through sampling wrap it themselves.

Guidance has one convention, diffusers': out = out_u + w (out_c - out_u), w = 1 is no guidance.
Because the conversions in parameterization.py are affine in the prediction (for fixed x_t,
alpha, sigma), guiding eps, v or x0 outputs gives the same step.
"""
from __future__ import annotations

import numbers

from typing import Callable, Optional

import torch

from distillkit.diffusion.consistency import apply_boundary
from distillkit.diffusion.parameterization import to_x0, x0_eps
from distillkit.diffusion.schedules import NoiseSchedule, expand_like

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided(out_uncond, out_cond, w):
    """Classifier-free guidance (Ho & Salimans 2021) in diffusers' convention:
    out = out_u + w (out_c - out_u). w = 1 returns the conditional output (no guidance), w = 0 the
    unconditional one. Papers that write (1 + w') eps_c - w' eps_u use w = 1 + w'. Computed as
    w out_c + (1 - w) out_u, the same value, so that w = 1 and w = 0 are exact (bitwise). ``w`` is a
    number or a per-sample tensor of shape (B,) (LCM draws w per sample)."""
    if isinstance(w, torch.Tensor):
        w = expand_like(w, out_cond)
    return w * out_cond + (1 - w) * out_uncond


def classifier_free(model_fn: Callable, cond: torch.Tensor, uncond: torch.Tensor, w: float) -> ModelFn:
    """Turn ``model_fn(x, t, c)`` into a guided ``model_fn(x, t)``: one batched call on
    [x; x] with [uncond; cond] (as diffusers pipelines do), then :func:`guided`. At w = 1 only the
    conditional half is evaluated."""
    def fn(x, t):
        if w == 1:
            return model_fn(x, t, cond)
        out_u, out_c = model_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
        return guided(out_u, out_c, w)
    return fn


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def ddim_step(x_t, x0, eps, alpha_s, sigma_s, eta: float = 0.0, sigma_t=None, alpha_t=None,
              noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None):
    """One DDIM step from time t to an earlier time s (Song et al. 2021, "Denoising Diffusion
    Implicit Models", eq. 12), given the step's (x0, eps) at x_t:

        x_s = alpha_s x0 + sqrt(sigma_s^2 - sigma_eta^2) eps + sigma_eta noise

    with (eq. 16, written with SNR = alpha^2 / sigma^2)

        sigma_eta = eta sigma_s sqrt(1 - SNR_t / SNR_s)
                  = eta sqrt((sigma_s^2 / sigma_t^2) (1 - alpha_t^2 / alpha_s^2))   (VP)

    eta = 0 is the deterministic DDIM (the probability-flow ODE's first-order solver: x_t itself is
    not needed), eta = 1 the DDPM ancestral step. ``alpha_t``, ``sigma_t`` are needed only when
    eta > 0; ``noise`` defaults to a draw from ``generator``. s = -1 (alpha_s = 1, sigma_s = 0)
    returns x0. Differentiable in x0 and eps."""
    if eta == 0:
        return alpha_s * x0 + sigma_s * eps
    if alpha_t is None or sigma_t is None:
        raise ValueError("ddim_step with eta > 0 needs alpha_t and sigma_t")
    sigma_eta = eta * sigma_s * (1 - (alpha_t * sigma_s / (alpha_s * sigma_t)) ** 2).clamp(min=0).sqrt()
    noise = _randn_like(x_t, generator) if noise is None else noise
    return alpha_s * x0 + (sigma_s ** 2 - sigma_eta ** 2).clamp(min=0).sqrt() * eps + sigma_eta * noise


def _batch_t(t, x: torch.Tensor) -> torch.Tensor:
    """Timesteps as an int64 tensor of shape (B,) on x's device (one int is repeated; filled on the
    device, not copied from the host)."""
    if isinstance(t, numbers.Integral):
        return torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    t = torch.as_tensor(t, device=x.device, dtype=torch.long)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


def ddim_step_from_pred(pred, x_t, t, s, schedule: NoiseSchedule, pred_type: str = "eps",
                        eta: float = 0.0, noise=None, generator=None, clip: Optional[float] = None) -> torch.Tensor:
    """The DDIM step from grid time t to s (s = -1: the clean end) for a network output ``pred`` of
    type ``pred_type`` already computed at (x_t, t). One network evaluation can feed several steps
    (e.g. DSD's single and double strides). t, s: ints or per-sample (B,) tensors.

    ``clip``: the x0-prediction is clamped to [-clip, clip] and eps kept, as diffusers'
    ``DDIMScheduler(clip_sample=True)`` does. An eps-network needs it where alpha_t is tiny (the
    top of a trailing grid: x0 = (x_t - sigma_t eps) / alpha_t multiplies eps's error by
    sigma_t / alpha_t, about 2e4 at t = T-1 of the cosine schedule with T = 1024)."""
    alpha_t, sigma_t = schedule.alpha(t, like=x_t), schedule.sigma(t, like=x_t)
    alpha_s, sigma_s = schedule.alpha(s, like=x_t), schedule.sigma(s, like=x_t)
    x0, eps = x0_eps(pred, pred_type, x_t, alpha_t, sigma_t)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    return ddim_step(x_t, x0, eps, alpha_s, sigma_s, eta, sigma_t, alpha_t, noise, generator)


def ddim_step_between(model_fn: ModelFn, x_t, t, s, schedule: NoiseSchedule, pred_type: str = "eps",
                      eta: float = 0.0, noise=None, generator=None, clip: Optional[float] = None) -> torch.Tensor:
    """One DDIM step from grid time t to s (s = -1: the clean end): one batched call of
    ``model_fn(x_t, t)`` then :func:`ddim_step_from_pred`. t, s: ints or per-sample (B,) tensors."""
    pred = model_fn(x_t, _batch_t(t, x_t))
    return ddim_step_from_pred(pred, x_t, t, s, schedule, pred_type, eta, noise, generator, clip)


def ddim_sample(model_fn: ModelFn, x_T: torch.Tensor, schedule: NoiseSchedule, num_steps: int,
                spacing: str = "trailing", eta: float = 0.0, generator: Optional[torch.Generator] = None,
                pred_type: str = "eps", clip: Optional[float] = None) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021) over ``schedule.grid(num_steps, spacing)``: step i goes from
    grid[i] to grid[i + 1], the last step to the clean end t = -1. Returns x_0. ``clip``: see
    :func:`ddim_step_from_pred`.

    Unlike diffusers' ``DDIMScheduler.step``, which always steps to t - T // N, each step lands on
    the next grid point; the two agree when the grid is evenly spaced by T // N ("leading", or
    "trailing" with N dividing T)."""
    grid = schedule.grid(num_steps, spacing).tolist()
    x = x_T
    for t, s in zip(grid[:-1], grid[1:]):
        x = ddim_step_between(model_fn, x, t, s, schedule, pred_type, eta, generator=generator, clip=clip)
    return x


def multistep_sample(model_fn: ModelFn, z: torch.Tensor, schedule: NoiseSchedule, timesteps,
                     generator: Optional[torch.Generator] = None, pred_type: str = "eps",
                     noises: Optional[list] = None, boundary: Optional[Callable] = None) -> torch.Tensor:
    """Multistep sampling of a few-step generator (consistency models, Song et al. 2023,
    Algorithm 1; DMD2's multi-step generator, Yin et al. 2024, Sec. 4.5): at each of the descending
    ``timesteps`` t_0 > t_1 > ... the network predicts x0 from its input, and the next input is that
    x0 re-noised with fresh noise, x_{t_{i+1}} = alpha_{t_{i+1}} x0 + sigma_{t_{i+1}} eps. The first
    input is the starting noise ``z`` itself (the generator's input at t_0, as DMD2 feeds pure
    noise at 999). Returns the last x0. diffusers' ``LCMScheduler`` with explicit ``timesteps``
    takes the same steps. ``noises``: the fresh noise of each later step (default: drawn from
    ``generator``). ``boundary(t) -> (c_skip, c_out)``: the prediction at each step is the
    consistency function c_skip x_t + c_out x0 (:mod:`distillkit.diffusion.consistency`; LCMScheduler's
    ``denoised``) instead of x0."""
    ts = [int(t) for t in timesteps]
    x = z
    for i, t in enumerate(ts):
        tt = _batch_t(t, x)
        x0 = to_x0(model_fn(x, tt), pred_type, x, schedule.alpha(tt, like=x), schedule.sigma(tt, like=x))
        if boundary is not None:
            x0 = apply_boundary(x, x0, *boundary(tt))
        if i + 1 == len(ts):
            return x0
        eps = noises[i] if noises is not None else _randn_like(x0, generator)
        x = schedule.add_noise(x0, eps, ts[i + 1])
    return x


def euler_sample(denoiser: Callable, x: torch.Tensor, sigmas) -> torch.Tensor:
    """Euler solver of the EDM probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma (Karras et
    al. 2022, eq. 4 with s = 1, sigma(t) = t; Algorithm 1 without its second-order correction).
    ``x`` is the start at sigmas[0] (``sigmas[0] * noise``); sigmas descend, usually to 0."""
    sigmas = torch.as_tensor(sigmas, device=x.device, dtype=x.dtype)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoiser(x, sigma.expand(x.shape[0]))) / sigma
        x = x + (sigma_next - sigma) * d
    return x


def heun_step(denoiser: Callable, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """One step of :func:`heun_sample` with its correction, from per-sample noise levels ``sigma``
    to ``sigma_next > 0`` (shape (B,)): the teacher's ODE step of consistency distillation on EDM
    schedules (Song et al. 2023, Sec. 4)."""
    s, s_next = expand_like(sigma, x), expand_like(sigma_next, x)
    d = (x - denoiser(x, sigma)) / s
    x_next = x + (s_next - s) * d
    d_next = (x_next - denoiser(x_next, sigma_next)) / s_next
    return x + (s_next - s) * (d + d_next) / 2


def heun_sample(denoiser: Callable, x: torch.Tensor, sigmas) -> torch.Tensor:
    """Heun's second-order solver of the same ODE (Karras et al. 2022, Algorithm 1, i.e.
    Algorithm 2 with S_churn = 0): an Euler step, then the trapezoidal correction unless the step
    ends at sigma = 0. 2N - 1 denoiser calls for N steps."""
    sigmas = torch.as_tensor(sigmas, device=x.device, dtype=x.dtype)
    corrected = (sigmas[1:] > 0).tolist()  # read once, not a device sync per step
    for sigma, sigma_next, correct in zip(sigmas[:-1], sigmas[1:], corrected):
        d = (x - denoiser(x, sigma.expand(x.shape[0]))) / sigma
        x_next = x + (sigma_next - sigma) * d
        if correct:
            d_next = (x_next - denoiser(x_next, sigma_next.expand(x.shape[0]))) / sigma_next
            x_next = x + (sigma_next - sigma) * (d + d_next) / 2
        x = x_next
    return x


__all__ = ["guided", "classifier_free", "ddim_step", "ddim_step_from_pred", "ddim_step_between",
           "ddim_sample", "multistep_sample", "euler_sample", "heun_step", "heun_sample"]
