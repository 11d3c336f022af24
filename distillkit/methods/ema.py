"""The exponential moving average of a network's weights: the sampling EMA (``callbacks.ema``)
and DSD's target network (``method.target=ema``).

    W_ema <- decay * W_ema + (1 - decay) * W        (the first update copies W)

It is torch's ``AveragedModel`` with ``get_ema_multi_avg_fn`` (``torch.optim.swa_utils``;
docs/architecture.md, Decisions), the same state dict (``module.*``, ``n_averaged``) and the same
numbers, with one change: ``AveragedModel.update_parameters`` tests ``n_averaged == 0`` and
``n_averaged > 0`` in Python, and ``n_averaged`` is a buffer on the network's device, so on a GPU
every update waited twice for all the work queued before it (twice more for DSD's target
network). Here whether the average has started is kept on the host; the buffer is read once,
at the first update after a state-dict load (a resumed run).

Frozen parameters (a LoRA network's base weights) are not copied: the average of a tensor that
never changes is itself, so the EMA shares them with its network (:func:`copy_sharing_frozen`) and
holds only copies of what trains (docs/memory.md). ``torch.save`` writes a shared tensor once.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def copy_sharing_frozen(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose frozen parameters (``requires_grad=False``: a LoRA model's
    base weights) are the original's tensors, not copies."""
    memo = {id(p): p for p in module.parameters() if not p.requires_grad}
    return copy.deepcopy(module, memo)


class EMA(AveragedModel):
    """An EMA copy of ``model`` (parameters and floating-point buffers, e.g. BatchNorm statistics,
    averaged; integer buffers copied). ``update_parameters(model)`` after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float):
        decay = float(decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay={decay} must lie in [0, 1]")
        super().__init__(nn.Module(), use_buffers=True)
        self.module = copy_sharing_frozen(model)
        self.decay = decay
        self._started: Optional[bool] = False  # n_averaged > 0, on the host; None: read the buffer

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._started = None  # n_averaged came from a checkpoint

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        if self._started is None:
            self._started = bool(self.n_averaged > 0)
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if len(mine) != len(theirs):
            raise ValueError(f"EMA of a network with {len(mine)} tensors updated from one with {len(theirs)}")
        avg, new = [], []
        for a, b in zip(mine, theirs):
            if a is b or a.data_ptr() == b.data_ptr():
                continue  # a frozen tensor shared with the network
            if a.is_floating_point() or a.is_complex():
                avg.append(a)
                new.append(b)
            else:
                a.copy_(b)  # e.g. BatchNorm's num_batches_tracked: a count, not a weight
        if avg:
            if self._started:
                torch._foreach_lerp_(avg, new, 1.0 - self.decay)
            else:
                torch._foreach_copy_(avg, new)
        self.n_averaged += 1
        self._started = True


__all__ = ["EMA", "copy_sharing_frozen"]
