"""Schedules: tables and grids equal diffusers'; trailing grids nest; Karras sigmas equal diffusers'."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EDMEulerScheduler

from distillkit.diffusion import KarrasSchedule, NoiseSchedule, expand_like, make_schedule

DIFFUSERS_ARGS = {  # our name -> the DDPMScheduler that defines it
    "linear": dict(beta_schedule="linear"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
}


@pytest.mark.parametrize("name", sorted(DIFFUSERS_ARGS))
def test_table_is_diffusers(name):
    sch = make_schedule(name)
    ref = DDPMScheduler(num_train_timesteps=1000, **DIFFUSERS_ARGS[name]).alphas_cumprod
    assert torch.equal(sch.alphas_cumprod.float(), ref)
    t = torch.arange(1000)
    assert torch.allclose(sch.alpha(t) ** 2, ref.double())
    assert torch.allclose(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, torch.ones(1000, dtype=torch.float64))
    assert torch.allclose(sch.snr(t), sch.alpha(t) ** 2 / sch.sigma(t) ** 2)
    assert torch.allclose(sch.log_snr(t), sch.snr(t).log())
    assert bool((sch.log_snr(t).diff() < 0).all())


def test_final_alpha_convention():
    sch = NoiseSchedule("linear")
    assert sch.alpha(-1).item() == 1.0 and sch.sigma(-1).item() == 0.0
    assert sch.snr(-1).item() == float("inf")
    with pytest.raises(IndexError):
        sch.alpha(1000)
    with pytest.raises(IndexError):
        sch.alpha(-2)
    with pytest.raises(TypeError):
        sch.alpha(torch.tensor([0.5]))


def test_shapes_and_add_noise():
    sch = NoiseSchedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, 3, 4, 4, generator=g)
    t = torch.tensor([0, 17, 500, 999, 3])
    assert sch.alpha(t, like=x0).shape == (5, 1, 1, 1)
    assert sch.alpha(t, like=x0).dtype == torch.float32
    assert sch.sigma(7, like=x0).shape == (1, 1, 1, 1)
    assert expand_like(torch.ones(5), torch.zeros(5, 2)).shape == (5, 1)
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).add_noise(x0, eps, t)
    assert torch.allclose(sch.add_noise(x0, eps, t), ref, atol=1e-6)


def test_buffers_follow_module_and_stay_out_of_state_dict():
    sch = NoiseSchedule("linear")
    assert sch.state_dict() == {}
    assert sch.to(torch.bfloat16).alpha(3).dtype == torch.float64  # casts never round the table
    x = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert sch.alpha(3, like=x).dtype == torch.bfloat16


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("T", [1000, 50])
def test_timesteps_equal_diffusers(spacing, T):
    sch = NoiseSchedule("linear", num_train_timesteps=T)
    offsets = [0, 1] if spacing == "leading" else [0]
    for offset in offsets:
        ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
        for n in sorted({1, 2, 3, 4, 7, 10, 16, 25, 50, 64, 250, 999, 1000} & set(range(1, T + 1))):
            ref.set_timesteps(n)
            ours = sch.timesteps(n, spacing, steps_offset=offset)
            assert ours.dtype == torch.int64
            assert torch.equal(ours, ref.timesteps), (spacing, n, offset)
            assert torch.equal(sch.grid(n, spacing, offset), torch.cat([ref.timesteps, torch.tensor([-1])]))
    with pytest.raises(ValueError):
        sch.timesteps(T + 1)
    with pytest.raises(ValueError):
        sch.timesteps(4, "uniform")


def test_trailing_grids_nest_and_leading_do_not():
    sch = NoiseSchedule("cosine")
    for n in [64, 32, 16, 8, 4]:
        fine, coarse = sch.timesteps(n, "trailing"), sch.timesteps(n // 2, "trailing")
        assert torch.equal(fine[::2], coarse), n
        assert torch.equal(sch.grid(n, "trailing")[::2], sch.grid(n // 2, "trailing"))
        assert fine[0] == 999
        assert not torch.equal(sch.timesteps(n, "leading")[::2], sch.timesteps(n // 2, "leading")), n


@pytest.mark.parametrize("n", [1, 2, 5, 18, 40, 256])
def test_karras_sigmas_equal_diffusers(n):
    ks = KarrasSchedule()
    ref = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, rho=7.0, sigma_schedule="karras")
    ref.set_timesteps(n)
    ours = ks.sigmas(n)
    assert ours.shape == (n + 1,) and ours[-1] == 0 and ours[0] == pytest.approx(80.0)
    assert torch.allclose(ours.float(), ref.sigmas, rtol=1e-6, atol=0)
    if n > 1:
        assert ours[-2] == pytest.approx(0.002)


def test_karras_eq5_by_hand():
    ks = KarrasSchedule(sigma_min=0.01, sigma_max=10.0, rho=3.0)
    i, N = 2, 5
    expected = (10.0 ** (1 / 3) + i / (N - 1) * (0.01 ** (1 / 3) - 10.0 ** (1 / 3))) ** 3
    assert ks.sigmas(N)[i].item() == pytest.approx(expected, rel=1e-12)


def test_edm_training_helpers():
    ks = KarrasSchedule()
    sigma = ks.sample_sigma(100_000, torch.Generator().manual_seed(0))
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.02)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.02)
    s = torch.tensor([0.5])
    assert ks.loss_weight(s).item() == pytest.approx(2 * 0.25 / 0.0625)
    x0, n = torch.ones(3, 2), torch.ones(3, 2)
    assert torch.equal(ks.add_noise(x0, n, torch.tensor([0.0, 1.0, 2.0]))[:, 0], torch.tensor([1.0, 2.0, 3.0]))


def test_make_schedule():
    assert isinstance(make_schedule("edm", sigma_max=10.0), KarrasSchedule)
    assert make_schedule("cosine").beta_schedule == "squaredcos_cap_v2"
    assert make_schedule("linear", num_train_timesteps=100).num_train_timesteps == 100
    with pytest.raises(ValueError, match="allowed"):
        make_schedule("sigmoid")
