"""Consistency models: the boundary-conditioned consistency function, the distance, the
discretisations of consistency distillation (CD) and the multistep consistency sampler.

A consistency function maps every point of a probability-flow ODE trajectory to its origin
(Song et al. 2023, "Consistency Models", Sec. 3). It is parameterised so that the boundary
condition f(x, t_min) = x holds exactly (eq. 3):

    f(x, t) = c_skip(t) x + c_out(t) F(x, t),    c_skip(t_min) = 1,  c_out(t_min) = 0.

Two forms, one per kind of schedule:

  sigma     (CM, App. C; EDM schedules x = x_0 + sigma n, boundary at sigma_min)
            c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)
            c_out  = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2)
            and F the raw network of EDM's preconditioning, F(c_in x; c_noise) (Karras et al. 2022).
            diffusers: ``CMStochasticIterativeScheduler.get_scalings_for_boundary_condition``.
  discrete  (LCM, Luo et al. 2023, eq. 7 and App. D; VP schedules, integer t, boundary at t = 0)
            c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2)
            c_out  = s t / sqrt((s t)^2 + sigma_data^2),     s = timestep_scaling (10), sigma_data = 0.5
            and F the network's x0-prediction at (x_t, t).
            diffusers: ``LCMScheduler.get_scalings_for_boundary_condition_discrete``.

Consistency distillation (CM, Algorithm 2; LCM, Algorithm 1) on a discretisation
t_min = t_0 < t_1 < ... < t_N with a skip of k points: for n ~ U{0, ..., N - k},

    x_{n+k} = alpha x_0 + sigma eps  at t_{n+k}
    x_hat_n = the teacher's ODE step t_{n+k} -> t_n from x_{n+k}  (DDIM on VP, Heun on EDM)
    L       = d( f_online(x_{n+k}, t_{n+k}),  stopgrad f_target(x_hat_n, t_n) )

with f_target an EMA of f_online (methods/consistency.py). Distances d: ``l2`` the mean squared
error (LCM's ``loss_type=l2``), ``huber`` the pseudo-Huber sqrt(||a - b||^2 + c^2) - c over each
sample (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models", Sec. 3.3,
c = 0.00054 sqrt(d) for d data dimensions), ``huber_elementwise`` the same per element, averaged
(diffusers' LCM training scripts, c = 0.001). The discretisation N may follow iCT's curriculum
N(u) = min(s0 2^floor(u / K'), s1) + 1, K' = floor(K / (log2 floor(s1 / s0) + 1)) (iCT, eq. 5).

Sampling (CM, Algorithm 1): from pure noise at the first of the chosen times, predict x_0 with f,
re-noise it to the next time with fresh noise, repeat; the last prediction is the sample.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from distillkit.diffusion.schedules import expand_like

DISTANCES = ("huber", "huber_elementwise", "l2")
ICT_HUBER_C = 0.00054  # iCT's c = 0.00054 sqrt(d)


# --------------------------------------------------------------------------- the boundary condition
def lcm_boundary(t, timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of LCM's discrete form at integer timesteps t (module docstring): exactly
    (1, 0) at t = 0."""
    st = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data ** 2 / (st ** 2 + sigma_data ** 2)
    c_out = st / (st ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out


def cm_boundary(sigma, sigma_min: float = 0.002, sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of the CM paper's sigma form (module docstring): exactly (1, 0) at sigma_min."""
    sigma = torch.as_tensor(sigma)
    c_skip = sigma_data ** 2 / ((sigma - sigma_min) ** 2 + sigma_data ** 2)
    c_out = (sigma - sigma_min) * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out


def apply_boundary(x: torch.Tensor, F_x: torch.Tensor, c_skip, c_out) -> torch.Tensor:
    """f = c_skip x + c_out F, the coefficients broadcast per sample against x. Where c_out = 0
    (the boundary) f is x exactly, whatever F is (even non-finite there)."""
    c_skip, c_out = expand_like(c_skip, x), expand_like(c_out, x)
    return torch.where(c_out == 0, x, c_skip * x + c_out * F_x)


# --------------------------------------------------------------------------- the distance
def huber_c_for(dims: int, huber_c: Optional[float] = None) -> float:
    """The pseudo-Huber constant: ``huber_c`` when given, else iCT's 0.00054 sqrt(d)."""
    return float(huber_c) if huber_c is not None else ICT_HUBER_C * math.sqrt(dims)


def consistency_distance(a: torch.Tensor, b: torch.Tensor, distance: str = "huber",
                         huber_c: Optional[float] = None) -> torch.Tensor:
    """Per-sample d(a, b): ``huber`` sqrt(||a - b||^2 + c^2) - c (iCT; c from :func:`huber_c_for`),
    ``huber_elementwise`` mean(sqrt((a - b)^2 + c^2) - c) over the sample's dimensions (diffusers' LCM
    scripts, c = ``huber_c``, 0.001 there), ``l2`` mean((a - b)^2) over them (LCM's l2)."""
    diff = (a.float() - b.float()).reshape(a.shape[0], -1)
    if distance == "l2":
        return (diff ** 2).mean(1)
    if distance == "huber_elementwise":
        c = 0.001 if huber_c is None else float(huber_c)
        return ((diff ** 2 + c ** 2).sqrt() - c).mean(1)
    if distance == "huber":
        c = huber_c_for(diff.shape[1], huber_c)
        return ((diff ** 2).sum(1) + c ** 2).sqrt() - c
    raise ValueError(f"distance={distance!r}; allowed: {list(DISTANCES)}")


# --------------------------------------------------------------------------- discretisations
def lcm_timesteps(num_train_timesteps: int, num_timesteps: int) -> torch.Tensor:
    """LCM's discretisation of T training timesteps into N points, ascending, with the boundary
    t = 0 first: [0, k - 1, 2k - 1, ..., N k - 1], k = T // N (LCM's "skipping-step" k = 20 for
    N = 50 on SD's T = 1000; ``LCMScheduler``'s ``lcm_origin_timesteps`` with
    ``original_inference_steps = N``). N + 1 values."""
    T, N = int(num_train_timesteps), int(num_timesteps)
    if not 1 <= N <= T:
        raise ValueError(f"num_timesteps={N} must lie in [1, {T}]")
    k = T // N
    return torch.from_numpy(np.concatenate([[0], np.arange(1, N + 1) * k - 1]).astype(np.int64))


def karras_ascending(schedule, num_timesteps: int) -> torch.Tensor:
    """The CM discretisation on an EDM schedule: Karras' N sigmas ascending, sigma_min first
    (Karras et al. 2022, eq. 5; CM, Sec. 5). N values, float64."""
    if int(num_timesteps) < 2:
        raise ValueError(f"num_timesteps={num_timesteps} must be at least 2 on an EDM schedule")
    return schedule.sigmas(int(num_timesteps))[:-1].flip(0)


def ict_discretisation(update: int, total_updates: int, start: int = 10, end: int = 1280) -> int:
    """iCT's exponential curriculum (Song & Dhariwal 2023, eq. 5): the number of discretisation
    steps at update u of K, min(s0 2^floor(u / K'), s1), K' = floor(K / (log2 floor(s1 / s0) + 1))
    (iCT's N(k) - 1: N counts the points)."""
    K = max(int(total_updates), 1)
    K_prime = max(K // (int(math.log2(end // start)) + 1), 1)
    return min(start * 2 ** (int(update) // K_prime), end)


def ict_discretisation_values(start: int = 10, end: int = 1280) -> list[int]:
    """Every value :func:`ict_discretisation` takes, ascending: s0 2^j below s1, then s1."""
    return sorted({min(start * 2 ** j, end) for j in range(int(math.log2(end // start)) + 2)})


# --------------------------------------------------------------------------- sampling
def consistency_sample_edm(f: Callable, z: torch.Tensor, sigmas: Sequence[float], sigma_min: float,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Multistep consistency sampling on an EDM schedule (CM, Algorithm 1): x = sigma_0 z,
    x_0 = f(x, sigma_0); for each later tau: x = x_0 + sqrt(tau^2 - sigma_min^2) eps, x_0 = f(x, tau).
    ``f(x, sigma)`` with sigma of shape (B,); ``sigmas`` descending."""
    sigmas = [float(s) for s in sigmas]
    x0 = f(z * sigmas[0], torch.full((z.shape[0],), sigmas[0], device=z.device, dtype=z.dtype))
    for tau in sigmas[1:]:
        device = generator.device if generator is not None else x0.device
        eps = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype).to(x0.device)
        x = x0 + math.sqrt(max(tau ** 2 - sigma_min ** 2, 0.0)) * eps
        x0 = f(x, torch.full((z.shape[0],), tau, device=z.device, dtype=z.dtype))
    return x0


__all__ = ["DISTANCES", "lcm_boundary", "cm_boundary", "apply_boundary", "huber_c_for",
           "consistency_distance", "lcm_timesteps", "karras_ascending", "ict_discretisation",
           "consistency_sample_edm"]
