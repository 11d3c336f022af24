"""distillkit.methods.ema.EMA: torch's AveragedModel EMA, without host reads in the update."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from distillkit.methods.ema import EMA


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def train_a_little(model: nn.Module, seed: int) -> None:
    """A change of every parameter and of BatchNorm's running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    model.train()(torch.randn(8, 1, 6, 6, generator=g))


@contextlib.contextmanager
def host_reads_forbidden():
    """Make every read of a tensor's value into Python raise (on a GPU each one waits for all
    queued work)."""
    saved = {n: getattr(torch.Tensor, n) for n in ("__bool__", "item", "__float__", "__int__", "tolist")}

    def refuse(self, *a, **k):
        raise AssertionError("host read of a tensor value")

    try:
        for n in saved:
            setattr(torch.Tensor, n, refuse)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_ema_equals_torchs_averaged_model_including_the_first_update_copy():
    student = net()
    ours = EMA(student, 0.9)
    theirs = AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for seed in range(4):
        train_a_little(student, seed)   # seed 0: the student moved before the first update, which copies it
        ours.update_parameters(student)
        theirs.update_parameters(student)
        for (k, a), b in zip(ours.module.state_dict().items(), theirs.module.state_dict().values()):
            if a.is_floating_point():
                torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    assert int(ours.n_averaged) == int(theirs.n_averaged) == 4
    assert ours.state_dict().keys() == theirs.state_dict().keys()   # checkpoints keep their layout
    w = ours.module[3].weight
    assert not torch.allclose(w, student[3].weight)   # it averages, not just copies


def test_ema_update_reads_nothing_back_to_the_host():
    student = net()
    ema, averaged = EMA(student, 0.99), AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(0.99))
    with host_reads_forbidden():
        for _ in range(2):
            ema.update_parameters(student)
        with pytest.raises(AssertionError, match="host read"):   # what the check catches in torch's own
            averaged.update_parameters(student)


def test_resumed_ema_continues_the_average_instead_of_copying():
    student = net()
    ema = EMA(student, 0.5)
    train_a_little(student, 0)
    ema.update_parameters(student)   # copy
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    resumed = EMA(net(), 0.5)
    resumed.load_state_dict(saved)
    before = resumed.module[3].weight.clone()
    train_a_little(student, 1)
    resumed.update_parameters(student)
    torch.testing.assert_close(resumed.module[3].weight, 0.5 * before + 0.5 * student[3].weight)
    assert int(resumed.n_averaged) == 2

    fresh = EMA(net(), 0.5)
    fresh.load_state_dict(EMA(net(), 0.5).state_dict())   # a checkpoint from before any update
    fresh.update_parameters(student)
    torch.testing.assert_close(fresh.module[3].weight, student[3].weight)   # copies


def test_ema_decay_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="decay"):
        EMA(net(), 1.5)


def test_frozen_parameters_are_shared_not_copied():
    """A LoRA network's frozen base is the same tensors in its EMA (the average of a constant is
    itself): only the trained parameters are copied and averaged, and a checkpoint holds the shared
    tensor once."""
    import io

    student = net()
    student[0].requires_grad_(False)  # the "base"
    ema = EMA(student, 0.5)
    assert ema.module[0].weight is student[0].weight and ema.module[0].bias is student[0].bias
    assert ema.module[3].weight is not student[3].weight
    train_a_little(student, 0)
    ema.update_parameters(student)
    train_a_little(student, 1)
    before = ema.module[3].weight.clone()
    ema.update_parameters(student)
    torch.testing.assert_close(ema.module[3].weight, 0.5 * before + 0.5 * student[3].weight)
    both, alone = io.BytesIO(), io.BytesIO()
    torch.save({"student": student.state_dict(), "ema": ema.state_dict()}, both)
    torch.save({"student": student.state_dict()}, alone)
    frozen = student[0].weight.numel() * 4
    assert len(both.getvalue()) - len(alone.getvalue()) < sum(p.numel() * 4 for p in student.parameters()) - frozen + 4096
