"""A CSV logger that appends across restarts.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts in a non-empty
directory; a resumed run would lose every row logged before the restart. This one keeps the
file and continues it (widening the header when new metrics appear, as Lightning does).

Once it follows the trainer (:meth:`AppendingCSVLogger.follow`), every row's ``step`` is the
trainer's update count, ``trainer.global_step``: the step of the progress log, of the evaluation's
rows (``fid/{k}step``), of ``results.json`` and of the checkpoints. Lightning itself logs a
training step's metrics, and a validation run inside the training loop, with its count of batches
stepped *before* that update (one behind), and under manual optimization (DMD's critic updates)
that count is of batches, not of generator updates. Training rows also get ``wall_s``, the run's
wall time so far (earlier sessions included), so that curves can be drawn against time.
"""
from __future__ import annotations

import csv
from typing import Any, Callable, Optional

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class AppendingExperimentWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = next(csv.reader(f), [])
            self.metrics_keys = sorted(header)


class AppendingCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment

    def follow(self, trainer: Any, wall_s: Optional[Callable[[], float]] = None) -> None:
        """Stamp rows with ``trainer.global_step`` (and training rows with ``wall_s()``) from now on."""
        self._trainer = trainer
        self._wall_s = wall_s

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: Optional[int] = None) -> None:
        trainer = getattr(self, "_trainer", None)
        if trainer is not None:
            step = int(trainer.global_step)
            wall_s = getattr(self, "_wall_s", None)
            if wall_s is not None and any(k.startswith("train/") for k in metrics):
                metrics = {**metrics, "wall_s": round(float(wall_s()), 3)}
        super().log_metrics(metrics, step)
