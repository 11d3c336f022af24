"""FitNets, Romero et al., ICLR 2015 (arXiv:1412.6550), eq. (3): the student's hint layer,
mapped by a learned regressor r onto the teacher's guided layer, is pulled towards it,

    L_hint = 1/2 || u_h(x; W_teacher) - r(v_g(x; W_student); W_r) ||^2

Here, as in mdistiller's single-stage variant, the hint term (mean squared error) is added
to the student's cross-entropy: ``ce_weight * CE + hint_weight * MSE``. Layers are chosen
by module path (``model.named_modules()`` names); the regressor (``connector``) is a 1x1
convolution + BatchNorm + ReLU for feature maps (mdistiller's ConvReg) or a linear layer
for flat features, and trains with the student.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distillkit.errors import DistillError
from distillkit.methods.classifier import ClassifierMethod


def find_module(net: nn.Module, path: str, key: str) -> nn.Module:
    modules = dict(net.named_modules())
    if path not in modules:
        names = [n for n in modules if n]
        raise DistillError(
            f"{key}={path!r} is not a module of {type(net).__name__}. Module paths include: "
            + ", ".join(names[:40]) + (" ..." if len(names) > 40 else "")
        )
    return modules[path]


class FeatureHook:
    """Keeps the output of one module from the latest forward pass."""

    def __init__(self, module: nn.Module):
        self.output: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.output = output[0] if isinstance(output, (tuple, list)) else output


def make_connector(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """Maps a student feature of ``student_shape`` (without batch) to ``teacher_shape``."""
    if len(student_shape) == 3 and len(teacher_shape) == 3:
        return nn.Sequential(
            nn.Conv2d(student_shape[0], teacher_shape[0], kernel_size=1, bias=False),
            nn.BatchNorm2d(teacher_shape[0]),
            nn.ReLU(inplace=True),
        )
    if len(student_shape) == 1 and len(teacher_shape) == 1:
        return nn.Linear(student_shape[0], teacher_shape[0])
    raise DistillError(f"fitnet: cannot connect a student feature of shape {tuple(student_shape)} "
                       f"to a teacher feature of shape {tuple(teacher_shape)}; pick layers of the same kind")


class FitNet(ClassifierMethod):
    needs_teacher = True
    method_name = "fitnet"

    def __init__(self, student, teacher=None, student_layer: str = "", teacher_layer: str = "",
                 hint_weight: float = 100.0, ce_weight: float = 1.0, input_shape: Sequence[int] = (), **kw):
        super().__init__(student, teacher=teacher, **kw)
        self.hint_weight, self.ce_weight = hint_weight, ce_weight
        self._s_hook = FeatureHook(find_module(student, student_layer, "method.student_layer"))
        self._t_hook = FeatureHook(find_module(teacher, teacher_layer, "method.teacher_layer"))
        if not input_shape:
            raise DistillError("fitnet needs the input shape to size its connector")
        # One dry run of both networks gives the feature shapes the connector must map.
        was_training = student.training
        student.eval()
        with torch.no_grad():
            probe = torch.zeros(2, *input_shape)
            student(probe)
            teacher(probe)
        student.train(was_training)
        s_shape, t_shape = self._s_hook.output.shape[1:], self._t_hook.output.shape[1:]
        if len(s_shape) == 3 and s_shape[1:] != t_shape[1:]:
            raise DistillError(
                f"fitnet: the hint layers have different spatial sizes (student {tuple(s_shape)}, "
                f"teacher {tuple(t_shape)}); choose method.student_layer / method.teacher_layer at the same resolution"
            )
        self.connector = make_connector(s_shape, t_shape)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        s = self.train_student(x)
        hint_s = self._s_hook.output
        self.teacher_forward(x)
        hint_t = self._t_hook.output
        ce = F.cross_entropy(s, y)
        hint = F.mse_loss(self.connector(hint_s), hint_t)
        return {"loss": self.ce_weight * ce + self.hint_weight * hint, "ce": ce, "hint": hint}
