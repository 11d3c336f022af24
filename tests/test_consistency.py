"""Consistency distillation and LCM (distillkit.diffusion.consistency, distillkit.methods.consistency).

The maths against the papers and diffusers (the boundary condition exact at the smallest time, both
forms equal to diffusers' schedulers' scalings, iCT's pseudo-Huber and curriculum, LCMScheduler's
choice of sampling times); with Gaussian data the exact consistency functions give zero loss and
perturbed ones do not; the target network takes no gradient and moves as its EMA; the skip and the
discretisation visit the configured times; LCM's guided step reduces to the unguided one at w = 0;
through the CLI: consistency on digits (and EDM on toy2d), LCM on class-conditional digits, a
mid-run SIGTERM that resumes bit for bit, and bad values as one error line.
"""
from __future__ import annotations

import json
import signal

import pytest
import torch
from torch import nn

from conftest import run_module
from distillkit.diffusion import GaussianData, NoiseSchedule, ddim_step_between
from distillkit.diffusion.consistency import (apply_boundary, cm_boundary, consistency_distance, huber_c_for,
                                              ict_discretisation, ict_discretisation_values, karras_ascending, lcm_boundary,
                                              lcm_timesteps)

QUIET = ["callbacks.progress=none", "trainer.limit_val_batches=1", "trainer.test_after_fit=false",
         "trainer.log_every_n_steps=1", "trainer.max_epochs=-1"]
DIGITS = ["trainer.max_steps=3", "dataset.batch_size=16", "eval.every_n_steps=0", "eval.num_samples=50",
          "eval.batch_size=50", *QUIET]


# --------------------------------------------------------------------------- the boundary condition
def test_boundary_condition_is_exact_at_the_smallest_time():
    x = torch.randn(4, 3, 8, 8)
    F = torch.randn_like(x) * 100
    c_skip, c_out = lcm_boundary(torch.zeros(4, dtype=torch.long))
    assert torch.equal(c_skip, torch.ones(4, dtype=torch.float64)) and torch.equal(c_out, torch.zeros(4, dtype=torch.float64))
    assert torch.equal(apply_boundary(x, F, c_skip, c_out), x)
    assert torch.equal(apply_boundary(x, torch.full_like(x, float("nan")), c_skip, c_out), x)
    c_skip, c_out = cm_boundary(torch.full((4,), 0.002, dtype=torch.float64), sigma_min=0.002)
    assert torch.equal(apply_boundary(x, F, c_skip, c_out), x)
    # away from the boundary F matters
    assert not torch.equal(apply_boundary(x, F, *lcm_boundary(torch.full((4,), 19))), x)


def test_boundary_scalings_equal_diffusers_schedulers():
    from diffusers import CMStochasticIterativeScheduler, LCMScheduler

    lcm = LCMScheduler(num_train_timesteps=1000, timestep_scaling=10.0)
    for t in (0, 1, 19, 259, 999):
        ours = lcm_boundary(torch.tensor(t))
        theirs = lcm.get_scalings_for_boundary_condition_discrete(torch.tensor(float(t)))
        assert torch.allclose(ours[0].float(), torch.as_tensor(theirs[0]).float(), rtol=1e-6, atol=0)
        assert torch.allclose(ours[1].float(), torch.as_tensor(theirs[1]).float(), rtol=1e-6, atol=0)
    cm = CMStochasticIterativeScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    for s in (0.002, 0.1, 1.0, 80.0):
        ours = cm_boundary(torch.tensor(s, dtype=torch.float64), 0.002, 0.5)
        theirs = cm.get_scalings_for_boundary_condition(torch.tensor(s, dtype=torch.float64))
        assert torch.allclose(ours[0], theirs[0]) and torch.allclose(ours[1], theirs[1])


def test_pseudo_huber_is_icts_and_l2_is_the_mse():
    a, b = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    c = 0.00054 * 8  # sqrt(64) = 8
    assert huber_c_for(64) == pytest.approx(c)
    want = ((a - b).reshape(3, -1).pow(2).sum(1) + c ** 2).sqrt() - c
    assert torch.allclose(consistency_distance(a, b, "huber"), want)
    assert torch.allclose(consistency_distance(a, b, "huber", 0.5), ((a - b).reshape(3, -1).pow(2).sum(1) + 0.25).sqrt() - 0.5)
    assert torch.allclose(consistency_distance(a, b, "l2"), (a - b).reshape(3, -1).pow(2).mean(1))
    # diffusers' LCM scripts: elementwise, averaged, c = 0.001
    want = (((a - b) ** 2 + 1e-6).sqrt() - 1e-3).reshape(3, -1).mean(1)
    assert torch.allclose(consistency_distance(a, b, "huber_elementwise"), want)
    assert torch.equal(consistency_distance(a, a, "huber"), torch.zeros(3))


# --------------------------------------------------------------------------- discretisations
def test_lcm_discretisation_and_icts_curriculum():
    assert lcm_timesteps(1000, 50).tolist() == [0] + [20 * i - 1 for i in range(1, 51)]  # LCM's skip of 20
    assert lcm_timesteps(1024, 32).tolist()[:3] == [0, 31, 63] and lcm_timesteps(1024, 32)[-1] == 1023
    from distillkit.diffusion import KarrasSchedule

    k = KarrasSchedule()
    pts = karras_ascending(k, 18)
    assert len(pts) == 18 and pts[0] == pytest.approx(0.002) and pts[-1] == pytest.approx(80.0)
    assert bool((pts[1:] > pts[:-1]).all())
    # iCT: s0 = 10, s1 = 1280, K = 1000 -> K' = floor(1000 / 8) = 125; N doubles every 125 updates
    assert [ict_discretisation(u, 1000) for u in (0, 124, 125, 250, 874, 875, 999)] == [10, 10, 20, 40, 640, 1280, 1280]
    # the values a run can meet (its discretisations go to the device before training): the curriculum's own
    for start, end in ((10, 1280), (10, 1000), (4, 4), (3, 17)):
        assert ict_discretisation_values(start, end) == sorted({ict_discretisation(u, 500, start, end) for u in range(500)})


def test_sampling_times_are_lcmschedulers_choice():
    from diffusers import LCMScheduler

    method = vp_method(num_timesteps=50)
    sch = LCMScheduler(num_train_timesteps=1000, original_inference_steps=50)
    for n in (1, 2, 3, 4, 8):
        sch.set_timesteps(n)
        assert method.sampling_times(n) == sch.timesteps.tolist()


def test_configured_sampling_timesteps_are_checked_and_used_for_their_step_count():
    from distillkit.errors import DistillError

    method = vp_method(num_timesteps=50, sampling_timesteps=[999.0, 399])
    assert method.sampling_times(2) == [999, 399] and method.num_steps == 2
    assert method.sampling_times(1) == vp_method(num_timesteps=50).sampling_times(1)  # another count: LCM's choice
    for bad in ([], [399, 999], [1000, 10], [999, 10.5], [999, 999]):
        with pytest.raises(DistillError, match="method.sampling_timesteps"):
            vp_method(num_timesteps=50, sampling_timesteps=bad)


# --------------------------------------------------------------------------- Gaussian oracles
class Oracle(nn.Module):
    """A network whose x0-prediction makes the method's consistency function f = c_skip x + c_out F
    equal ``fn(x, alpha, sigma) + bump sigma`` : F = (f - c_skip x) / c_out (the boundary takes x
    where c_out = 0). A bump that grows with sigma breaks the invariance along trajectories (a
    multiple of a consistency function is still one)."""

    def __init__(self, fn, schedule, bump: float = 0.0):
        super().__init__()
        self.fn, self.bump = fn, bump
        self.w = nn.Parameter(torch.zeros(()))
        object.__setattr__(self, "schedule", schedule)

    def forward(self, x, t):
        a, s = self.schedule.alpha(t, like=x), self.schedule.sigma(t, like=x)
        c_skip, c_out = (v.to(x).reshape(-1, 1) for v in lcm_boundary(t))
        f = self.fn(x.double(), a.double(), s.double()).to(x) + self.bump * s + self.w
        return (f - c_skip * x) / c_out


class OracleTeacher(nn.Module):
    def __init__(self, fn, schedule):
        super().__init__()
        self.fn = fn
        object.__setattr__(self, "schedule", schedule)

    def forward(self, x, t):
        a, s = self.schedule.alpha(t, like=x), self.schedule.sigma(t, like=x)
        return self.fn(x.double(), a.double(), s.double()).to(x)


def vp_method(student=None, teacher=None, **kw):
    from distillkit.diffusion.from_config import schedule_from_config
    from distillkit.methods.consistency import ConsistencyDistillation
    from distillkit.models.denoiser import as_denoiser
    from distillkit.models.mlp import MLPDenoiser

    cfg = {"name": "linear", "num_train_timesteps": 1000, "num_steps": 4}
    sched = schedule_from_config(cfg)
    student = student(sched) if callable(student) and not isinstance(student, nn.Module) else student
    teacher = teacher(sched) if callable(teacher) and not isinstance(teacher, nn.Module) else teacher
    kw.setdefault("init_from_teacher", False)
    return ConsistencyDistillation(student or MLPDenoiser(), as_denoiser(teacher or MLPDenoiser(), sched, "x0"),
                                   schedule_cfg=cfg, input_shape=kw.pop("input_shape", (2,)), prediction_type="x0",
                                   optim_cfg={"optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}},
                                   **kw)


def test_straight_coupling_denoiser_is_the_consistency_function_of_its_own_ddim_teacher():
    """The straight coupling's denoiser mu + S (alpha S + sigma I)^-1 (x - alpha mu) is constant along
    its own DDIM trajectories (distillkit.diffusion.gaussian), so as consistency function with that
    DDIM step as teacher the consistency-distillation loss is zero; plus 0.05 sigma_t it is not."""
    data = GaussianData.random(dim=2, seed=0)
    x0 = data.sample(512, torch.Generator().manual_seed(1)).float()
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731

    exact = vp_method(lambda s: Oracle(data.straight_denoiser, s), lambda s: OracleTeacher(data.straight_denoiser, s),
                      skip=3, target_decay=0.0)
    loss, nfe = exact.consistency_loss(x0, {}, g())
    loss = loss.detach()
    _, s = exact.pair_times(len(x0), g())  # the pairs the loss drew (the same generator's first draw)
    inner = s > 0
    assert nfe == 3 and 0 < int(inner.sum()) < len(x0) and float(loss[inner].max()) < 1e-4
    # pairs ending at LCM's boundary t = 0 compare with f(x, 0) = x: the denoiser's own change there
    # (alpha_0 < 1) is the discrete form's approximation, small
    assert float(loss[~inner].max()) < 0.05
    off = vp_method(lambda s: Oracle(data.straight_denoiser, s, 0.05), lambda s: OracleTeacher(data.straight_denoiser, s),
                    skip=3, target_decay=0.0)
    assert float(off.consistency_loss(x0, {}, g())[0].detach()[inner].mean()) > 1e-3


def test_exact_ode_endpoint_is_the_consistency_function_of_the_exact_ode():
    """With the exact probability-flow ODE map as teacher step, the consistency function is the map to
    the clean end (alpha, sigma) = (1, 0): f(x_t) = f(ODE(x_t -> s)) to float precision. The straight
    coupling's denoiser is not that ODE's consistency function (its trajectories are another ODE's),
    and a perturbed map is not either."""
    data = GaussianData.random(dim=3, seed=0)
    sched = NoiseSchedule("linear", 1000)
    x0 = data.sample(256, torch.Generator().manual_seed(1))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2), dtype=x0.dtype)
    t = torch.randint(20, 1000, (256,), generator=torch.Generator().manual_seed(3))
    s = t - 20
    a_t, s_t, a_s, s_s = (v.double().reshape(-1, 1) for v in (sched.alpha(t), sched.sigma(t), sched.alpha(s), sched.sigma(s)))
    x_t = a_t * x0 + s_t * eps
    x_s = data.exact_ode_map(x_t, a_t, s_t, a_s, s_s)

    def endpoint(x, a, sg, bump=0.0):
        return data.exact_ode_map(x, a, sg, torch.ones_like(a), torch.zeros_like(sg)) + bump * sg

    assert float(consistency_distance(endpoint(x_t, a_t, s_t), endpoint(x_s, a_s, s_s), "l2").max()) < 1e-20
    assert float(consistency_distance(endpoint(x_t, a_t, s_t, 0.05), endpoint(x_s, a_s, s_s, 0.05), "l2").mean()) > 1e-8
    straight = consistency_distance(data.straight_denoiser(x_t, a_t, s_t), data.straight_denoiser(x_s, a_s, s_s), "l2")
    assert float(straight.mean()) > 1e-8


# --------------------------------------------------------------------------- the target network
def test_no_gradient_reaches_the_target_and_it_moves_as_its_ema():
    method = vp_method(target_decay=0.9)
    target = method.target_net.module
    before = [p.detach().clone() for p in target.parameters()]
    x0 = torch.randn(32, 2)
    loss, _ = method.consistency_loss(x0, {}, torch.Generator().manual_seed(0))
    loss.mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in target.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())
    opt = torch.optim.SGD(method.student.parameters(), lr=0.1)
    opt.step()
    method.update_ema()
    after = [p.detach() for p in target.parameters()]
    online = [p.detach() for p in method.student.parameters()]
    # the first EMA update copies the network (methods/ema.py); the second is 0.9 old + 0.1 new
    assert all(torch.equal(a, o) for a, o in zip(after, online))
    snap = [p.clone() for p in after]
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    method.update_ema()
    assert all(torch.allclose(p, 0.9 * s + 0.1 * o) for p, s, o in
               zip(target.parameters(), snap, method.student.parameters()))
    assert not any(torch.equal(b, a) for b, a in zip(before, snap) if b.numel() > 1)


def test_target_decay_zero_is_the_online_network_without_a_copy():
    method = vp_method(target_decay=0.0)
    assert method.target_net is None and method.target_network() is method.student
    assert not any(k.startswith("target_net.") for k in method.state_dict())


# --------------------------------------------------------------------------- discretisation visits
@pytest.mark.parametrize("skip", [1, 3])
def test_pairs_visit_the_configured_times(skip):
    method = vp_method(num_timesteps=10, skip=skip)
    pts = lcm_timesteps(1000, 10).tolist()
    assert method.points().tolist() == pts
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        t, s = method.pair_times(64, g)
        seen |= set(zip(t.tolist(), s.tolist()))
    assert seen == {(pts[n + skip], pts[n]) for n in range(len(pts) - skip)}


def test_lcm_teacher_step_at_w_zero_is_the_unguided_step():
    """LCM's guided step uses cond + w (cond - uncond) (diffusers' scale 1 + w): at w = 0 it is the
    plain conditional DDIM step, bit for bit."""
    from distillkit.models.denoiser import Denoiser
    from distillkit.models.unet import DiffusersUNet

    torch.manual_seed(0)
    unet = DiffusersUNet(sample_size=8, in_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                         down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                         attention_head_dim=32, norm_num_groups=8, num_classes=10)
    sched = NoiseSchedule("cosine", 1024)
    teacher = Denoiser(unet, "v", sched, condition="class", num_classes=10)
    from distillkit.methods.consistency import ConsistencyDistillation

    method = ConsistencyDistillation.__new__(ConsistencyDistillation)
    nn.Module.__init__(method)
    object.__setattr__(method, "teacher", teacher)
    method.is_edm, method.schedule = False, sched
    x = torch.randn(4, 1, 8, 8)
    t, s = torch.full((4,), 511), torch.full((4,), 479)
    cond = {"class_labels": torch.tensor([1, 2, 3, 4])}
    guided = method.teacher_step(x, t, s, cond, 1 + torch.zeros(4))
    plain = ddim_step_between(lambda a, b: teacher(a, b, cond).float(), x, t, s, sched, "v")
    assert torch.equal(guided, plain)
    assert not torch.equal(method.teacher_step(x, t, s, cond, 1 + torch.full((4,), 3.0)), plain)


def test_a_digits_lora_student_starts_as_the_teacher_which_is_its_base_with_the_adapter_off():
    """model.lora_rank on unet_digits: the teacher's weights go into the frozen base (so the student
    starts as the teacher), and the teacher the method keeps is that base, shared, with the adapter off:
    training the adapter leaves it alone."""
    from distillkit.models.unet import DiffusersUNet

    arch = dict(sample_size=8, in_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=32, norm_num_groups=8)
    torch.manual_seed(0)
    teacher = DiffusersUNet(**arch)
    student = DiffusersUNet(**arch, lora_rank=4, lora_target_modules=["to_q", "to_v", "conv1"])
    m = vp_method(lambda s: student, lambda s: teacher, init_from_teacher=True, input_shape=(1, 8, 8))
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([900, 100])
    with torch.no_grad():
        want = teacher(x, t)
        assert torch.equal(m.student(x, t, {}), want)
        trainable = [n for n, p in m.student.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)
        for n, p in m.student.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
        assert not torch.allclose(m.student(x, t, {}), want)
        assert torch.equal(m.teacher(x, t, {}), want)
    frozen = {id(p) for n, p in m.student.named_parameters() if "lora_" not in n}
    assert frozen == {id(p) for n, p in m.teacher.named_parameters() if "lora_" not in n}


# --------------------------------------------------------------------------- the CLI
def digits_teacher(path, num_classes=None):
    from test_dmd import digits_teacher as make

    return make(path, num_classes=num_classes)


def test_consistency_on_digits_evaluates_samples_and_exports_an_lcm_scheduler(cli, tmp_path):
    teacher = digits_teacher(tmp_path / "t.pt")
    r = cli("experiment=digits_consistency", f"teacher.checkpoint={teacher}", f"runs_dir={tmp_path}", "name=r",
            "eval.steps=[1,2]", "method.sampling_timesteps=[1023,383]", *DIGITS)
    assert r.returncode == 0, r.output
    run = tmp_path / "digits_consistency" / "r"
    res = json.loads((run / "results.json").read_text())
    assert res["global_step"] == 3 and "fid/1step" in res and "fid/2step" in res
    ck = torch.load(run / "last.ckpt", weights_only=True)
    assert any(k.startswith("target_net.") for k in ck["state_dict"])
    from distillkit.export import export_pipeline
    from distillkit.models.loading import load_run_checkpoint

    method = load_run_checkpoint(run / "last.ckpt")
    out = export_pipeline(method, tmp_path / "export")
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "LCMScheduler" and sched["original_inference_steps"] == 32
    # the configured two-step times: what the evaluation sampled at and what the export tells the pipeline
    assert method.sampling_times(2) == [1023, 383]
    assert json.loads((out / "distillkit.json").read_text())["timesteps"] == [1023, 383]
    # distill-sample at other times (the CM paper tunes the two-step intermediate time), and a bad list
    s = run_module("distillkit.sample", f"checkpoint={run / 'last.ckpt'}", "num_samples=4", "timesteps=1023,639",
                   f"out={tmp_path / 's.npz'}", timeout=300)
    assert s.returncode == 0 and "2 steps" in s.stdout, s.stdout + s.stderr
    bad = run_module("distillkit.sample", f"checkpoint={run / 'last.ckpt'}", "num_samples=4", "timesteps=639,1023",
                     f"out={tmp_path / 'b.npz'}", timeout=300)
    assert bad.returncode == 2 and "timesteps=639,1023: method.sampling_timesteps=[639, 1023]" in bad.stderr, bad.stderr


def test_consistency_on_class_conditional_digits_with_a_guided_teacher(cli, tmp_path):
    """method=consistency (no w-embedding) on the class-conditional teacher, its ODE step guided at 2:
    the samples are scored for class accuracy."""
    teacher = digits_teacher(tmp_path / "t.pt", num_classes=10)
    r = cli("experiment=digits_consistency", "model.num_classes=10", "teacher.num_classes=10",
            f"teacher.checkpoint={teacher}", "method.teacher_guidance=2", "eval.guidance=1", f"runs_dir={tmp_path}",
            "name=r", "eval.steps=[1]", *DIGITS)
    assert r.returncode == 0, r.output
    res = json.loads((tmp_path / "digits_consistency" / "r" / "results.json").read_text())
    assert "class_acc/1step" in res and "fid/1step" in res


def test_lcm_on_class_conditional_digits(cli, tmp_path):
    teacher = digits_teacher(tmp_path / "t.pt", num_classes=10)
    r = cli("experiment=digits_cond_lcm", f"teacher.checkpoint={teacher}", f"runs_dir={tmp_path}", "name=r",
            "eval.steps=[1]", *DIGITS)
    assert r.returncode == 0, r.output
    run = tmp_path / "digits_cond_lcm" / "r"
    res = json.loads((run / "results.json").read_text())
    assert "class_acc/1step" in res and "fid/1step" in res
    ck = torch.load(run / "last.ckpt", weights_only=True)
    assert any("cond_proj" in k for k in ck["state_dict"])


def test_lcm_lora_on_class_conditional_digits_trains_only_the_adapter_over_the_teacher(cli, tmp_path):
    """experiment=digits_cond_lcm_lora: the frozen base is the teacher's weights, only the adapter moves,
    the target network is an EMA of it, and the checkpoint alone rebuilds the student, whose export (the
    adapter fused into a plain UNet2DModel) computes what the student computes."""
    from diffusers import UNet2DModel

    from distillkit.export import export_pipeline
    from distillkit.models.loading import load_run_checkpoint
    from distillkit.models.lora import base_name

    teacher = digits_teacher(tmp_path / "t.pt", num_classes=10)
    r = cli("experiment=digits_cond_lcm_lora", f"teacher.checkpoint={teacher}", f"runs_dir={tmp_path}", "name=r",
            "eval.steps=[1]", *DIGITS)
    assert r.returncode == 0, r.output
    run = tmp_path / "digits_cond_lcm_lora" / "r"
    assert "class_acc/1step" in json.loads((run / "results.json").read_text())
    sd = torch.load(run / "last.ckpt", weights_only=True)["state_dict"]
    t = torch.load(teacher, weights_only=True)
    base = {base_name(k[len("student."):]): v for k, v in sd.items() if k.startswith("student.") and "lora_" not in k}
    assert base.keys() == t.keys() and all(torch.equal(v, t[k]) for k, v in base.items())  # frozen, the teacher's
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in sd.items() if k.startswith("student."))  # trained
    assert any(k.startswith("target_net.") and "lora_B" in k for k in sd) and not any("cond_proj" in k for k in sd)

    method = load_run_checkpoint(run / "last.ckpt")
    out = export_pipeline(method, tmp_path / "export")
    unet = UNet2DModel.from_pretrained(str(out / "unet")).eval()
    x, ts, y = torch.randn(3, 1, 8, 8), torch.tensor([999, 500, 20]), torch.tensor([1, 5, 9])
    with torch.no_grad():
        want = method.eval_network()(x, ts, {"class_labels": y})
        assert torch.allclose(unet(x, ts, class_labels=y).sample, want, atol=1e-5)
        assert not torch.allclose(UNet2DModel.from_config(unet.config).eval()(x, ts, class_labels=y).sample, want)


def test_consistency_on_an_edm_schedule(cli, tmp_path, toy_teacher):
    r = cli("experiment=toy2d_diffusion", "method=consistency", "schedule=edm", "teacher=mlp2d",
            f"teacher.checkpoint={toy_teacher}", f"runs_dir={tmp_path}", "name=r", "method.num_timesteps=17",
            "trainer.max_steps=3", "dataset.batch_size=64", *QUIET)
    assert r.returncode == 0, r.output


@pytest.mark.parametrize("override, message", [
    ("method.distance=l1", "method.distance"),
    ("method.num_timesteps=2000", "method.num_timesteps=2000"),
    ("method.target_decay=1.5", "method.target_decay"),
    ("teacher.lora_rank=4", "teacher.lora_rank=4: the teacher is frozen whole"),
    ("method.sampling_timesteps=[255,767]", "method.sampling_timesteps=[255, 767]: give integer timesteps that descend"),
])
def test_bad_values_are_one_error_line(cli, tmp_path, override, message):
    teacher = digits_teacher(tmp_path / "t.pt")
    r = cli("experiment=digits_consistency", f"teacher.checkpoint={teacher}", f"runs_dir={tmp_path}", override, *DIGITS)
    assert r.returncode != 0 and message in r.output and "Traceback" not in r.output, r.output


@pytest.mark.parametrize("experiment, extra", [("digits_consistency", []), ("digits_consistency", ["model.lora_rank=4"]),
                                               ("digits_cond_lcm", [])], ids=["full", "lora", "lcm"])
def test_sigterm_mid_run_resumes_bit_exact(cli, tmp_path, experiment, extra):
    """Stopped by SIGTERM after 3 updates and rerun: the online network, the target network, the
    sampling EMA and the optimizer state end as an uninterrupted run's, bit for bit (a LoRA
    student's too, whose base the method fills from the teacher again on resume; and LCM's, whose
    guidance scales w are drawn per sample and fed through the guidance embedding)."""
    from test_dmd import cli_with_events

    teacher = digits_teacher(tmp_path / "t.pt", **({"num_classes": 10} if experiment == "digits_cond_lcm" else {}))
    args = [f"experiment={experiment}", *extra, f"teacher.checkpoint={teacher}", "name=cm", "trainer.max_steps=5",
            "dataset.batch_size=16", "eval=none", "callbacks.checkpoint_every_n_steps=1", *QUIET]
    whole = cli(*args, f"runs_dir={tmp_path / 'whole'}")
    assert whole.returncode == 0, whole.output
    stopped = cli_with_events(*args, f"runs_dir={tmp_path / 'cut'}", env={"STOP_AT_STEP": "3"})
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout + stopped.stderr
    run = tmp_path / "cut" / experiment / "cm"
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 3
    resumed = cli(*args, f"runs_dir={tmp_path / 'cut'}")
    assert resumed.returncode == 0, resumed.output
    a = torch.load(run / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "whole" / experiment / "cm" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 5
    assert any(k.startswith("target_net.") for k in a["state_dict"]) and any(k.startswith("ema.") for k in a["state_dict"])
    assert experiment != "digits_cond_lcm" or any("cond_proj" in k for k in a["state_dict"])  # the w-embedding
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sb for k in sb[i] if torch.is_tensor(sb[i][k]))
