"""Cycles in updates (distillkit.cycles): one length or a list of lengths, as the per-round lr
anneal, the per-round evaluation and the rounds of step distillation read them."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from distillkit.callbacks.evaluation import SampleEvaluation
from distillkit.cycles import cycle_lengths, cycle_position, ends_cycle
from distillkit.errors import DistillError


def test_positions_in_equal_and_unequal_cycles():
    assert [cycle_position(k, [4]) for k in (0, 3, 4, 9)] == [(0, 4), (3, 4), (0, 4), (1, 4)]
    # [2, 3]: cycles [0, 2), [2, 5), then the last length repeats: [5, 8), [8, 11)
    assert [cycle_position(k, [2, 3]) for k in range(9)] == [
        (0, 2), (1, 2), (0, 3), (1, 3), (2, 3), (0, 3), (1, 3), (2, 3), (0, 3)]
    assert [k for k in range(12) if ends_cycle(k, [2, 3])] == [2, 5, 8, 11]
    assert not any(ends_cycle(k, []) for k in range(5))


def test_lengths_accept_an_int_or_a_list_and_name_the_key_otherwise():
    assert cycle_lengths(0, "k") == [] and cycle_lengths(5, "k") == [5] and cycle_lengths([2, 3], "k") == [2, 3]
    from omegaconf import OmegaConf

    assert cycle_lengths(OmegaConf.create({"v": [2, 3]}).v, "k") == [2, 3]
    for bad in (-1, [], [2, -1], 1.5, "x", True):
        with pytest.raises(DistillError, match="^k="):
            cycle_lengths(bad, "k")
    with pytest.raises(DistillError, match="k=0"):
        cycle_lengths(0, "k", allow_zero=False)


def test_evaluation_runs_at_the_end_of_each_round_of_a_list(monkeypatch):
    ev = SampleEvaluation(every_n_steps=[3, 5], steps=[1], num_samples=2)
    done = []
    monkeypatch.setattr(ev, "evaluate", lambda trainer, module: done.append(trainer.global_step))
    for step in range(1, 15):
        ev.on_train_batch_end(SimpleNamespace(global_step=step), None, None, None, 0)
    assert done == [3, 8, 13]
    with pytest.raises(DistillError, match="eval.every_n_steps"):
        SampleEvaluation(every_n_steps=-1, steps=[1], num_samples=2)
