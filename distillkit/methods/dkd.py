"""Decoupled Knowledge Distillation, Zhao, Cui, Song, Qiu & Liang, CVPR 2022
(arXiv:2203.08679). The KD loss splits into target-class and non-target-class parts
(eq. 5): KD = TCKD + (1 - p_t^T) NCKD; DKD reweights them freely (eq. 7):

    DKD  = alpha * TCKD + beta * NCKD
    TCKD = KL(b^T || b^S),  b = [p_t, 1 - p_t]   (binary: target vs the rest)
    NCKD = KL(p~^T || p~^S), p~ = softmax over the non-target classes only

both at temperature T and multiplied by T^2 as in KD, batchmean. The total loss is
``ce_weight * CE + min(epoch / warmup_epochs, 1) * DKD`` with 1-based epochs, the official
code's (mdistiller) linear warm-up.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from distillkit.methods.classifier import ClassifierMethod


def _kl_batchmean(p_teacher: torch.Tensor, log_p_student: torch.Tensor) -> torch.Tensor:
    # sum_c p_t (log p_t - log p_s); 0 log 0 = 0 via xlogy
    return (torch.special.xlogy(p_teacher, p_teacher) - p_teacher * log_p_student).sum(1).mean()


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each already multiplied by T^2."""
    t = temperature
    gt = F.one_hot(target, student_logits.shape[1]).bool()
    p_s = F.softmax(student_logits / t, dim=1)
    p_t = F.softmax(teacher_logits / t, dim=1)
    # binary distributions [p_target, p_rest] (eq. 2); gather, not p[gt]: a boolean-mask index
    # reads the mask's True count back from the GPU (forward and backward)
    at = target[:, None]
    ps_target, pt_target = p_s.gather(1, at), p_t.gather(1, at)
    b_s = torch.cat([ps_target, 1 - ps_target], dim=1)
    b_t = torch.cat([pt_target, 1 - pt_target], dim=1)
    tckd = _kl_batchmean(b_t, torch.log(b_s.clamp_min(1e-12))) * t * t
    # non-target distributions: softmax with the target logit removed (-inf -> prob 0)
    mask = torch.where(gt, float("-inf"), 0.0)
    log_q_s = F.log_softmax(student_logits / t + mask, dim=1)
    q_t = F.softmax(teacher_logits / t + mask, dim=1)
    nckd = _kl_batchmean(q_t, log_q_s.masked_fill(gt, 0.0)) * t * t
    return tckd, nckd


class DKD(ClassifierMethod):
    needs_teacher = True
    method_name = "dkd"

    def __init__(self, student, teacher=None, alpha: float = 1.0, beta: float = 8.0,
                 temperature: float = 4.0, ce_weight: float = 1.0, warmup_epochs: float = 20.0, **kw):
        super().__init__(student, teacher=teacher, **kw)
        self.alpha, self.beta, self.temperature = alpha, beta, temperature
        self.ce_weight, self.warmup_epochs = ce_weight, warmup_epochs

    def warmup_factor(self) -> float:
        if self.warmup_epochs <= 0:
            return 1.0
        epoch = (self.current_epoch if self._trainer is not None else 0) + 1
        return min(epoch / self.warmup_epochs, 1.0)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.train_student(x)
        t = self.teacher_forward(x)
        ce = F.cross_entropy(s, y)
        tckd, nckd = dkd_terms(s, t, y, self.temperature)
        w = self.warmup_factor()
        loss = self.ce_weight * ce + w * (self.alpha * tckd + self.beta * nckd)
        return {"loss": loss, "ce": ce, "tckd": tckd, "nckd": nckd,
                "warmup": torch.full((), float(w), device=s.device)}
