"""Progress output: Lightning's rich bar on an interactive terminal, otherwise one plain
log line every ``log_every_n_steps`` (readable in SLURM logs and CI output)."""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("distillkit")


def use_rich(mode: str) -> bool:
    if mode == "auto":
        return sys.stdout.isatty()
    return mode == "rich"


class PlainProgress(Callback):
    def __init__(self, every_n_steps: int = 10):
        self.every = max(1, every_n_steps)
        self._t0 = 0.0
        self._last = -1

    def on_train_start(self, trainer: "L.Trainer", pl_module: Any) -> None:
        self._t0 = time.time()
        log.info("training from step %d (max_steps=%s, max_epochs=%s)", trainer.global_step,
                 trainer.max_steps, trainer.max_epochs)

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # once per update count (it stays put over an accumulation window, and over the critic's
        # updates between two generator updates of distillkit.methods.roles)
        if trainer.is_global_zero and step % self.every == 0 and step != self._last:
            self._last = step
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
            shown = " ".join(f"{k[6:]}={v:.4g}" for k, v in sorted(metrics.items()))
            log.info("epoch %d step %d %s (%.1fs)", trainer.current_epoch, step, shown, time.time() - self._t0)

    def on_validation_end(self, trainer: "L.Trainer", pl_module: Any) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            if metrics:
                log.info("epoch %d step %d %s", trainer.current_epoch, trainer.global_step,
                         " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
