"""method=diffusion: loss targets and weightings against hand formulas, a short toy2d training run
that lowers the loss, sampling (shape, range, EMA weights), the denoisers and their configs."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from distillkit.diffusion import convert
from distillkit.errors import DistillError
from distillkit.methods.diffusion import Diffusion, min_snr_weight, regression_target

GAMMA = 5.0


class Recorder(nn.Module):
    """A "network" that returns a fixed output and records its inputs."""

    def __init__(self, out: torch.Tensor | None = None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.out, self.calls = out, []

    def forward(self, x, t):
        self.calls.append((x.clone(), torch.as_tensor(t).clone()))
        return (self.out if self.out is not None else torch.zeros_like(x)) + 0 * self.w


def method(net=None, shape=(3, 2), schedule=None, **kw) -> Diffusion:
    return Diffusion(net or Recorder(), schedule_cfg=schedule or {"name": "cosine", "num_train_timesteps": 1000},
                     input_shape=shape, **kw)


def hand_alpha_sigma(t: torch.Tensor, T: int = 1000):
    ac = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()[t]
    return ac.sqrt().float().reshape(-1, 1, 1), (1 - ac).sqrt().float().reshape(-1, 1, 1)


def fixed_tensors(B=4):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(B, 3, 2, generator=g), torch.randn(B, 3, 2, generator=g)
    return x0, eps, torch.tensor([0, 10, 500, 999])


@pytest.mark.parametrize("pred_type", ["eps", "x0", "v"])
def test_loss_targets_match_hand_formulas(pred_type):
    x0, eps, t = fixed_tensors()
    a, s = hand_alpha_sigma(t)
    hand = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[pred_type]  # v: Salimans & Ho 2022, Sec. 4
    assert torch.allclose(regression_target(pred_type, x0, eps, a, s), hand)

    m = method(prediction_type=pred_type)
    x_t = a * x0 + s * eps
    assert torch.allclose(m.vp_loss(hand, x_t, x0, eps, t), torch.zeros(4), atol=1e-8)
    delta = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    expected = (delta ** 2).mean((1, 2))
    assert torch.allclose(m.vp_loss(hand + delta, x_t, x0, eps, t), expected, rtol=1e-5)


def test_loss_space_is_independent_of_prediction_type():
    """A v-network trained in eps space: the v error delta becomes the eps error alpha * delta
    (eps = sigma x_t + alpha v for VP schedules)."""
    x0, eps, t = fixed_tensors()
    a, s = hand_alpha_sigma(t)
    m = method(prediction_type="v", loss_space="eps")
    x_t = a * x0 + s * eps
    delta = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    got = m.vp_loss(a * eps - s * x0 + delta, x_t, x0, eps, t)
    assert torch.allclose(got, (a.flatten() ** 2) * (delta ** 2).mean((1, 2)), rtol=1e-4, atol=1e-6)


def test_denoising_loss_noises_as_x_t_equals_alpha_x0_plus_sigma_eps():
    x0, _, _ = fixed_tensors()
    net = Recorder()
    m = method(net, prediction_type="eps")
    loss = m.denoising_loss(net, x0, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (4,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a, s = hand_alpha_sigma(t)
    (x_t, t_seen), = net.calls
    assert torch.equal(t_seen, t)
    assert torch.allclose(x_t, a * x0 + s * eps, atol=1e-6)
    assert torch.allclose(loss, (eps ** 2).mean((1, 2)), rtol=1e-5)  # network output 0, target eps


def test_min_snr_weights_equal_the_paper():
    """Hang et al. 2023: x0-space weight min(SNR, gamma); eps: / SNR; v: / (SNR + 1)."""
    snr = torch.tensor([1e-3, 0.5, 5.0, 20.0, 1e4], dtype=torch.float64)
    for i, v in enumerate(snr.tolist()):
        assert min_snr_weight(snr, GAMMA, "x0")[i].item() == pytest.approx(min(v, 5))
        assert min_snr_weight(snr, GAMMA, "eps")[i].item() == pytest.approx(min(v, 5) / v)
        assert min_snr_weight(snr, GAMMA, "v")[i].item() == pytest.approx(min(v, 5) / (v + 1))


@pytest.mark.parametrize("space", ["eps", "x0", "v"])
def test_min_snr_loss_is_min_snr_times_x0_error_in_every_space(space):
    """At fixed x_t, every space's weighted loss equals min(SNR, gamma) * ||x0 error||^2."""
    x0, eps, t = fixed_tensors()
    a, s = hand_alpha_sigma(t)
    x_t = a * x0 + s * eps
    dx0 = 0.1 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    m = method(prediction_type="x0", loss_space=space, weighting="min_snr", min_snr_gamma=GAMMA)
    snr = (a ** 2 / s ** 2).flatten().double()
    expected = snr.clamp(max=GAMMA).float() * (dx0 ** 2).mean((1, 2))
    assert torch.allclose(m.vp_loss(x0 + dx0, x_t, x0, eps, t), expected, rtol=1e-3, atol=1e-6)


def test_edm_loss_is_plain_mse_on_the_raw_output():
    """Karras et al. 2022, Table 1: lambda(sigma) ||D - x0||^2 equals ||F - F_target||^2 with
    F_target = (sigma x0 - sigma_data^2 n) / (sigma_data sqrt(sigma^2 + sigma_data^2))."""
    x0, _, _ = fixed_tensors()
    out = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    net = Recorder(out)
    for w in ("edm", "none"):
        m = method(net, schedule={"name": "edm"}, weighting=w)
        loss = m.denoising_loss(net, x0, generator=torch.Generator().manual_seed(4))
        g = torch.Generator().manual_seed(4)
        sigma = (torch.randn(4, generator=g, dtype=torch.float64) * 1.2 - 1.2).exp().float().reshape(-1, 1, 1)
        n = torch.randn(x0.shape, generator=g)
        sd = 0.5
        f_target = (sigma * x0 - sd ** 2 * n) / (sd * (sigma ** 2 + sd ** 2).sqrt())
        assert torch.allclose(loss, ((out - f_target) ** 2).mean((1, 2)), rtol=1e-4)
        x_in, c_noise = net.calls[-1]
        assert torch.allclose(x_in, (x0 + sigma * n) / (sigma ** 2 + sd ** 2).sqrt(), atol=1e-6)
        assert torch.allclose(c_noise, sigma.flatten().log() / 4, atol=1e-6)


@pytest.mark.parametrize("kw,match", [
    (dict(weighting="edm"), "schedule=edm"),
    (dict(schedule={"name": "edm"}, weighting="min_snr"), "VP schedules"),
    (dict(schedule={"name": "edm"}, prediction_type="eps"), "prediction_type=v"),
    (dict(schedule={"name": "none"}), "needs a diffusion noise schedule"),
    (dict(schedule={"name": "cosinus"}), "schedule.name"),
    (dict(prediction_type="noise"), "prediction_type"),
])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(DistillError, match=match):
        method(**kw)


def test_a_classifier_or_wrong_shape_network_is_refused():
    from distillkit.models.cnn import DigitsCNN

    with pytest.raises(DistillError, match="not a denoiser"):
        method(DigitsCNN(4))
    net = Recorder(torch.zeros(4, 5))
    with pytest.raises(DistillError, match="returns shape"):
        method(net).denoising_loss(net, torch.zeros(4, 3, 2))


# --------------------------------------------------------------------------- training
def test_toy2d_training_reduces_the_loss():
    import lightning as L

    from distillkit.data.toy2d import Toy2DDataModule
    from distillkit.models.mlp import MLPDenoiser

    L.seed_everything(0, verbose=False)
    dm = Toy2DDataModule(batch_size=512, num_train=4096, num_val=1024, num_test=16, seed=0)
    dm.setup("fit")
    val = dm.val_set.tensors[0]
    m = Diffusion(MLPDenoiser(hidden=64, depth=2), schedule_cfg={"name": "cosine"}, input_shape=(2,),
                  optim_cfg={"optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 3e-3}},
                  ema_cfg={"enabled": True, "decay": 0.9})

    def val_loss():
        with torch.no_grad():
            return m.denoising_loss(m.eval_network(), val, generator=torch.Generator().manual_seed(0)).mean().item()

    class Exact(nn.Module):  # the optimal denoiser E[x0 | x_t] of the mixture, as a v-prediction
        def forward(self, x, t):
            a, s = m.schedule.alpha(t, like=x), m.schedule.sigma(t, like=x)
            return convert(dm.mixture.posterior_mean(x, a.flatten(), s.flatten()).float(), "x0", "v", x, a, s)

    with torch.no_grad():
        optimum = m.denoising_loss(Exact(), val, generator=torch.Generator().manual_seed(0)).mean().item()
    before = val_loss()
    trainer = L.Trainer(max_steps=300, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(m, datamodule=dm)
    after = val_loss()
    # two thirds of the way from the untrained network to the exact denoiser (0.728 -> 0.645; 0.620)
    assert after - optimum < (before - optimum) / 3, (before, after, optimum)
    assert m.nfe == 300
    assert float(trainer.callback_metrics["nfe"]) == 300 and float(trainer.callback_metrics["nfe_per_update"]) == 1


# --------------------------------------------------------------------------- sampling
def tiny_unet():
    from distillkit.models.unet import DiffusersUNet

    return DiffusersUNet(sample_size=8, in_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                         norm_num_groups=4, add_attention=False)


def test_sample_shape_range_and_ema_weights():
    torch.manual_seed(0)
    m = method(tiny_unet(), shape=(1, 8, 8), ema_cfg={"enabled": True, "decay": 0.9})
    m.ema.update_parameters(m.student)  # the EMA copies the student on its first update
    ema_before = m.sample(6, 3, generator=torch.Generator().manual_seed(0))
    assert ema_before.shape == (6, 1, 8, 8) and ema_before.dtype == torch.float32
    assert ema_before.min() >= -1 and ema_before.max() <= 1
    # The evaluation callback's call is reproducible from its generator.
    assert torch.equal(ema_before, m.sample(6, 3, generator=torch.Generator().manual_seed(0)))
    raw_before = m.sample(6, 3, generator=torch.Generator().manual_seed(0), use_ema=False)
    assert torch.allclose(raw_before, ema_before)  # EMA == student right after the first update

    with torch.no_grad():
        for p in m.student.parameters():
            p.zero_()
    assert torch.equal(m.sample(6, 3, generator=torch.Generator().manual_seed(0)), ema_before)
    raw = m.sample(6, 3, generator=torch.Generator().manual_seed(0), use_ema=False)
    assert not torch.allclose(raw, ema_before)
    # A zero v-network: x0 = alpha x_t each step, so DDIM returns alpha_T-ish scaled noise, clipped.
    assert raw.abs().max() <= 1
    assert m.student.training  # sampling restores the train/eval mode


def test_sample_toy2d_and_edm_shapes():
    from distillkit.models.mlp import MLPDenoiser

    torch.manual_seed(0)
    m = method(MLPDenoiser(hidden=16, depth=1), shape=(2,))
    assert m.sample(5, 2).shape == (5, 2)  # points are not clipped
    e = method(MLPDenoiser(hidden=16, depth=1, time_scale=100.0), shape=(2,), schedule={"name": "edm", "num_steps": 3})
    calls = []
    e.student.register_forward_hook(lambda mod, inp, out: calls.append(1))
    assert e.sample(5).shape == (5, 2) and len(calls) == 2 * 3 - 1  # Heun: 2N - 1 evaluations


def test_unet_wrapper_round_trips_through_diffusers_format(tmp_path):
    from distillkit.models.unet import DiffusersUNet

    net = tiny_unet().eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 900])
    net.save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    back = DiffusersUNet.from_pretrained(tmp_path / "unet").eval()
    with torch.no_grad():
        assert torch.equal(net(x, t), back(x, t))
        assert torch.equal(net(x, t), net.unet(x, t).sample)


def test_configs_compose():
    """Every new option composes against its schema; the digits teacher is what it says."""
    from hydra import compose, initialize_config_dir

    from distillkit.cli import CONF_DIR
    from distillkit.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=digits_diffusion_teacher"])
        assert cfg.model.sample_size == 8 and cfg.method.prediction_type.value == "v"
        assert cfg.callbacks.ema.enabled and cfg.schedule.name == "cosine"
        assert cfg.schedule.num_train_timesteps % cfg.schedule.num_steps == 0
        for s in ("linear", "cosine", "scaled_linear", "edm", "none"):
            compose("config", overrides=["method=diffusion", f"schedule={s}"])
        compose("config", overrides=["experiment=toy2d_diffusion", "method.weighting=min_snr", "method.loss_space=eps"])
        compose("config", overrides=["model=unet", "teacher=unet_digits", "teacher.checkpoint=x", "optim=adamw"])
        for bad in (["method=diffusion", "method.weighting=snr"], ["schedule=cosine", "schedule.spacing=even"],
                    ["schedule=linear", "schedule.sigma_max=3"], ["model=mlp2d", "model.widht=3"]):
            with pytest.raises(Exception):
                compose("config", overrides=bad)
