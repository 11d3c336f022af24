"""Progressive distillation (``method=progressive``): Salimans & Ho 2022, "Progressive
Distillation for Fast Sampling of Diffusion Models", Algorithm 2.

Per update, for a data batch x, a student step index j ~ U{0, ..., N/2 - 1} per example on the
round's trailing grid g = schedule.grid(N) (N: the teacher's steps), t = g[2j], t' = g[2j+1],
t'' = g[2j+2], and z_t = alpha_t x + sigma_t eps:

    z_t'  = DDIM_teacher(z_t;  t -> t')                  two teacher steps (no gradient)
    z_t'' = DDIM_teacher(z_t'; t' -> t'')
    x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)
    L = w(t) || x_hat_student(z_t, t) - x_tilde ||^2,    w = max(SNR_t, 1) ("truncated SNR")
                                                            or SNR_t + 1 (method.weighting)

so one student step t -> t'' lands where two teacher steps do. 3 network evaluations per update.
Rounds halve N (e.g. 64 -> 32 -> ... -> 2, the last student sampling with 1 step); each round's
student starts as its teacher and becomes the next round's teacher (``round_<r>.ckpt`` in the
run dir; see :mod:`distillkit.methods.step_distill`).

Parameterisation (the paper's Sec. 4): the student predicts v or x0 (``method.prediction_type``),
since an eps-prediction's x_hat = (z_t - sigma eps_hat) / alpha_t blows up at few steps; the
first teacher may predict something else (``method.teacher_prediction_type``, e.g. eps). A
student that starts from an eps teacher's weights but reads its output as v re-learns its output
layer in round 1: train the teacher in v (as ``experiment=digits_diffusion_teacher`` does) when you
can, or convert first: the first ``method.convert_updates`` updates of round 1 regress the student's
x-prediction onto the teacher's own at the same (z_t, t), with the same weight w(t),

    L = w(t) || x_hat_student(z_t, t) - x_hat_teacher(z_t, t) ||^2     (1 teacher evaluation, no step)

so that the student learns to say in its parameterisation what the teacher says in its own before
it learns to skip steps (2 network evaluations per update).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from distillkit.diffusion import to_x0
from distillkit.errors import DistillError
from distillkit.methods.diffusion import mean_flat
from distillkit.diffusion.step_targets import ddim_implied_x0, step_loss_weight
from distillkit.methods.step_distill import StepDistillation, two_ddim_steps


def progressive_target(teacher_fn, z_t: torch.Tensor, t, t1, t2, schedule, teacher_pred_type: str,
                       clip: Optional[float] = None) -> torch.Tensor:
    """Algorithm 2's x_tilde: two teacher DDIM steps t -> t1 -> t2, expressed as the x-prediction
    of ONE step t -> t2 from z_t (2 teacher evaluations, no gradient; ``clip``: the steps' x0 clamp)."""
    _, z_t2 = two_ddim_steps(teacher_fn, z_t, t, t1, t2, schedule, teacher_pred_type, clip)
    return ddim_implied_x0(z_t2, z_t, t, t2, schedule)


class Progressive(StepDistillation):
    """Salimans & Ho 2022, Algorithm 2 (see the module docstring)."""

    method_name = "progressive"
    needs_teacher = True
    round_name = "round"

    def __init__(self, *args: Any, convert_updates: int = 0, **kw: Any):
        super().__init__(*args, **kw)
        self.convert_updates = int(convert_updates)
        if not 0 <= self.convert_updates < self.round_updates[0]:
            raise DistillError(f"method.convert_updates={convert_updates}: must lie in [0, {self.round_updates[0]}), "
                               "the updates of round 1 (method.updates_per_round): they are its first updates")
        if not self.convert_updates:
            self.warn_on_type_change("; or convert first: method.convert_updates")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x0, cond = self.split_batch(batch)  # the condition (class labels, text) goes to teacher and student alike
        x0 = x0.float()
        teacher_fn = lambda x, t: self.teacher_fn(x, t, cond)  # noqa: E731
        B, grid, g = x0.shape[0], self.round_grid(x0.device), self.noise_generator(batch_idx)
        j = torch.randint(0, self.teacher_steps_now // 2, (B,), generator=g, device=g.device).to(x0.device)
        t, t1, t2 = self.grid_times(grid, 2 * j)
        z_t = self.schedule.add_noise(x0, self.randn(x0.shape, g), t)
        alpha, sigma = self.schedule.alpha(t, like=z_t), self.schedule.sigma(t, like=z_t)
        converting = self.global_step < self.convert_updates
        if converting:
            with torch.no_grad():
                x_tilde = to_x0(teacher_fn(z_t, t), self.teacher_pred_type, z_t, alpha, sigma)
                if self.clip_sample is not None:
                    x_tilde = x_tilde.clamp(-self.clip_sample, self.clip_sample)
        else:
            x_tilde = progressive_target(teacher_fn, z_t, t, t1, t2, self.schedule, self.teacher_pred_type,
                                         self.clip_sample)
        out = self._checked(self.train_student(z_t, t, cond), z_t).float()
        x_hat = to_x0(out, self.prediction_type, z_t, alpha, sigma)
        w = step_loss_weight(self.step_weighting, self.schedule, t, t2, like=z_t).flatten()
        loss = (w * mean_flat((x_hat - x_tilde) ** 2)).mean()
        self.count_nfe(2 if converting else 3)  # one teacher evaluation or two teacher steps, + the student's
        if self.convert_updates:
            self.log_scalar("converting", float(converting))
        self.log_round()
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, batch_size=B)
        return loss


__all__ = ["Progressive", "progressive_target"]
