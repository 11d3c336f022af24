"""``trainer.compile``: the student's and the teacher's forwards in training run through
``torch.compile`` and nothing else changes: the same updates (to float tolerance), the same checkpoint keys, resumable either
way, and the copies a method makes of the student stay independent networks."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from distillkit.errors import DistillError

TOY = ["dataset=toy2d", "model=mlp2d", "schedule=cosine", "schedule.num_train_timesteps=1024", "debug=smoke",
       "callbacks.progress=none", "dataset.batch_size=32", "trainer.test_after_fit=false", "trainer.max_epochs=-1"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


def assert_compiled_trains_like_eager(cli, runs_dir: Path, *args: str) -> None:
    """Train the same run eagerly and compiled; the same checkpoint keys, weights equal to float
    tolerance."""
    runs = {}
    for name, mode in (("eager", "null"), ("compiled", "default")):
        r = cli(*args, f"trainer.compile={mode}", f"runs_dir={runs_dir}", f"name={name}")
        assert r.returncode == 0, r.output
        runs[name] = _weights(next(runs_dir.glob(f"*/{name}")))
    wa, wb = runs["eager"], runs["compiled"]
    assert sorted(wa) == sorted(wb)  # the compiled wrapper adds no keys
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst < 1e-3, worst  # inductor's kernels round differently, nothing more


@pytest.mark.parametrize("method", [
    ["method=diffusion"],
    # two gloo ranks: rank 0's weights match only if the compiled backward's gradients are all-reduced
    ["method=diffusion", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"],
    # two round changes: each round's teacher is a new network, compiled afresh
    ["teacher=mlp2d", "method=progressive", "method.teacher_steps=8", "method.final_steps=2",
     "method.updates_per_round=4"],
    # the DSD target network is an EMA copy of the student; its evaluation 2 stays eager
    ["teacher=self", "method=dsd", "method.variant=dsdi", "method.target=ema", "method.denoise_weight=0.5",
     "method.teacher_steps=8", "method.final_steps=2", "method.updates_per_level=4"],
    # DMD2: the generator, the guided teacher's pair and the fake score (both turns) compiled; the
    # GAN's bottleneck pass (a forward stopped by a hook) stays eager
    ["teacher=mlp2d", "method=dmd2", "method.critic_updates_per_generator_update=2", "method.real_guidance=1.5"],
], ids=["diffusion", "diffusion_ddp", "progressive", "dsdi", "dmd2"])
def test_compiled_training_matches_eager(cli, runs_dir, toy_teacher, method):
    teacher = [f"teacher.checkpoint={toy_teacher}"] if "teacher=mlp2d" in method else []
    assert_compiled_trains_like_eager(cli, runs_dir, *TOY, *method, *teacher, "trainer.max_steps=8")


def test_compiled_fitnet_matches_eager(cli, runs_dir, digits_teacher_ckpt):
    """A classifier method with a teacher: both forwards compiled, FitNet's hint hooks on both."""
    assert_compiled_trains_like_eager(cli, runs_dir, "experiment=digits_fitnet", f"teacher.checkpoint={digits_teacher_ckpt}",
                                      "debug=smoke", "callbacks.progress=none", "trainer.test_after_fit=false")


def test_an_eager_run_resumes_compiled(cli, runs_dir):
    args = [*TOY, "method=diffusion", f"runs_dir={runs_dir}", "name=run"]
    assert cli(*args, "trainer.max_steps=4").returncode == 0
    # trainer.compile is not part of the run's identity: the same run goes on, compiled
    r = cli(*args, "trainer.max_steps=8", "trainer.compile=true")
    assert r.returncode == 0, r.output
    assert "resuming from" in r.output
    run = next(runs_dir.glob("*/run"))
    assert json.loads((run / "results.json").read_text())["global_step"] == 8


def test_compiled_wrappers_stay_out_of_the_module_tree():
    from distillkit.methods.supervised import Supervised
    from distillkit.models.mlp import MLPDenoiser

    student = MLPDenoiser()
    method = Supervised(student)
    keys = sorted(method.state_dict())
    method.set_compile("default")
    assert method.train_student is not student and method.train_student._orig_mod is student
    assert method.train_student is method.train_student  # one wrapper, compiled once
    assert sorted(method.state_dict()) == keys
    assert {id(p) for p in method.parameters()} == {id(p) for p in student.parameters()}
    # a copy made after compiling (a round's teacher, an EMA) is an eager network of its own
    twin = copy.deepcopy(method.student)
    assert type(twin) is MLPDenoiser
    with torch.no_grad():
        for p in twin.parameters():
            p.zero_()
    x, t = torch.randn(4, 2), torch.randint(0, 1000, (4,))
    assert not torch.equal(twin(x, t), student(x, t))
    with pytest.raises(DistillError, match="trainer.compile='fast'"):
        method.set_compile("fast")


def test_a_compiler_failure_is_one_clear_error_and_keeps_the_run(cli, runs_dir, tmp_path):
    """No working C++ compiler (inductor's CPU backend needs one): one message naming the key and
    the way out, no traceback, and the run's checkpoint as it was."""
    args = [*TOY, "method=diffusion", f"runs_dir={runs_dir}", "name=run"]
    assert cli(*args, "trainer.max_steps=4").returncode == 0
    ckpt = next(runs_dir.glob("*/run")) / "last.ckpt"
    before = ckpt.read_bytes()
    # an empty inductor cache, so the graphs the other tests compiled are not simply reloaded
    env = {"CXX": "/nonexistent/g++", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "0"}
    r = cli(*args, "trainer.max_steps=8", "trainer.compile=default", env=env)
    assert r.returncode == 2, r.output
    assert "Traceback" not in r.output
    assert "trainer.compile=default" in r.output and "trainer.compile=null" in r.output
    assert ckpt.read_bytes() == before


def test_the_teacher_is_compiled_and_recompiled_when_it_changes():
    """A frozen teacher's forward goes through its own wrapper; a new teacher (the next round's)
    gets a new one, and the old network is not kept alive by the old wrapper."""
    import weakref

    from distillkit.methods.kd import KD

    torch.manual_seed(0)
    method = KD(torch.nn.Linear(4, 3), teacher=torch.nn.Linear(4, 3))
    method.set_compile("default")
    x = torch.randn(2, 4)
    first = method.teacher
    torch.testing.assert_close(method.teacher_forward(x), first(x))
    assert method.__dict__["_compiled_teacher"]._orig_mod is first
    gone = weakref.ref(first)
    object.__setattr__(method, "teacher", torch.nn.Linear(4, 3).requires_grad_(False))  # as a round change does
    del first
    torch.testing.assert_close(method.teacher_forward(x), method.teacher(x))
    assert method.__dict__["_compiled_teacher"]._orig_mod is method.teacher
    assert gone() is None
