"""Periodic FID / IS of generated samples during training (DESIGN: periodic FID/IS on EMA
samples).

Every ``every_n_steps`` optimizer steps and at the end of training, for each step count k
in ``steps``: ``num_samples`` images from ``pl_module.sample(n, k, generator=g)`` (the
method samples with its evaluation network: the EMA of the student when EMA is on), FID and
IS against the training split's cached real statistics (:mod:`distillkit.metrics.fid`),
logged as ``fid/{k}step`` and ``is/{k}step`` to every logger, appended to
``<run dir>/eval.jsonl`` with the feature network's hash, and a PNG grid
``<run dir>/samples/step{global_step}_{k}step.png`` (also to TensorBoard / W&B when on).

Conditional models sample with ``guidance`` (diffusers' convention, 1: none). A class-conditional
model draws its classes uniformly (from the same seed, after the noise), and the feature network's
classifier scores whether each sample shows the class asked for: ``class_acc/{k}step``, a fraction.

Every evaluation draws the same noise (``seed``; ranks get their own offset), so numbers are
comparable across evaluations, and the global RNG streams of training are left untouched.
Under DDP each rank samples its share of ``num_samples`` and torchmetrics sums the states.
Metric objects are made per evaluation; nothing of this callback goes into checkpoints.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from distillkit.cycles import cycle_lengths, ends_cycle
from distillkit.errors import DistillError
from distillkit.metrics.fid import DIGITS_NUM_SAMPLES, SampleScorer
from distillkit.metrics.images import image_grid, save_png, split_images

log = logging.getLogger("distillkit")


def has_sampler(module: Any) -> bool:
    return callable(getattr(module, "sample", None))


class SampleEvaluation(Callback):
    def __init__(self, every_n_steps: int | list[int] = 1000, steps: Iterable[int] = (1, 2, 4),
                 num_samples: int = DIGITS_NUM_SAMPLES, feature_net: str = "digits",
                 inception_weights: Optional[str] = None, cache_dir: Optional[str] = None,
                 batch_size: int = 256, seed: int = 0, dataset_name: Optional[str] = None,
                 sample_dir: Optional[str] = None, grid_size: int = 64, real_images: Optional[torch.Tensor] = None,
                 guidance: float = 1.0):
        # an int, or a list of lengths: at the end of each round of unequal rounds (distillkit.cycles)
        self.every_n_steps = cycle_lengths(every_n_steps, "eval.every_n_steps")
        self.steps = [int(k) for k in steps]
        if not self.steps or min(self.steps) < 1:
            raise DistillError(f"eval.steps={self.steps}: give one or more sampling step counts >= 1, e.g. [1, 2, 4]")
        if int(num_samples) < 2:
            raise DistillError(f"eval.num_samples={num_samples}: FID needs at least 2 samples")
        self.num_samples = int(num_samples)
        self.batch_size = max(1, int(batch_size))
        self.seed = int(seed)
        self.cache_dir = cache_dir
        self.dataset_name = dataset_name
        self.sample_dir = Path(sample_dir) if sample_dir else None
        self.grid_size = int(grid_size)
        self.real_images = real_images
        self.guidance = float(guidance)
        # Loads (and so checks) the feature network now, before any training.
        self.scorer = SampleScorer(feature_net, inception_weights, batch_size=self.batch_size)
        self._real_stats: Optional[dict[str, torch.Tensor]] = None
        self._last_step = -1
        self.history: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, cfg: Any, **kw: Any) -> "SampleEvaluation":
        """From the ``eval`` config group (see ``distillkit.config.EvalConfig``)."""
        return cls(every_n_steps=cfg.every_n_steps, steps=list(cfg.steps), num_samples=cfg.num_samples,
                   feature_net=cfg.feature_net, inception_weights=cfg.inception_weights, cache_dir=cfg.cache_dir,
                   batch_size=cfg.batch_size, seed=cfg.seed, guidance=cfg.get("guidance", 1.0), **kw)

    # ------------------------------------------------------------------ no checkpoint state
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if not has_sampler(pl_module):
            raise DistillError(f"eval needs a generative method with a sample() method; {type(pl_module).__name__} "
                               "has none: use eval=none")
        shape = tuple(int(s) for s in getattr(pl_module, "image_shape", ()))
        net = self.scorer.feature_net_name
        if net == "digits" and shape != (1, 8, 8):
            raise DistillError(f"eval.feature_net=digits scores 1x8x8 digits; this run samples shape {shape}: "
                               "use eval=none (or eval.feature_net=inception for natural images)")
        if net == "inception" and (len(shape) != 3 or shape[0] not in (1, 3)):
            raise DistillError(f"eval.feature_net=inception scores images (C, H, W) with C 1 or 3; "
                               f"this run samples shape {shape}: use eval=none")

    def on_fit_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if trainer.is_global_zero:
            self._reference(trainer, pl_module)

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if ends_cycle(step, self.every_n_steps) and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------ work
    def _reference(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> dict[str, torch.Tensor]:
        if self._real_stats is None:
            dm = trainer.datamodule
            if self.real_images is not None:
                images = self.real_images
            elif dm is not None:
                images = split_images(dm, "train")
            else:
                raise DistillError("eval needs the training split's images: fit with a datamodule")
            name = self.dataset_name or (type(dm).__name__.removesuffix("DataModule").lower() if dm is not None
                                         else "images")
            self._real_stats = self.scorer.reference(images, name, "train", self.cache_dir, device=pl_module.device)
        return self._real_stats

    def _run_dir(self, trainer: "L.Trainer") -> Path:
        return Path(trainer.default_root_dir)

    @torch.no_grad()
    def evaluate(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> dict[str, float]:
        """Sample, score and log once; every rank must call it (DDP syncs the metrics)."""
        t0 = time.time()
        step = trainer.global_step
        self._last_step = step
        rank, world = trainer.global_rank, max(1, trainer.world_size)
        n_local = self.num_samples // world + int(rank < self.num_samples % world)
        stats = self._reference(trainer, pl_module) if trainer.is_global_zero else None
        device = pl_module.device
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        metrics: dict[str, float] = {}
        grids: dict[int, Any] = {}
        rows = []
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=cuda):
                for k in self.steps:
                    # The same noise at every evaluation and for every step count.
                    g = torch.Generator(device=device).manual_seed(self.seed + 1_000_003 * rank)
                    chunks, labels = [], []
                    for i in range(0, n_local, self.batch_size):
                        x, cond = self._sample(pl_module, min(self.batch_size, n_local - i), k, g)
                        chunks.append(x.float())
                        if "class_labels" in cond:
                            labels.append(cond["class_labels"])
                    x = torch.cat(chunks) if chunks else torch.empty(0, *pl_module.image_shape, device=device)
                    res = self.scorer.score(x, stats, seed=self.seed, device=device)
                    if labels:
                        res["class_acc"] = self.scorer.class_accuracy(x, torch.cat(labels), device=device)
                        metrics[f"class_acc/{k}step"] = res["class_acc"]
                    if getattr(pl_module.student, "is_conditional", False):
                        res["guidance"] = self.guidance
                    metrics[f"fid/{k}step"] = res["fid"]
                    metrics[f"is/{k}step"] = res["is"]
                    rows.append({"step": step, "sampling_steps": k, **res})
                    if trainer.is_global_zero and self.grid_size > 0:
                        grids[k] = image_grid(x[: self.grid_size], pad=2, scale=max(1, min(4, 64 // x.shape[-1])))
        finally:
            for m, mode in modes.items():
                m.training = mode
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        self.history.extend(rows)
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)  # rank-zero-only in Lightning's loggers
        if trainer.is_global_zero:
            self._write(trainer, rows, grids, step)
            log.info("eval step %d: %s (%s, %d samples, %.1fs)", step,
                     " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), self.scorer.net_id, self.num_samples,
                     time.time() - t0)
        return metrics

    def _sample(self, pl_module: "L.LightningModule", n: int, k: int, g: torch.Generator):
        """``n`` samples in ``k`` steps and their conditions ({} for unconditional models)."""
        if getattr(getattr(pl_module, "student", None), "is_conditional", False):
            return pl_module.sample(n, k, generator=g, guidance=self.guidance, return_cond=True)
        return pl_module.sample(n, k, generator=g), {}

    def _write(self, trainer: "L.Trainer", rows: list[dict], grids: dict[int, Any], step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        run_dir = self._run_dir(trainer)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "eval.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        sample_dir = self.sample_dir or run_dir / "samples"
        for k, grid in grids.items():
            save_png(grid, sample_dir / f"step{step}_{k}step.png")
            for lg in trainer.loggers:
                if isinstance(lg, TensorBoardLogger):
                    lg.experiment.add_image(f"samples/{k}step", grid, step, dataformats="HWC")
                elif isinstance(lg, WandbLogger):
                    lg.log_image(key=f"samples/{k}step", images=[grid], step=step)
