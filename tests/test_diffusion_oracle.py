"""Gaussian oracles: closed forms checked by independent matrix algebra, DDIM with the exact denoiser
converging to the exact ODE map, and DDIM with the straight denoiser exact at any step count."""
import pytest
import torch

from distillkit.diffusion import GaussianData, NoiseSchedule, convert, ddim_sample, ddim_step_between

F64 = torch.float64


def _sqrtm(C):
    w, V = torch.linalg.eigh(C)
    return V @ torch.diag(w.sqrt()) @ V.T


@pytest.fixture(scope="module")
def data():
    return GaussianData.random(4, seed=0)


def test_construction_and_sampling(data):
    assert data.dim == 4 and torch.allclose(data.cov, data.S @ data.S.T)
    x = data.sample(200_000, torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(0), data.mu, atol=0.02)
    assert torch.allclose(torch.cov(x.T), data.cov, atol=0.03 * data.cov.abs().max())
    with pytest.raises(ValueError):
        GaussianData(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError):
        GaussianData(torch.zeros(2), -torch.eye(2))


def test_closed_forms_by_matrix_algebra(data):
    """The eigenbasis implementation against the formulas written with full matrices."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 4, generator=g, dtype=F64)
    I, S2, mu = torch.eye(4, dtype=F64), data.cov, data.mu
    a, s, a2, s2 = 0.7, 0.5, 0.95, 0.2
    C = a ** 2 * S2 + s ** 2 * I
    den = mu + (a * S2 @ torch.linalg.inv(C) @ (x - a * mu).T).T
    assert torch.allclose(data.exact_denoiser(x, a, s), den)
    M = _sqrtm(a2 ** 2 * S2 + s2 ** 2 * I) @ torch.linalg.inv(_sqrtm(C))
    assert torch.allclose(data.exact_ode_map(x, a, s, a2, s2), a2 * mu + (M @ (x - a * mu).T).T)
    straight = mu + (data.S @ torch.linalg.inv(a * data.S + s * I) @ (x - a * mu).T).T
    assert torch.allclose(data.straight_denoiser(x, a, s), straight)
    # per-sample (alpha, sigma) of shape (B,)
    av, sv = torch.linspace(0.1, 0.99, 7, dtype=F64), torch.linspace(0.9, 0.05, 7, dtype=F64)
    rows = torch.stack([data.exact_denoiser(x[i:i + 1], av[i], sv[i])[0] for i in range(7)])
    assert torch.allclose(data.exact_denoiser(x, av, sv), rows)


def test_exact_denoiser_is_the_posterior_mean(data):
    """Monte-Carlo regression: E[x0 | x_t] minimises the denoising loss, so its residual is
    uncorrelated with x_t."""
    g = torch.Generator().manual_seed(2)
    x0 = data.sample(200_000, g)
    a, s = 0.6, 0.8
    x_t = a * x0 + s * torch.randn(x0.shape, generator=g, dtype=F64)
    r = x0 - data.exact_denoiser(x_t, a, s)
    assert r.mean(0).abs().max() < 0.01
    assert ((r - r.mean(0)).T @ (x_t - x_t.mean(0)) / len(r)).abs().max() < 0.01


def test_exact_ode_map_pushes_marginals_and_composes(data):
    I, S2 = torch.eye(4, dtype=F64), data.cov
    a_t, s_t, a_u, s_u, a_s, s_s = 0.3, 0.95, 0.8, 0.6, 1.0, 0.0
    # linear part M: x_s - a_s mu = M (x_t - a_t mu)
    M = data.exact_ode_map(I + a_t * data.mu, a_t, s_t, a_s, s_s) - a_s * data.mu  # rows = M applied to e_i
    assert torch.allclose(M.T @ (a_t ** 2 * S2 + s_t ** 2 * I) @ M, a_s ** 2 * S2 + s_s ** 2 * I)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    via_u = data.exact_ode_map(data.exact_ode_map(x, a_t, s_t, a_u, s_u), a_u, s_u, a_s, s_s)
    assert torch.allclose(via_u, data.exact_ode_map(x, a_t, s_t, a_s, s_s))


@pytest.mark.parametrize("pred_type", ["eps", "v", "x0"])
def test_model_fn_adapters(data, pred_type):
    sch = NoiseSchedule("linear")
    x = torch.randn(6, 4, dtype=F64)
    t = torch.tensor([0, 100, 400, 700, 950, 999])
    alpha, sigma = sch.alpha(t, like=x), sch.sigma(t, like=x)
    for kind, D in (("exact", data.exact_denoiser), ("straight", data.straight_denoiser)):
        out = data.model_fn(sch, pred_type, kind)(x, t)
        assert torch.allclose(convert(out, pred_type, "x0", x, alpha, sigma), D(x, alpha, sigma))
    sigma = torch.full((6,), 2.0, dtype=F64)
    assert torch.allclose(data.edm_denoiser()(x, sigma), data.exact_denoiser(x, 1.0, 2.0))
    with pytest.raises(ValueError):
        data.model_fn(sch, pred_type, "mean")


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddim_exact_denoiser_converges_to_exact_ode_map(data, name):
    """DDIM is a first-order ODE solver: error ~ 1/N, so x4 steps -> ~1/4 the error."""
    sch = NoiseSchedule(name)
    x_T = torch.randn(512, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    exact = data.exact_ode_map(x_T, sch.alpha(999), sch.sigma(999), 1.0, 0.0)
    err = {}
    for n in (4, 16, 64, 256):
        x0 = ddim_sample(data.model_fn(sch, "eps"), x_T, sch, n, "trailing", pred_type="eps")
        err[n] = ((x0 - exact).norm(dim=1) / exact.norm(dim=1)).mean().item()
    assert err[16] < 0.35 * err[4] and err[64] < 0.35 * err[16] and err[256] < 0.35 * err[64]
    assert err[256] < 0.01  # mean relative error (measured ~0.007 linear, ~0.006 cosine)


@pytest.mark.parametrize("pred_type", ["eps", "v", "x0"])
def test_ddim_straight_denoiser_is_exact_at_any_step_count(data, pred_type):
    sch = NoiseSchedule("linear")
    model_fn = data.model_fn(sch, pred_type, "straight")
    n = torch.randn(50_000, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    x_T = data.straight_marginal(n, sch.alpha(999), sch.sigma(999))
    x1, x2, x64 = (ddim_sample(model_fn, x_T, sch, k, "trailing", pred_type=pred_type) for k in (1, 2, 64))
    assert (x1 - x64).abs().max() < 1e-6 and (x2 - x64).abs().max() < 1e-6
    assert torch.allclose(x1, data.mu + n @ data.S, atol=1e-8)       # one step: noise -> exact sample
    assert torch.allclose(x64.mean(0), data.mu, atol=0.03)
    assert torch.allclose(torch.cov(x64.T), data.cov, atol=0.04 * data.cov.abs().max())
    # plain N(0, I) noise also gives the same sample at every step count (trajectories are exact)
    z = torch.randn(64, 4, generator=torch.Generator().manual_seed(6), dtype=F64)
    assert (ddim_sample(model_fn, z, sch, 1, pred_type=pred_type)
            - ddim_sample(model_fn, z, sch, 64, pred_type=pred_type)).abs().max() < 1e-6


def test_straight_trajectory_stays_on_its_line(data):
    sch = NoiseSchedule("cosine")
    n = torch.randn(8, 4, generator=torch.Generator().manual_seed(7), dtype=F64)
    x = data.straight_marginal(n, sch.alpha(999), sch.sigma(999))
    grid = sch.grid(5, "trailing").tolist()
    for t, s in zip(grid[:-1], grid[1:]):
        x = ddim_step_between(data.model_fn(sch, "v", "straight"), x, t, s, sch, "v")
        assert torch.allclose(x, data.straight_marginal(n, sch.alpha(s), sch.sigma(s)), atol=1e-10)
