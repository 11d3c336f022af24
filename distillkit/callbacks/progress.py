"""Progress output: a rich bar on an interactive terminal, otherwise one plain log line every
``log_every_n_steps`` (readable in SLURM logs and CI output). Both count updates (optimizer steps;
the generator's in methods with several roles) out of the run's total, the number that
``trainer.max_steps``, the checkpoint interval and the LR schedule speak in, rather than the batches
of an epoch, and say the rate and the time left:

    step 20/3200 (epoch 0), 11.2 it/s, 4m41s left, loss=0.3127
"""
from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import BatchesProcessedColumn
from rich.text import Text

log = logging.getLogger("distillkit")


def use_rich(mode: str) -> bool:
    if mode == "auto":
        return sys.stdout.isatty()
    return mode == "rich"


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def format_rate(updates_per_s: float) -> str:
    # seconds per update once an update takes longer than a second (large models): "0.31 it/s" reads worse
    return f"{updates_per_s:.1f} it/s" if updates_per_s >= 1 else f"{1 / updates_per_s:.2f} s/it"


class RunPace:
    """The run's total updates and this session's rate.

    The total is the fewer of ``trainer.max_steps`` and ``max_epochs`` epochs of updates (the
    method's own count per epoch where it has one: a multi-role method's batches per generator
    update; else the loader's batches over the accumulation), None when neither bounds the run. The
    limits are read at each call: step distillation sets ``max_steps`` from its rounds in ``setup``.

    The rate counts from the session's first update (a resumed run from its start step): the first
    carries the start-up (data workers, torch.compile, cuDNN's autotuning), which would make the
    time left of a long run wrong for its first hour."""

    def __init__(self) -> None:
        self.per_epoch: Optional[int] = None
        self._start: tuple[int, float] = (0, 0.0)
        self._first: Optional[tuple[int, float]] = None

    def start(self, trainer: "L.Trainer", pl_module: Any) -> None:
        self._start, self._first = (trainer.global_step, time.time()), None
        try:
            self.per_epoch = int(pl_module.steps_per_epoch())
        except (AttributeError, TypeError, RuntimeError):  # not a distillkit method, or no datamodule
            n = trainer.num_training_batches
            finite = math.isfinite(n) and n > 0
            self.per_epoch = max(1, math.ceil(n / trainer.accumulate_grad_batches)) if finite else None

    def total(self, trainer: "L.Trainer") -> Optional[int]:
        limits = [trainer.max_steps] if trainer.max_steps and trainer.max_steps > 0 else []
        if trainer.max_epochs and trainer.max_epochs > 0 and self.per_epoch:
            limits.append(trainer.max_epochs * self.per_epoch)
        return min(limits) if limits else None

    def tick(self, step: int) -> None:
        """Called after every batch: notes when the session's first update is done."""
        if self._first is None and step > self._start[0]:
            self._first = (step, time.time())

    def rate(self, step: int) -> Optional[float]:
        """Updates per second, None before the second update of the session."""
        s0, t0 = self._first if self._first is not None and step > self._first[0] else self._start
        dt = time.time() - t0
        return (step - s0) / dt if step > s0 and dt > 0 else None

    def describe(self, trainer: "L.Trainer", with_rate: bool = True) -> str:
        """``step 20/3200 (epoch 0), 11.2 it/s, 4m41s left``."""
        step, total = trainer.global_step, self.total(trainer)
        parts = [f"step {step}/{total} (epoch {trainer.current_epoch})" if total
                 else f"step {step} (epoch {trainer.current_epoch})"]
        rate = self.rate(step) if with_rate else None
        if rate:
            parts.append(format_rate(rate))
            if total and total >= step:
                parts.append(f"{format_duration((total - step) / rate)} left")
        return ", ".join(parts)


class PlainProgress(Callback):
    def __init__(self, every_n_steps: int = 10):
        self.every = max(1, every_n_steps)
        self.pace = RunPace()
        self._last = -1

    def on_train_start(self, trainer: "L.Trainer", pl_module: Any) -> None:
        self.pace.start(trainer, pl_module)
        total = self.pace.total(trainer)
        log.info("training from step %d%s (max_steps=%s, max_epochs=%s)", trainer.global_step,
                 f" to {total}" if total else "", trainer.max_steps, trainer.max_epochs)

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        self.pace.tick(step)
        # once per update count (it stays put over an accumulation window, and over the critic's
        # updates between two generator updates of distillkit.methods.roles)
        if trainer.is_global_zero and step % self.every == 0 and step != self._last:
            self._last = step
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
            shown = " ".join(f"{k[6:]}={v:.4g}" for k, v in sorted(metrics.items()))
            log.info("%s%s", self.pace.describe(trainer), f", {shown}" if shown else "")

    def on_validation_end(self, trainer: "L.Trainer", pl_module: Any) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            if metrics:
                log.info("%s, %s", self.pace.describe(trainer, with_rate=False),
                         " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))


class _UpdatesColumn(BatchesProcessedColumn):
    """Lightning's ``done/total`` column, which on the training row reads ``step 40/3200``."""

    def __init__(self, bar: "StepProgressBar", style: Any):
        super().__init__(style)
        self.bar = bar

    def render(self, task: Any) -> Text:
        text = super().render(task)
        if task.id == self.bar.train_progress_bar_id:
            text = Text("step ", style=self.style) + text
        return text


class StepProgressBar(RichProgressBar):
    """Lightning's rich bar with its training row over the run's updates: Lightning's counts the
    batches of the epoch under ``Epoch 0/29``, for a run that ``trainer.max_steps`` may end after
    40 updates. One row for the whole run, so its bar, time left and rate (rich's, from the last
    30 s) are the run's; a resumed run's starts at its step."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.pace = RunPace()

    def on_train_start(self, trainer: "L.Trainer", pl_module: Any) -> None:
        self.pace.start(trainer, pl_module)
        super().on_train_start(trainer, pl_module)

    def configure_columns(self, trainer: "L.Trainer") -> list:
        return [_UpdatesColumn(self, self.theme.batch_progress) if isinstance(c, BatchesProcessedColumn) else c
                for c in super().configure_columns(trainer)]

    def _get_train_description(self, current_epoch: int) -> str:
        # the epoch only: the steps column has the run's length, which max_epochs - 1 may not be
        description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"

    def _styled(self, description: str) -> str:
        return f"[{self.theme.description}]{description}" if self.theme.description else description

    def _initialize_train_progress_bar_id(self) -> None:
        assert self.progress is not None
        total = self.pace.total(self.trainer)
        self.train_progress_bar_id = self.progress.add_task(
            self._styled(self._get_train_description(self.trainer.current_epoch)),
            total=total or float("inf"), completed=self.trainer.global_step)

    def on_train_epoch_start(self, trainer: "L.Trainer", pl_module: Any) -> None:
        if self.is_disabled:
            return
        if self.train_progress_bar_id is not None and self._leave:
            self._stop_progress()
            self._init_progress(trainer)
        if self.progress is None:
            return
        if self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        else:  # the same row goes on; only its epoch changes
            self.progress.update(self.train_progress_bar_id, visible=True,
                                 description=self._styled(self._get_train_description(trainer.current_epoch)))
        self.refresh()

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
