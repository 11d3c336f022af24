"""Plain supervised training with cross-entropy: trains teachers and the student-alone
baseline every distillation method is compared against."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distillkit.methods.classifier import ClassifierMethod


class Supervised(ClassifierMethod):
    method_name = "supervised"

    def __init__(self, student, label_smoothing: float = 0.0, **kw):
        super().__init__(student, **kw)
        self.label_smoothing = label_smoothing

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(self.train_student(x), y, label_smoothing=self.label_smoothing)
        return {"loss": ce, "ce": ce}
