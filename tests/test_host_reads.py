"""A training update reads nothing back from the device: on a GPU every read of a tensor's value
into Python waits for all queued work and leaves the GPU idle until the CPU has queued the next
kernels. The harness (tests/host_reads.py) records such reads during training batches of real
CLI runs; the progress bar, checkpoints and evaluation are outside the batch."""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest

from conftest import run_module

HERE = Path(__file__).resolve().parent
T = 1024
VP = ["schedule=cosine", f"schedule.num_train_timesteps={T}"]
TOY_RUN = ["dataset=toy2d", "model=mlp2d", "callbacks.ema.enabled=true", "debug=smoke", "callbacks.progress=none",
           "trainer.max_steps=8", "dataset.batch_size=32"]
TOY = [*TOY_RUN, *VP]


def host_reads(out: Path, *args: str) -> dict:
    p = run_module("host_reads", str(out), *args)
    assert out.is_file(), p.stdout + p.stderr
    result = json.loads(out.read_text())
    assert result["exit_code"] == 0, p.stdout + p.stderr
    return result


def harness():
    """tests/host_reads.py as a module (its wrappers are installed only by its main())."""
    sys.path.insert(0, str(HERE))
    try:
        import host_reads
    finally:
        sys.path.remove(str(HERE))
    return host_reads


# Work a step-distillation run does once per round or level, in the batch that starts it: build the
# round's grid on the device and write the finished round's student (torch.save copies it to the
# host). On a GPU both synchronise; once per 50,000 updates that costs nothing worth saving.
PER_ROUND = ("methods/step_distill.py:", " round_grid ", " save_round ")


def per_round(site: str) -> bool:
    return PER_ROUND[0] in site and any(f in site for f in PER_ROUND[1:])


@pytest.mark.parametrize("method,per_round_updates,updates", [
    (["method=diffusion"], None, 8),
    # two round changes: the round file, the new teacher and the grid come inside the batch
    (["teacher=mlp2d", "method=progressive", "method.teacher_steps=8", "method.final_steps=1",
      "method.updates_per_round=3"], 3, 8),
    (["teacher=self", "method=dsd", "method.variant=dsdi", "method.target=ema", "method.denoise_weight=0.5",
      "method.teacher_steps=8", "method.final_steps=2", "method.updates_per_level=4"], 4, 8),
    (["teacher=mlp2d", "method=tsd", "method.teacher_steps=8", "method.updates_per_level=8"], 8, 8),
    # progressive's conversion phase (an x0 student of a v teacher) and the other DSD paths
    (["teacher=mlp2d", "method=progressive", "method.prediction_type=x0", "method.teacher_prediction_type=v",
      "method.convert_updates=2", "method.teacher_steps=8", "method.final_steps=2", "method.updates_per_round=4"], 4, 8),
    (["teacher=self", "method=dsd", "method.variant=dsdn", "method.teacher_steps=8", "method.updates_per_level=7"], 7, 7),
    (["teacher=self", "method=dsd", "method.variant=dsdi", "method.from_scratch=true", "method.target=online",
      "method.latents=data", "method.teacher_steps=8", "method.final_steps=2", "method.updates_per_level=4"], 4, 8),
], ids=["diffusion", "progressive", "dsdi", "tsd", "progressive_convert", "dsdn", "dsdi_scratch_data"])
def test_step_distillation_updates_read_nothing_back(tmp_path, toy_teacher, method, per_round_updates, updates):
    teacher = [f"teacher.checkpoint={toy_teacher}"] if "teacher=mlp2d" in method else []
    r = host_reads(tmp_path / "reads.json", *TOY, *method, *teacher, f"runs_dir={tmp_path / 'runs'}")
    assert r["updates"] == updates  # DSDN's one level of 7 updates ends the run before max_steps
    per_update = {site: n for site, n in r["reads"].items() if not per_round(site)}
    assert per_update == {}, per_update
    for site, batches in r["batches"].items():  # only on a GPU: CPU runs see no syncs
        assert per_round(site) and all(b % per_round_updates == 0 for b in batches), (site, batches)


# The few-step generators on toy2d, the mlp2d teacher's: DMD and DMD2 (two roles under manual
# optimization; trainer.max_steps counts generator updates, each batch makes a critic update and every
# K-th a generator update first, so 8 generator updates at K = 2 are 15 batches) and consistency
# distillation. PAIRS: DMD's regression pairs (tests/test_dmd.py writes such a file), kept in host memory.
PAIRS = "pairs.safetensors"


@pytest.mark.parametrize("method,updates", [
    (["method=dmd", f"method.pairs={PAIRS}"], 8),
    (["method=dmd2", "method.critic_updates_per_generator_update=2"], 15),
    # four steps, backward simulation: the step index trained sets how many no-grad steps run first
    (["method=dmd2", "method.timesteps=[1023,767,511,255]", "method.critic_updates_per_generator_update=2"], 15),
    (["method=consistency"], 8),
    # EDM (Heun teacher steps, sigma boundary), iCT's curriculum through 4 discretisations (4 to 32
    # steps: a new one every 2 updates) and no target network
    (["method=consistency", "schedule=edm", "method.curriculum=ict", "method.curriculum_start=4",
      "method.curriculum_end=32", "method.target_decay=0", "method.distance=huber_elementwise"], 8),
], ids=["dmd", "dmd2", "dmd2_multistep_backward", "consistency", "consistency_edm_ict"])
def test_few_step_generator_updates_read_nothing_back(tmp_path, toy_teacher, method, updates):
    import torch

    from distillkit.pairs import save_pairs

    g = torch.Generator().manual_seed(0)
    save_pairs(tmp_path / PAIRS, torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g))
    method = [a.replace(PAIRS, str(tmp_path / PAIRS)) for a in method]
    schedule = [] if any(a.startswith("schedule=") for a in method) else VP
    r = host_reads(tmp_path / "reads.json", *TOY_RUN, *schedule, "teacher=mlp2d", f"teacher.checkpoint={toy_teacher}",
                   *method, f"runs_dir={tmp_path / 'runs'}")
    assert r["updates"] == updates
    assert r["reads"] == {}, r["reads"]


# Class-conditional digits (a randomly initialised unet_digits teacher with 10 classes): LCM's guided
# teacher steps and the student's guidance embedding; DMD2's guided real score, its GAN head on the
# UNet's mid block and a two-step generator fed noised real data.
@pytest.mark.parametrize("experiment,extra,updates", [
    ("digits_cond_lcm", [], 3),
    ("digits_cond_dmd2", ["method.timesteps=[1023,511]", "method.generator_inputs=real",
                          "method.critic_updates_per_generator_update=2"], 5),
], ids=["lcm", "dmd2_two_step_real"])
def test_class_conditional_generator_updates_read_nothing_back(tmp_path, experiment, extra, updates):
    from test_dmd import digits_teacher

    teacher = digits_teacher(tmp_path / "teacher.pt", num_classes=10)
    r = host_reads(tmp_path / "reads.json", f"experiment={experiment}", f"teacher.checkpoint={teacher}",
                   "callbacks.ema.enabled=true", "debug=smoke", "callbacks.progress=none", "eval=none",
                   "trainer.max_steps=3", *extra, f"runs_dir={tmp_path / 'runs'}")
    assert r["updates"] == updates
    assert r["reads"] == {}, r["reads"]


@pytest.mark.parametrize("method", ["kd", "dkd", "fitnet"])
def test_classifier_updates_read_nothing_back(tmp_path, digits_teacher_ckpt, method):
    r = host_reads(tmp_path / "reads.json", f"experiment=digits_{method}", f"teacher.checkpoint={digits_teacher_ckpt}",
                   "callbacks.ema.enabled=true", "debug=smoke", "callbacks.progress=none",
                   f"runs_dir={tmp_path / 'runs'}")
    assert r["updates"] == 6
    assert r["reads"] == {}, r["reads"]


def test_the_harness_records_cuda_sync_warnings_at_their_call_site(monkeypatch):
    """On a GPU the harness turns on torch.cuda.set_sync_debug_mode("warn"); its warnings count
    as reads, at the line that called the synchronising operation."""
    host_reads = harness()
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


def test_the_harness_records_mask_indexing_and_only_device_builds_on_a_gpu(monkeypatch):
    """x[mask] counts (its size is read back); gather does not. With CUDA, a tensor built from
    Python data counts only when it lands on the GPU: torch's multi-tensor Adam builds a CPU scalar
    every update (seen on an H200), which waits for nothing."""
    import torch

    host_reads = harness()
    for name in ("__getitem__", "__setitem__"):
        monkeypatch.setattr(torch.Tensor, name, getattr(torch.Tensor, name))  # undone after the test
        host_reads._wrap_mask_index(name)
    x, mask = torch.arange(6.0).view(2, 3), torch.tensor([[True, False, False], [False, True, False]])
    monkeypatch.setattr(torch, "tensor", torch.tensor)
    host_reads._wrap_build("tensor")
    monkeypatch.setattr(host_reads, "reads", host_reads.collections.Counter())
    monkeypatch.setattr(host_reads, "in_batch", [True])
    monkeypatch.setattr(host_reads, "cuda", [True])
    torch.tensor(1.0)  # a CPU scalar in a CUDA run: not counted
    x.gather(1, torch.zeros(2, 1, dtype=torch.long))
    x[0, 1:]
    assert sum(host_reads.reads.values()) == 0, host_reads.reads
    x[mask]
    x[mask] = 0.0
    monkeypatch.setattr(host_reads, "cuda", [False])
    torch.tensor(1.0)  # on a CPU run it may be a device build in a GPU run
    kinds = sorted(site.split(" at ")[0] for site in host_reads.reads.elements())
    assert kinds == ["boolean-mask index", "boolean-mask index", "torch.tensor(python data)"]


def test_per_round_sites_are_the_round_grid_and_round_file_of_step_distillation():
    # site strings as the harness wrote them on an H200
    assert per_round("CUDA sync at main/distillkit/methods/step_distill.py:293 save_round (from methods/step_distill.py:293)")
    assert per_round("CUDA sync at main/distillkit/methods/step_distill.py:193 round_grid (from methods/step_distill.py:193)")
    assert not per_round("CUDA sync at main/distillkit/methods/dkd.py:34 dkd_terms (from methods/dkd.py:34)")
    assert not per_round("CUDA sync at torch/autograd/graph.py:869 _engine_run_backward (from methods/step_distill.py:293)")
