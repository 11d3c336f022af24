"""``last.ckpt``, written atomically: every ``callbacks.checkpoint_every_seconds`` of wall time
(default 600, as Lightning's ``ModelCheckpoint(train_time_interval=...)``), every
``callbacks.checkpoint_every_n_steps`` optimizer steps when that is set (default 0: off), at the
end of fitting, and when the job is told to stop (SIGTERM; SIGUSR1, which SLURM sends before a
time limit with ``--signal=USR1@90``; SIGUSR2, submitit's preemption signal), so a restarted run
resumes from where this one stopped.

The save at the end of fitting is taken at the last update's batch when ``trainer.max_steps``
ends the run mid-epoch, so that extending the run (the same command with a larger
``trainer.max_steps``) continues with that epoch's remaining batches, as an uninterrupted run would.

Not at every epoch's end: a save costs about 0.1 s on a CPU, as much as several updates of a small
model whose epochs are a few updates long. A save that falls due in an epoch's
last batch (by time or by step count) is taken at the epoch's end instead (``on_train_epoch_end``,
after validation): Lightning restarts a state saved after the epoch's last batch but before its
end without that end. A save by time waits for a batch that made an update, so it never falls
inside a gradient-accumulation window. Under DDP every rank saves (the save is collective): rank
0's clock decides, through the one all-reduce per batch that also spreads a stop signal.

On a cluster the job is then requeued: a signal that had a handler before training (submitit's,
when ``distill -m hydra/launcher=submitit_slurm`` launched the job) is handed to it once the
checkpoint is written, and submitit requeues the job; in a plain SLURM batch job, SIGUSR1 is
followed by ``scontrol requeue`` (what Lightning's own SLURM handler does, without its extra
checkpoint file). The requeued job runs the same command, which resumes from ``last.ckpt``.

On a signal the checkpoint is taken at the end of the current batch, before Lightning's
own stopping logic closes the epoch, and the process exits with status 128 + signal: the
checkpoint then holds a genuine mid-epoch state, and rerunning the same command continues
with exactly the batches, RNG draws and learning rates an uninterrupted run would have used.
Ctrl-C (SIGINT) is such a signal too, unless the process started with it ignored (a job in
the background of a script); a second Ctrl-C stops at once, as Lightning's own handling does
(its last.ckpt is then the one before: an interrupted batch is no state to resume from).

Atomic: the checkpoint is written to a temporary file in the same folder and renamed over
``last.ckpt``, so a crash mid-write leaves the previous checkpoint intact. The next session of
the run deletes such a leftover (a job killed mid-write leaves one as large as the checkpoint).

The checkpoint also carries the wall time spent so far, so a run resumed over several
sessions (requeues, a benchmark finished in a later sitting) reports the time of all of them
in ``results.json``'s ``wall_s``, not only the last session's (``session_wall_s``). Time
after a session's last checkpoint is lost with the work it did, which is redone.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("distillkit")


def stop_signals() -> tuple[int, ...]:
    """The signals a job gets before it is stopped: SIGTERM, SIGUSR1 and submitit's preemption
    signal (SIGUSR2 unless ``$SUBMITIT_PREEMPT_SIGNAL`` names another)."""
    sigs = [signal.SIGTERM, signal.SIGUSR1]
    extra = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    if isinstance(extra, signal.Signals) and extra not in sigs:
        sigs.append(extra)
    return tuple(sigs)


def slurm_job_id() -> str | None:
    """This SLURM batch job's id as ``scontrol requeue`` takes it (array tasks as JOB_TASK), or
    None outside one (an interactive allocation is not requeued)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return None
    array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_id is not None:
        return f"{array_id}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID")


class LastCheckpoint(Callback):
    def __init__(self, run_dir: str | Path, every_n_steps: int = 0, started_at: float | None = None,
                 every_seconds: float = 600.0):
        self.path = Path(run_dir) / "last.ckpt"
        self.every_n_steps = max(0, int(every_n_steps))
        self.every_seconds = max(0.0, float(every_seconds))  # 0: no saves by time
        self._last_saved_step = -1
        self._saved_at = time.monotonic()  # of the last save, or of the session's start
        self._batch_step = -1  # global_step at the end of the previous batch
        self._save_at_epoch_end = False  # a save fell due in an epoch's last batch
        self._stop_signal = 0
        self._stop_at_epoch_end = False  # a stop signal came during an epoch's last batch
        self.started_at = time.time() if started_at is None else started_at
        self.earlier_sessions_s = 0.0  # restored from the checkpoint on resume
        self._sigint_before: Any = None  # SIGINT's handler before training, put back at teardown
        self._launcher_handlers: dict[int, Any] = {}  # stop signals' handlers before fit (submitit's)

    @property
    def wall_s(self) -> float:
        """Wall time of this session plus that of the sessions before it, up to their last checkpoints."""
        return self.earlier_sessions_s + time.time() - self.started_at

    def state_dict(self) -> dict:
        return {"wall_s": self.wall_s}

    def load_state_dict(self, state_dict: dict) -> None:
        self.earlier_sessions_s = float(state_dict.get("wall_s", 0.0))

    def save(self, trainer: "L.Trainer", once_per_step: bool = False) -> None:
        if once_per_step and trainer.global_step == self._last_saved_step:
            return
        guard = getattr(trainer.lightning_module, "_nonfinite_guard", None)
        if guard is not None:  # never save weights a non-finite update made (callbacks/nonfinite.py)
            guard.flush(trainer, trainer.lightning_module)
        tmp = self._tmp()
        trainer.save_checkpoint(tmp)  # collective under DDP; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("last_ckpt")
        self._last_saved_step = trainer.global_step
        self._saved_at = time.monotonic()

    def _tmp(self) -> Path:
        return self.path.with_name(f".last.ckpt.tmp{os.getpid()}")

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if stage == "fit":
            # Before Lightning installs its own: what is there now is the launcher's.
            self._launcher_handlers = {s: h for s in stop_signals() if callable(h := signal.getsignal(s))}
        if stage == "fit" and trainer.is_global_zero:
            for left in self.path.parent.glob(".last.ckpt.tmp*"):
                if left != self._tmp():
                    left.unlink(missing_ok=True)
                    log.info("removed %s, a checkpoint write an earlier session did not finish", left.name)

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        self._last_saved_step = trainer.global_step  # a resumed session starts from a saved state
        self._batch_step = trainer.global_step
        self._saved_at = time.monotonic()
        # Replaces Lightning's SIGTERM handler (installed just before), which would end the
        # epoch and exit before a mid-epoch checkpoint is written; Lightning restores the
        # original handlers at teardown.
        for sig in stop_signals():
            try:
                signal.signal(sig, self._on_signal)
            except (ValueError, OSError):  # not the main thread
                pass
        if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            try:
                self._sigint_before = signal.signal(signal.SIGINT, self._on_signal)
            except (ValueError, OSError):
                pass

    def teardown(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if self._sigint_before is not None:
            signal.signal(signal.SIGINT, self._sigint_before)
            self._sigint_before = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self._stop_signal == signal.SIGINT:  # the second Ctrl-C: stop now
                raise KeyboardInterrupt
            log.warning("Ctrl-C: %s is written at the end of this batch, then the run stops (Ctrl-C again "
                        "stops at once)", self.path.name)
        self._stop_signal = signum

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # This batch's update made the count (not a batch inside an accumulation window, nor one of
        # a critic's updates between two generator updates: distillkit.methods.roles).
        updated = step != self._batch_step
        self._batch_step = step
        stop = bool(self._stop_signal)
        # Rank 0's clock alone decides a save by time, so that the ranks agree.
        timed = (self.every_seconds > 0 and trainer.is_global_zero
                 and time.monotonic() - self._saved_at >= self.every_seconds)
        if trainer.world_size > 1:  # every rank must take part in the collective save
            stop, timed = self._agree(trainer, stop, timed)
        # After an epoch's last batch the checkpoint to take is the one at the epoch's end
        # (on_train_epoch_end, after validation): Lightning restarts a state saved here, with the
        # epoch's batches done but not its end, without that end (tests/test_resume.py).
        last_batch = batch_idx + 1 >= trainer.num_training_batches
        if stop:
            self._stop_signal = self._stop_signal or signal.SIGTERM
            if last_batch:
                self._stop_at_epoch_end = True
                return
            self.save(trainer)
            self._stop(trainer, step)
        # Once per update count: global_step stays put over the batches of an accumulation window
        # and over a critic's updates between two generator updates (distillkit.methods.roles), and
        # the first batch that shows the new count is the one whose update made it. A save by time
        # waits for such a batch.
        due = timed and updated
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            due = True
        # The run's last update (trainer.max_steps) mid-epoch: saved here, a genuine mid-epoch state.
        # Saved at the end of fitting instead, it would hold the epoch as finished (Lightning closes
        # it when it stops), and a longer rerun would skip the epoch's remaining batches.
        max_steps = getattr(trainer, "max_steps", None)
        if updated and max_steps is not None and 0 < max_steps <= step:
            due = True
        if due and step != self._last_saved_step:
            if last_batch:
                self._save_at_epoch_end = True
            else:
                self.save(trainer, once_per_step=True)

    @staticmethod
    def _agree(trainer: "L.Trainer", stop: bool, timed: bool) -> tuple[bool, bool]:
        """The ranks' decisions in one all-reduce (the one a stop signal needs anyway): a stop
        signal on any rank stops them all, and a save by time is rank 0's (only rank 0 proposes
        one, so the sum's parity is its vote)."""
        votes = torch.tensor(2 * int(stop) + int(timed), device=trainer.strategy.root_device)
        total = int(trainer.strategy.reduce(votes, reduce_op="sum").item())
        return total >= 2, total % 2 == 1

    def _stop(self, trainer: "L.Trainer", step: int) -> None:
        signum = self._stop_signal
        # a method with several roles counts each one's updates: say where in its cycle it stopped
        roles = getattr(trainer.lightning_module, "role_updates", None) or {}
        where = f" ({', '.join(f'{r} updates {n}' for r, n in roles.items())})" if roles else ""
        log.warning("stopped by signal %d at step %d%s; %s saved. Run the same command again to resume.",
                    signum, step, where, self.path)
        self._requeue(trainer, signum)
        raise SystemExit(128 + signum)

    def _requeue(self, trainer: "L.Trainer", signum: int) -> None:
        """After the checkpoint: the launcher's handler for this signal (submitit's requeues the
        job and exits), or, for SIGUSR1 in a SLURM batch job, ``scontrol requeue``."""
        handler = self._launcher_handlers.get(signum)
        if handler is not None:
            log.info("handing signal %d to the launcher's handler (%s)", signum, getattr(handler, "__qualname__", handler))
            handler(signum, None)
            return
        job = slurm_job_id() if signum == signal.SIGUSR1 and trainer.is_global_zero else None
        if job is not None:
            try:
                rc = subprocess.call(["scontrol", "requeue", job])
            except OSError as e:  # no scontrol on this node's PATH
                rc = f"{type(e).__name__}: {e}"
            if rc == 0:
                log.info("SLURM job %s requeued: it resumes from %s", job, self.path.name)
            else:
                log.warning("`scontrol requeue %s` failed (%s): resubmit the job to resume", job, rc)

    def on_train_epoch_end(self, trainer: "L.Trainer", pl_module: Any) -> None:
        if self._save_at_epoch_end or self._stop_at_epoch_end:
            self._save_at_epoch_end = False
            self.save(trainer, once_per_step=True)  # once: a session resumed here passes here again
        if self._stop_at_epoch_end:
            self._stop(trainer, trainer.global_step)

    def on_train_end(self, trainer: "L.Trainer", pl_module: Any) -> None:
        self.save(trainer, once_per_step=True)
