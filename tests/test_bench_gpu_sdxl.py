"""scripts/bench_gpu_sdxl_diffusion.py on a CPU with the tiny SDXL UNet (--tiny): every variant runs
and gives a row (the timings of the tiny network mean nothing; the GPU run is the benchmark)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_gpu_sdxl_diffusion as bench  # noqa: E402


def test_tiny_run_writes_rows(tmp_path):
    out = tmp_path / "x.json"
    assert bench.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["name"] == "gpu_sdxl_diffusion" and result["warmup"] == 2 and result["updates"] == 2
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == list(bench.VARIANTS)
    for r in rows.values():
        assert r["method"] == "diffusion" and r["batch_size"] == 1 and r["resolution"] > 0
        assert not r.get("oom") and r["s_per_step"] > 0
    for v in ("full", "full_gc"):
        assert rows[v]["trainable_params"] == result["unet_params"] > 1_000_000
    for v in ("lora", "lora_gc"):
        assert 0 < rows[v]["trainable_params"] == result["lora_params"] < rows["full"]["trainable_params"] / 20
    assert rows["frozen_forward"]["trainable_params"] == 0
    assert rows["full_gc"]["gradient_checkpointing"] and not rows["full"]["gradient_checkpointing"]
    with pytest.raises(SystemExit):  # the default --out is the GPU run's file: not written by a CPU run
        bench.main(["--tiny", "--device", "cpu"])

