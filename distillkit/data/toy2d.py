"""toy2d: a 2-D Gaussian mixture with a known density, for the fastest numerical checks.

``num_modes`` equal-weight isotropic Gaussians N(mu_k, std^2 I) with means evenly spaced on a
circle of ``radius`` (the "8 Gaussians" of the generative-modelling literature, scaled so the
data lie in about [-1.3, 1.3]^2). Everything a diffusion model should learn is known in closed
form: the density of x_t = alpha x_0 + sigma eps (a mixture of N(alpha mu_k, (alpha^2 std^2 +
sigma^2) I)) and the posterior mean E[x_0 | x_t], the optimal x0-prediction.

The datamodule draws fixed train / val / test sets (``num_train``, ``num_val``, ``num_test``
points) from ``split_seed`` alone; the labels are the mixture components.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.utils.data import TensorDataset

from distillkit.data.base import DistillDataModule


class GaussianMixture2D:
    def __init__(self, num_modes: int = 8, radius: float = 1.0, std: float = 0.1):
        self.num_modes = num_modes
        self.radius = radius
        self.std = std
        angle = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
        self.means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)  # (K, 2)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n points (float32, (n, 2)) and their components (int64, (n,))."""
        k = torch.randint(0, self.num_modes, (n,), generator=generator)
        z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.std * z).float(), k

    def _noised(self, x: torch.Tensor, alpha, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-component log N(x; alpha mu_k, s2 I) with s2 = alpha^2 std^2 + sigma^2, and s2."""
        x = torch.as_tensor(x, dtype=torch.float64)
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        s2 = alpha ** 2 * self.std ** 2 + sigma ** 2  # (B or 1, 1)
        d2 = ((x[:, None, :] - alpha[:, :, None] * self.means[None]) ** 2).sum(-1)  # (B, K)
        return -0.5 * d2 / s2 - math.log(2 * math.pi) - s2.log(), s2

    def log_prob(self, x: torch.Tensor, alpha=1.0, sigma=0.0) -> torch.Tensor:
        """Exact log-density (float64, (B,)) of x_t = alpha x_0 + sigma eps at x; alpha = 1,
        sigma = 0 gives the data density. alpha, sigma: numbers or per-sample (B,) tensors."""
        logp, _ = self._noised(x, alpha, sigma)
        return torch.logsumexp(logp, dim=1) - math.log(self.num_modes)

    def posterior_mean(self, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """E[x_0 | x_t] (float64, (B, 2)): sum_k r_k(x_t) (mu_k + alpha std^2 / s2 (x_t - alpha mu_k)),
        with r_k the posterior component probabilities (Bayes' rule on the noised mixture)."""
        logp, s2 = self._noised(x_t, alpha, sigma)
        r = logp.softmax(dim=1)  # (B, K)
        x_t = torch.as_tensor(x_t, dtype=torch.float64)
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1, 1)
        mu = self.means[None]  # (1, K, 2)
        cond = mu + alpha * self.std ** 2 / s2[:, :, None] * (x_t[:, None, :] - alpha * mu)
        return (r[:, :, None] * cond).sum(1)


class Toy2DDataModule(DistillDataModule):
    image_shape = (2,)

    def __init__(self, num_train: int = 8192, num_val: int = 1024, num_test: int = 1024,
                 num_modes: int = 8, radius: float = 1.0, std: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if min(num_train, num_val, num_test) < 1:
            raise ValueError("dataset.num_train, num_val and num_test must be positive")
        if num_modes < 1 or std <= 0:
            raise ValueError("dataset.num_modes must be positive and dataset.std above 0")
        self.mixture = GaussianMixture2D(num_modes, radius, std)
        self.num_classes = num_modes
        self.counts = (num_train, num_val, num_test)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        g = torch.Generator().manual_seed(self.split_seed)
        self.train_set, self.val_set, self.test_set = (TensorDataset(*self.mixture.sample(n, g)) for n in self.counts)
