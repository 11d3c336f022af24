"""Targets and weights of step distillation on a discrete DDIM grid (progressive distillation,
DSD, TSD): the schedule maths those methods need, so that ``methods/`` never computes an alpha.

Notation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models"):
z_t = alpha_t x + sigma_t eps. One deterministic DDIM step from t to an earlier s with the
prediction (x_hat, eps_hat) at z_t, eps_hat = (z_t - alpha_t x_hat) / sigma_t, is

    z_s = alpha_s x_hat + sigma_s eps_hat = c(t, s) x_hat + (sigma_s / sigma_t) z_t,
    c(t, s) = alpha_s - (sigma_s / sigma_t) alpha_t                                     (1)

so at fixed z_t the step is affine in x_hat, and any z_s is reached by exactly one x_hat:

    x_tilde = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)  (2)

Eq. (2) is Algorithm 2's target ("x_tilde ... teacher x_hat target") when z_s = z_t'' comes from
two teacher DDIM steps. c(t, s) > 0 whenever SNR_s > SNR_t (s nearer the data than t), and s = -1
(the clean end: alpha = 1, sigma = 0) gives x_tilde = z_s.

Weights of the x-space loss w(t) ||x_hat - x_tilde||^2 (Salimans & Ho 2022, Sec. 4):
    truncated_snr  max(SNR_t, 1)                = max(||x - x_hat||^2, ||eps - eps_hat||^2)
    snr_plus_one   SNR_t + 1                    = ||v - v_hat||^2 (VP)
    latent         c(t, s)^2                    = ||z_s - z_s_hat||^2: the plain MSE between the two
                                                  latents a step lands on (the DSD paper's reading)
"""
from __future__ import annotations

import torch

from distillkit.diffusion.schedules import NoiseSchedule

STEP_WEIGHTINGS = ("truncated_snr", "snr_plus_one", "latent")


def ddim_x0_coef(schedule: NoiseSchedule, t, s, like: torch.Tensor) -> torch.Tensor:
    """c(t, s) = alpha_s - (sigma_s / sigma_t) alpha_t, eq. (1): how much x_hat moves a DDIM step."""
    a_t, s_t = schedule.alpha(t, like=like), schedule.sigma(t, like=like)
    a_s, s_s = schedule.alpha(s, like=like), schedule.sigma(s, like=like)
    return a_s - s_s / s_t * a_t


def ddim_implied_x0(z_s: torch.Tensor, z_t: torch.Tensor, t, s, schedule: NoiseSchedule) -> torch.Tensor:
    """Eq. (2) (Salimans & Ho 2022, Algorithm 2): the x-prediction at (z_t, t) whose single DDIM
    step to s lands exactly on z_s. t, s: ints or per-sample (B,) tensors of grid timesteps."""
    s_t, s_s = schedule.sigma(t, like=z_t), schedule.sigma(s, like=z_t)
    return (z_s - s_s / s_t * z_t) / ddim_x0_coef(schedule, t, s, z_t)


def step_loss_weight(weighting: str, schedule: NoiseSchedule, t, s, like: torch.Tensor) -> torch.Tensor:
    """w(t) of the x-space loss of a step t -> s (see the module docstring), shaped to broadcast
    against ``like``."""
    if weighting == "truncated_snr":
        return schedule.snr(t, like=like).clamp(min=1)
    if weighting == "snr_plus_one":
        return schedule.snr(t, like=like) + 1
    if weighting == "latent":
        return ddim_x0_coef(schedule, t, s, like) ** 2
    raise ValueError(f"weighting={weighting!r}; allowed: {list(STEP_WEIGHTINGS)}")


def grids_nest(schedule: NoiseSchedule, num_steps: int, spacing: str = "trailing") -> bool:
    """True when the grid of num_steps / 2 steps is every other point of the grid of num_steps
    (so one student step covers exactly two teacher steps and the student samples on its own grid)."""
    if num_steps % 2:
        return False
    fine, coarse = schedule.grid(num_steps, spacing), schedule.grid(num_steps // 2, spacing)
    return torch.equal(fine[::2], coarse)


__all__ = ["STEP_WEIGHTINGS", "ddim_x0_coef", "ddim_implied_x0", "step_loss_weight", "grids_nest"]
