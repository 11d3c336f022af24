"""Run dirs a user can find again: short names (a path override as its file's name and a hash,
an override equal to the default left out), commands.log with every session's command line,
the config each checkpoint was trained under, the teacher found under another runs dir, and no
run dir left behind by a run that fails before training."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
# Only keys that may change on resume (conf/config.yaml exclude_keys): they shorten the runs
# without naming them, so the names below are exactly what the overrides under test make.
FAST = ("trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        "callbacks.progress=none")


def _teacher(path: Path) -> Path:
    """A weights file for experiment=digits_kd's teacher (cnn_digits, width 64), untrained: the
    runs here test names and files, not accuracy."""
    from distillkit.models.cnn import DigitsCNN

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(DigitsCNN(width=64).state_dict(), path)
    return path


def _dirs(parent: Path) -> set[str]:
    return {p.name for p in parent.iterdir() if p.is_dir()}


def _ok(r) -> None:
    assert r.returncode == 0, r.output


def test_a_sweep_over_seeds_makes_default_and_seed_1(cli, runs_dir):
    """seed=0 is the default: its job shares the run dir of the command without it, and that
    command afterwards finds the run finished. The benchmark scripts predict the same dirs."""
    r = cli("-m", "experiment=digits_student", "seed=0,1", f"runs_dir={runs_dir}", *FAST)
    _ok(r)
    exp = runs_dir / "digits_student"
    assert _dirs(exp) == {"default", "seed=1"}, r.output
    log = (exp / "seed=1" / "commands.log").read_text()
    assert "fresh: python -m distillkit.cli -m experiment=digits_student seed=0,1" in log
    assert "# sweep job 1: experiment=digits_student seed=1" in log
    r = cli("experiment=digits_student", f"runs_dir={runs_dir}", *FAST)
    _ok(r)
    assert f"run {exp / 'default'} is finished" in r.output
    assert _dirs(exp) == {"default", "seed=1"}

    sys.path.insert(0, str(REPO / "scripts"))
    import bench_kd_digits

    plan = bench_kd_digits.Runner(runs_dir)._plan
    for seed, name in ((0, "default"), (1, "seed=1")):
        assert plan(["experiment=digits_student", f"seed={seed}", f"runs_dir={runs_dir}", *FAST])[0] == exp / name


def test_a_path_override_names_the_run_by_its_file_and_a_hash(cli, runs_dir, tmp_path):
    teacher = _teacher(tmp_path / "teachers" / "wide" / "last.ckpt")
    r = cli("experiment=digits_kd", f"teacher.checkpoint={teacher}", f"runs_dir={runs_dir}", *FAST)
    _ok(r)
    digest = hashlib.sha1(str(teacher).encode()).hexdigest()[:6]
    assert _dirs(runs_dir / "digits_kd") == {f"teacher.checkpoint=last-{digest}"}
    # the experiment's own teacher path, given explicitly, and seed=0 change nothing: `default`
    _teacher(runs_dir / "digits_teacher" / "default" / "last.ckpt")
    r = cli("experiment=digits_kd", f"teacher.checkpoint={runs_dir}/digits_teacher/default/last.ckpt", "seed=0",
            f"runs_dir={runs_dir}", *FAST)
    _ok(r)
    assert _dirs(runs_dir / "digits_kd") == {f"teacher.checkpoint=last-{digest}", "default"}


def test_an_interpolated_path_names_the_run_by_the_path_it_resolves_to_as_the_benchmarks_predict(cli, runs_dir):
    """'teacher.checkpoint=${runs_dir}/...' is named by the resolved path's file and hash, and the
    benchmark scripts' Runner predicts that dir (it once hashed the unresolved text and missed it)."""
    teacher = _teacher(runs_dir / "teachers" / "last.ckpt")
    overrides = ["experiment=digits_kd", "teacher.checkpoint=${runs_dir}/teachers/last.ckpt", f"runs_dir={runs_dir}", *FAST]
    _ok(cli(*overrides))
    digest = hashlib.sha1(str(teacher).encode()).hexdigest()[:6]
    assert _dirs(runs_dir / "digits_kd") == {f"teacher.checkpoint=last-{digest}"}

    sys.path.insert(0, str(REPO / "scripts"))
    import bench_kd_digits

    assert bench_kd_digits.Runner(runs_dir)._plan(overrides)[0] == runs_dir / "digits_kd" / f"teacher.checkpoint=last-{digest}"


def test_names_leave_out_group_options_the_config_already_has():
    """method=kd and model=cnn_digits are what experiment=digits_kd chooses; debug=smoke is not."""
    from distillkit.compose import register_resolvers, run_name_for
    from distillkit.config import register_configs

    register_configs()
    register_resolvers()
    exclude = ["experiment", "runs_dir"]
    assert run_name_for(["experiment=digits_kd", "method=kd", "model=cnn_digits", "debug=smoke"], exclude) == "debug=smoke"
    assert run_name_for(["experiment=digits_kd", "method=dkd", "seed=0"], exclude) == "method=dkd"
    assert run_name_for(["experiment=digits_kd", "model.width=8"], exclude) == "default"  # digits_student's width
    assert run_name_for(["experiment=digits_kd", "model.width=16"], exclude) == "model.width=16"


def test_commands_log_and_the_config_of_each_session(cli, runs_dir):
    """Extending a finished run from 2 to 4 updates: config.yaml stays the run's first config,
    config.1.yaml is the one the new checkpoint was trained under, and commands.log says so. Running
    the finished command again is no session: it writes nothing."""
    base = ["experiment=digits_student", "name=mine", f"runs_dir={runs_dir}", *FAST[1:]]
    _ok(cli(*base, "trainer.max_steps=2"))
    _ok(cli(*base, "trainer.max_steps=4"))
    run = runs_dir / "digits_student" / "mine"
    log = (run / "commands.log").read_text()
    sessions = [line for line in log.splitlines() if not line.startswith(" ")]
    assert len(sessions) == 2, log
    assert sessions[0].endswith("Z fresh: python -m distillkit.cli " + " ".join([*base, "trainer.max_steps=2"]))
    assert sessions[1].endswith("Z extended from step 2: python -m distillkit.cli "
                                + " ".join([*base, "trainer.max_steps=4"]))
    assert "  config.1.yaml: this session's config; changed since step 2:\n    trainer.max_steps: 2 -> 4\n" in log
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 2
    assert yaml.safe_load((run / "config.1.yaml").read_text())["trainer"]["max_steps"] == 4
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["distillkit"]["config"]["trainer"]["max_steps"] == 4

    r = cli(*base, "trainer.max_steps=4")
    _ok(r)
    assert "is finished" in r.output
    assert (run / "commands.log").read_text() == log


def test_a_missing_teacher_names_the_one_under_another_runs_dir(cli, tmp_path):
    """After `make demo` (its digits teacher in runs/demo) the README's `distill experiment=digits_kd`
    is told the exact override, which then works; the failed run leaves no run dir."""
    _teacher(tmp_path / "runs" / "demo" / "digits_teacher" / "default" / "last.ckpt")
    r = cli("experiment=digits_kd", *FAST, cwd=tmp_path)
    assert r.returncode == 2, r.output
    assert "`distill experiment=digits_teacher`: train that first. A run of it is in runs/demo: to use that one, " \
           "add teacher.checkpoint=runs/demo/digits_teacher/default/last.ckpt" in r.output, r.output
    assert _dirs(tmp_path / "runs") == {"demo"}
    r = cli("experiment=digits_kd", "teacher.checkpoint=runs/demo/digits_teacher/default/last.ckpt", *FAST, cwd=tmp_path)
    _ok(r)
    assert (tmp_path / "runs" / "digits_kd").is_dir()


@pytest.mark.parametrize("args, needle", [
    (["dataset=cifar10", "dataset.data_dir=/no/such/dir"], "dataset.data_dir='/no/such/dir' does not exist"),
    (["trainer.strategy=dpp"], "Lightning refused the trainer settings"),
])
def test_a_run_that_fails_before_training_leaves_no_run_dir(cli, runs_dir, args, needle):
    r = cli(*args, f"runs_dir={runs_dir}", *FAST)
    assert r.returncode == 2 and needle in r.output, r.output
    assert not any(runs_dir.iterdir()), sorted(runs_dir.rglob("*"))


def test_a_failed_run_keeps_a_run_dir_an_earlier_session_wrote_to(cli, runs_dir):
    args = ["experiment=digits_student", "dataset.batch_size=5000", f"runs_dir={runs_dir}", *FAST]
    r = cli(*args)
    assert r.returncode == 2 and "fewer than one batch" in r.output, r.output
    assert not any(runs_dir.iterdir())
    run = runs_dir / "digits_student" / "dataset.batch_size=5000"
    run.mkdir(parents=True)
    (run / "cli.log").write_text("an earlier session's log\n")
    r = cli(*args)
    assert r.returncode == 2, r.output
    assert (run / "cli.log").read_text().startswith("an earlier session's log\n")
