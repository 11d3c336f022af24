"""``trainer.strategy=fsdp`` (distillkit.parallel): FSDP2 shards each diffusers block and each
network of the method over the devices. On the CPU (two gloo processes) a DMD2 run on digits, stopped
and resumed under FSDP, ends where the same run under DDP ends, with the same checkpoint; what FSDP
cannot shard is refused in one line; on a GPU (skipped without CUDA; the device sessions run this
file there) a DMD2 run of a tiny SDXL-class model trains, clips, checkpoints and resumes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import run_cli  # noqa: E402
from test_dmd import digits_teacher  # noqa: E402
from tiny_sd import TINY_RESOLUTION, make_tiny_sdxl, write_image_text_folder  # noqa: E402

from distillkit.errors import DistillError  # noqa: E402
from distillkit.parallel import check_shardable, shared_parameters  # noqa: E402


def _unet():
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def test_a_shared_frozen_base_and_a_model_without_blocks_are_refused():
    from distillkit.methods.ema import copy_sharing_frozen

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    net[0].requires_grad_(False)
    pair = torch.nn.ModuleDict({"generator": net, "critic": copy_sharing_frozen(net)})
    assert shared_parameters(pair) == ["critic.0.weight", "critic.0.bias"]
    with pytest.raises(DistillError, match="LoRA.*trainer.strategy=ddp"):
        check_shardable(pair)
    with pytest.raises(DistillError, match="no BasicTransformerBlock or ResnetBlock2D: use trainer.strategy=ddp"):
        check_shardable(torch.nn.Linear(2, 2))
    assert shared_parameters(_unet()) == [] and check_shardable(_unet()) is None


def test_the_cli_refuses_fsdp_for_a_classifier_in_one_line(tmp_path):
    r = run_cli("experiment=digits_teacher", "trainer.strategy=fsdp", f"runs_dir={tmp_path}", "debug=smoke")
    assert r.returncode == 2, r.output
    assert "distill: error: trainer.strategy=fsdp shards diffusers UNets block by block" in r.output
    assert "Traceback" not in r.output


def _ckpt(run: Path) -> dict:
    return torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)


def test_fsdp_dmd2_on_two_cpu_processes_resumes_and_matches_ddp(tmp_path):
    """Two gloo processes: DMD2 (two roles, manual optimization, the sampling EMA, gradient clipping)
    under FSDP for 2 generator updates, resumed to 4, against 4 under DDP. Same maths, so the same
    weights up to float rounding (the reductions' order differs), the same checkpoint layout (whole
    tensors, plain keys, both optimizers' states), and the same student.safetensors keys."""
    from safetensors.torch import load_file

    teacher = digits_teacher(tmp_path / "t.pt")
    args = ["experiment=digits_dmd2", f"teacher.checkpoint={teacher}", "trainer.accelerator=cpu", "trainer.devices=2",
            "method.critic_updates_per_generator_update=2", "dataset.batch_size=16", "eval=none",
            "callbacks.ema.enabled=true", "optim.gradient_clip_val=1.0", "callbacks.progress=none",
            "trainer.limit_val_batches=1", "trainer.test_after_fit=false", f"runs_dir={tmp_path}"]
    first = run_cli(*args, "name=fsdp", "trainer.strategy=fsdp", "trainer.max_steps=2", timeout=600)
    assert first.returncode == 0, first.output
    assert "trainer.strategy=fsdp: " in first.output and "sharded over 2 devices" in first.output
    resumed = run_cli(*args, "name=fsdp", "trainer.strategy=fsdp", "trainer.max_steps=4", timeout=600)
    assert resumed.returncode == 0, resumed.output
    assert "resuming from" in resumed.output
    ddp = run_cli(*args, "name=ddp", "trainer.strategy=ddp", "trainer.max_steps=4", timeout=600)
    assert ddp.returncode == 0, ddp.output
    run = tmp_path / "digits_dmd2"
    a, b = _ckpt(run / "fsdp"), _ckpt(run / "ddp")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("ema.") for k in a["state_dict"]) and any(k.startswith("gan_head.") for k in a["state_dict"])
    for k, v in a["state_dict"].items():
        assert v.shape == b["state_dict"][k].shape, k
        assert torch.allclose(v.float(), b["state_dict"][k].float(), atol=2e-3), k
    assert a["distillkit"]["role_updates"] == b["distillkit"]["role_updates"] == {"generator": 4, "critic": 7}
    assert [len(o["state"]) for o in a["optimizer_states"]] == [len(o["state"]) for o in b["optimizer_states"]]
    assert load_file(run / "fsdp" / "student.safetensors").keys() == load_file(run / "ddp" / "student.safetensors").keys()
    assert json.loads((run / "fsdp" / "results.json").read_text())["global_step"] == 4


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="a GPU run (bf16-mixed, NCCL): needs CUDA")


@needs_cuda
def test_fsdp_dmd2_trains_clips_and_resumes_on_a_gpu(tmp_path):
    folder = make_tiny_sdxl(tmp_path / "sdxl")
    images = write_image_text_folder(tmp_path / "images")
    args = ["method=dmd2", "model=sdxl", f"model.pretrained={folder}", "teacher=sdxl", f"teacher.pretrained={folder}",
            "dataset=image_text_folder", f"dataset.data_dir={images}", f"dataset.resolution={TINY_RESOLUTION}",
            "dataset.batch_size=2", f"dataset.cache_dir={tmp_path / 'cache'}", "dataset.val_fraction=0",
            "trainer.max_epochs=-1", "method.critic_updates_per_generator_update=2", "method.real_guidance=8",
            "method.timesteps=[999,499]", "optim.gradient_clip_val=1.0", "eval=none", "callbacks.progress=none",
            "callbacks.ema.enabled=true", "trainer.test_after_fit=false", f"runs_dir={tmp_path / 'runs'}",
            "trainer.accelerator=gpu", "trainer.devices=1"]
    plain = run_cli(*args, "name=plain", "trainer.max_steps=2")
    assert plain.returncode == 0, plain.output
    first = run_cli(*args, "name=fsdp", "trainer.strategy=fsdp", "trainer.max_steps=2")
    assert first.returncode == 0, first.output
    run = tmp_path / "runs" / "default"
    ckpt = torch.load(run / "fsdp" / "last.ckpt", map_location="cpu", weights_only=True)
    reference = torch.load(run / "plain" / "last.ckpt", map_location="cpu", weights_only=True)
    # a full state dict with the plain run's keys and shapes: it loads without FSDP (distill-sample, export)
    assert {k: v.shape for k, v in ckpt["state_dict"].items()} == {k: v.shape for k, v in reference["state_dict"].items()}
    assert ckpt["distillkit"]["role_updates"] == {"generator": 2, "critic": 3}
    assert len(ckpt["optimizer_states"]) == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    resumed = run_cli(*args, "name=fsdp", "trainer.strategy=fsdp", "trainer.max_steps=3")
    assert resumed.returncode == 0, resumed.output
    assert "resuming from" in resumed.output
    res = json.loads((run / "fsdp" / "results.json").read_text())
    assert res["global_step"] == 3

