"""Running a finished run's command again: it says the run is finished and where its results are,
exits 0 and touches none of its files; a larger trainer.max_steps / max_epochs resumes it and keeps
every earlier result (results.json merges them, metrics.csv repeats no (step, metric))."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import run_cli

# 3 updates per epoch (batch 16, limit_train_batches=3): the first session validates at the end of
# its epoch 0 (step 3) and stops at max_steps=4, mid-epoch.
ARGS = ("experiment=digits_student", "dataset.batch_size=16", "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.log_every_n_steps=1",
        "trainer.check_val_every_n_epoch=1", "callbacks.progress=none", "name=mine")
FILES = ("results.json", "metrics.csv", "last.ckpt", "config.yaml", "student.safetensors")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A run finished at its max_steps=4 (a validation at step 3, a test at the end)."""
    runs = tmp_path_factory.mktemp("rerun")
    r = run_cli(*ARGS, f"runs_dir={runs}", "trainer.max_steps=4")
    assert r.returncode == 0, r.output
    run = runs / "digits_student" / "mine"
    res = json.loads((run / "results.json").read_text())
    assert res["global_step"] == 4 and "val/loss" in res and "test/acc" in res
    mask = os.umask(0)
    os.umask(mask)  # the student's weights get the umask's mode (safetensors writes 0600)
    assert (run / "student.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    return run


def snapshot(run: Path) -> dict:
    return {f: ((run / f).read_bytes(), (run / f).stat().st_mtime_ns) for f in FILES}


def copy_run(run: Path, runs: Path) -> Path:
    dest = runs / "digits_student" / "mine"
    shutil.copytree(run, dest)
    return dest


def test_rerun_of_a_finished_run_changes_nothing(finished, tmp_path):
    run = copy_run(finished, tmp_path / "runs")
    before = snapshot(run)
    r = run_cli(*ARGS, f"runs_dir={tmp_path / 'runs'}", "trainer.max_steps=4")
    assert r.returncode == 0, r.output
    assert f"run {run} is finished" in r.stdout and str(run / "results.json") in r.stdout, r.output
    assert "raise trainer.max_steps" in r.stdout
    assert "Traceback" not in r.output and "Restored all states" not in r.output  # no fit, no test
    assert snapshot(run) == before


def test_an_option_added_since_the_run_at_its_default_is_no_change(finished, tmp_path):
    """A run dir written before an option existed (its config.yaml lacks the key): the option at its
    schema default changes nothing, so the rerun finds the run finished; at another value it is a
    change, and the rerun is refused naming the key."""
    import yaml

    run = copy_run(finished, tmp_path / "runs")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["trainer"]["compile"] is None and cfg["trainer"]["limit_train_batches"] == 3
    del cfg["trainer"]["compile"]  # schema default: None
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli(*ARGS, f"runs_dir={tmp_path / 'runs'}", "trainer.max_steps=4")
    assert r.returncode == 0 and f"run {run} is finished" in r.stdout, r.output
    del cfg["trainer"]["limit_train_batches"]  # set by ARGS to 3, not its default
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    r = run_cli(*ARGS, f"runs_dir={tmp_path / 'runs'}", "trainer.max_steps=4")
    assert r.returncode != 0 and "trainer.limit_train_batches: (absent) -> 3" in r.output, r.output
    assert "trainer.compile" not in r.output and "Traceback" not in r.output


def metric_rows(path: Path) -> list[tuple[int, str]]:
    """(step, metric) of every value in metrics.csv."""
    with path.open(newline="") as f:
        return [(int(row["step"]), k) for row in csv.DictReader(f)
                for k, v in row.items() if k not in ("step", "epoch") and v != ""]


def test_extending_a_finished_run_continues_as_an_uninterrupted_run(tmp_path):
    """A run finished mid-epoch (4 updates, 3 an epoch) and extended to 6 ends bit for bit as a run
    of 6 from the start: the rest of its epoch is not skipped. (A constant learning rate: a cosine
    schedule is stretched over the new trainer.max_steps by design.)"""
    import torch

    args = (*ARGS, "optim.scheduler.name=none")
    r = run_cli(*args, f"runs_dir={tmp_path / 'cut'}", "trainer.max_steps=4")
    assert r.returncode == 0, r.output
    run = tmp_path / "cut" / "digits_student" / "mine"
    assert torch.load(run / "last.ckpt", weights_only=True)["epoch"] == 1  # mid-epoch 1
    r = run_cli(*args, f"runs_dir={tmp_path / 'cut'}", "trainer.max_steps=6")
    assert r.returncode == 0, r.output
    whole = run_cli(*args, f"runs_dir={tmp_path / 'whole'}", "trainer.max_steps=6")
    assert whole.returncode == 0, whole.output
    a = torch.load(run / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "whole" / "digits_student" / "mine" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])


def test_extending_a_finished_run_keeps_earlier_results(finished, tmp_path):
    run = copy_run(finished, tmp_path / "runs")
    earlier = json.loads((run / "results.json").read_text())
    earlier_rows = metric_rows(run / "metrics.csv")
    # one more update, mid-epoch: this session measures no validation loss of its own
    r = run_cli(*ARGS, f"runs_dir={tmp_path / 'runs'}", "trainer.max_steps=5")
    assert r.returncode == 0, r.output
    assert "resuming from" in r.output and "is finished" not in r.output
    res = json.loads((run / "results.json").read_text())
    assert res["global_step"] == 5 and res["resumed_from"]
    assert res["val/loss"] == earlier["val/loss"] and res["val/acc"] == earlier["val/acc"]  # kept
    assert set(earlier) <= set(res)
    rows = metric_rows(run / "metrics.csv")
    assert len(rows) == len(set(rows)), "a (step, metric) logged twice"
    assert set(earlier_rows) <= set(rows) and "test/acc" in {k for s, k in rows if s > 4}  # kept, and the new test

    # the extended run, rerun: finished again, untouched
    before = snapshot(run)
    r = run_cli(*ARGS, f"runs_dir={tmp_path / 'runs'}", "trainer.max_steps=5")
    assert r.returncode == 0 and "is finished (step 5" in r.stdout, r.output
    assert snapshot(run) == before
