"""Progress output says where a run is going: updates out of the run's total, the rate and the
time left, in the plain log lines and in the rich bar; and a run started from another run's weights
says which weights it loaded."""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from conftest import run_cli

# two epochs of 3 updates: the total comes from max_epochs (no max_steps), validation each epoch
TWO_EPOCHS = ("experiment=digits_teacher", "debug=smoke", "trainer.max_steps=-1", "trainer.max_epochs=2",
              "trainer.limit_train_batches=3")
LINE = re.compile(r"step (\d+)/6 \(epoch (\d)\), [\d.]+ (?:it/s|s/it), (\d+)s left, .*loss=")


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> tuple:
    """A short run with plain progress lines and an EMA: its output and run dir."""
    runs = tmp_path_factory.mktemp("progress_runs")
    r = run_cli(*TWO_EPOCHS, f"runs_dir={runs}", "name=source", "callbacks.progress=plain",
                "callbacks.ema.enabled=true")
    assert r.returncode == 0, r.output
    return r, runs / "digits_teacher" / "source"


def test_plain_lines_show_steps_of_the_total_rate_and_time_left(source_run):
    r, _ = source_run
    assert "training from step 0 to 6 (max_steps=-1, max_epochs=2)" in r.output, r.output
    seen = [(int(m.group(1)), int(m.group(2))) for m in LINE.finditer(r.output)]
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5, 6], r.output  # log_every_n_steps=1 in debug=smoke
    assert [e for _, e in seen] == [0, 0, 0, 1, 1, 1]
    assert re.search(r"step 6/6 \(epoch 1\), [^\n]*0s left", r.output), r.output
    assert re.search(r"step 3/6 \(epoch 0\), val/acc=[\d.]+ val/loss=", r.output), r.output


def test_rich_bar_counts_steps_of_the_run_not_batches_of_the_epoch(runs_dir):
    r = run_cli(*TWO_EPOCHS, f"runs_dir={runs_dir}", "callbacks.progress=rich", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.output
    assert "step 6/6" in r.output, r.output
    assert "Epoch 1/1" not in r.output, r.output  # Lightning's own: the epoch of max_epochs, its batches


def test_a_run_from_another_runs_weights_logs_what_it_loaded(runs_dir, source_run):
    _, source = source_run
    r = run_cli("experiment=digits_teacher", "debug=smoke", f"runs_dir={runs_dir}", "callbacks.progress=none",
                f"model.checkpoint={source / 'last.ckpt'}", "name=ft")
    assert r.returncode == 0, r.output
    assert (f"model.checkpoint: loaded 22 tensors into the student (DigitsCNN) from {source.resolve() / 'last.ckpt'} "
            "(step 6, its EMA weights)") in r.output, r.output
    assert (runs_dir / "digits_teacher" / "ft" / "last.ckpt").is_file()


# --------------------------------------------------------------------------- the arithmetic
def _trainer(step: int, max_steps: int = -1, max_epochs: int = -1, batches: float = 100, epoch: int = 0):
    return SimpleNamespace(global_step=step, max_steps=max_steps, max_epochs=max_epochs, current_epoch=epoch,
                           num_training_batches=batches, accumulate_grad_batches=2)


@pytest.mark.parametrize("max_steps, max_epochs, batches, total", [
    (40, 30, 100, 40),          # max_steps ends it first
    (-1, 30, 100, 1500),        # 30 epochs of 100 batches, 2 per update
    (5000, 30, 100, 1500),      # max_epochs ends it first
    (-1, -1, 100, None),        # nothing bounds it
    (-1, 3, float("inf"), None),  # a loader of unknown length
])
def test_the_total_is_the_first_limit_reached(max_steps, max_epochs, batches, total):
    from distillkit.callbacks.progress import RunPace

    pace = RunPace()
    trainer = _trainer(0, max_steps, max_epochs, batches)
    pace.start(trainer, object())  # no steps_per_epoch: the loader's batches over the accumulation
    assert pace.total(trainer) == total


def test_a_resumed_run_counts_its_rate_from_its_own_updates(monkeypatch):
    import distillkit.callbacks.progress as progress

    now = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    pace = progress.RunPace()
    trainer = _trainer(100, max_steps=200, epoch=3)
    pace.start(trainer, object())
    assert pace.describe(trainer) == "step 100/200 (epoch 3)"  # no update yet: no rate
    now[0] += 30.0  # the first update of the session, slow (start-up): left out of the rate
    pace.tick(101)
    now[0] += 1.0
    pace.tick(111)
    trainer.global_step = 111
    assert pace.describe(trainer) == "step 111/200 (epoch 3), 10.0 it/s, 9s left"


@pytest.mark.parametrize("seconds, text", [(59.4, "59s"), (281, "4m41s"), (3725, "1h02m"), (90000, "1d01h")])
def test_durations_read_at_a_glance(seconds, text):
    from distillkit.callbacks.progress import format_duration

    assert format_duration(seconds) == text


def test_slow_updates_show_seconds_per_update():
    from distillkit.callbacks.progress import format_rate

    assert (format_rate(11.24), format_rate(0.5)) == ("11.2 it/s", "2.00 s/it")


def test_the_rich_bars_description_is_the_epoch_alone():
    from distillkit.callbacks.progress import StepProgressBar

    bar = StepProgressBar()
    assert bar._get_train_description(3).strip() == "Epoch 3"
