"""A training update reads nothing back from the device: on a GPU every read of a tensor's value
into Python waits for all queued work and leaves the GPU idle until the CPU has queued the next
kernels. The harness (tests/host_reads.py) records such reads during training batches of real
CLI runs; the progress bar, checkpoints and evaluation are outside the batch."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
T = 1024
TOY = ["dataset=toy2d", "model=mlp2d", "schedule=cosine", f"schedule.num_train_timesteps={T}",
       "callbacks.ema.enabled=true", "debug=smoke", "callbacks.progress=none", "trainer.max_steps=8",
       "dataset.batch_size=32"]


def host_reads(out: Path, *args: str) -> dict:
    p = subprocess.run([sys.executable, str(HERE / "host_reads.py"), str(out), *args], cwd=HERE.parent,
                       capture_output=True, text=True, timeout=600)
    assert out.is_file(), p.stdout + p.stderr
    result = json.loads(out.read_text())
    assert result["exit_code"] == 0, p.stdout + p.stderr
    return result


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory) -> Path:
    import torch

    from distillkit.models.mlp import MLPDenoiser

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("toy_teacher") / "mlp2d.pt"
    torch.save(MLPDenoiser().state_dict(), path)
    return path


@pytest.mark.parametrize("method", [
    ["method=diffusion"],
    # two round changes: the round file, the new teacher and the grid come inside the batch
    ["teacher=mlp2d", "method=progressive", "method.teacher_steps=8", "method.final_steps=1",
     "method.updates_per_round=3"],
    ["teacher=self", "method=dsd", "method.variant=dsdi", "method.target=ema", "method.denoise_weight=0.5",
     "method.teacher_steps=8", "method.final_steps=2", "method.updates_per_level=4"],
    ["teacher=mlp2d", "method=tsd", "method.teacher_steps=8", "method.updates_per_level=8"],
], ids=["diffusion", "progressive", "dsdi", "tsd"])
def test_step_distillation_updates_read_nothing_back(tmp_path, toy_teacher, method):
    teacher = [f"teacher.checkpoint={toy_teacher}"] if "teacher=mlp2d" in method else []
    r = host_reads(tmp_path / "reads.json", *TOY, *method, *teacher, f"runs_dir={tmp_path / 'runs'}")
    assert r["updates"] == 8
    assert r["reads"] == {}, r["reads"]


@pytest.mark.parametrize("method", ["kd", "dkd"])
def test_classifier_updates_read_nothing_back(tmp_path, digits_teacher_ckpt, method):
    r = host_reads(tmp_path / "reads.json", f"experiment=digits_{method}", f"teacher.checkpoint={digits_teacher_ckpt}",
                   "callbacks.ema.enabled=true", "debug=smoke", "callbacks.progress=none",
                   f"runs_dir={tmp_path / 'runs'}")
    assert r["updates"] == 6
    assert r["reads"] == {}, r["reads"]


def test_the_harness_records_cuda_sync_warnings_at_their_call_site(monkeypatch):
    """On a GPU the harness turns on torch.cuda.set_sync_debug_mode("warn"); its warnings count
    as reads, at the line that called the synchronising operation."""
    sys.path.insert(0, str(HERE))
    try:
        import host_reads
    finally:
        sys.path.remove(str(HERE))
    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: shown.append(str(message)))
    monkeypatch.setattr(host_reads, "reads", host_reads.collections.Counter())
    monkeypatch.setattr(host_reads, "in_batch", [True])
    with warnings.catch_warnings():
        host_reads._record_cuda_syncs()
        warnings.warn("called a synchronizing CUDA operation", UserWarning)   # what torch's debug mode says
        warnings.warn("something else", UserWarning)
    (site, n), = host_reads.reads.items()
    assert n == 1 and site.startswith("CUDA sync at ") and "test_host_reads.py" in site
    assert shown == ["something else"]   # other warnings are shown as before
