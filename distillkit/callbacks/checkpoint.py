"""``last.ckpt``, written atomically: every N optimizer steps, at the end of each epoch,
at the end of fitting, and when the job is told to stop (SIGTERM/SIGUSR1 from SLURM
before preemption), so a restarted run resumes from where this one stopped.

Atomic: the checkpoint is written to a temporary file in the same folder and renamed over
``last.ckpt``, so a crash mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


class LastCheckpoint(Callback):
    def __init__(self, run_dir: str | Path, every_n_steps: int = 100):
        self.path = Path(run_dir) / "last.ckpt"
        self.every_n_steps = max(0, int(every_n_steps))
        self._last_saved_step = -1
        self._stop_requested = False

    def state_dict(self) -> dict:
        return {}

    def save(self, trainer: "L.Trainer", once_per_step: bool = False) -> None:
        if once_per_step and trainer.global_step == self._last_saved_step:
            return
        tmp = self.path.with_name(f".last.ckpt.tmp{os.getpid()}")
        trainer.save_checkpoint(tmp)  # collective under DDP; rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        trainer.strategy.barrier("last_ckpt")
        self._last_saved_step = trainer.global_step

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                try:
                    signal.signal(sig, self._on_signal)
                except (ValueError, OSError):  # not the main thread
                    pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_requested = True

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._stop_requested:
            self.save(trainer)
            trainer.should_stop = True
        elif self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: "L.Trainer", pl_module: Any) -> None:
        self.save(trainer)

    def on_train_end(self, trainer: "L.Trainer", pl_module: Any) -> None:
        self.save(trainer, once_per_step=True)
