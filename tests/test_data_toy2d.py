"""toy2d: the mixture's exact density and posterior mean, and the fixed splits."""
import math

import torch

from distillkit.data.toy2d import GaussianMixture2D, Toy2DDataModule


def test_log_prob_is_a_normalised_density_with_the_right_peaks():
    gm = GaussianMixture2D(num_modes=8, radius=1.0, std=0.1)
    # at a mean: one component's peak density 1 / (2 pi std^2), weight 1/8 (the others are ~0)
    peak = gm.log_prob(gm.means[:1].float())
    assert math.isclose(peak.item(), math.log(1 / 8 / (2 * math.pi * 0.01)), rel_tol=1e-6)
    # integrates to 1 (Riemann sum), also for the noised density of alpha x0 + sigma eps
    h = 0.01
    ax = torch.arange(-4, 4, h, dtype=torch.float64)
    grid = torch.cartesian_prod(ax, ax)
    for alpha, sigma in ((1.0, 0.0), (0.8, 0.6)):
        total = gm.log_prob(grid, alpha, sigma).exp().sum().item() * h * h
        assert abs(total - 1) < 1e-3, (alpha, sigma, total)


def test_posterior_mean_is_tweedie():
    """E[x0 | x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha (Tweedie's formula)."""
    gm = GaussianMixture2D()
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    alpha, sigma = 0.7, 0.5
    (grad,) = torch.autograd.grad(gm.log_prob(x, alpha, sigma).sum(), x)
    tweedie = (x + sigma ** 2 * grad) / alpha
    assert torch.allclose(gm.posterior_mean(x.detach(), alpha, sigma), tweedie, atol=1e-10)


def test_splits_are_fixed_by_split_seed_and_sized_as_configured():
    a = Toy2DDataModule(num_train=100, num_val=20, num_test=30, split_seed=1, seed=5)
    b = Toy2DDataModule(num_train=100, num_val=20, num_test=30, split_seed=1, seed=9)
    for dm in (a, b):
        dm.setup("fit")
    assert [len(d) for d in (a.train_set, a.val_set, a.test_set)] == [100, 20, 30]
    assert torch.equal(a.train_set.tensors[0], b.train_set.tensors[0])
    assert a.image_shape == (2,) and a.num_classes == 8 and a.train_set.tensors[0].dtype == torch.float32
    x, k = a.test_set.tensors
    assert ((x - a.mixture.means[k].float()).norm(dim=1) < 0.6).all()  # 6 std from its own mean
