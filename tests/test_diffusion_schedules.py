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


def test_sample_sigma_on_cpu_is_unchanged():
    """A CPU generator (or none, on the CPU) draws exactly as before: float64 on the CPU."""
    ks = KarrasSchedule()
    old = (torch.randn(64, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.2 - 1.2).exp()
    assert torch.equal(ks.sample_sigma(64, torch.Generator().manual_seed(3)), old)
    assert torch.equal(ks.sample_sigma(64, torch.Generator().manual_seed(3), device="cpu"), old)
    torch.manual_seed(3)
    assert torch.equal(ks.sample_sigma(64), old)
    assert ks.sample_sigma(4).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sample_sigma_draws_on_the_generators_device():
    ks = KarrasSchedule()
    g = torch.Generator("cuda").manual_seed(3)
    s = ks.sample_sigma(64, g, device="cuda")
    expected = (torch.randn(64, generator=torch.Generator("cuda").manual_seed(3), device="cuda",
                            dtype=torch.float64) * 1.2 - 1.2).exp()
    assert s.device.type == "cuda" and s.dtype == torch.float64 and torch.equal(s, expected)
    assert ks.sample_sigma(4, torch.Generator("cuda").manual_seed(0), device="cpu").device.type == "cpu"


# ----------------------------------------------------------------- zero terminal SNR (Lin et al. 2024)
ZERO_SNR = {"name": "cosine", "num_train_timesteps": 1024, "rescale_betas_zero_snr": True}


class Net(torch.nn.Module):
    """A denoiser net(x_t, t) whose prediction is 0."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return x * self.w


def test_zero_terminal_snr_min_snr_weights_are_finite():
    """SNR = 0 at t = T-1: the eps-space weight min(SNR, gamma) / SNR is 1 there (its limit, diffusers'
    convention), the v- and x0-space weights are 0; elsewhere the formulas are unchanged."""
    from distillkit.methods.diffusion import min_snr_weight

    s = NoiseSchedule("cosine", 1024, rescale_betas_zero_snr=True)
    t = torch.tensor([0, 100, 900, 1022, 1023])
    snr = s.snr(t)
    assert snr[-1] == 0 and (snr[:-1] > 0).all()
    eps = min_snr_weight(snr, 5.0, "eps")
    assert torch.isfinite(eps).all() and eps[-1] == 1
    assert torch.equal(eps[:-1], snr[:-1].clamp(max=5.0) / snr[:-1])
    assert min_snr_weight(snr, 5.0, "v")[-1] == 0 and min_snr_weight(snr, 5.0, "x0")[-1] == 0


@pytest.mark.parametrize("space", ["eps", "v", "x0"])
def test_zero_terminal_snr_loss_at_the_last_timestep_is_finite(space):
    from distillkit.methods.diffusion import Diffusion

    torch.manual_seed(0)
    m = Diffusion(Net(), schedule_cfg=dict(ZERO_SNR), prediction_type="v", loss_space=space,
                  weighting="min_snr", input_shape=(1, 4, 4))
    x0, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([1023, 1023, 500])
    x_t = m.schedule.add_noise(x0, eps, t)
    loss = m.vp_loss(torch.randn_like(x0), x_t, x0, eps, t)
    assert torch.isfinite(loss).all(), loss


def test_zero_terminal_snr_v_sampling_from_the_last_timestep_is_finite():
    """DDIM from t = T-1 (trailing) of a v-model: x_0 = alpha x_t - sigma v needs no division."""
    from distillkit.diffusion import ddim_sample

    s = NoiseSchedule("cosine", 1024, rescale_betas_zero_snr=True)
    z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    x = ddim_sample(lambda x, t: 0.3 * x, z, s, 4, "trailing", pred_type="v")
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("kw, key", [
    (dict(prediction_type="eps"), "method.prediction_type=eps"),
    (dict(prediction_type="v", teacher_prediction_type="eps"), "teacher_prediction_type"),
])
def test_eps_prediction_with_zero_terminal_snr_is_refused(kw, key):
    from distillkit.errors import DistillError
    from distillkit.methods.diffusion import Diffusion

    net = Net()
    teacher = Net() if "teacher_prediction_type" in kw else None
    with pytest.raises(DistillError, match="rescale_betas_zero_snr=true") as e:
        Diffusion(net, teacher=teacher, schedule_cfg=dict(ZERO_SNR), input_shape=(1, 4, 4), **kw)
    assert key in str(e.value) and "method.prediction_type=v" in str(e.value)
    Diffusion(net, schedule_cfg=dict(ZERO_SNR), input_shape=(1, 4, 4), prediction_type="x0")  # x0 is fine


def test_eps_prediction_with_zero_terminal_snr_is_one_cli_error(cli, runs_dir):
    r = cli("experiment=digits_diffusion_teacher", f"runs_dir={runs_dir}", "method.prediction_type=eps",
            "schedule.rescale_betas_zero_snr=true", "callbacks.progress=none")
    assert r.returncode == 2, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("distill: error:")]
    assert len(errors) == 1 and "schedule.rescale_betas_zero_snr=true" in errors[0], r.output
    assert "method.prediction_type=eps" in errors[0] and "method.prediction_type=v" in errors[0]
    assert "Traceback" not in r.output
