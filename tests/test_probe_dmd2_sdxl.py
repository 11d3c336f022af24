"""scripts/probe_dmd2_sdxl.py on a CPU with the tiny SDXL-style UNet (--tiny): every configuration
trains DMD2 under a Lightning Trainer and gives a row with the right generator / critic update
counts, a finite time per generator update, and FLOP counts whose checkpointing recomputation is
told apart (the timings of the tiny network mean nothing; the GPU run is the probe)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import probe_dmd2_sdxl as probe  # noqa: E402


@pytest.fixture(scope="module")
def tiny_result(tmp_path_factory) -> dict:
    """The default configurations on the tiny UNet (shared: the fsdp test compares with its full row)."""
    out = tmp_path_factory.mktemp("probe") / "x.json"
    assert probe.main(["--tiny", "--device", "cpu", "--peak-tflops", "1", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_tiny_run_writes_rows(tiny_result):
    result = tiny_result
    assert result["name"] == "gpu_dmd2_sdxl" and result["warmup"] == 1 and result["updates"] == 1
    assert result["method"]["critic_updates_per_generator_update"] == 5 and result["peak_bf16_tflops"] == 1.0
    rows = {r["config"]: r for r in result["rows"]}
    assert list(rows) == probe.ONE_DEVICE == ["lora", "full", "lora_nockpt"]  # fsdp runs on its own
    k, cycles = 5, result["warmup"] + result["updates"] + 1  # the FLOP-counted cycle comes after the timed ones
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
    with pytest.raises(SystemExit) as e:  # Lightning's launcher runs the script again for fsdp's other devices
        probe.main(["--tiny", "--device", "cpu", "--configs", "full", "fsdp", "--out", "/nonexistent/x.json"])
    assert "--configs fsdp runs on its own" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        probe.main(["--tiny", "--device", "cpu", "--configs", "fsdp", "--devices", "0", "--out", "/nonexistent/x.json"])
    assert "--devices 0: give 1 to" in str(e.value) and "\n" not in str(e.value)


def test_fsdp_config_shards_over_two_processes(tmp_path, tiny_result):
    """--configs fsdp: Lightning starts a second process by running the script again (so not through
    main() here: it would run pytest again); the first writes one row, with each process's FLOPs
    those of the unsharded full configuration on its own batch."""
    out = tmp_path / "fsdp.json"
    cmd = [sys.executable, str(SCRIPTS / "probe_dmd2_sdxl.py"), "--tiny", "--device", "cpu", "--configs", "fsdp",
           "--devices", "2", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Starting with 2 processes" in r.stdout + r.stderr and "view tensor" not in r.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["config"] == "fsdp" and row["devices"] == 2 and row["gradient_checkpointing"] and not row.get("oom")
    assert row["generator_updates"] == 4 and row["critic_updates"] == 16 and math.isfinite(row["s_per_update"])
    (ref,) = [r for r in tiny_result["rows"] if r["config"] == "full"]
    for key in ("generator_params", "critic_params", "nfe_per_update", "flops_per_update", "model_flops_per_update"):
        assert row[key] == ref[key], key


def test_no_flops_run_leaves_the_flop_fields_empty(tmp_path):
    out = tmp_path / "x.json"
    assert probe.main(["--tiny", "--device", "cpu", "--configs", "lora", "--no-flops", "--memory-trace",
                       "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["flops_per_update"] is None and row["mfu"] is None and row["forward_equivalents"] is None
    assert math.isfinite(row["s_per_update"]) and "memory_trace" not in row  # the trace is CUDA's
    assert row["generator_updates"] == 1 + 1 + 1 and row["timed_updates"] == 1  # no counted cycle


def test_memory_summary_replays_the_trace_to_its_peak():
    M = 10 ** 7  # bytes: 100 M = 1 GB

    def fr(*names):
        return [{"filename": n.split(":")[0], "line": int(n.split(":")[1]), "name": "f"} for n in names]

    a = fr("/opt/torch/.venv/site-packages/torch/nn/conv.py:1", "/x/diffusers/unet.py:5", "/r/distillkit/methods/dmd.py:10")
    b = fr("/x/peft/lora.py:2", "/r/distillkit/methods/dmd.py:20")
    events = [{"action": "alloc", "addr": 1, "size": 100 * M, "frames": a},
              {"action": "alloc", "addr": 2, "size": 50 * M, "frames": b},
              {"action": "free_requested", "addr": 1, "size": 100 * M, "frames": a},
              {"action": "free_completed", "addr": 1, "size": 100 * M, "frames": a},
              {"action": "alloc", "addr": 3, "size": 120 * M, "frames": a},  # peak: 50 + 120
              {"action": "free_requested", "addr": 3, "size": 120 * M, "frames": a},
              {"action": "alloc", "addr": 4, "size": 10 * M, "frames": b}]
    peak, live, frames = probe.live_at_peak(events, baseline=1000 * M)
    assert peak == 1170 * M and set(live) == {2, 3} and frames == a
    s = probe.memory_summary(events, 1000 * M)
    assert s["live_blocks_at_peak"] == 2 and s["peak_reached_at"][0] == "distillkit/methods/dmd.py:10 f"
    assert s["by_distillkit_frame"] == {"distillkit/methods/dmd.py:10 f": 1.2, "distillkit/methods/dmd.py:20 f": 0.5}
    assert s["by_library_frame"] == {"torch/nn/conv.py:1 f": 1.2, "peft/lora.py:2 f": 0.5}
