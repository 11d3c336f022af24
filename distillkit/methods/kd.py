"""Knowledge distillation, Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
Neural Network" (arXiv:1503.02531), section 2:

    L = a * CE(softmax(z_s), y) + b * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

The T^2 factor keeps the soft-target gradients' magnitude independent of T (section 2.1).
KL is summed over classes and averaged over the batch (``batchmean``): ``reduction="mean"``
would also divide by the number of classes and silently shrink the term by that factor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distillkit.methods.classifier import ClassifierMethod


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), batchmean."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t


class KD(ClassifierMethod):
    needs_teacher = True
    method_name = "kd"

    def __init__(self, student, teacher=None, temperature: float = 4.0, ce_weight: float = 0.1,
                 kd_weight: float = 0.9, **kw):
        super().__init__(student, teacher=teacher, **kw)
        self.temperature, self.ce_weight, self.kd_weight = temperature, ce_weight, kd_weight

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.train_student(x)
        t = self.teacher_forward(x)
        ce = F.cross_entropy(s, y)
        kd = kd_loss(s, t, self.temperature)
        return {"loss": self.ce_weight * ce + self.kd_weight * kd, "ce": ce, "kd": kd}
