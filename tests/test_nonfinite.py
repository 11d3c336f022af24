"""Non-finite updates (distillkit.callbacks.nonfinite; ``callbacks.nonfinite``, ``callbacks.max_nonfinite_skips``).

In process, on tiny modules: which update stops the run and what the message names (a logged term, a
float term, the loss, a gradient), that the optimizer step of that update never happens, and that
skip mode leaves the weights and the optimizer's state untouched, counts the skips and stops after K
in a row, for automatic and manual (multi-role) optimization. Through the CLI: a diverging run
stops with exit status 3 and one message, last.ckpt is the last finite periodic checkpoint, and
results.json is strict JSON; skip mode through the CLI; DMD2 (manual optimization) on digits; DDP.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from distillkit.callbacks.nonfinite import EXIT_NONFINITE, NonFiniteGuard, NonFiniteStop
from distillkit.methods.base import DistillMethod
from distillkit.methods.roles import MultiRoleMethod

ADAM = {"optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.1}}


class NanGrad(torch.autograd.Function):
    """Identity forward; a NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


def poison(what: str, w: torch.Tensor, out: torch.Tensor, method: L.LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
    """Make one thing of this update non-finite: the loss, a gradient, a logged tensor or float term."""
    if what == "loss":
        out = out * float("nan")
    elif what == "grad":
        w = NanGrad.apply(w)
    elif what == "term":
        method.log("train/extra", torch.tensor(float("inf")))
    elif what == "float_term":
        method.log("train/extra", float("nan"))
    return w, out


class Tiny(DistillMethod):
    """A linear student; update ``s`` (1-based) is made non-finite when ``s`` is in ``bad``."""

    def __init__(self, bad=(), what="loss"):
        torch.manual_seed(0)
        super().__init__(nn.Linear(3, 1), optim_cfg=ADAM)
        self.bad, self.what = set(bad), what
        self.after: dict[int, dict] = {}  # weights after each update

    def training_step(self, batch, batch_idx):
        (x,) = batch
        w = self.student.weight
        out = torch.ones(())
        if self.global_step + 1 in self.bad:
            w, out = poison(self.what, w, out, self)
        loss = out * ((x @ w.t() + self.student.bias) ** 2).mean()
        self.log("train/loss", loss.detach())
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.after[self.global_step] = {k: v.clone() for k, v in self.student.state_dict().items()}


class TwoRoles(MultiRoleMethod):
    """A generator and a critic, each a linear layer, updated in turn (manual optimization); the
    critic's update ``s`` is made non-finite when ``s`` is in ``bad``."""

    def __init__(self, bad=(), what="loss"):
        torch.manual_seed(0)
        super().__init__(nn.Linear(3, 1), optim_cfg=ADAM)
        self.critic = nn.Linear(3, 1)
        self.bad, self.what = set(bad), what
        self.after: dict[int, dict] = {}

    def role_parameters(self):
        return {"generator": list(self.student.parameters()), "critic": list(self.critic.parameters())}

    def training_step(self, batch, batch_idx):
        (x,) = batch
        with self.updating("generator") as step:
            step((self.student(x) ** 2).mean())
        with self.updating("critic") as step:
            w, out = self.critic.weight, torch.ones(())
            if self.global_step in self.bad:  # the generator stepped already: global_step is this update's
                w, out = poison(self.what, w, out, self)
            step(out * ((x @ w.t() + self.critic.bias) ** 2).mean())

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.after[self.global_step] = {k: v.clone() for k, v in self.state_dict().items()}


def fit(method: L.LightningModule, steps: int = 6, mode: str = "stop", max_skips: int = 10) -> NonFiniteGuard:
    guard = NonFiniteGuard(mode, max_skips)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 3)), batch_size=4)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[guard])
    trainer.fit(method, train_dataloaders=data)
    return guard


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- in process
@pytest.mark.parametrize("what, term", [("loss", "train/loss"), ("grad", "gradient of student.weight"),
                                        ("term", "train/extra"), ("float_term", "train/extra")])
def test_stop_names_the_first_non_finite_step_and_term_without_a_read_per_update(what, term):
    """Stop mode keeps its verdict on the device and reads it before a checkpoint or at the end (no
    checkpoint callback here: at the end), naming the first non-finite update, not a later one."""
    m = Tiny(bad={3, 4, 5}, what=what)
    with pytest.raises(NonFiniteStop) as e:
        fit(m)
    assert (e.value.step, e.value.term) == (3, term)
    assert str(e.value).startswith(f"non-finite {term} at step 3: the run stopped")


def test_stop_reads_every_flush_every_checks_and_names_the_same_step(monkeypatch):
    """What stop mode holds between reads is bounded: every FLUSH_EVERY checks it reads them, so a
    long interval between checkpoints stops soon after the non-finite update, still naming it."""
    monkeypatch.setattr(NonFiniteGuard, "FLUSH_EVERY", 2)
    m = Tiny(bad={3}, what="term")
    with pytest.raises(NonFiniteStop) as e:
        fit(m, steps=50)
    assert (e.value.step, e.value.term) == (3, "train/extra")
    assert str(e.value).startswith("non-finite train/extra at step 3: the run stopped at step 4 ")
    assert max(m.after) == 3  # read at the fourth update's check, before its optimizer step


def test_skip_leaves_weights_and_optimizer_state_and_counts():
    m = Tiny(bad={2, 3, 5}, what="grad")
    guard = fit(m, steps=7, mode="skip", max_skips=3)
    assert guard.skipped == 3 and guard.in_a_row == {"model": 0}
    assert same(m.after[2], m.after[1]) and same(m.after[3], m.after[1]) and same(m.after[5], m.after[4])
    assert not same(m.after[4], m.after[3]) and not same(m.after[6], m.after[5])
    state = m.trainer.optimizers[0].state
    assert {int(s["step"]) for s in state.values()} == {7 - 3}  # Adam never counted the skipped ones
    assert all(torch.isfinite(v).all() for v in m.student.state_dict().values())


def test_skip_stops_after_k_in_a_row():
    m = Tiny(bad=set(range(2, 100)), what="loss")
    with pytest.raises(NonFiniteStop, match=r"non-finite train/loss at step 4: 3 updates in a row were non-finite"):
        fit(m, steps=20, mode="skip", max_skips=3)
    assert same(m.after[3], m.after[1])


@pytest.mark.parametrize("what, term", [("loss", "critic loss"), ("grad", "gradient of critic.weight")])
def test_manual_optimization_names_the_roles_step(what, term):
    m = TwoRoles(bad={3}, what=what)
    with pytest.raises(NonFiniteStop) as e:
        fit(m)
    assert (e.value.step, e.value.term) == (3, term)


def test_manual_optimization_skips_one_role_and_counts_it_apart():
    m = TwoRoles(bad={2, 3}, what="grad")
    guard = fit(m, steps=5, mode="skip", max_skips=3)
    assert guard.skipped == 2 and guard.in_a_row == {"generator": 0, "critic": 0}
    critic = lambda s: {k: v for k, v in m.after[s].items() if k.startswith("critic.")}  # noqa: E731
    assert same(critic(3), critic(1)) and not same(critic(4), critic(3))
    assert not torch.equal(m.after[3]["student.weight"], m.after[1]["student.weight"])


def test_results_json_is_strict(tmp_path):
    from distillkit.runs import write_results

    write_results(tmp_path, {"val/loss": float("nan"), "x": [float("inf"), 1.0], "n": {"a": -math.inf}, "ok": 2.5})
    res = json.loads((tmp_path / "results.json").read_text(), parse_constant=strict)
    assert res == {"val/loss": None, "x": [None, 1.0], "n": {"a": None}, "ok": 2.5}


# --------------------------------------------------------------------------- through the CLI
def strict(name: str):
    raise ValueError(f"results.json holds {name}: not JSON")


def finite_checkpoint(path: Path) -> dict:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
    for opt in ck["optimizer_states"]:
        assert all(torch.isfinite(t).all() for s in opt["state"].values() for t in s.values()
                   if torch.is_tensor(t) and t.is_floating_point())
    return ck


# lr = 1e8 * (step + 1) / 1e8 (cosine warmup): the loss grows for a few updates, then goes NaN
DIVERGING = ["experiment=digits_diffusion_teacher", "optim.optimizer.lr=1e8", "optim.scheduler.warmup_steps=100000000",
             "trainer.max_steps=40", "dataset.batch_size=16", "callbacks.checkpoint_every_n_steps=2",
             "callbacks.progress=plain", "trainer.log_every_n_steps=1", "trainer.limit_val_batches=1",
             "trainer.test_after_fit=false"]


def check_stopped(r, run: Path, every: int = 2) -> dict:
    assert r.returncode == EXIT_NONFINITE, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("distill: error:")]
    assert len(errors) == 1 and "non-finite" in errors[0] and "Traceback" not in r.output, r.output
    res = json.loads((run / "results.json").read_text(), parse_constant=strict)
    step = res["nonfinite"]["step"]
    assert res["stopped"] == "non-finite" and f"at step {step}" in errors[0]
    assert not (run / "student.safetensors").exists()
    ck = finite_checkpoint(run / "last.ckpt")
    # the last periodic checkpoint before the failure, never overwritten after it
    assert ck["global_step"] == res["last_ckpt_step"] == (step - 1) // every * every > 0
    assert f"last.ckpt holds step {ck['global_step']}, the last finite checkpoint" in errors[0]
    return res


def test_cli_stops_a_diverging_run(cli, runs_dir):
    r = cli(*DIVERGING, f"runs_dir={runs_dir}", "name=r")
    res = check_stopped(r, runs_dir / "digits_diffusion_teacher" / "r")
    assert res["nonfinite"]["term"] == "train/loss"
    assert "callbacks.nonfinite=skip" in r.stderr  # the way to skip instead


def test_cli_skip_mode_counts_and_stops_after_k(cli, runs_dir):
    """No warmup: update 1 makes the weights huge, every later loss is NaN; each such update is
    skipped (the weights stay finite, checkpoints go on) until 3 in a row stop the run."""
    r = cli(*DIVERGING, "optim.scheduler.name=none", "callbacks.checkpoint_every_n_steps=1", "callbacks.nonfinite=skip",
            "callbacks.max_nonfinite_skips=3", f"runs_dir={runs_dir}", "name=r")
    run = runs_dir / "digits_diffusion_teacher" / "r"
    res = check_stopped(r, run, every=1)
    assert res["nonfinite"] == {"step": 4, "term": "train/loss", "skipped": 3}
    assert "3 updates in a row were non-finite" in r.stderr
    assert r.output.count("update skipped") == 2
    rows = (run / "metrics.csv").read_text().splitlines()
    col = rows[0].split(",").index("train/nonfinite_skipped")
    assert [float(row.split(",")[col]) for row in rows[1:] if row.split(",")[col]] == [0.0, 1.0, 2.0]
    ck = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert ck["callbacks"]["NonFiniteGuard"] == {"skipped": 2, "in_a_row": {"model": 2}}


def test_cli_dmd2_stops_cleanly(cli, tmp_path):
    """Manual optimization (generator and critic): the critic's update after a huge generator step."""
    from test_dmd import digits_teacher

    teacher = digits_teacher(tmp_path / "t.pt")
    runs = tmp_path / "runs"
    r = cli("experiment=digits_dmd2", f"teacher.checkpoint={teacher}", f"runs_dir={runs}", "name=r", "eval=none",
            "optim.optimizer.lr=1e8", "trainer.max_steps=10", "trainer.max_epochs=-1",
            "method.critic_updates_per_generator_update=2", "dataset.batch_size=16", "callbacks.checkpoint_every_n_steps=1",
            "callbacks.progress=none", "trainer.limit_val_batches=1", "trainer.test_after_fit=false")
    res = check_stopped(r, runs / "digits_dmd2" / "r", every=1)
    assert res["nonfinite"]["term"] in ("critic loss", "generator loss") or "gradient of" in res["nonfinite"]["term"]


@pytest.mark.ddp
def test_cli_ddp_every_rank_stops(cli, runs_dir):
    """Two gloo processes: the ranks reduce the decision, both stop at the same update, no hang."""
    r = cli(*DIVERGING, f"runs_dir={runs_dir}", "name=r", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.strategy=ddp", timeout=600)
    check_stopped(r, runs_dir / "digits_diffusion_teacher" / "r")
