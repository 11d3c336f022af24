"""Exact resumption: a run stopped mid-epoch (by the signal a preempted job gets) and
started again with the same command ends with the same weights, bit for bit on CPU, as
an uninterrupted run. Exercises the data order, optimizer and epoch-based LR scheduler
state, the EMA and the RNG states in the checkpoint."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, run_cli, run_module
from distillkit.callbacks import checkpoint

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
        if re.search(r" step 45\b", line):
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


def _run_with_events(*args: str, env: dict):
    """The CLI through tests/cli_with_events.py (signals and deaths at exact steps)."""
    return run_module("cli_with_events", *args, env={**THREADS, **env}, timeout=300)


@pytest.mark.parametrize("event", ["stop", "die"], ids=["signal-in-an-epochs-last-batch", "killed-after-an-epoch-end-checkpoint"])
def test_resume_at_an_epoch_boundary_is_bit_exact(runs_dir: Path, reference: dict, event: str):
    """Step 8 ends epoch 1 (4 batches per epoch), one epoch before the LR milestone at epoch 2.
    A stop signal in an epoch's last batch is served at the epoch's end, and a run that dies
    later resumes from the checkpoint of an epoch's end (every 4 steps: a save due in an epoch's
    last batch is written at the epoch's end): both continue like the uninterrupted run (before,
    the first resumed a mid-end state Lightning restarts without the epoch's end, and both put the
    milestone an epoch late)."""
    env = {"STOP_AT_STEP": "8"} if event == "stop" else {"DIE_AT_STEP": "9"}
    every = [] if event == "stop" else ["callbacks.checkpoint_every_n_steps=4"]
    args = [*ARGS, *every, f"runs_dir={runs_dir}", "name=boundary"]
    r = _run_with_events(*args, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == (128 + signal.SIGTERM if event == "stop" else 9), out
    run = runs_dir / "digits_student" / "boundary"
    assert torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 8
    if event == "stop":
        assert "stopped by signal 15 at step 8" in out
    again = run_cli(*args, env=THREADS)
    assert again.returncode == 0 and "resuming from" in again.output, again.output
    for k, v in _weights(run).items():
        assert torch.equal(reference[k], v), f"{k} differs after resuming at the end of epoch 1"


def test_a_launchers_signal_handler_runs_after_the_checkpoint(runs_dir: Path, tmp_path: Path):
    """Under submitit (distill -m hydra/launcher=submitit_slurm) SIGUSR2 has submitit's handler,
    which requeues the job and exits: the run first writes last.ckpt at the end of the batch, then
    hands the signal over, so the requeued job resumes from that step."""
    args = [*ARGS, "trainer.max_steps=40", f"runs_dir={runs_dir}", "name=launched"]
    record = tmp_path / "launcher.txt"
    env = {"STOP_AT_STEP": "6", "STOP_SIGNAL": "USR2", "LAUNCHER_SIGNAL": "USR2", "LAUNCHER_RECORD": str(record),
           "LAUNCHER_CKPT": str(runs_dir / "digits_student" / "launched" / "last.ckpt")}
    r = _run_with_events(*args, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 3, out  # the launcher's handler ended the process
    assert record.read_text() == f"{int(signal.SIGUSR2)} 6\n", out
    assert "stopped by signal 12 at step 6" in out and "handing signal 12 to the launcher's handler" in out


def test_sigusr1_in_a_slurm_batch_job_requeues_it(runs_dir: Path, tmp_path: Path):
    """In a SLURM batch job without a launcher's handler, SIGUSR1 (sbatch --signal=USR1@90) is
    followed by `scontrol requeue <job>` once last.ckpt is written, as Lightning's own SLURM
    handler does. A stand-in scontrol records the call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.txt"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    args = [*ARGS, "trainer.max_steps=40", f"runs_dir={runs_dir}", "name=sbatch"]
    env = {"STOP_AT_STEP": "6", "STOP_SIGNAL": "USR1", "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_JOB_NAME": "distill-job", "SLURM_PROCID": "0",
           "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    r = _run_with_events(*args, env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 128 + signal.SIGUSR1, out
    assert calls.read_text() == "requeue 4242\n", out
    assert "SLURM job 4242 requeued" in out
    ckpt = torch.load(runs_dir / "digits_student" / "sbatch" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6


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


def test_resume_with_gradient_accumulation_is_bit_exact(runs_dir: Path):
    """With trainer.accumulate_grad_batches=2 the periodic last.ckpt is written at the end of an
    accumulation window, never inside one (a checkpoint there loses the half-accumulated gradient):
    a run killed after update 4 resumes from update 3's checkpoint and ends like an uninterrupted run
    (issue 29, item 3)."""
    args = [*ARGS, "dataset.train_fraction=1.0", "trainer.accumulate_grad_batches=2", "trainer.max_steps=10",
            "callbacks.checkpoint_every_n_steps=3"]
    whole = run_cli(*args, f"runs_dir={runs_dir / 'whole'}", "name=acc", env=THREADS)
    assert whole.returncode == 0, whole.output
    cut = [*args, f"runs_dir={runs_dir / 'cut'}", "name=acc"]
    r = _run_with_events(*cut, env={"DIE_AT_STEP": "4"})
    assert r.returncode == 9, r.stdout + r.stderr
    run = runs_dir / "cut" / "digits_student" / "acc"
    assert torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 3
    again = run_cli(*cut, env=THREADS)
    assert again.returncode == 0 and "resuming from" in again.output, again.output
    ref = _weights(runs_dir / "whole" / "digits_student" / "acc")
    for k, v in _weights(run).items():
        assert torch.equal(ref[k], v), f"{k} differs after resuming inside an accumulating epoch"


# ARGS with the default checkpoint cadence (every 600 s, no step interval), 11 updates: epochs end
# at steps 4 and 8, and step 11 is the third batch of the third epoch.
CADENCE = [a for a in ARGS if not a.startswith("callbacks.checkpoint_every_n_steps=")] + ["trainer.max_steps=11"]


@pytest.mark.parametrize("overrides, saves", [
    ([], ["11 on_train_batch_end"]),
    (["callbacks.checkpoint_every_seconds=1e-9"],
     ["1 on_train_batch_end", "2 on_train_batch_end", "3 on_train_batch_end", "4 on_train_epoch_end",
      "5 on_train_batch_end", "6 on_train_batch_end", "7 on_train_batch_end", "8 on_train_epoch_end",
      "9 on_train_batch_end", "10 on_train_batch_end", "11 on_train_batch_end"]),
    (["callbacks.checkpoint_every_n_steps=2"],
     ["2 on_train_batch_end", "4 on_train_epoch_end", "6 on_train_batch_end", "8 on_train_epoch_end",
      "10 on_train_batch_end", "11 on_train_batch_end"]),
], ids=["default-no-epoch-end-saves", "every-seconds", "every-n-steps"])
def test_checkpoint_cadence(runs_dir: Path, tmp_path: Path, overrides: list, saves: list):
    """last.ckpt is written by wall time (callbacks.checkpoint_every_seconds, 600 s by default) and
    every callbacks.checkpoint_every_n_steps updates (off by default), at the end of training and on
    a stop signal, not at every epoch's end (a save costs about as much as a few of the digits
    experiments' updates: issue 29, item 9). A save that falls due in an epoch's last batch is
    written at the epoch's end; the run's last update (trainer.max_steps, here mid-epoch) is saved at
    its batch, a mid-epoch state that a longer rerun continues, and the run's end then writes none."""
    record = tmp_path / "saves.txt"
    r = _run_with_events(*CADENCE, *overrides, f"runs_dir={runs_dir}", "name=cadence", env={"SAVE_RECORD": str(record)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert record.read_text().splitlines() == saves
    ckpt = torch.load(runs_dir / "digits_student" / "cadence" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 11


class _Trainer:
    """What LastCheckpoint reads of a Lightning Trainer, for one rank; ``others`` is what the other
    ranks add to the per-batch all-reduce."""

    def __init__(self, rank: int = 0, world_size: int = 1, others: int = 0):
        self.global_step, self.world_size, self.is_global_zero = 0, world_size, rank == 0
        self.num_training_batches, self.lightning_module = 100, None
        self.saved, self.reductions, self.others = [], 0, others
        self.strategy = SimpleNamespace(root_device=torch.device("cpu"), barrier=lambda name: None, reduce=self._reduce)

    def _reduce(self, votes: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        self.reductions += 1
        return votes + self.others

    def save_checkpoint(self, path) -> None:
        self.saved.append(self.global_step)
        Path(path).write_bytes(b"")


def _callback(tmp_path: Path, monkeypatch, clock: list, every_seconds: float) -> checkpoint.LastCheckpoint:
    """A LastCheckpoint on a clock the test sets, as on_train_start leaves it at step 0 (without
    installing its signal handlers in pytest's process)."""
    monkeypatch.setattr(checkpoint, "time", SimpleNamespace(monotonic=lambda: clock[0], time=time.time))
    cb = checkpoint.LastCheckpoint(tmp_path, every_seconds=every_seconds)
    cb._last_saved_step = cb._batch_step = 0
    return cb


def test_a_save_by_time_waits_for_the_end_of_an_accumulation_window(tmp_path: Path, monkeypatch):
    """With gradient accumulation, global_step stays put over a window's batches: a save that falls
    due inside a window waits for the batch whose update ends it (a checkpoint inside one loses the
    half-accumulated gradient), then the clock starts again."""
    clock = [0.0]
    cb = _callback(tmp_path, monkeypatch, clock, every_seconds=10)
    trainer = _Trainer()
    # (time at the batch's end, global_step after it): an update on every second batch; the saves
    # fall due at t=11 (batch 2) and t=22 (batch 6), inside windows
    prev = 0
    for i, (t, step) in enumerate([(1, 0), (5, 1), (11, 1), (12, 2), (13, 2), (21, 3), (22, 3), (23, 4)]):
        clock[0], trainer.global_step = t, step
        n = len(trainer.saved)
        cb.on_train_batch_end(trainer, None, None, None, i)
        assert len(trainer.saved) == n or step != prev, f"saved inside an accumulation window at batch {i}"
        prev = step
    assert trainer.saved == [2, 4] and trainer.reductions == 0  # one process: no collective


@pytest.mark.parametrize("rank, others, saves", [(0, 0, [1]), (1, 0, []), (1, 1, [1]), (1, 2, "stop"), (1, 3, "stop")],
                         ids=["rank0-clock", "rank1-clock-alone", "rank0-says-save", "a-rank-stops",
                              "a-rank-stops-as-rank0-says-save"])
def test_ddp_ranks_follow_rank_0s_clock_in_the_stop_all_reduce(tmp_path: Path, monkeypatch, rank: int, others: int, saves):
    """Under DDP every rank must take part in a save (it is collective): the per-batch all-reduce that
    spreads a stop signal also carries rank 0's decision to save by time (each stop votes 2, rank 0's
    timed save 1), so the ranks agree with no other collective, and another rank's clock counts for
    nothing."""
    clock = [0.0]
    cb = _callback(tmp_path, monkeypatch, clock, every_seconds=10)
    trainer = _Trainer(rank=rank, world_size=2, others=others)
    clock[0], trainer.global_step = 11, 1
    if saves == "stop":
        with pytest.raises(SystemExit) as stopped:
            cb.on_train_batch_end(trainer, None, None, None, 0)
        assert stopped.value.code == 128 + signal.SIGTERM and trainer.saved == [1]
    else:
        cb.on_train_batch_end(trainer, None, None, None, 0)
        assert trainer.saved == saves
    assert trainer.reductions == 1
