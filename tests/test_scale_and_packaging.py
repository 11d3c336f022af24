"""DDP through the CLI, the loggers, and the wheel carrying its configs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SMOKE = ("debug=smoke", "callbacks.progress=none")


@pytest.mark.ddp
def test_ddp_two_processes_on_cpu(cli, runs_dir, digits_teacher_ckpt):
    """Two gloo processes through the real CLI (Lightning relaunches the command per rank)."""
    r = cli("experiment=digits_kd", f"teacher.checkpoint={digits_teacher_ckpt}", f"runs_dir={runs_dir}",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", *SMOKE, timeout=900)
    assert r.returncode == 0, r.output
    run = next((runs_dir / "digits_kd").iterdir())
    res = json.loads((run / "results.json").read_text())
    assert res["global_step"] == 6
    assert "world_size=2" in r.output or "distributed_backend=gloo" in r.output or "Initializing distributed" in r.output, r.output
    assert (run / "last.ckpt").is_file()


def test_tensorboard_logger(cli, runs_dir):
    r = cli("experiment=digits_student", f"runs_dir={runs_dir}", "logger=tensorboard", *SMOKE)
    assert r.returncode == 0, r.output
    run = next((runs_dir / "digits_student").iterdir())
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "metrics.csv").is_file()


def test_wandb_offline_resumes_the_same_run(cli, runs_dir, tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
           "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_CONFIG_DIR": str(tmp_path / "cfg")}
    args = ["experiment=digits_student", f"runs_dir={runs_dir}", "logger=wandb", *SMOKE]
    r = cli(*args, env=env)
    assert r.returncode == 0, r.output
    run = next((runs_dir / "digits_student").iterdir())
    run_id = (run / "wandb_run_id").read_text().strip()
    r = cli(*args, "trainer.max_steps=9", "trainer.max_epochs=5", env=env)
    assert r.returncode == 0, r.output
    assert (run / "wandb_run_id").read_text().strip() == run_id
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2, list((run / "wandb").iterdir())  # two sessions, one wandb run id


def test_wheel_ships_configs(tmp_path):
    """Build the wheel, install it into a fresh target, and compose from another directory."""
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheel_dir), str(REPO)], check=True, capture_output=True, text=True)
    wheel = next(wheel_dir.glob("distillkit-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "distillkit/conf/config.yaml" in names and "distillkit/conf/method/kd.yaml" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    code = ("import distillkit, distillkit.cli as c, sys; "
            "assert distillkit.__file__.startswith(sys.argv[1]), distillkit.__file__; "
            "print('CONF', c.CONF_DIR); sys.argv = ['distill', '--cfg', 'job', 'method=kd']; c.main()")
    p = subprocess.run([sys.executable, "-c", code, str(target)], cwd=elsewhere, env=env,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"CONF {target}" in p.stdout
    assert "_target_: distillkit.methods.kd.KD" in p.stdout
    # the console script is in the wheel's entry points
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert entry and "distill = distillkit.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()
