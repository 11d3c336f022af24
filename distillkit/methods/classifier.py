"""Base of the classifier methods: train on (x, y), report accuracy of the student (or its
EMA) on the validation and test splits."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from distillkit.methods.base import DistillMethod


class ClassifierMethod(DistillMethod):
    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The method's loss terms; ``"loss"`` is the one minimised."""
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        terms = self.losses(x, y)
        # the student's forward, and the frozen teacher's when the method has one
        self.count_nfe(1 if self.teacher is None else 2)
        self.log_dict({f"train/{k}": v.detach() for k, v in terms.items() if k != "loss"},
                      prog_bar=False, on_step=True, on_epoch=False, batch_size=len(y))
        self.log("train/loss", terms["loss"].detach(), prog_bar=True, on_step=True, batch_size=len(y))
        return terms["loss"]

    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y = batch
        logits = self.eval_network()(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True, batch_size=len(y))
        self.log(f"{stage}/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True,
                 sync_dist=True, batch_size=len(y))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")
