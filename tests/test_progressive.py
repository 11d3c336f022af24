"""method=progressive (Salimans & Ho 2022, Algorithm 2): the target against the closed form of two
DDIM steps, the straight-coupling oracle's zero loss, 3 network evaluations per update, the
halving schedule of rounds, and a run requeued between rounds that resumes with round 1's
student as its teacher (and ends exactly like an uninterrupted run)."""
from __future__ import annotations

import csv
import re
import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from torch import nn

from distillkit.diffusion import GaussianData, NoiseSchedule
from distillkit.diffusion.step_targets import ddim_implied_x0, ddim_x0_coef, grids_nest, step_loss_weight
from distillkit.errors import DistillError
from distillkit.methods.progressive import Progressive, progressive_target
from distillkit.methods.step_distill import x_space_loss

T = 1024
SCHEDULE = {"name": "cosine", "num_train_timesteps": T, "spacing": "trailing"}
SMOKE = ["callbacks.progress=none", "trainer.limit_val_batches=1", "trainer.test_after_fit=false",
         "dataset.batch_size=32", "dataset.eval_batch_size=64", "trainer.log_every_n_steps=1"]


def hand_alpha_sigma(t: int):
    """alpha, sigma from diffusers' table (independent of our schedule code); t = -1: the clean end."""
    if t < 0:
        return 1.0, 0.0
    ac = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()[t]
    return float(ac.sqrt()), float((1 - ac).sqrt())


def hand_trailing_grid(N: int) -> list[int]:
    """Trailing spacing (Lin et al. 2024, Table 2): t_i = round(T - i T / N) - 1, then the clean end."""
    return [round(T - i * T / N) - 1 for i in range(N)] + [-1]


class Oracle(nn.Module):
    """The straight-coupling oracle of the diffusion core as a network net(x_t, t), predicting
    ``pred_type``; ``bias`` is a trainable offset (0: exact) and ``calls`` counts evaluations."""

    def __init__(self, data: GaussianData, schedule: NoiseSchedule, pred_type: str = "v", bias: float = 0.0):
        super().__init__()
        self.fn = data.model_fn(schedule, pred_type, denoiser="straight")
        self.bias = nn.Parameter(torch.tensor(float(bias)))
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return self.fn(x.double(), t).float() + self.bias


class EpsNet(nn.Module):
    """A fixed, non-trivial eps-prediction: eps_hat = tanh(x) * (1 + t / T)."""

    def forward(self, x, t):
        return torch.tanh(x) * (1 + torch.as_tensor(t, dtype=x.dtype).reshape(-1, *[1] * (x.ndim - 1)) / T)


def progressive(student, teacher, **kw) -> Progressive:
    kw.setdefault("teacher_steps", 8)
    kw.setdefault("final_steps", 1)
    return Progressive(student, teacher, schedule_cfg=SCHEDULE, input_shape=(2,), **kw)


def test_target_equals_two_ddim_steps_in_closed_form():
    """x_tilde = (z'' - (s''/s) z) / (a'' - (s''/s) a) after two hand-computed DDIM steps."""
    sched = NoiseSchedule("cosine", T)
    g = hand_trailing_grid(8)
    assert sched.grid(8).tolist() == g
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    net = EpsNet()
    for i in (0, 2, 6):  # the first, a middle and the last student step (t'' = -1: the clean end)
        t, t1, t2 = g[i], g[i + 1], g[i + 2]
        a, s = hand_alpha_sigma(t)
        a1, s1 = hand_alpha_sigma(t1)
        a2, s2 = hand_alpha_sigma(t2)
        eps = net(z, torch.full((6,), t))
        x = (z - s * eps) / a
        z1 = a1 * x + s1 * eps                                   # DDIM, Song et al. 2021 eq. 12
        eps1 = net(z1, torch.full((6,), t1))
        z2 = a2 * (z1 - s1 * eps1) / a1 + s2 * eps1
        hand = (z2 - s2 / s * z) / (a2 - s2 / s * a)             # Salimans & Ho 2022, Algorithm 2
        got = progressive_target(net, z, torch.full((6,), t), torch.full((6,), t1), torch.full((6,), t2),
                                 sched, "eps")
        assert torch.allclose(got, hand, rtol=1e-9, atol=1e-9)
        # one DDIM step t -> t'' with x_hat = x_tilde lands exactly on z''
        eps_tilde = (z - a * got) / s
        assert torch.allclose(a2 * got + s2 * eps_tilde, z2, atol=1e-9)


def test_weightings_and_latent_loss():
    """truncated SNR = max(SNR, 1), SNR + 1, and `latent` = the plain MSE between the latents."""
    sched = NoiseSchedule("cosine", T)
    t, s = torch.tensor([1023, 511, 63]), torch.tensor([895, 383, -1])
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    snr = torch.tensor([hand_alpha_sigma(int(v))[0] ** 2 / hand_alpha_sigma(int(v))[1] ** 2 for v in t],
                       dtype=torch.float64)
    assert torch.allclose(step_loss_weight("truncated_snr", sched, t, s, z).flatten(), snr.clamp(min=1))
    assert torch.allclose(step_loss_weight("snr_plus_one", sched, t, s, z).flatten(), snr + 1)
    zp, zq = torch.randn_like(z), torch.randn_like(z)
    assert torch.allclose(x_space_loss(zp, zq, z, t, s, sched, "latent"), ((zp - zq) ** 2).mean(1))
    c = ddim_x0_coef(sched, t, s, z)
    assert bool((c > 0).all())
    assert torch.allclose(ddim_implied_x0(zp, z, t, s, sched) * c, zp - sched.sigma(s, like=z) / sched.sigma(t, like=z) * z)


@pytest.mark.parametrize("weighting", ["truncated_snr", "snr_plus_one"])
def test_oracle_loss_is_zero_and_not_when_perturbed(weighting):
    """The straight coupling's DDIM is exact at any step count, so two teacher steps equal one
    student step: the loss vanishes with the oracle as teacher and student, and not otherwise.
    One update costs 3 evaluations (2 teacher, 1 student)."""
    data, sched = GaussianData.random(dim=2, seed=0), NoiseSchedule("cosine", T)
    teacher, student = Oracle(data, sched), Oracle(data, sched)
    m = progressive(student, teacher, weighting=weighting, init_from_teacher=False)
    m.sync_round()
    x0 = data.sample(64, torch.Generator().manual_seed(2)).float()
    torch.manual_seed(0)
    loss = m.training_step(x0, 0)
    assert loss.item() < 1e-9
    assert (teacher.calls, student.calls, m.nfe) == (2, 1, 3)
    with torch.no_grad():
        student.bias.fill_(0.05)
    torch.manual_seed(0)
    bad = m.training_step(x0, 0)
    assert bad.item() > 1e-4 and bad.requires_grad
    bad.backward()
    assert student.bias.grad is not None and student.bias.grad.abs() > 0 and teacher.bias.grad is None


@pytest.mark.parametrize("student_type", ["v", "x0"])
def test_eps_teacher_and_v_or_x0_student(student_type):
    """Teacher and student prediction types are separate: an eps oracle teaches a v or x0 student."""
    data, sched = GaussianData.random(dim=2, seed=0), NoiseSchedule("cosine", T)
    m = progressive(Oracle(data, sched, student_type), Oracle(data, sched, "eps"), teacher_prediction_type="eps",
                    prediction_type=student_type, init_from_teacher=False)
    m.sync_round()
    assert m.teacher_pred_type == "eps" and m.prediction_type == student_type
    assert m.training_step(data.sample(32).float(), 0).item() < 1e-6  # float32 round-off of eps at high noise


def test_convert_updates_regress_onto_the_teachers_own_x_prediction(monkeypatch):
    """method.convert_updates=K: round 1's first K updates take the target from ONE teacher
    evaluation at (z_t, t), its x-prediction in its own type; an eps oracle teaching a v oracle
    gives zero loss, a perturbed student not; then the usual two-step target (2 evaluations)."""
    data, sched = GaussianData.random(dim=2, seed=0), NoiseSchedule("cosine", T)
    step = {"n": 0}
    monkeypatch.setattr(Progressive, "global_step", property(lambda self: step["n"]))
    teacher = Oracle(data, sched, "eps")
    m = progressive(Oracle(data, sched, "v"), teacher, teacher_prediction_type="eps", init_from_teacher=False,
                    updates_per_round=5, convert_updates=2)
    m.sync_round()
    x = data.sample(32).float()
    assert m.training_step(x, 0).item() < 1e-6 and teacher.calls == 1 and m.nfe == 2
    with torch.no_grad():
        m.student.unet.bias.fill_(0.3)
    assert m.training_step(x, 0).item() > 1e-3 and teacher.calls == 2 and m.nfe == 4
    step["n"] = 2   # conversion over: two teacher steps per update
    m.training_step(x, 0)
    assert teacher.calls == 4 and m.nfe == 7
    with pytest.raises(DistillError, match="method.convert_updates=5"):
        progressive(EpsNet(), EpsNet(), updates_per_round=5, convert_updates=5)


def test_a_change_of_prediction_type_is_warned_about(caplog):
    """A student initialised from the teacher but reading its output as another type re-learns
    the output layer in round 1 (README: an x0 student of the v digits teacher never recovers
    in 1,000 updates): the run says so."""
    with caplog.at_level("WARNING", logger="distillkit"):
        progressive(EpsNet(), EpsNet(), teacher_prediction_type="eps")
        assert "re-learn the output layer" in caplog.text and "as v" in caplog.text
        caplog.clear()
        progressive(EpsNet(), EpsNet(), teacher_prediction_type="v")
        progressive(EpsNet(), EpsNet(), teacher_prediction_type="eps", init_from_teacher=False)
        progressive(EpsNet(), EpsNet(), teacher_prediction_type="eps", convert_updates=10)   # converts first
        assert "re-learn" not in caplog.text


def test_rounds_halve_the_step_count():
    net = EpsNet()
    m = progressive(net, net, teacher_steps=64, final_steps=1, updates_per_round=10)
    assert m.round_steps == [64, 32, 16, 8, 4, 2] and m.final_steps == 1 and m.num_steps == 1
    assert m.total_updates == 60
    assert [m.round_of(k) for k in (0, 9, 10, 19, 20, 59, 60, 99)] == [1, 1, 2, 2, 3, 6, 6, 6]
    sched = NoiseSchedule("cosine", T)
    for n in m.round_steps:  # a student of the round with N samples on the N/2 grid = every other point
        assert grids_nest(sched, n) and torch.equal(sched.grid(n)[::2], sched.grid(n // 2))
    for bad in ({"teacher_steps": 48, "final_steps": 1}, {"teacher_steps": 8, "final_steps": 8},
                {"teacher_steps": 2048, "final_steps": 1}):
        with pytest.raises(DistillError, match="teacher_steps"):
            Progressive(net, net, schedule_cfg=SCHEDULE, input_shape=(2,), **bad)
    with pytest.raises(DistillError, match="trailing"):
        Progressive(net, net, schedule_cfg={**SCHEDULE, "spacing": "leading"}, input_shape=(2,))
    with pytest.raises(DistillError, match="needs a teacher"):
        Progressive(net, None, schedule_cfg=SCHEDULE, input_shape=(2,))


def test_rounds_of_unequal_length():
    """method.updates_per_round as a list: one count per round, the rounds end at its running sums."""
    net = EpsNet()
    m = progressive(net, net, teacher_steps=8, final_steps=1, updates_per_round=[2, 3, 5])
    assert m.round_updates == [2, 3, 5] and m.total_updates == 10
    assert [m.round_of(k) for k in range(12)] == [1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3]
    assert [m.round_start(r) for r in (1, 2, 3)] == [0, 2, 5]
    assert [m.updates_into_round(k) for k in (0, 1, 2, 4, 5, 9)] == [0, 1, 0, 2, 0, 4]
    assert progressive(net, net, teacher_steps=8, final_steps=1, updates_per_round=[4]).round_updates == [4, 4, 4]
    for bad, why in (([2, 3], "2 counts for 3 rounds"), ([2, 0, 5], "updates_per_round"), (0, "updates_per_round"),
                     (2.5, "updates_per_round=2.5")):
        with pytest.raises(DistillError, match=why):
            progressive(net, net, teacher_steps=8, final_steps=1, updates_per_round=bad)
    with pytest.raises(DistillError, match=r"convert_updates=2: must lie in \[0, 2\)"):
        progressive(EpsNet(), EpsNet(), teacher_steps=8, final_steps=1, updates_per_round=[2, 9, 9], convert_updates=2)


def test_round_grid_is_kept_for_the_round_and_follows_a_round_change():
    net = EpsNet()
    m = progressive(net, net, teacher_steps=8, final_steps=1, updates_per_round=10)
    sched = NoiseSchedule("cosine", T)
    for r in (1, 1, 2, 3, 2):  # a requeued run can also land in an earlier round than the last grid's
        m.round = r
        g = m.round_grid("cpu")
        assert torch.equal(g, sched.grid(m.round_steps[r - 1])) and g is m.round_grid("cpu")


def test_round_switch_saves_the_student_and_makes_it_the_teacher(tmp_path, monkeypatch):
    """At a round boundary the student's EMA is written to round_<r>.ckpt and becomes the teacher;
    a fresh method (a restart) in round 2 reloads exactly those weights."""
    data, sched = GaussianData.random(dim=2, seed=0), NoiseSchedule("cosine", T)
    m = progressive(Oracle(data, sched, bias=0.3), Oracle(data, sched), updates_per_round=5,
                    ema_cfg={"enabled": True, "decay": 0.5})
    m.run_dir = tmp_path
    step = {"n": 0}
    monkeypatch.setattr(Progressive, "global_step", property(lambda self: step["n"]))
    m.sync_round()
    assert m.round == 1 and m.student.unet.bias.item() == 0.0  # the student starts as the teacher
    with torch.no_grad():
        m.student.unet.bias.fill_(0.7)
    m.update_ema()
    step["n"] = 5
    m.sync_round()
    assert m.round == 2 and m.teacher_steps_now == 4
    saved = torch.load(tmp_path / "round_1.ckpt", weights_only=True)
    assert saved["round"] == 1 and saved["teacher_steps"] == 8 and saved["student_steps"] == 4
    assert saved["state_dict"]["unet.bias"].item() == pytest.approx(0.7)  # the denoiser's keys
    assert m.teacher.unet.bias.item() == pytest.approx(0.7) and m.student.unet.bias.item() == pytest.approx(0.7)
    ckpt = {"distillkit": {}}
    m.on_save_checkpoint(ckpt)
    assert ckpt["distillkit"]["step_distill"]["round"] == 2
    assert ckpt["distillkit"]["step_distill"]["teacher"] == str(tmp_path / "round_1.ckpt")

    fresh = progressive(Oracle(data, sched), Oracle(data, sched), updates_per_round=5)
    fresh.run_dir = tmp_path
    fresh.on_load_checkpoint(ckpt)
    fresh.sync_round()  # step 5: round 2, teacher from round_1.ckpt; the student is left alone
    assert fresh.teacher.unet.bias.item() == pytest.approx(0.7) and fresh.student.unet.bias.item() == 0.0
    (tmp_path / "round_1.ckpt").unlink()
    again = progressive(Oracle(data, sched), Oracle(data, sched), updates_per_round=5)
    again.run_dir = tmp_path
    again.on_load_checkpoint(ckpt)
    with pytest.raises(DistillError, match="round_1.ckpt is missing"):
        again.sync_round()


def test_a_round_finished_again_after_a_requeue_replaces_the_earlier_file(tmp_path, monkeypatch):
    """Attempt 1 crosses the end of round 1 and dies; attempt 2 resumes from a checkpoint taken
    before that end, so it finishes round 1 again (on a GPU, not bit for bit the same). Its round-2
    teacher must be what round_1.ckpt holds, or attempt 3, requeued in round 2, would load another
    teacher than attempt 2 trained against."""
    data, sched = GaussianData.random(dim=2, seed=0), NoiseSchedule("cosine", T)
    step = {"n": 0}
    monkeypatch.setattr(Progressive, "global_step", property(lambda self: step["n"]))

    def attempt(bias_at_round_end: float, start: int, round_: int) -> Progressive:
        m = progressive(Oracle(data, sched, bias=0.3), Oracle(data, sched), updates_per_round=5)
        m.run_dir, m.round, step["n"] = tmp_path, round_, start
        m.sync_round()
        with torch.no_grad():
            m.student.unet.bias.fill_(bias_at_round_end)
        step["n"] = 5
        m.sync_round()
        return m

    attempt(0.7, start=0, round_=0)
    assert torch.load(tmp_path / "round_1.ckpt", weights_only=True)["state_dict"]["unet.bias"].item() == pytest.approx(0.7)
    second = attempt(0.71, start=3, round_=1)   # resumed at update 3 of round 1
    assert second.round == 2 and second.teacher.unet.bias.item() == pytest.approx(0.71)
    assert torch.load(tmp_path / "round_1.ckpt", weights_only=True)["state_dict"]["unet.bias"].item() == pytest.approx(0.71)
    third = progressive(Oracle(data, sched), Oracle(data, sched), updates_per_round=5)
    third.run_dir, third.round, step["n"] = tmp_path, 2, 7
    third.sync_round()   # requeued in round 2: the teacher from round_1.ckpt
    assert third.teacher.unet.bias.item() == pytest.approx(0.71)


def test_the_last_round_finished_again_replaces_its_file(tmp_path, monkeypatch):
    """The last round's file is the run's product (distill-sample reads it). A run that finishes
    the last round again, requeued from before its end or extended with more updates, writes this
    attempt's student there (a digits probe extended this way kept the earlier student)."""
    data, sched = GaussianData.random(dim=2, seed=0), NoiseSchedule("cosine", T)
    step = {"n": 0}
    monkeypatch.setattr(Progressive, "global_step", property(lambda self: step["n"]))
    for bias in (0.7, 0.71):
        m = progressive(Oracle(data, sched, bias=0.3), Oracle(data, sched), teacher_steps=2, final_steps=1,
                        updates_per_round=5)
        m.run_dir, step["n"] = tmp_path, 0
        m.sync_round()
        with torch.no_grad():
            m.student.unet.bias.fill_(bias)
        step["n"] = 5
        m.on_train_end()
        saved = torch.load(tmp_path / "round_1.ckpt", weights_only=True)["state_dict"]["unet.bias"].item()
        assert saved == pytest.approx(bias)


@pytest.mark.parametrize("fresh", [False, True])
def test_fresh_optimizer_clears_the_state_at_a_round_boundary(fresh, monkeypatch):
    """method.fresh_optimizer=true: round 2 starts with empty Adam moments (as each halving of the
    official code starts a new training state); by default they carry over."""
    from types import SimpleNamespace

    data, sched = GaussianData.random(dim=2, seed=0), NoiseSchedule("cosine", T)
    m = progressive(Oracle(data, sched, bias=0.3), Oracle(data, sched), updates_per_round=3, fresh_optimizer=fresh)
    opt = torch.optim.Adam(m.student.parameters(), lr=0.1)
    m._trainer = SimpleNamespace(optimizers=[opt], is_global_zero=True)
    monkeypatch.setattr(Progressive, "trainer", property(lambda self: self._trainer))
    step = {"n": 0}
    monkeypatch.setattr(Progressive, "global_step", property(lambda self: step["n"]))
    for n in range(4):
        step["n"] = n
        m.sync_round()
        if n == 3:
            assert m.round == 2 and (len(opt.state) == 0) == fresh
        opt.zero_grad()
        m.student.unet.bias.square().backward()
        opt.step()
        assert len(opt.state) == 1
    assert int(opt.state[m.student.unet.bias]["step"]) == (1 if fresh else 4)


def test_linear_lr_restarts_every_cycle():
    """optim.scheduler.name=linear with cycle_steps: the lr decays linearly to lr * min_lr_ratio
    over each cycle and restarts (progressive's per-round anneal: cycle_steps = updates_per_round)."""
    data, sched = GaussianData.random(dim=2, seed=0), NoiseSchedule("cosine", T)
    optim = {"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 1.0},
             "scheduler": {"name": "linear", "cycle_steps": 4, "min_lr_ratio": 0.0}}
    m = progressive(Oracle(data, sched, bias=0.3), Oracle(data, sched), optim_cfg=optim)
    cfg = m.configure_optimizers()
    opt, s = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert cfg["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(9):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs == pytest.approx([1.0, 0.75, 0.5, 0.25, 1.0, 0.75, 0.5, 0.25, 1.0])
    # rounds of unequal length (cycle_steps=${method.updates_per_round} with a list): one anneal each,
    # restarting where each round starts; past the list the last length repeats
    optim["scheduler"]["cycle_steps"] = [2, 4]
    cfg = progressive(Oracle(data, sched), Oracle(data, sched), optim_cfg=optim).configure_optimizers()
    opt, s = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        s.step()
    assert lrs == pytest.approx([1.0, 0.5, 1.0, 0.75, 0.5, 0.25, 1.0, 0.75])
    for bad in (-1, [4, 0], "four"):
        optim["scheduler"]["cycle_steps"] = bad
        with pytest.raises(DistillError, match=re.escape(f"optim.scheduler.cycle_steps={bad}:")):
            progressive(Oracle(data, sched), Oracle(data, sched), optim_cfg=optim).configure_optimizers()


def _metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _toy_teacher(path: Path) -> Path:
    from distillkit.models.mlp import MLPDenoiser

    torch.manual_seed(0)
    torch.save(MLPDenoiser().state_dict(), path)
    return path


def test_requeued_run_resumes_in_its_round_with_round_1_as_teacher(cli, tmp_path):
    """Run 1 stops in round 2 (after round_1.ckpt was written); run 2, the same command with a
    larger trainer.max_steps, resumes in round 2 with round_1.ckpt as teacher and ends with the
    weights of an uninterrupted run."""
    teacher = _toy_teacher(tmp_path / "teacher.pt")
    args = ["dataset=toy2d", "model=mlp2d", "teacher=mlp2d", f"teacher.checkpoint={teacher}", "method=progressive",
            "schedule=cosine", f"schedule.num_train_timesteps={T}", "method.teacher_steps=8", "method.final_steps=2",
            "method.updates_per_round=4", "callbacks.ema.enabled=true", "callbacks.ema.decay=0.9",
            "callbacks.checkpoint_every_n_steps=2", "name=pd", *SMOKE]
    first = cli(*args, f"runs_dir={tmp_path / 'a'}", "trainer.max_steps=6")
    assert first.returncode == 0, first.output
    assert ("trainer.max_steps=6 stops this run in round 2 of 2, before the end of its schedule (8 updates): the "
            "same command with trainer.max_steps=8, or without it, resumes it") in " ".join(first.output.split())
    run = tmp_path / "a" / "default" / "pd"
    assert (run / "round_1.ckpt").is_file() and not (run / "round_2.ckpt").exists()
    ck = torch.load(run / "last.ckpt", weights_only=True)
    assert ck["distillkit"]["step_distill"]["round"] == 2 and ck["global_step"] == 6
    round_1 = (run / "round_1.ckpt").read_bytes()
    second = cli(*args, f"runs_dir={tmp_path / 'a'}", "trainer.max_steps=8")
    assert second.returncode == 0, second.output
    assert "stops this run" not in second.output
    assert "round 2 resumes with the teacher" in second.output and "round_1.ckpt" in second.output
    assert (run / "round_1.ckpt").read_bytes() == round_1 and (run / "round_2.ckpt").is_file()
    ck = torch.load(run / "last.ckpt", weights_only=True)
    assert ck["distillkit"]["step_distill"]["teacher"] == str(run / "round_1.ckpt")
    assert json.loads((run / "results.json").read_text())["global_step"] == 8
    whole = cli(*args, f"runs_dir={tmp_path / 'b'}")
    assert whole.returncode == 0, whole.output
    a, b = load_file(str(run / "student.safetensors")), load_file(str(tmp_path / "b/default/pd/student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    r1, r2 = (torch.load(p, weights_only=True)["state_dict"] for p in (run / "round_1.ckpt", tmp_path / "b/default/pd/round_1.ckpt"))
    assert all(torch.equal(r1[k], r2[k]) for k in r1)
    rows = [r for r in _metrics(tmp_path / "b/default/pd") if r.get("nfe_per_update")]
    assert {float(r["nfe_per_update"]) for r in rows} == {3.0}
    assert max(float(r["nfe"]) for r in rows) == 3 * 8


def test_teacher_self_is_refused(cli, runs_dir):
    r = cli("dataset=toy2d", "model=mlp2d", "teacher=self", "method=progressive", "schedule=cosine",
            f"runs_dir={runs_dir}", *SMOKE)
    assert r.returncode == 2 and "teacher=self" in r.output and "distinct teacher" in r.output


def test_round_files_are_sampled_like_a_run_checkpoint(cli, tmp_path):
    """distill-sample reads round_<r>.ckpt as it reads last.ckpt: that round's network (for EMA and
    raw weights alike) with its own step count as the default; teacher.checkpoint still reads the
    file as plain weights; a round file without the run's config gets an error that says what to do."""
    import numpy as np

    from distillkit.models.loading import load_run_checkpoint, read_state_dict
    from distillkit.sample import generate, run as sample_run

    teacher = _toy_teacher(tmp_path / "teacher.pt")
    r = cli("dataset=toy2d", "model=mlp2d", "teacher=mlp2d", f"teacher.checkpoint={teacher}", "method=progressive",
            "schedule=cosine", f"schedule.num_train_timesteps={T}", "method.teacher_steps=8", "method.final_steps=2",
            "method.updates_per_round=3", "callbacks.ema.enabled=true", "callbacks.ema.decay=0.5", "name=pd",
            f"runs_dir={tmp_path}", *SMOKE)
    assert r.returncode == 0, r.output
    run = tmp_path / "default" / "pd"

    def sampled(name: str, *extra: str) -> np.ndarray:
        out = sample_run([f"checkpoint={run / name}", "num_samples=32", f"out={tmp_path / name}.npz", *extra])
        with np.load(out) as f:
            return f["arr_0"]

    for name, steps in (("round_1.ckpt", 4), ("round_2.ckpt", 2)):
        assert load_run_checkpoint(run / name).num_steps == steps
        reference = load_run_checkpoint(run / "last.ckpt")
        reference.eval_network().load_state_dict(read_state_dict(run / name), strict=True)
        want = generate(reference, 32, steps).numpy()
        assert np.array_equal(sampled(name), want)
        assert np.array_equal(sampled(name, "use_ema=false"), want)  # the student holds the same network
    assert not np.array_equal(sampled("round_1.ckpt", "steps=2"), sampled("round_2.ckpt"))

    legacy = torch.load(run / "round_1.ckpt", weights_only=True)
    del legacy["distillkit"]
    torch.save(legacy, tmp_path / "legacy.ckpt")
    with pytest.raises(DistillError, match="round/level file .* point checkpoint at the run's last.ckpt"):
        load_run_checkpoint(tmp_path / "legacy.ckpt")
