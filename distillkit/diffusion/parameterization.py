"""What a network predicts, and exact conversions between the choices.

With x_t = alpha x_0 + sigma eps (schedules.py, eq. 1), a denoising network may output

    "eps": the noise eps                                    (Ho et al. 2020)
    "x0":  the clean sample x_0                             (diffusers: "sample")
    "v":   v = alpha eps - sigma x_0                        (Salimans & Ho 2022, Sec. 4, App. D)

Given x_t, any one of them determines the other two, so the conversions below are exact (they are
affine in the prediction). The formulas hold for any (alpha, sigma), not only for VP schedules:
for v, alpha x_t - sigma v = (alpha^2 + sigma^2) x_0 and sigma x_t + alpha v = (alpha^2 + sigma^2) eps.

The network's prediction type and the quantity a method regresses are independent choices: a
method takes the network output in the network's type and calls :func:`convert` (or
:func:`x0_eps`) to get the quantity its loss or its sampler step needs; it never writes these
formulas itself. ``alpha`` and ``sigma`` are tensors broadcastable against x_t, as returned by
``NoiseSchedule.alpha(t, like=x_t)``.

EDM preconditioning (Karras et al. 2022, Table 1) wraps a raw network F into a denoiser
D(x; sigma) = c_skip x + c_out F(c_in x; c_noise): see :func:`edm_precond`, :class:`EDMPrecond`.
"""
from __future__ import annotations

import torch
from torch import nn

from distillkit.diffusion.schedules import expand_like

PRED_TYPES = ("eps", "v", "x0")
_ALIASES = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "x0": "x0", "sample": "x0"}


def canonical_pred_type(pred_type: str) -> str:
    """Our name for a prediction type; diffusers' names ("epsilon", "v_prediction", "sample") map
    to ("eps", "v", "x0") so a teacher's scheduler config can be passed as is."""
    try:
        return _ALIASES[pred_type]
    except KeyError:
        raise ValueError(f"pred_type={pred_type!r}; allowed: {list(PRED_TYPES)} "
                         "(or diffusers' 'epsilon', 'v_prediction', 'sample')") from None


def x0_eps(pred, pred_type: str, x_t, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_0, eps) implied by a prediction of type ``pred_type`` at x_t.

    eps:  x_0 = (x_t - sigma eps) / alpha
    x0:   eps = (x_t - alpha x_0) / sigma
    v:    x_0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2),  eps = (sigma x_t + alpha v) / (alpha^2 + sigma^2)
          (Salimans & Ho 2022, App. D; the denominator is 1 for VP schedules)

    No division is guarded: at zero terminal SNR (alpha = 0 at t = T-1, ``rescale_betas_zero_snr``)
    x_0 from eps is undefined (as in diffusers' DDIMScheduler), and ``DiffusionMethod`` refuses eps
    networks on such schedules; v and x0 stay exact there (sigma = 1).
    """
    pred_type = canonical_pred_type(pred_type)
    if pred_type == "eps":
        return (x_t - sigma * pred) / alpha, pred
    if pred_type == "x0":
        return pred, (x_t - alpha * pred) / sigma
    r2 = alpha ** 2 + sigma ** 2
    return (alpha * x_t - sigma * pred) / r2, (sigma * x_t + alpha * pred) / r2


def to_x0(pred, pred_type: str, x_t, alpha, sigma) -> torch.Tensor:
    """The clean sample x_0 implied by ``pred``."""
    return convert(pred, pred_type, "x0", x_t, alpha, sigma)


def to_eps(pred, pred_type: str, x_t, alpha, sigma) -> torch.Tensor:
    """The noise eps implied by ``pred``."""
    return convert(pred, pred_type, "eps", x_t, alpha, sigma)


def to_v(pred, pred_type: str, x_t, alpha, sigma) -> torch.Tensor:
    """The velocity v = alpha eps - sigma x_0 implied by ``pred``."""
    return convert(pred, pred_type, "v", x_t, alpha, sigma)


def convert(pred, from_type: str, to_type: str, x_t, alpha, sigma) -> torch.Tensor:
    """Express a prediction of type ``from_type`` as type ``to_type`` (identity when equal)."""
    from_type, to_type = canonical_pred_type(from_type), canonical_pred_type(to_type)
    if from_type == to_type:
        return pred
    x0, eps = x0_eps(pred, from_type, x_t, alpha, sigma)
    return {"x0": x0, "eps": eps, "v": alpha * eps - sigma * x0}[to_type]


def edm_precond(sigma, sigma_data: float = 0.5):
    """EDM preconditioning (Karras et al. 2022, Table 1, "Ours"; Appendix B.6):

        c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)
        c_out   = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
        c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
        c_noise = ln(sigma) / 4

    Returns (c_skip, c_out, c_in, c_noise), each of sigma's shape."""
    sigma = torch.as_tensor(sigma)
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))  (Karras et al.
    2022, eq. 7). ``model`` is F, called as ``model(c_in x, c_noise, *args, **kwargs)`` with c_noise
    of shape (B,) (a diffusers UNet's ``timestep``); an output with a ``.sample`` field (diffusers'
    ``UNet2DOutput``) is unwrapped. The result is an x_0 prediction for x = x_0 + sigma n, i.e. a
    ``denoiser(x, sigma)`` for ``samplers.euler_sample`` / ``heun_sample``."""

    def __init__(self, model: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.model = model
        self.sigma_data = sigma_data

    def forward(self, x: torch.Tensor, sigma, *args, **kwargs) -> torch.Tensor:
        sigma = expand_like(sigma, x)
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        F_x = self.model(c_in * x, c_noise.flatten(), *args, **kwargs)
        F_x = getattr(F_x, "sample", F_x)
        return c_skip * x + c_out * F_x


__all__ = ["PRED_TYPES", "canonical_pred_type", "x0_eps", "to_x0", "to_eps", "to_v", "convert",
           "edm_precond", "EDMPrecond"]
