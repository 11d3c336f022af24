"""Exact resumption: a run stopped mid-epoch (by the signal a preempted job gets) and
started again with the same command ends with the same weights, bit for bit on CPU, as
an uninterrupted run. Exercises the data order, optimizer and epoch-based LR scheduler
state, the EMA and the RNG states in the checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli

# 4 batches per epoch (train_fraction 0.25 of the training split, batch 64); SGD with
# momentum and a step decay at epochs 2 and 5; EMA on; dropout-free CNN.
ARGS = ["experiment=digits_student", "model.width=8", "optim=sgd", "optim.scheduler.name=multistep", "optim.scheduler.milestones=[2,5]",
        "optim.optimizer.lr=0.05", "callbacks.ema.enabled=true", "callbacks.ema.decay=0.9",
        "callbacks.progress=plain", "trainer.log_every_n_steps=1", "callbacks.checkpoint_every_n_steps=1000",
        "trainer.max_epochs=200", "trainer.max_steps=600", "trainer.limit_val_batches=1",
        "trainer.test_after_fit=false"]


def _weights(run: Path) -> dict:
    return load_file(str(run / "student.safetensors"))


# Every run of a comparison uses the same thread count: CPU reductions split across threads
# round differently, so runs with 1 and 2 threads differ in the last bits.
THREADS = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run's weights, trained once for every signal."""
    runs = tmp_path_factory.mktemp("reference_runs")
    ref = run_cli(*ARGS, f"runs_dir={runs}", "name=reference", env=THREADS)
    assert ref.returncode == 0, ref.output
    return _weights(runs / "digits_student" / "reference")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "ctrl-c"])
def test_resume_after_signal_is_bit_exact(runs_dir: Path, reference: dict, sig):
    """SIGTERM (a preempted job) and Ctrl-C (SIGINT) both stop at the end of the batch."""
    cmd = [sys.executable, "-m", "distillkit.cli", *ARGS, f"runs_dir={runs_dir}", "name=interrupted"]
    env = dict(os.environ, **THREADS, PYTHONUNBUFFERED="1")
    # SIGINT as a terminal leaves it: pytest may run with it ignored (a background job), which the run respects
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out = []
    deadline = time.time() + 300
    for line in p.stdout:  # wait until training is under way, then preempt it
        out.append(line)
        if " step 45 " in line:
            p.send_signal(sig)
            break
        assert time.time() < deadline, "".join(out)
    rest, _ = p.communicate(timeout=300)
    out.append(rest)
    log = "".join(out)
    assert p.returncode == 128 + sig, log
    assert "Traceback" not in log and "Run the same command again to resume" in log, log
    run = runs_dir / "digits_student" / "interrupted"
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    stopped_at = ckpt["global_step"]
    assert 45 <= stopped_at < 600, stopped_at
    assert not (run / "student.safetensors").exists()

    again = run_cli(*ARGS, f"runs_dir={runs_dir}", "name=interrupted", env=THREADS)
    assert again.returncode == 0, again.output
    assert "resuming from" in again.output
    res = json.loads((run / "results.json").read_text())
    assert res["global_step"] == 600 and res["resumed_from"]
    a, b = reference, _weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming from step {stopped_at}"


def test_loader_leaves_the_global_rng_alone():
    """Creating an epoch's iterator must not draw from the global RNG: a resumed run creates
    it at another point of the random stream than an uninterrupted one."""
    from torch.utils.data import TensorDataset

    from distillkit.data.loader import ResumableLoader

    loader = ResumableLoader(TensorDataset(torch.arange(10.0)), 2, seed=0)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(iter(loader))
    assert torch.equal(torch.rand(3), expected)


def test_resume_deletes_a_checkpoint_write_left_unfinished(runs_dir: Path):
    """A job killed while writing last.ckpt leaves its temporary file (as large as a checkpoint);
    the next session of the run deletes it and keeps last.ckpt."""
    args = ["experiment=digits_student", "model.width=4", "debug=smoke", "trainer.max_epochs=10",
            "callbacks.progress=none", f"runs_dir={runs_dir}", "name=left"]
    assert run_cli(*args, "trainer.max_steps=2").returncode == 0
    run = runs_dir / "digits_student" / "left"
    left = run / ".last.ckpt.tmp4242"
    left.write_bytes(b"half a checkpoint")
    again = run_cli(*args, "trainer.max_steps=4")
    assert again.returncode == 0, again.output
    assert "resuming from" in again.output and "removed .last.ckpt.tmp4242" in again.output
    assert not left.exists() and torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 4
