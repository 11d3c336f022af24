"""DMD and DMD2 (distillkit.methods.dmd) and the multi-role base (distillkit.methods.roles).

The maths against the papers' equations and DMD2's code (the distribution-matching gradient, the
non-saturating GAN losses, backward simulation); each loss moving only its own role; on toy2d with
the exact score of the Gaussian mixture as teacher, DMD's and DMD2's generators move close to the
data; and through the CLI: runs on digits (unconditional, class-conditional), a mid-cycle SIGTERM
that resumes bit for bit with the two time-scale counts right, DDP over two processes, and bad
values as one error line.
"""
from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import run_module

SCHEDULE = {"name": "cosine", "num_train_timesteps": 1000, "num_steps": 1, "spacing": "trailing"}
QUIET = ["callbacks.progress=none", "trainer.limit_val_batches=1", "trainer.test_after_fit=false",
         "trainer.log_every_n_steps=1", "trainer.max_epochs=-1"]


# --------------------------------------------------------------------------- helpers
class ExactMixture(nn.Module):
    """The exact x0-prediction E[x0 | x_t] of toy2d's Gaussian mixture: a teacher with no error."""

    def __init__(self, schedule):
        super().__init__()
        from distillkit.data.toy2d import GaussianMixture2D

        self.mixture = GaussianMixture2D()
        object.__setattr__(self, "schedule", schedule)

    def forward(self, x, t):
        a, s = self.schedule.alpha(t, like=x).reshape(-1), self.schedule.sigma(t, like=x).reshape(-1)
        return self.mixture.posterior_mean(x, a, s).to(x.dtype)


def toy_method(cls=None, lr: float = 1e-3, **kw):
    from distillkit.diffusion.from_config import schedule_from_config
    from distillkit.methods.dmd import DMD2
    from distillkit.models.denoiser import as_denoiser
    from distillkit.models.mlp import MLPDenoiser

    torch.manual_seed(0)
    sched = schedule_from_config(SCHEDULE)
    teacher = as_denoiser(ExactMixture(sched), sched, "x0")
    kw.setdefault("init_from_teacher", False)
    return (cls or DMD2)(MLPDenoiser(), teacher, schedule_cfg=dict(SCHEDULE), input_shape=(2,), prediction_type="x0",
                         optim_cfg={"optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": lr}}, **kw)


def fit(method, steps: int) -> L.Trainer:
    from distillkit.data.toy2d import Toy2DDataModule

    dm = Toy2DDataModule(batch_size=256, seed=0)
    trainer = L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(method, datamodule=dm)
    return trainer


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n: int = 256) -> float:
    d = torch.randn(x.shape[1], n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = d / d.norm(dim=0)
    px, py = (x.double() @ d).sort(0)[0], (y.double() @ d).sort(0)[0]
    return float(((px - py) ** 2).mean().sqrt())


def toy_sw(method) -> float:
    from distillkit.data.toy2d import GaussianMixture2D

    data = GaussianMixture2D().sample(4096, torch.Generator().manual_seed(1))[0]
    return sliced_wasserstein(method.sample(4096, generator=torch.Generator().manual_seed(2), use_ema=False), data)


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


# --------------------------------------------------------------------------- the maths
def test_distribution_matching_gradient_is_the_hand_computation():
    """grad = ((x - x0_real) - (x - x0_fake)) / mean_dims |x - x0_real| per sample (DMD2's code), and
    0.5 mse(x, sg(x - grad)) has gradient grad / numel in x."""
    from distillkit.methods.dmd import distribution_matching_grad, distribution_matching_loss

    g = torch.Generator().manual_seed(0)
    x, real, fake = (torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    grad = distribution_matching_grad(x, real, fake)
    for b in range(3):
        hand = ((x[b] - real[b]) - (x[b] - fake[b])) / (x[b] - real[b]).abs().sum() * 4
        assert torch.allclose(grad[b], hand)
    xr = x.float().requires_grad_(True)
    distribution_matching_loss(xr, grad.float()).backward()
    assert torch.allclose(xr.grad, grad.float() / x.numel(), atol=1e-7)
    # where x = x0_real exactly the normaliser is 0: the gradient is zeroed, not NaN
    assert torch.equal(distribution_matching_grad(real, real, fake), torch.zeros_like(real))


def test_gan_losses_are_the_non_saturating_softplus():
    from distillkit.methods.dmd import gan_critic_loss, gan_generator_loss

    fake, real = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.0])
    sp = lambda v: torch.log1p(torch.exp(v))  # noqa: E731
    assert torch.allclose(gan_critic_loss(fake, real), sp(fake).mean() + sp(-real).mean())
    assert torch.allclose(gan_generator_loss(fake), sp(-fake).mean())


def test_dm_loss_is_zero_when_generator_fake_score_and_teacher_agree():
    """At the start the generator and the fake score are copies of the teacher: every x0 agrees and
    the distribution-matching gradient vanishes."""
    from distillkit.diffusion.from_config import schedule_from_config
    from distillkit.methods.dmd import DMD2
    from distillkit.models.mlp import MLPDenoiser

    torch.manual_seed(0)
    teacher = MLPDenoiser()
    m = DMD2(MLPDenoiser(), teacher, schedule_cfg=dict(SCHEDULE), input_shape=(2,), prediction_type="v",
             optim_cfg={"optimizer": {"_target_": "torch.optim.Adam", "_partial_": True}})
    assert schedule_from_config(SCHEDULE).num_train_timesteps == 1000
    x = torch.randn(16, 2, requires_grad=True)
    loss = m.dm_loss(x, {}, torch.Generator().manual_seed(0))
    loss.backward()
    assert float(x.grad.abs().max()) < 1e-6


def test_backward_simulation_feeds_the_generators_own_samples():
    """At step i > 0 the generator's input is its own no-grad sample of steps 0..i-1 re-noised to t_i
    (generator_inputs=backward), or real data noised to t_i (generator_inputs=real)."""
    from distillkit.diffusion import multistep_sample

    m = toy_method(timesteps=[999, 666, 333])
    z, x_real = torch.randn(8, 2), torch.randn(8, 2)
    got = m.generator_input(z, 2, {}, x_real, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x0 = multistep_sample(lambda x, t: m.student(x, t).float(), z, m.schedule, [999, 666], generator=g, pred_type="x0")
        want = m.schedule.add_noise(x0, torch.randn(z.shape, generator=g), 333)
    assert torch.equal(got, want)
    assert torch.equal(m.generator_input(z, 0, {}, x_real, g), z)
    m.generator_inputs = "real"
    assert torch.equal(m.generator_input(z, 1, {}, x_real, g), m.schedule.add_noise(x_real, z, 666))


def test_each_loss_changes_only_its_own_role():
    """The generator's update (distribution matching and GAN through the critic) leaves the fake score
    and the GAN head untouched, and the critic's update leaves the generator untouched."""
    from distillkit.methods.dmd import gan_critic_loss, gan_generator_loss

    m = toy_method()
    fit(m, 1)  # optimizers and trainer in place
    roles = m.role_parameters()
    g = torch.Generator().manual_seed(0)
    gen0, crit0 = snapshot(roles["generator"]), snapshot(roles["critic"])
    with m.updating("generator") as step:
        x = m.generator_step(m.student, torch.randn(64, 2), 0, {})
        step(m.dm_loss(x, {}, g) + gan_generator_loss(m.discriminate(x, {}, g)))
    assert not same(gen0, roles["generator"]) and same(crit0, roles["critic"])
    gen1 = snapshot(roles["generator"])
    with m.updating("critic") as step:
        x = m.generator_step(m.student, torch.randn(64, 2), 0, {}).detach()
        step(m.denoising_loss(m.fake_score, x, generator=g).mean()
             + gan_critic_loss(m.discriminate(x, {}, g), m.discriminate(torch.randn(64, 2), {}, g)))
    assert same(gen1, roles["generator"]) and not same(crit0, roles["critic"])
    assert all(p.requires_grad for ps in roles.values() for p in ps)  # unfrozen again


def test_lora_fake_score_shares_the_frozen_base():
    from distillkit.methods.dmd import copy_sharing_frozen

    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    net[0].requires_grad_(False)
    copy = copy_sharing_frozen(net)
    assert copy[0].weight is net[0].weight and copy[1].weight is not net[1].weight


def test_dmd_and_dmd2_generators_approach_the_data_with_the_exact_teacher():
    """toy2d, the exact mixture score as real score, a random MLP generator: the sliced Wasserstein
    distance to the data falls well below its start (DMD without GAN; DMD2 with TTUR and GAN)."""
    from distillkit.methods.dmd import DMD

    dmd = toy_method(DMD, lr=1e-4, regression_weight=0.0)
    start = toy_sw(dmd)
    fit(dmd, 300)
    dmd2 = toy_method(critic_updates_per_generator_update=5)
    fit(dmd2, 100)
    end_dmd, end_dmd2 = toy_sw(dmd), toy_sw(dmd2)
    assert end_dmd < 0.5 * start, (start, end_dmd)
    assert end_dmd2 < 0.5 * start, (start, end_dmd2)


# --------------------------------------------------------------------------- through the CLI
def toy_args(teacher: Path, *extra: str) -> list[str]:
    return ["dataset=toy2d", "model=mlp2d", "teacher=mlp2d", f"teacher.checkpoint={teacher}", "method=dmd2",
            "schedule=cosine", "schedule.num_train_timesteps=1000", "dataset.batch_size=64",
            "method.critic_updates_per_generator_update=3", "callbacks.ema.enabled=true", "callbacks.ema.decay=0.9",
            "callbacks.checkpoint_every_n_steps=2", *QUIET, *extra]


def cli_with_events(*args: str, env: dict):
    """The CLI through tests/cli_with_events.py (signals and deaths at exact steps)."""
    return run_module("cli_with_events", *args, env=env)


def test_sigterm_between_generator_updates_resumes_bit_exact(cli, tmp_path, toy_teacher):
    """Stopped by SIGTERM after 3 generator updates (1 of the 3 critic updates of that cycle done)
    and rerun: the same generator, EMA, fake score and head, bit for bit, as an uninterrupted run;
    the checkpoints count generator updates as global_step and the critic's 3 per generator update."""
    # each role with its own schedule (a cosine decay after a warm-up, the critic's shorter and at
    # another lr), AdamW moments and clipping: every state a resume must bring back
    args = toy_args(toy_teacher, "trainer.max_steps=5", "name=dmd2", "optim=adamw", "optim.scheduler.name=cosine",
                    "optim.scheduler.warmup_steps=2", "optim.scheduler.min_lr_ratio=0.1", "optim.gradient_clip_val=0.5", "critic_optim.lr=3e-3",
                    "critic_optim.warmup_steps=1")
    whole = cli(*args, f"runs_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.output
    stopped = cli_with_events(*args, f"runs_dir={tmp_path / 'cut'}", env={"STOP_AT_STEP": "3"})
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout + stopped.stderr
    assert "at step 3 (generator updates 3, critic updates 7)" in stopped.stdout + stopped.stderr  # where in the cycle
    run = tmp_path / "cut" / "default" / "dmd2"
    ck = torch.load(run / "last.ckpt", weights_only=True)
    assert ck["global_step"] == 3 and ck["distillkit"]["role_updates"] == {"generator": 3, "critic": 7}
    resumed = cli(*args, f"runs_dir={tmp_path / 'cut'}")
    assert resumed.returncode == 0, resumed.output
    a = torch.load(run / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "whole" / "default" / "dmd2" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 5
    assert a["distillkit"]["role_updates"] == b["distillkit"]["role_updates"] == {"generator": 5, "critic": 13}
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("fake_score.") for k in a["state_dict"]) and any(k.startswith("gan_head.") for k in a["state_dict"])
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert len(a["optimizer_states"]) == len(b["optimizer_states"]) == 2
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"]):  # moments, step counts and the scheduled lr
        assert oa["state"].keys() == ob["state"].keys() and oa["param_groups"] == ob["param_groups"]
        assert all(torch.equal(oa["state"][i][k], ob["state"][i][k]) for i in ob["state"] for k in ob["state"][i])
    assert a["lr_schedulers"] == b["lr_schedulers"] and len(a["lr_schedulers"]) == 2
    assert a["optimizer_states"][0]["param_groups"][0]["lr"] != a["optimizer_states"][1]["param_groups"][0]["lr"]
    sa, sb = load_file(str(run / "student.safetensors")), load_file(str(tmp_path / "whole/default/dmd2/student.safetensors"))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_ddp_reduces_each_role(cli, runs_dir, toy_teacher):
    """Two processes (gloo): each role's gradient is all-reduced at its own backward, so both ranks
    end with the same generator and critic (the method checks the ranks' checksums at the end)."""
    r = cli(*toy_args(toy_teacher, "trainer.max_steps=3", "trainer.accelerator=cpu", "trainer.devices=2",
                      "trainer.strategy=ddp", f"runs_dir={runs_dir}"), timeout=600)
    assert r.returncode == 0, r.output
    assert "ranks' weights differ" not in r.output


@pytest.mark.parametrize("override, message", [
    ("method.gan_generator_weight=-1", "method.gan_generator_weight=-1"),
    ("method.gan_critic_weight=-0.5", "method.gan_critic_weight=-0.5"),
    ("method.timesteps=[]", "method.timesteps=[]"),
    ("method.critic_updates_per_generator_update=0", "method.critic_updates_per_generator_update=0"),
    ("trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches=2"),
])
def test_bad_values_are_one_error_line(cli, runs_dir, toy_teacher, override, message):
    r = cli(*toy_args(toy_teacher, f"runs_dir={runs_dir}", override))
    assert r.returncode == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len([line for line in r.stderr.splitlines() if line.startswith("distill: error:")]) == 1, r.stderr


def test_lora_generator_critic_and_teacher_share_one_frozen_base(tmp_path):
    """model.lora_rank with the teacher's own folder: the fake score and the teacher hold the
    generator's frozen base tensors (one base in memory), the teacher with the adapter off."""
    from tiny_sd import make_tiny_sd15

    from distillkit.methods.dmd import DMD2
    from distillkit.models.stable_diffusion import stable_diffusion

    folder = str(make_tiny_sd15(tmp_path / "sd15"))
    teacher = stable_diffusion(folder, variant="sd15")
    student = stable_diffusion(folder, variant="sd15", lora_rank=4)
    m = DMD2(student, teacher, schedule_cfg={"name": "none"}, input_shape=student.sample_shape,
             optim_cfg={"optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True}})
    base = {n: p for n, p in m.student.unet.named_parameters() if "lora_" not in n}
    for net in (m.teacher, m.fake_score):
        for n, p in net.unet.named_parameters():
            if "lora_" not in n:
                assert p is base[n]
    lora = [p for n, p in m.student.unet.named_parameters() if "lora_" in n]
    fake_lora = [p for n, p in m.fake_score.unet.named_parameters() if "lora_" in n]
    assert lora and fake_lora and not {id(p) for p in lora} & {id(p) for p in fake_lora}
    x, t = torch.randn(2, *student.sample_shape), torch.tensor([999, 500])
    cond = {"encoder_hidden_states": torch.randn(2, 77, teacher.unet.config.cross_attention_dim)}
    with torch.no_grad():
        before = m.teacher(x, t, cond)
        for p in lora:
            p.add_(0.1)  # the generator's adapter moves; the teacher (adapter off) does not
        assert torch.equal(m.teacher(x, t, cond), before) and torch.equal(teacher(x, t, cond), before)
        assert not torch.equal(m.student(x, t, cond), before)
    assert set(m.state_dict()) and all("lora_" in k for k in m.state_dict() if k.startswith(("student.", "fake_score.")))


# --------------------------------------------------------------------------- digits through the CLI
def digits_teacher(path: Path, num_classes=None) -> Path:
    """A randomly initialised unet_digits (the architecture of conf/model/unet_digits.yaml)."""
    from distillkit.models.unet import DiffusersUNet

    torch.manual_seed(0)
    net = DiffusersUNet(sample_size=8, in_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                        attention_head_dim=32, norm_num_groups=8, num_classes=num_classes)
    torch.save(net.state_dict(), path)
    return path


DIGITS = ["trainer.max_steps=2", "method.critic_updates_per_generator_update=2", "dataset.batch_size=16",
          "eval.every_n_steps=0", "eval.num_samples=50", "eval.batch_size=50", *QUIET]


def test_dmd2_on_digits_samples_in_its_steps_through_evaluation_and_distill_sample(cli, tmp_path):
    """A 2-step DMD2 generator on digits: evaluation scores it at its 2 steps, the run's results hold
    the FID, and distill-sample draws from it with its own timesteps by default."""
    import json

    teacher = digits_teacher(tmp_path / "t.pt")
    r = cli("experiment=digits_dmd2", f"teacher.checkpoint={teacher}", f"runs_dir={tmp_path}", "name=r",
            "method.timesteps=[1023,511]", "eval.steps=[2]", *DIGITS)
    assert r.returncode == 0, r.output
    run = tmp_path / "digits_dmd2" / "r"
    res = json.loads((run / "results.json").read_text())
    assert res["global_step"] == 2 and "fid/2step" in res
    s = run_module("distillkit.sample", f"checkpoint={run / 'last.ckpt'}", "num_samples=4", f"out={tmp_path / 's.npz'}",
                   timeout=300)
    assert s.returncode == 0, s.stdout + s.stderr
    assert "2 steps" in s.stdout
    # at other conditioning timesteps (distill-sample timesteps=), checked as method.timesteps is
    one = run_module("distillkit.sample", f"checkpoint={run / 'last.ckpt'}", "num_samples=4", "timesteps=767",
                     f"out={tmp_path / 'one.npz'}", timeout=300)
    assert one.returncode == 0 and "1 steps" in one.stdout, one.stdout + one.stderr
    bad = run_module("distillkit.sample", f"checkpoint={run / 'last.ckpt'}", "num_samples=4", "timesteps=511,1023",
                     f"out={tmp_path / 'bad.npz'}", timeout=300)
    assert bad.returncode == 2 and "timesteps=511,1023: method.timesteps=[511, 1023]: must descend strictly" in bad.stderr


def test_an_extended_run_does_not_repeat_the_evaluation_it_ended_with(cli, tmp_path):
    """DMD2's step counts generator updates, so the critic-only batches that follow the last one end
    at the same step: an extended run starts with them, and must not evaluate that step again."""
    import json

    teacher = digits_teacher(tmp_path / "t.pt")
    args = ["experiment=digits_dmd2", f"teacher.checkpoint={teacher}", f"runs_dir={tmp_path}", "name=r", *DIGITS,
            "eval.every_n_steps=2"]
    assert cli(*args).returncode == 0
    r = cli(*args, "trainer.max_steps=4")
    assert r.returncode == 0 and "resuming from" in r.output, r.output
    run = tmp_path / "digits_dmd2" / "r"
    steps = [json.loads(line)["step"] for line in (run / "eval.jsonl").read_text().splitlines()]
    assert steps == [2, 4]
    assert json.loads((run / "results.json").read_text())["global_step"] == 4


def test_class_conditional_dmd2_logs_class_accuracy(cli, tmp_path):
    import json

    teacher = digits_teacher(tmp_path / "t.pt", num_classes=10)
    r = cli("experiment=digits_cond_dmd2", f"teacher.checkpoint={teacher}", f"runs_dir={tmp_path}", "name=r", *DIGITS)
    assert r.returncode == 0, r.output
    res = json.loads((tmp_path / "digits_cond_dmd2" / "r" / "results.json").read_text())
    assert "class_acc/1step" in res and "fid/1step" in res


def test_dmd_trains_on_its_pairs_and_a_missing_pairs_file_names_distill_pairs(cli, tmp_path):
    from distillkit.pairs import save_pairs

    teacher = digits_teacher(tmp_path / "t.pt")
    missing = cli("experiment=digits_dmd", f"teacher.checkpoint={teacher}", f"runs_dir={tmp_path}",
                  f"method.pairs={tmp_path / 'none.safetensors'}", *DIGITS)
    assert missing.returncode == 2 and "distill-pairs checkpoint=" in missing.output
    assert not (tmp_path / "digits_dmd").exists() or not any((tmp_path / "digits_dmd").rglob("last.ckpt"))
    g = torch.Generator().manual_seed(0)
    save_pairs(tmp_path / "pairs.safetensors", torch.randn(32, 1, 8, 8, generator=g), torch.rand(32, 1, 8, 8, generator=g) * 2 - 1)
    r = cli("experiment=digits_dmd", f"teacher.checkpoint={teacher}", f"runs_dir={tmp_path}", "name=r",
            f"method.pairs={tmp_path / 'pairs.safetensors'}", "eval=none", "optim.gradient_clip_val=0.5",
            "critic_optim.lr=3e-4", "critic_optim.gradient_clip_val=2", *DIGITS)
    assert r.returncode == 0, r.output
    rows = (tmp_path / "digits_dmd" / "r" / "metrics.csv").read_text()
    assert "train/regression_loss" in rows and "train/gan_critic_loss" not in rows
    ck = torch.load(tmp_path / "digits_dmd" / "r" / "last.ckpt", weights_only=True)
    lrs = [o["param_groups"][0]["lr"] for o in ck["optimizer_states"]]
    assert lrs == [1e-4, 3e-4]  # optim for the generator, critic_optim's lr for the critic


def test_the_critic_has_a_schedule_of_its_own(cli, tmp_path, toy_teacher):
    """critic_optim.scheduler_name: the generator's lr decays by a cosine while the critic's stays
    constant; a name that is no schedule is one error line, before anything loads."""
    args = toy_args(toy_teacher, "trainer.max_steps=4", "name=s", f"runs_dir={tmp_path}", "optim=adamw",
                    "optim.optimizer.lr=1e-3", "optim.scheduler.name=cosine", "optim.scheduler.min_lr_ratio=0.1")
    r = cli(*args, "critic_optim.scheduler_name=none")
    assert r.returncode == 0, r.output
    ck = torch.load(tmp_path / "default" / "s" / "last.ckpt", weights_only=True)
    generator, critic = (o["param_groups"][0]["lr"] for o in ck["optimizer_states"])
    assert abs(generator - 1e-4) < 1e-12 and critic == 1e-3  # the cosine's floor (0.1 lr) after 4 of 4 updates
    bad = cli(*args, "critic_optim.scheduler_name=cosin", "name=b")
    assert bad.returncode == 2 and "critic_optim.scheduler_name='cosin': allowed values are none" in bad.output, bad.output


def test_class_conditional_dmd_regresses_onto_pairs_with_their_labels(cli, tmp_path):
    """method=dmd on the class-conditional digits teacher: its pairs carry cond.class_labels (as
    distill-pairs writes them for a conditional teacher), and the run's evaluation logs class accuracy."""
    import json

    from distillkit.pairs import save_pairs

    teacher = digits_teacher(tmp_path / "t.pt", num_classes=10)
    g = torch.Generator().manual_seed(0)
    save_pairs(tmp_path / "pairs.safetensors", torch.randn(32, 1, 8, 8, generator=g),
               torch.rand(32, 1, 8, 8, generator=g) * 2 - 1, cond={"class_labels": torch.arange(32) % 10})
    r = cli("experiment=digits_cond_dmd2", "method=dmd", "method.real_guidance=2", f"teacher.checkpoint={teacher}",
            f"method.pairs={tmp_path / 'pairs.safetensors'}", f"runs_dir={tmp_path}", "name=r", *DIGITS)
    assert r.returncode == 0, r.output
    run = tmp_path / "digits_cond_dmd2" / "r"
    assert "train/regression_loss" in (run / "metrics.csv").read_text()
    res = json.loads((run / "results.json").read_text())
    assert "class_acc/1step" in res and "fid/1step" in res


def test_a_gan_without_real_images_is_refused_before_any_network_loads(cli, tmp_path):
    """method=dmd2 model=sd15 on prompts only: the GAN has no real images. Said before the model folder
    is read (here it does not exist), so a typo costs no SDXL load, and no run dir is written."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    r = cli("method=dmd2", "model=sd15", "teacher=sd15", "dataset=prompts", f"dataset.path={prompts}",
            f"model.pretrained={tmp_path / 'nowhere'}", f"runs_dir={tmp_path / 'runs'}")
    assert r.returncode == 2, r.output
    assert "the GAN (method.gan_*_weight) needs real data and the dataset gives prompts only" in r.output
    assert "nowhere" not in r.output and not list((tmp_path / "runs").rglob("config.yaml"))
    # the same with the GAN off is refused later, for the missing folder
    off = cli("method=dmd2", "model=sd15", "teacher=sd15", "dataset=prompts", f"dataset.path={prompts}",
              "method.gan_generator_weight=0", "method.gan_critic_weight=0", f"model.pretrained={tmp_path / 'nowhere'}",
              f"runs_dir={tmp_path / 'runs'}")
    assert off.returncode == 2 and "nowhere" in off.output, off.output


def test_critic_optim_for_a_method_without_critic_is_one_error_line(cli, runs_dir):
    r = cli("dataset=toy2d", "model=mlp2d", "method=diffusion", "schedule=cosine", "critic_optim.lr=1e-3",
            f"runs_dir={runs_dir}", *QUIET)
    assert r.returncode == 2 and "critic_optim.lr: method=diffusion trains one network" in r.output, r.output
    assert "Traceback" not in r.output
