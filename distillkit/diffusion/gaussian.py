"""Closed-form oracles for Gaussian data x_0 ~ N(mu, S^2), S symmetric positive definite.

With x_t = alpha x_0 + sigma eps, everything a diffusion model should learn is known in closed
form, so samplers and distillation methods can be checked against exact answers.

All matrices below are functions of S, so they share its eigenvectors: with S = Q diag(s) Q^T,
f(S) = Q diag(f(s)) Q^T, and every formula reduces to d independent scalar ones in Q's basis
(``_spectral``). Shapes: x is (B, d); alpha, sigma are numbers or per-sample (B,) tensors (or
already (B, 1)).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from distillkit.diffusion.parameterization import convert
from distillkit.diffusion.schedules import NoiseSchedule, expand_like


class GaussianData:
    """Data N(mu, S^2) with closed-form denoisers and probability-flow ODE maps."""

    def __init__(self, mu: torch.Tensor, S: torch.Tensor):
        self.mu = torch.as_tensor(mu)
        self.S = torch.as_tensor(S, dtype=self.mu.dtype)
        if not torch.allclose(self.S, self.S.T):
            raise ValueError("S must be symmetric")
        self.s, self.Q = torch.linalg.eigh(self.S)
        if not bool((self.s > 0).all()):
            raise ValueError("S must be positive definite")

    @classmethod
    def random(cls, dim: int = 2, seed: int = 0, dtype=torch.float64,
               scales: Optional[list[float]] = None) -> "GaussianData":
        """A reproducible test case: random mean, random rotation, eigenvalues of S in ``scales``
        (default log-spaced from 0.3 to 2, so the d directions denoise at different rates)."""
        g = torch.Generator().manual_seed(seed)
        Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=dtype))
        s = torch.tensor(scales, dtype=dtype) if scales else torch.logspace(
            torch.tensor(0.3).log10(), torch.tensor(2.0).log10(), dim, dtype=dtype)
        mu = torch.randn(dim, generator=g, dtype=dtype)
        return cls(mu, Q @ torch.diag(s) @ Q.T)

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    @property
    def cov(self) -> torch.Tensor:
        """The data covariance S^2."""
        return self.S @ self.S

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """x_0 = mu + S z, z ~ N(0, I)."""
        z = torch.randn(n, self.dim, generator=generator, dtype=self.mu.dtype)
        return self.mu + z @ self.S

    def _spectral(self, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Q diag(g) Q^T y for each row y, with g of shape (d,) or (B, d) (per-sample spectra)."""
        Q = self.Q.to(y)
        return ((y @ Q) * g) @ Q.T

    def _args(self, x, *coefs):
        return (self.mu.to(x), self.s.to(x)) + tuple(expand_like(c, x) for c in coefs)

    def exact_denoiser(self, x_t, alpha, sigma) -> torch.Tensor:
        """E[x_0 | x_t] = mu + alpha S^2 (alpha^2 S^2 + sigma^2 I)^-1 (x_t - alpha mu).

        (x_0, x_t) is jointly Gaussian with Cov(x_0, x_t) = alpha S^2 and
        Cov(x_t) = alpha^2 S^2 + sigma^2 I; this is the Gaussian conditional mean, the minimiser of
        the denoising loss, i.e. the ideal x0-prediction network."""
        mu, s, alpha, sigma = self._args(x_t, alpha, sigma)
        return mu + self._spectral(x_t - alpha * mu, alpha * s ** 2 / (alpha ** 2 * s ** 2 + sigma ** 2))

    def exact_ode_map(self, x_t, alpha_t, sigma_t, alpha_s, sigma_s) -> torch.Tensor:
        """The probability-flow ODE solution from (alpha_t, sigma_t) to (alpha_s, sigma_s):

            x_s = alpha_s mu + C_s^{1/2} C_t^{-1/2} (x_t - alpha_t mu),   C = alpha^2 S^2 + sigma^2 I.

        Derivation. In DDIM's coordinates xbar = x / alpha, sigmabar = sigma / alpha the ODE is
        dxbar/dsigmabar = (xbar - D) / sigmabar with D the exact denoiser (Song et al. 2021, eq. 14;
        Karras et al. 2022, eq. 4). Per eigen-direction with eigenvalue s and ybar = xbar - mu,
        D - mu = s^2 / (s^2 + sigmabar^2) ybar, so dybar/dsigmabar = sigmabar ybar / (s^2 + sigmabar^2),
        solved by ybar proportional to sqrt(s^2 + sigmabar^2). Multiplying back by alpha:
        y_s / y_t = sqrt((alpha_s^2 s^2 + sigma_s^2) / (alpha_t^2 s^2 + sigma_t^2)).
        The map is the unique one that commutes with S and pushes N(alpha_t mu, C_t) onto
        N(alpha_s mu, C_s). (alpha_s, sigma_s) = (1, 0) gives the ODE's clean sample."""
        mu, s, a_t, s_t, a_s, s_s = self._args(x_t, alpha_t, sigma_t, alpha_s, sigma_s)
        ratio = ((a_s ** 2 * s ** 2 + s_s ** 2) / (a_t ** 2 * s ** 2 + s_t ** 2)).sqrt()
        return a_s * mu + self._spectral(x_t - a_t * mu, ratio)

    def straight_denoiser(self, x_t, alpha, sigma) -> torch.Tensor:
        """mu + S (alpha S + sigma I)^-1 (x_t - alpha mu): the denoiser of the *straight coupling*
        eps = S^-1 (x_0 - mu), under which x_t = alpha mu + (alpha S + sigma I) n with n the shared
        standard normal, so x_t determines n and x_0 = mu + S n exactly.

        Its DDIM trajectories are straight: from x_t it predicts x0 = mu + S n and
        eps = (x_t - alpha x0) / sigma = n, and the DDIM step alpha_s x0 + sigma_s eps lands on
        alpha_s mu + (alpha_s S + sigma_s I) n, the same n. (x0, eps) are constant along the
        trajectory (a line in xbar = x / alpha against sigmabar = sigma / alpha), so DDIM is exact
        at any step count and one step maps noise to the exact sample mu + S n. Samples follow
        N(mu, S^2) when the start x_T is drawn from :meth:`straight_marginal`."""
        mu, s, alpha, sigma = self._args(x_t, alpha, sigma)
        return mu + self._spectral(x_t - alpha * mu, s / (alpha * s + sigma))

    def straight_marginal(self, n: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """x_t = alpha mu + (alpha S + sigma I) n: the straight coupling's x_t for standard normal n.
        It equals n when alpha = 0, sigma = 1; for a schedule whose last alpha_T is small but not 0,
        starting DDIM there makes its samples exactly mu + S n."""
        mu, s, alpha, sigma = self._args(n, alpha, sigma)
        return alpha * mu + self._spectral(n, alpha * s + sigma)

    def _denoiser(self, kind: str) -> Callable:
        if kind not in ("exact", "straight"):
            raise ValueError(f"denoiser={kind!r}; allowed: ['exact', 'straight']")
        return self.exact_denoiser if kind == "exact" else self.straight_denoiser

    def model_fn(self, schedule: NoiseSchedule, pred_type: str = "eps", denoiser: str = "exact") -> Callable:
        """The oracle as a network: ``model_fn(x_t, t)`` returning its output as ``pred_type``
        ("eps", "v", "x0") for a discrete VP schedule, ready for ``samplers.ddim_sample``."""
        D = self._denoiser(denoiser)

        def fn(x_t, t):
            alpha, sigma = schedule.alpha(t, like=x_t), schedule.sigma(t, like=x_t)
            return convert(D(x_t, alpha, sigma), "x0", pred_type, x_t, alpha, sigma)
        return fn

    def edm_denoiser(self, denoiser: str = "exact") -> Callable:
        """The oracle as an EDM denoiser ``D(x, sigma)`` for x = x_0 + sigma n (alpha = 1), ready
        for ``samplers.euler_sample`` / ``heun_sample``."""
        D = self._denoiser(denoiser)
        return lambda x, sigma: D(x, 1.0, sigma)


__all__ = ["GaussianData"]
