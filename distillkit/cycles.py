"""Schedules in updates that come in cycles: the learning rate annealed afresh in every round of
step distillation (``optim.scheduler.cycle_steps``), an evaluation at the end of every round
(``eval.every_n_steps``), the rounds themselves (``method.updates_per_round`` / ``_level``).

Each of these settings is an int (cycles of that many updates) or a list of lengths (cycles of
those lengths in turn, the last one repeating), so that rounds of unequal length, e.g.
``method.updates_per_round=[250,250,250,250,1500,3500]``, anneal and evaluate per round through
the experiments' ``${method.updates_per_round}`` interpolations.
"""
from __future__ import annotations

import bisect
import itertools
from typing import Any

from omegaconf import ListConfig

from distillkit.errors import DistillError


def cycle_lengths(value: Any, key: str, *, allow_zero: bool = True) -> list[int]:
    """The cycle lengths of setting ``key``: ``[]`` for 0 (no cycles, where ``allow_zero``),
    ``[n]`` for an int n >= 1, the list itself for a list of ints >= 1."""
    if isinstance(value, ListConfig):  # from the composed config
        value = list(value)
    items = list(value) if isinstance(value, (list, tuple)) else None
    try:
        if items is None:
            n = _whole(value)
            if n == 0 and allow_zero:
                return []
            items = [n]
        lengths = [_whole(v) for v in items]
    except (TypeError, ValueError):
        lengths = []
    if not lengths or min(lengths) < 1:
        zero = " or 0 (none)" if allow_zero else ""
        raise DistillError(f"{key}={value}: give a number of updates >= 1{zero}, or a list of them, one per "
                           f"round, e.g. {key}=[250,250,1500,4000]")
    return lengths


def _whole(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)) or float(v) != int(float(v)):
        raise ValueError(v)
    return int(float(v))


def cycle_position(step: int, lengths: list[int]) -> tuple[int, int]:
    """(updates into its cycle, the cycle's length) of update number ``step`` (0-based)."""
    ends = list(itertools.accumulate(lengths))
    if step < ends[-1]:
        i = bisect.bisect_right(ends, step)
        return step - (ends[i - 1] if i else 0), lengths[i]
    return (step - ends[-1]) % lengths[-1], lengths[-1]


def ends_cycle(step: int, lengths: list[int]) -> bool:
    """Whether ``step`` updates complete a cycle (``step`` > 0)."""
    return bool(lengths) and step > 0 and cycle_position(step, lengths)[0] == 0
