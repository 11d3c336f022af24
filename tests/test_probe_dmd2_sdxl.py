"""scripts/probe_dmd2_sdxl.py on a CPU with the tiny SDXL-style UNet (--tiny): every configuration
trains DMD2 under a Lightning Trainer and gives a row with the right generator / critic update
counts, a finite time per generator update, and FLOP counts whose checkpointing recomputation is
told apart (the timings of the tiny network mean nothing; the GPU run is the probe)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import probe_dmd2_sdxl as probe  # noqa: E402


def test_tiny_run_writes_rows(tmp_path):
    out = tmp_path / "x.json"
    assert probe.main(["--tiny", "--device", "cpu", "--peak-tflops", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["name"] == "gpu_dmd2_sdxl" and result["warmup"] == 1 and result["updates"] == 1
    assert result["method"]["critic_updates_per_generator_update"] == 5 and result["peak_bf16_tflops"] == 1.0
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == list(probe.CONFIGS)
    k, cycles = 5, result["warmup"] + result["updates"]
    for r in rows.values():
        assert r["method"] == "dmd2" and r["batch_size"] == 1 and r["resolution"] == 64 and not r.get("oom")
        assert r["critic_updates_per_generator_update"] == k
        # max_steps = cycles + 1 generator updates; one critic update per batch, K batches a cycle
        assert r["generator_updates"] == cycles + 1 and r["critic_updates"] == k * cycles + 1
        assert r["timed_updates"] == result["updates"]
        assert math.isfinite(r["s_per_update"]) and 0 < r["s_per_update_min"] <= r["s_per_update"]
        assert r["nfe_per_update"] > k and r["unet_forward_flops"] > 0
        assert r["model_flops_per_update"] == r["flops_per_update"] - r["recompute_flops_per_update"] > 0
        assert (r["recompute_flops_per_update"] > 0) == r["gradient_checkpointing"]
        assert r["forward_equivalents"] > k
        assert r["mfu"] == pytest.approx(r["model_flops_per_update"] / r["s_per_update"] / 1e12, abs=1e-4)
        assert r["hfu"] >= r["mfu"]
    head = rows["full"]["gan_head_params"]
    assert head > 0
    assert rows["full"]["generator_params"] == result["unet_params"]
    assert rows["full"]["critic_params"] == result["unet_params"] + head
    assert not rows["full"]["fake_score_shares_frozen_base"] and not rows["full"]["teacher_shares_frozen_base"]
    for c in ("lora", "lora_nockpt"):
        assert rows[c]["generator_params"] == result["lora_params"]
        assert rows[c]["critic_params"] == result["lora_params"] + head
        # one frozen base for the three networks, as DMD2 holds it when the teacher is the generator's folder
        assert rows[c]["fake_score_shares_frozen_base"] and rows[c]["teacher_shares_frozen_base"]
    # the same computation with and without checkpointing: the same model FLOPs
    assert rows["lora"]["model_flops_per_update"] == rows["lora_nockpt"]["model_flops_per_update"]
    assert rows["lora"]["gradient_checkpointing"] and not rows["lora_nockpt"]["gradient_checkpointing"]


def test_refusals_are_one_line():
    with pytest.raises(SystemExit) as e:  # the default --out is the GPU run's file: not written by a CPU run
        probe.main(["--tiny", "--device", "cpu"])
    assert "give --out" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:  # the SDXL-size probe needs CUDA
        probe.main(["--device", "cpu", "--out", "/nonexistent/x.json"])
    assert "needs a CUDA GPU" in str(e.value) and "\n" not in str(e.value)
