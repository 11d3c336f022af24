"""Prediction types: exact conversions for every pair; EDM preconditioning (Karras et al. 2022, Table 1)."""
import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from distillkit.diffusion import (PRED_TYPES, EDMPrecond, NoiseSchedule, canonical_pred_type, convert,
                                  edm_precond, to_eps, to_v, to_x0, x0_eps)


def _truth(schedule, t, shape=(6, 3, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    eps = torch.randn(*shape, generator=g, dtype=torch.float64)
    alpha, sigma = schedule.alpha(t, like=x0), schedule.sigma(t, like=x0)
    x_t = alpha * x0 + sigma * eps
    return x_t, alpha, sigma, {"x0": x0, "eps": eps, "v": alpha * eps - sigma * x0}


TIMESTEPS = [torch.tensor([0, 1, 250, 500, 998, 999]), torch.full((6,), 42), torch.arange(6) * 199]


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("t", TIMESTEPS, ids=["mixed", "same", "spread"])
def test_all_pairs_exact(name, t):
    x_t, alpha, sigma, truth = _truth(NoiseSchedule(name), t)
    for a, b in itertools.product(PRED_TYPES, repeat=2):
        out = convert(truth[a], a, b, x_t, alpha, sigma)
        assert torch.allclose(out, truth[b], atol=1e-8, rtol=1e-6), (a, b)
        back = convert(out, b, a, x_t, alpha, sigma)
        assert torch.allclose(back, truth[a], atol=1e-8, rtol=1e-6), (a, b)
    for a in PRED_TYPES:
        x0, eps = x0_eps(truth[a], a, x_t, alpha, sigma)
        assert torch.allclose(x0, truth["x0"], atol=1e-8) and torch.allclose(eps, truth["eps"], atol=1e-8)
        assert torch.allclose(to_x0(truth[a], a, x_t, alpha, sigma), truth["x0"], atol=1e-8)
        assert torch.allclose(to_eps(truth[a], a, x_t, alpha, sigma), truth["eps"], atol=1e-8)
        assert torch.allclose(to_v(truth[a], a, x_t, alpha, sigma), truth["v"], atol=1e-8)


def test_conversions_hold_beyond_vp():
    """The v formulas keep the alpha^2 + sigma^2 denominator, so they are exact for VE (EDM) too."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 8, 2, generator=g, dtype=torch.float64)
    alpha, sigma = torch.tensor(1.0, dtype=torch.float64), torch.tensor([[3.0]] * 8, dtype=torch.float64)
    x_t = alpha * x0 + sigma * eps
    truth = {"x0": x0, "eps": eps, "v": alpha * eps - sigma * x0}
    for a, b in itertools.product(PRED_TYPES, repeat=2):
        assert torch.allclose(convert(truth[a], a, b, x_t, alpha, sigma), truth[b], atol=1e-10)


def test_diffusers_names_and_identity():
    assert [canonical_pred_type(n) for n in ("epsilon", "v_prediction", "sample")] == ["eps", "v", "x0"]
    with pytest.raises(ValueError, match="allowed"):
        canonical_pred_type("score")
    p = torch.randn(3)
    assert convert(p, "epsilon", "eps", p, 0.5, 0.5) is p


def test_conversions_are_differentiable():
    x_t, alpha, sigma, truth = _truth(NoiseSchedule("linear"), TIMESTEPS[0])
    pred = truth["v"].clone().requires_grad_(True)
    to_x0(pred, "v", x_t, alpha, sigma).sum().backward()
    # d x0 / d v = -sigma / (alpha^2 + sigma^2) = -sigma (VP)
    assert torch.allclose(pred.grad, (-sigma).expand_as(pred))


def test_edm_precond_table1():
    sd = 0.5
    c_skip, c_out, c_in, c_noise = edm_precond(torch.tensor(sd, dtype=torch.float64), sd)
    assert c_skip.item() == pytest.approx(0.5)
    assert c_out.item() == pytest.approx(sd / math.sqrt(2))
    assert c_in.item() == pytest.approx(1 / (sd * math.sqrt(2)))
    assert c_noise.item() == pytest.approx(math.log(sd) / 4)
    sigma = torch.tensor([0.002, 0.1, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, _ = edm_precond(sigma, sd)
    # EDM App. B.6: F's input and its effective training target (x0 - c_skip x) / c_out both have
    # unit variance when x0 has std sigma_data.
    assert torch.allclose(c_in ** 2 * (sigma ** 2 + sd ** 2), torch.ones(4, dtype=torch.float64))
    assert torch.allclose(((1 - c_skip) ** 2 * sd ** 2 + c_skip ** 2 * sigma ** 2) / c_out ** 2,
                          torch.ones(4, dtype=torch.float64))


def test_edm_precond_wrapper():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    n = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    x = x0 + sigma.reshape(-1, 1, 1, 1) * n
    seen = {}

    def F(x_in, c_noise):
        # The ideal F: its effective training target (x0 - c_skip x) / c_out (EDM eq. 8).
        seen["c_noise"], seen["x_in"] = c_noise, x_in
        c_skip, c_out, c_in, _ = edm_precond(sigma.reshape(-1, 1, 1, 1))
        return SimpleNamespace(sample=(x0 - c_skip * x) / c_out)  # diffusers-style output

    D = EDMPrecond(F)
    assert torch.allclose(D(x, sigma), x0, atol=1e-10)
    assert seen["c_noise"].shape == (4,) and torch.allclose(seen["c_noise"], sigma.log() / 4)
    assert torch.allclose(seen["x_in"], x / (sigma ** 2 + 0.25).sqrt().reshape(-1, 1, 1, 1))
    assert torch.allclose(EDMPrecond(lambda x, c: torch.zeros_like(x))(x, 2.0), x * 0.25 / 4.25)
