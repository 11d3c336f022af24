"""``last.ckpt``, written atomically: every N optimizer steps, at the end of each epoch,
at the end of fitting, and when the job is told to stop (SIGTERM, or SIGUSR1 which SLURM
sends before preemption), so a restarted run resumes from where this one stopped.

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
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("distillkit")


class LastCheckpoint(Callback):
    def __init__(self, run_dir: str | Path, every_n_steps: int = 100, started_at: float | None = None):
        self.path = Path(run_dir) / "last.ckpt"
        self.every_n_steps = max(0, int(every_n_steps))
        self._last_saved_step = -1
        self._stop_signal = 0
        self.started_at = time.time() if started_at is None else started_at
        self.earlier_sessions_s = 0.0  # restored from the checkpoint on resume
        self._sigint_before: Any = None  # SIGINT's handler before training, put back at teardown

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
        tmp = self._tmp()
        trainer.save_checkpoint(tmp)  # collective under DDP; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("last_ckpt")
        self._last_saved_step = trainer.global_step

    def _tmp(self) -> Path:
        return self.path.with_name(f".last.ckpt.tmp{os.getpid()}")

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            for left in self.path.parent.glob(".last.ckpt.tmp*"):
                if left != self._tmp():
                    left.unlink(missing_ok=True)
                    log.info("removed %s, a checkpoint write an earlier session did not finish", left.name)

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        # Replaces Lightning's SIGTERM handler (installed just before), which would end the
        # epoch and exit before a mid-epoch checkpoint is written; Lightning restores the
        # original handlers at teardown.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
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
        stop = bool(self._stop_signal)
        if trainer.world_size > 1:  # every rank must take part in the collective save
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            signum = self._stop_signal or signal.SIGTERM
            self.save(trainer)
            log.warning("stopped by signal %d at step %d; %s saved. Run the same command again to resume.",
                        signum, step, self.path)
            raise SystemExit(128 + signum)
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: "L.Trainer", pl_module: Any) -> None:
        self.save(trainer)

    def on_train_end(self, trainer: "L.Trainer", pl_module: Any) -> None:
        self.save(trainer, once_per_step=True)
