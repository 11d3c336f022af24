"""Samplers: our DDIM step equals diffusers' DDIMScheduler.step; loops visit the grid; guidance;
Euler / Heun (Karras et al. 2022) converge to the exact ODE map of Gaussian data."""
import pytest
import torch
from diffusers import DDIMScheduler

from distillkit.diffusion import (GaussianData, KarrasSchedule, NoiseSchedule, classifier_free, convert,
                                  ddim_sample, ddim_step, ddim_step_between, ddim_step_from_pred,
                                  euler_sample, guided, heun_sample, to_x0)

DIFFUSERS_PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _ddim_ref(schedule_name, pred_type, spacing, T=1000):
    beta = {"cosine": "squaredcos_cap_v2"}.get(schedule_name, schedule_name)
    return DDIMScheduler(num_train_timesteps=T, beta_schedule=beta, clip_sample=False, set_alpha_to_one=True,
                         prediction_type=DIFFUSERS_PRED[pred_type], timestep_spacing=spacing)


@pytest.mark.parametrize("pred_type", ["eps", "v", "x0"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_ddim_step_equals_diffusers(pred_type, spacing, eta):
    sch, ref = NoiseSchedule("linear"), _ddim_ref("linear", pred_type, spacing)
    g = torch.Generator().manual_seed(0)
    for n in (10, 64):
        ref.set_timesteps(n)
        for t in ref.timesteps.tolist()[:: max(1, n // 8)] + [int(ref.timesteps[-1])]:
            x_t, out, noise = torch.randn(3, 4, 2, 5, 5, generator=g, dtype=torch.float64)
            expected = ref.step(out, t, x_t, eta=eta, variance_noise=noise).prev_sample
            s = max(t - 1000 // n, -1)  # diffusers steps to t - T // N (see the off-grid test below)
            ours = ddim_step_from_pred(out, x_t, t, s, sch, pred_type, eta=eta, noise=noise)
            assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5), (n, t)


@pytest.mark.parametrize("pred_type", ["eps", "v", "x0"])
@pytest.mark.parametrize("spacing,n", [("leading", 10), ("leading", 50), ("trailing", 8), ("trailing", 10)])
@pytest.mark.parametrize("eta", [0.0, 0.8])
def test_ddim_loop_equals_diffusers(pred_type, spacing, n, eta):
    """On grids evenly spaced by T // N the whole loop matches diffusers, noise stream included."""
    sch, ref = NoiseSchedule("cosine"), _ddim_ref("cosine", pred_type, spacing)
    data = GaussianData.random(4, seed=1)
    model_fn = data.model_fn(sch, pred_type)
    x_T = torch.randn(16, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    ref.set_timesteps(n)
    g, x = torch.Generator().manual_seed(3), x_T
    for t in ref.timesteps:
        x = ref.step(model_fn(x, t.expand(16)), int(t), x, eta=eta, generator=g).prev_sample
    ours = ddim_sample(model_fn, x_T, sch, n, spacing, eta=eta, generator=torch.Generator().manual_seed(3),
                       pred_type=pred_type)
    assert torch.allclose(ours, x, atol=1e-5)


@pytest.mark.parametrize("pred_type", ["eps", "v", "x0"])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_step_with_clip_equals_diffusers_clip_sample(pred_type, eta):
    """clip: the x0-prediction clamped, eps as predicted (diffusers' DDIMScheduler(clip_sample=True))."""
    sch = NoiseSchedule("linear")
    ref = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True, clip_sample_range=0.8,
                        set_alpha_to_one=True, prediction_type=DIFFUSERS_PRED[pred_type], timestep_spacing="trailing")
    ref.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    clipped = 0
    for t in ref.timesteps.tolist():
        x_t, out, noise = 3 * torch.randn(3, 4, 2, 5, 5, generator=g, dtype=torch.float64)
        expected = ref.step(out, t, x_t, eta=eta, variance_noise=noise).prev_sample
        ours = ddim_step_from_pred(out, x_t, t, max(t - 100, -1), sch, pred_type, eta=eta, noise=noise, clip=0.8)
        assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5), t
        clipped += int(not torch.allclose(ours, ddim_step_from_pred(out, x_t, t, max(t - 100, -1), sch, pred_type,
                                                                     eta=eta, noise=noise)))
    assert clipped == len(ref.timesteps)   # the clamp acted at every step


def test_clip_sample_reaches_the_sampler_of_a_method():
    """schedule.clip_sample: an eps-network's samples stay in range (2-d data: no final image clamp)."""
    from distillkit.methods.diffusion import Diffusion

    class Big(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(1.0))

        def forward(self, x, t):
            return 5 * self.w * torch.ones_like(x)   # a badly wrong eps: x0 far outside [-1, 1]

    cfg = {"name": "cosine", "num_train_timesteps": 1024, "num_steps": 8, "spacing": "trailing"}
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    free = Diffusion(Big(), schedule_cfg=cfg, prediction_type="eps", input_shape=(2,)).sample_from_noise(z)
    kept = Diffusion(Big(), schedule_cfg={**cfg, "clip_sample": True, "clip_sample_range": 0.5},
                     prediction_type="eps", input_shape=(2,)).sample_from_noise(z)
    assert free.abs().max() > 100 and kept.abs().max() <= 0.5
    from distillkit.errors import DistillError

    with pytest.raises(DistillError, match="schedule.clip_sample_range=0"):
        Diffusion(Big(), schedule_cfg={**cfg, "clip_sample": True, "clip_sample_range": 0}, input_shape=(2,))


def test_diffusers_trailing_steps_off_grid():
    """diffusers' DDIMScheduler.step goes to t - T // N. On a trailing grid with N not dividing T that
    is not the next grid point, and the last step lands on t = 0 instead of the clean end. Our
    samplers step along schedule.grid(), which ends at -1 (alpha = 1, sigma = 0)."""
    sch, ref = NoiseSchedule("linear"), _ddim_ref("linear", "eps", "trailing")
    ref.set_timesteps(64)
    last = int(ref.timesteps[-1])
    assert last - 1000 // 64 == 0                      # diffusers: ends at alphas_cumprod[0] < 1
    assert int(ref.timesteps[1]) != int(ref.timesteps[0]) - 1000 // 64
    assert sch.grid(64, "trailing")[-2:].tolist() == [last, -1]


def test_sampler_visits_grid_with_batched_calls():
    sch, calls = NoiseSchedule("linear"), []

    def model_fn(x, t):
        calls.append(t.clone())
        return torch.zeros_like(x)

    ddim_sample(model_fn, torch.randn(5, 2), sch, 4, "trailing")
    assert [c.shape for c in calls] == [(5,)] * 4
    assert [int(c[0]) for c in calls] == sch.timesteps(4, "trailing").tolist() == [999, 749, 499, 249]


def test_step_to_clean_end_is_x0_prediction():
    sch = NoiseSchedule("cosine")
    x_t, out = torch.randn(2, 6, 3, dtype=torch.float64)
    t = torch.tensor([999, 500, 10, 0, 250, 700])
    for pt in ("eps", "v", "x0"):
        x0 = to_x0(out, pt, x_t, sch.alpha(t, like=x_t), sch.sigma(t, like=x_t))
        assert torch.allclose(ddim_step_between(lambda x, tt: out, x_t, t, -1, sch, pt), x0)
        assert torch.allclose(ddim_step_between(lambda x, tt: out, x_t, t, -1, sch, pt, eta=1.0), x0)


def test_per_sample_steps_equal_one_by_one():
    sch, data = NoiseSchedule("linear"), GaussianData.random(3, seed=4)
    model_fn = data.model_fn(sch, "v")
    x_t = torch.randn(4, 3, dtype=torch.float64)
    t, s = torch.tensor([999, 600, 300, 20]), torch.tensor([899, 100, 299, -1])
    batched = ddim_step_between(model_fn, x_t, t, s, sch, "v")
    for i in range(4):
        one = ddim_step_between(model_fn, x_t[i:i + 1], int(t[i]), int(s[i]), sch, "v")
        assert torch.allclose(batched[i:i + 1], one)


def test_one_evaluation_feeds_two_strides():
    """DSD's use: one network output, a single and a double stride from it."""
    sch, data = NoiseSchedule("linear"), GaussianData.random(2, seed=5)
    grid = sch.grid(8, "trailing")
    x_t = torch.randn(3, 2, dtype=torch.float64)
    t = int(grid[2])
    pred = data.model_fn(sch, "x0")(x_t, torch.full((3,), t))
    one = ddim_step_from_pred(pred, x_t, t, int(grid[3]), sch, "x0")
    two = ddim_step_from_pred(pred, x_t, t, int(grid[4]), sch, "x0")
    x0 = pred
    eps = (x_t - sch.alpha(t) * x0) / sch.sigma(t)
    assert torch.allclose(one, sch.alpha(int(grid[3])) * x0 + sch.sigma(int(grid[3])) * eps)
    assert torch.allclose(two, sch.alpha(int(grid[4])) * x0 + sch.sigma(int(grid[4])) * eps)


def test_eta_noise_needs_alpha_t_and_is_reproducible():
    x = torch.randn(4, 2)
    with pytest.raises(ValueError):
        ddim_step(x, x, x, 0.9, 0.4, eta=1.0)
    sch = NoiseSchedule("linear")
    model_fn = lambda x, t: torch.zeros_like(x)  # noqa: E731
    a = ddim_sample(model_fn, x, sch, 5, eta=1.0, generator=torch.Generator().manual_seed(0))
    b = ddim_sample(model_fn, x, sch, 5, eta=1.0, generator=torch.Generator().manual_seed(0))
    c = ddim_sample(model_fn, x, sch, 5, eta=0.0)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_sampling_is_differentiable():
    sch, data = NoiseSchedule("cosine"), GaussianData.random(2, seed=6)
    x_T = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    x0 = ddim_sample(data.model_fn(sch, "eps"), x_T, sch, 3)
    (grad,) = torch.autograd.grad(x0.sum(), x_T)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_guidance_convention():
    g = torch.Generator().manual_seed(0)
    u, c = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    assert torch.equal(guided(u, c, 1.0), c)
    assert torch.equal(guided(u, c, 0.0), u)
    assert torch.allclose(guided(u, c, 7.5), u + 7.5 * (c - u))
    # Guidance is affine, conversions are affine: guiding eps or x0 outputs gives the same x0.
    x_t, alpha, sigma = torch.randn(5, 3, generator=g, dtype=torch.float64), 0.6, 0.8
    via_eps = convert(guided(u, c, 3.0), "eps", "x0", x_t, alpha, sigma)
    via_x0 = guided(*(convert(o, "eps", "x0", x_t, alpha, sigma) for o in (u, c)), 3.0)
    assert torch.allclose(via_eps, via_x0)


def test_classifier_free_is_one_batched_call():
    calls = []

    def model_fn(x, t, c):
        calls.append(x.shape[0])
        return x * c[:, None]

    x, t = torch.randn(4, 2), torch.full((4,), 10)
    cond, uncond = torch.full((4,), 3.0), torch.zeros(4)
    out = classifier_free(model_fn, cond, uncond, 2.0)(x, t)
    assert calls == [8] and torch.allclose(out, guided(0 * x, 3 * x, 2.0))
    calls.clear()
    assert torch.allclose(classifier_free(model_fn, cond, uncond, 1.0)(x, t), 3 * x) and calls == [4]


def test_heun_and_euler_converge_to_exact_ode_map():
    """VE form x = x0 + sigma n on EDM sigmas: Euler is first order, Heun second order."""
    data, ks = GaussianData.random(4, seed=7), KarrasSchedule()
    D = data.edm_denoiser("exact")
    x = 80.0 * torch.randn(256, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = data.exact_ode_map(x, 1.0, 80.0, 1.0, 0.0)
    err = {}
    for n in (8, 16, 32, 64):
        err["euler", n] = (euler_sample(D, x, ks.sigmas(n)) - exact).abs().max().item()
        err["heun", n] = (heun_sample(D, x, ks.sigmas(n)) - exact).abs().max().item()
    for n in (8, 16, 32):
        assert err["euler", 2 * n] < 0.6 * err["euler", n]   # ~ 1/2 per doubling
        assert err["heun", 2 * n] < 0.3 * err["heun", n]     # ~ 1/4 per doubling
        assert err["heun", n] < err["euler", n]
    assert err["heun", 64] < 0.02 and err["euler", 64] < 0.25


def test_heun_calls_denoiser_2n_minus_1_times_batched():
    calls = []

    def D(x, sigma):
        calls.append(sigma.shape)
        return torch.zeros_like(x)

    heun_sample(D, torch.randn(3, 2) * 80, KarrasSchedule().sigmas(6))
    assert calls == [(3,)] * (2 * 6 - 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_with_cpu_schedule_and_generator():
    """The schedule's table follows t's device; a CPU generator drives noise for CUDA samples."""
    sch, data = NoiseSchedule("linear"), GaussianData.random(2, seed=8)
    x_T = torch.randn(16, 2, dtype=torch.float64)
    kw = dict(eta=0.5, pred_type="v")
    cpu = ddim_sample(data.model_fn(sch, "v"), x_T, sch, 4, generator=torch.Generator().manual_seed(0), **kw)
    gpu = ddim_sample(data.model_fn(sch, "v"), x_T.cuda(), sch, 4, generator=torch.Generator().manual_seed(0), **kw)
    assert gpu.is_cuda and torch.allclose(gpu.cpu(), cpu, atol=1e-10)
    assert sch.alpha(torch.tensor([3, -1], device="cuda")).is_cuda


def test_samplers_read_device_values_once_per_call_not_per_step(monkeypatch):
    """On a GPU each read of a device value into Python (``.tolist()``, ``if t:``, ``int(t)``) and
    each timestep copied from the host waits for the work queued before it. DDIM reads its grid
    once per call, fills timesteps on the device and looks an int step up where the schedule's
    table lives; Heun reads which steps it corrects once."""
    reads, builds = [], []
    for name in ("item", "__bool__", "__float__", "__int__", "__index__", "tolist"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=orig, _n=name, **k: (reads.append(_n), _o(self, *a, **k))[1])
    as_tensor = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda data, *a, **k: (builds.append(type(data).__name__)
                                                                      if not isinstance(data, torch.Tensor) else None,
                                                                      as_tensor(data, *a, **k))[1])

    def counts(sample) -> tuple[int, int]:
        reads.clear(), builds.clear()
        sample()
        return len(reads), len(builds)

    sch, net = NoiseSchedule("cosine", 1024), (lambda x, t: 0.1 * x)
    x_T = torch.randn(4, 2)
    ddim = [counts(lambda: ddim_sample(net, x_T, sch, n, pred_type="v")) for n in (1, 8)]
    assert ddim[0] == ddim[1] == (1, 0), ddim   # the grid's tolist, whatever the step count
    assert sch.alpha(5).shape == () and torch.equal(sch.alpha(5), sch.alpha(torch.tensor(5)))
    with pytest.raises(IndexError, match="1024"):
        sch.alpha(1024)
    heun = [counts(lambda: heun_sample(lambda x, s: 0.5 * x, x_T * 80, KarrasSchedule().sigmas(n))) for n in (2, 8)]
    assert heun[0] == heun[1], heun
