"""Bad input stops the run at start with one clear message naming the key, a non-zero exit
code and no traceback; nothing already in the run dir is overwritten."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

SMOKE = ("debug=smoke", "callbacks.progress=none")


def _clean_error(r, *needles):
    assert r.returncode != 0, r.output
    assert "Traceback" not in r.output, r.output
    for n in needles:
        assert n in r.output, f"{n!r} not in:\n{r.output}"


@pytest.mark.parametrize("args, needles", [
    (["method=kdd"], ["method", "kd", "dkd", "fitnet"]),                       # unknown option, lists allowed
    (["method=kd", "method.temperatur=2"], ["method.temperatur", "temperature"]),  # misspelt key, suggestion
    (["seeed=1"], ["seeed", "seed"]),                                              # top-level typo
    (["trainer.max_steps=abc"], ["trainer.max_steps", "abc"]),                    # wrong type
    (["resume=sometimes"], ["resume", "auto", "force", "never"]),                 # enum lists its values
    (["method=kd", "teacher=cnn_digits"], ["teacher.checkpoint"]),               # missing required value
    (["dataset=cifar100"], ["dataset.data_dir"]),                                   # missing required value
    (["method=kd"], ["method=kd needs a teacher", "teacher.checkpoint"]),        # method needs a teacher
    # weights without an architecture: teacher=none has no checkpoint key
    (["method=kd", "teacher.checkpoint=x.pt"], ["teacher=none has no checkpoint", "teacher=cnn_digits"]),
    (["trainer.limit_val_batches=-1"], ["trainer.limit_val_batches=-1: must be at least 0"]),
    (["callbacks.ema.enabled=true", "callbacks.ema.decay=1.5"], ["callbacks.ema.decay=1.5", "[0, 1]"]),  # out of range
    (["trainer.compile=fast"], ["trainer.compile='fast'", "max-autotune-no-cudagraphs"]),  # lists the modes
    (["trainer.compile=reduce-overhead"], ["trainer.compile=reduce-overhead", "CUDA-graph", "default"]),
    # values outside a schema field's bounds (distillkit.config.bounded): torch or Lightning would
    # fail on them only once training starts
    (["dataset.batch_size=0"], ["dataset.batch_size=0: must be at least 1"]),
    (["optim.optimizer.lr=-1"], ["optim.optimizer.lr=-1.0: must be at least 0"]),
    (["trainer.max_steps=-5"], ["trainer.max_steps=-5: must be at least -1"]),
    (["method=kd", "method.temperature=0"], ["method.temperature=0.0: must be above 0"]),
    (["trainer.accumulate_grad_batches=0", "dataset.eval_batch_size=0"],
     ["trainer.accumulate_grad_batches=0: must be at least 1", "dataset.eval_batch_size=0: must be at least 1"]),
    # settings only Lightning knows: its own message, with the trainer overrides given
    (["trainer.strategy=dpp"], ["Lightning refused the trainer settings", "trainer.strategy=dpp", "invalid strategy"]),
    (["trainer.precision=bf17"], ["trainer.precision=bf17", "Precision 'bf17' is invalid"]),
    pytest.param(["trainer.accelerator=gpu"], ["trainer.accelerator=gpu", "gpu"],
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    (["dataset.batch_size=5000"], ["dataset.batch_size=5000", "fewer than one batch"]),
    # keys the paper's settings of method=dmd2 with model=sdxl put in (conf/paper/) name the choice missing
    (["method=dmd2", "model=sdxl", "model.pretrained=/m"],
     ["conf/paper/dmd2_sdxl.yaml", "teacher=none has no pretrained", "choose teacher=sdxl"]),
    (["method=dmd2", "model=sd15", "teacher=sd15", "model.pretrained=/m"],
     ["conf/paper/dmd2_sd15.yaml", "the default dataset has no resolution", "dataset=coco_captions"]),
])
def test_config_errors_are_one_clear_message(cli, runs_dir, args, needles):
    r = cli(*args, f"runs_dir={runs_dir}", *SMOKE)
    _clean_error(r, *needles)
    assert r.returncode == 2
    # found before the run dir is written: no config.yaml blocks the corrected command
    assert not list(runs_dir.rglob("config.yaml")), r.output


def test_every_bounded_field_keeps_its_bounds_in_subclasses():
    """A schema subclass that changes a bounded field's default must declare it with bounded()
    again; a plain override would silently drop the check."""
    from dataclasses import fields

    from distillkit.config import SCHEMAS

    for options in SCHEMAS.values():
        for schema in options.values():
            for base in schema.__mro__[1:]:
                bounded = {f.name for f in fields(base) if "bounds" in f.metadata} if hasattr(base, "__dataclass_fields__") else set()
                lost = [f.name for f in fields(schema) if f.name in bounded and "bounds" not in f.metadata]
                assert not lost, f"{schema.__name__} drops the bounds of {lost} declared in {base.__name__}"


@pytest.mark.parametrize("args, line", [
    # a misspelt group option: the closest, then the group's options
    (["method=kdd"], "unknown option method=kdd. Did you mean method=kd? Options of method: consistency, diffusion, dkd,"),
    (["dataset=digit"], "unknown option dataset=digit. Did you mean dataset=digits? Options of dataset: cifar10,"),
    (["experiment=digits_kdd"], "Did you mean experiment=digits_kd?"),
    (["model=zzz"], "unknown option model=zzz. Options of model: cnn_digits, mlp2d,"),  # nothing close: the list
    # a key at the wrong depth: the key that exists, in the group the user was in first
    (["optim.lr=0.1"], "unknown key 'optim.lr'. Did you mean 'optim.optimizer.lr'? Keys allowed in optim: optimizer,"),
    (["lr=0.1"], "Did you mean 'optim.optimizer.lr' or 'critic_optim.lr'?"),
    (["optim.name=cosine"], "Did you mean 'optim.scheduler.name'?"),
    (["scheduler.name=cosine"], "unknown key 'scheduler'. Did you mean 'optim.scheduler.name'?"),
    (["ema.decay=0.9"], "Did you mean 'callbacks.ema.decay'?"),
    (["optim.lrr=0.1"], "Did you mean 'optim.optimizer.lr'?"),  # misspelt and at the wrong depth
    (["method=kd", "temperature=2"], "Did you mean 'method.temperature'?"),  # the keys of the chosen option
    # a value given to a node of keys
    (["optim.scheduler=cosine"], "optim.scheduler=cosine: optim.scheduler holds keys (name, milestones"),
    (["callbacks.ema=true"], "e.g. callbacks.ema.enabled=true"),
])
def test_typos_are_answered_with_what_exists(cli, runs_dir, args, line):
    r = cli(*args, f"runs_dir={runs_dir}", *SMOKE)
    _clean_error(r, line)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # one line: the key and what to use


def test_hydra_full_error_shows_traceback(cli, runs_dir):
    r = cli("method=kdd", f"runs_dir={runs_dir}", env={"HYDRA_FULL_ERROR": "1"})
    assert r.returncode != 0 and "Traceback" in r.output
    r = cli("optim.lr=0.1", f"runs_dir={runs_dir}", env={"HYDRA_FULL_ERROR": "1"})
    assert r.returncode != 0 and "Traceback" in r.output and "optim.optimizer.lr" in r.output


def test_wrong_data_dir_names_the_key(cli, runs_dir, tmp_path):
    r = cli("dataset=cifar100", f"dataset.data_dir={tmp_path / 'nope'}", "model=resnet8", f"runs_dir={runs_dir}", *SMOKE)
    _clean_error(r, "dataset.data_dir")


def _snapshot(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir())
            if p.is_file() and p.suffix != ".log"}


@pytest.mark.parametrize("problem", ["missing", "corrupt", "truncated", "wrong_arch"])
def test_bad_teacher_checkpoint_leaves_run_dir_untouched(cli, runs_dir, tmp_path, digits_teacher_ckpt, problem):
    teacher = tmp_path / "teacher.ckpt"
    teacher.write_bytes(digits_teacher_ckpt.read_bytes())
    args = ["experiment=digits_kd", f"teacher.checkpoint={teacher}", f"runs_dir={runs_dir}", "name=kd", *SMOKE]
    assert cli(*args).returncode == 0
    run = runs_dir / "digits_kd" / "kd"
    before = _snapshot(run)
    assert {"config.yaml", "last.ckpt", "results.json", "metrics.csv"} <= set(before)
    # extend the run, so that it loads its teacher again (rerun unchanged, a finished run is left
    # alone before anything is loaded: tests/test_rerun.py)
    args.append("trainer.max_steps=8")
    if problem == "missing":
        teacher.unlink()
        needles = ["teacher.checkpoint", "no such file"]
    elif problem == "corrupt":
        teacher.write_bytes(b"this is not a checkpoint" * 10)
        needles = ["teacher.checkpoint", "cannot read weights"]
    elif problem == "truncated":
        teacher.write_bytes(digits_teacher_ckpt.read_bytes()[:5000])
        needles = ["teacher.checkpoint", "cannot read weights"]
    else:
        args.append("teacher.width=32")  # the file holds a width-64 network
        needles = ["teacher.checkpoint", "do not fit"]
    r = cli(*args)
    _clean_error(r, *needles)
    assert _snapshot(run) == before


def test_a_damaged_dataset_file_is_one_message(cli, runs_dir, tmp_path):
    """Reading the data happens before the run dir is written, and a file that is not what its
    name says is named in one message (not the unpickler's traceback)."""
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / name).write_bytes(b"<html>not found</html>")
    r = cli("experiment=cifar10_diffusion_teacher", f"dataset.data_dir={tmp_path}", f"runs_dir={runs_dir}", *SMOKE)
    _clean_error(r, "distill: error: dataset: ", "data_batch_1 is not a CIFAR batch file")
    assert r.returncode == 2 and not list(runs_dir.rglob("config.yaml"))


def test_a_bad_pretrained_folder_is_one_message_without_hydras_wrapper(cli, runs_dir, tmp_path):
    from PIL import Image

    (tmp_path / "images" / "a").mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(tmp_path / "images" / "a" / f"{i}.png")
    folder = tmp_path / "unet"
    folder.mkdir()
    base = ["experiment=celebahq_progressive", f"teacher.pretrained={folder}", f"runs_dir={runs_dir}",
            f"dataset.data_dir={tmp_path / 'images'}", "dataset.batch_size=2", *SMOKE]
    r = cli(*base)
    _clean_error(r, f"pretrained={folder}: no diffusers UNet folder there")
    assert "Error in call to target" not in r.output and "DistillError(" not in r.output
    (folder / "config.json").write_text("{not json")
    r = cli(*base)
    _clean_error(r, "model: cannot build", f"{folder / 'config.json'}", "not a valid JSON file")
    assert "Error in call to target" not in r.output


def test_missing_teacher_run_names_the_experiment_that_trains_it(cli, runs_dir):
    """digits_kd's teacher path is digits_teacher's last.ckpt: a new user who skipped that run is
    told which command writes it; a path that is not a run's checkpoint gets no such hint."""
    r = cli("experiment=digits_kd", f"runs_dir={runs_dir}", *SMOKE)
    _clean_error(r, "teacher.checkpoint", "no such file", "`distill experiment=digits_teacher`: train that first")
    wide = runs_dir / "digits_teacher" / "wide" / "last.ckpt"
    r = cli("experiment=digits_kd", f"runs_dir={runs_dir}", f"teacher.checkpoint={wide}", *SMOKE)
    _clean_error(r, "`distill experiment=digits_teacher` (the run named 'wide')")
    r = cli("experiment=digits_kd", f"runs_dir={runs_dir}", f"teacher.checkpoint={runs_dir / 'teacher.ckpt'}", *SMOKE)
    _clean_error(r, "no such file")
    assert "train that first" not in r.output


@pytest.mark.parametrize("sweep, needles", [
    (["model.widht=4,6"], ["model.widht=4", "Did you mean 'model.width'?"]),
    (["model.width=4,six"], ["model.width=six", "model.width"]),
])
def test_a_sweep_with_a_bad_job_stops_before_any_job(cli, runs_dir, sweep, needles):
    """distill -m checks every job of the sweep first: one message naming the job, and no job
    starts (on a cluster none is submitted)."""
    r = cli("-m", "experiment=digits_student", f"runs_dir={runs_dir}", *SMOKE, *sweep)
    _clean_error(r, "distill: error: the sweep's job", *needles)
    assert r.returncode == 2 and not any(runs_dir.iterdir()), r.output


def test_a_sweep_runs_each_job_in_its_own_run_dir(cli, runs_dir):
    r = cli("-m", "experiment=digits_student", f"runs_dir={runs_dir}", *SMOKE, "model.width=4,6")
    assert r.returncode == 0, r.output
    for w in (4, 6):
        assert (runs_dir / "digits_student" / f"debug=smoke,model.width={w}" / "last.ckpt").is_file()


def test_changed_config_refuses_to_resume(cli, runs_dir):
    base = ["experiment=digits_student", f"runs_dir={runs_dir}", "name=fixed", *SMOKE]
    assert cli(*base, "model.width=4").returncode == 0
    run = runs_dir / "digits_student" / "fixed"
    before = _snapshot(run)
    r = cli(*base, "model.width=6")
    _clean_error(r, "different config", "model.width: 4 -> 6", "name=", "resume=force")
    assert _snapshot(run) == before
    # resume anyway: the old config is kept next to the new one
    r = cli(*base, "model.width=4", "trainer.max_steps=8", "resume=force")
    assert r.returncode == 0, r.output


def test_a_damaged_last_ckpt_is_one_message_and_stays_as_it_is(cli, runs_dir):
    """A last.ckpt cut short after it was written (a copy, a full disk) stops the resume with a
    message naming the file, not torch's zip error from inside Lightning's restore."""
    base = ["experiment=digits_student", f"runs_dir={runs_dir}", "name=fixed", *SMOKE]
    assert cli(*base).returncode == 0
    ckpt = runs_dir / "digits_student" / "fixed" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:3000])
    before = _snapshot(ckpt.parent)
    r = cli(*base, "trainer.max_steps=20")
    _clean_error(r, f"{ckpt}: cannot be read as a checkpoint", "Put back a good copy", "move it away")
    assert r.returncode == 2
    assert _snapshot(ckpt.parent) == before


def test_a_run_that_wrote_only_its_config_does_not_block_the_corrected_command(cli, runs_dir):
    """A run that stopped before its first checkpoint (e.g. a bad value found once training ran)
    left only config.yaml: the corrected command starts afresh in the same run dir, keeping the
    earlier config as config.1.yaml. With a checkpoint there it still refuses
    (test_changed_config_refuses_to_resume)."""
    base = ["experiment=digits_student", f"runs_dir={runs_dir}", "name=fixed", *SMOKE]
    assert cli(*base, "model.width=4").returncode == 0
    run = runs_dir / "digits_student" / "fixed"
    for f in run.iterdir():  # as if that run had stopped before its first checkpoint
        if f.name != "config.yaml" and f.is_file():
            f.unlink()
    r = cli(*base, "model.width=6")
    assert r.returncode == 0, r.output
    assert "earlier config is kept as config.1.yaml" in r.output
    assert "width: 4" in (run / "config.1.yaml").read_text()
    assert "width: 6" in (run / "config.yaml").read_text()
    assert (run / "last.ckpt").is_file()


def test_same_command_resumes_and_finished_run_is_not_redone(cli, runs_dir):
    args = ["experiment=digits_student", f"runs_dir={runs_dir}", *SMOKE]
    assert cli(*args).returncode == 0
    import torch

    (first,) = (runs_dir / "digits_student").iterdir()
    ckpt = torch.load(first / "last.ckpt", map_location="cpu", weights_only=True)
    (first_wall,) = [s["wall_s"] for s in ckpt["callbacks"].values() if "wall_s" in s]
    assert first_wall > 0
    r = cli(*args, "trainer.max_steps=9", "trainer.max_epochs=5")  # may change: same run dir, continues
    assert r.returncode == 0, r.output
    assert "resuming from" in r.output
    import json

    runs = list((runs_dir / "digits_student").iterdir())
    assert len(runs) == 1  # the same run dir, named after the overrides
    run = runs[0]
    assert run.name == "debug=smoke"  # callbacks.progress and trainer.max_steps do not name runs
    results = json.loads((run / "results.json").read_text())
    assert results["global_step"] == 9
    # the wall time counts the first session too, up to its last checkpoint
    assert results["wall_s"] == pytest.approx(first_wall + results["session_wall_s"], abs=2e-3)
    import csv

    steps = {int(r["step"]) for r in csv.DictReader((run / "metrics.csv").open()) if r.get("step")}
    assert min(steps) < 5 and max(steps) >= 8, steps  # rows of both sessions: nothing lost on resume


def test_help_shows_usage_groups_and_the_composed_config(cli):
    r = cli("experiment=digits_kd", "--help")
    assert r.returncode == 0, r.output
    out = r.output
    assert out.startswith("distill: distil neural networks") and "powered by Hydra" not in out
    assert "  method      consistency, diffusion, dkd, dmd, dmd2, dsd, fitnet, kd, lcm, progressive, supervised,\n" \
           "              tsd" in out
    assert "3 non-finite" in out  # the exit statuses
    assert "schema/" not in out  # the schema groups are not for the command line
    assert "temperature: 4.0" in out and "$CONFIG" not in out  # the experiment's composed config
