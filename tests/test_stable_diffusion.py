"""The model boundary for latent text-to-image models: SD1.5 and SDXL from local folders, offline.

Tiny random pipelines (tests/tiny_sd.py, sizes of diffusers' own tests) are written to disk and
loaded as distillkit denoisers: guided sampling through our sampler equals the exported diffusers
pipeline's images, SDXL's added conditioning reaches the UNet, a `method=diffusion` run trains on
cached latents and text through the CLI, a LoRA run keeps only its adapter and resumes exactly, and
a missing or incomplete folder is one error naming the key.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_sd import TINY_RESOLUTION, make_tiny_sd15, make_tiny_sdxl, write_image_text_folder  # noqa: E402

PROMPTS = ["a cat", "a red dog"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny_sd")
    images = write_image_text_folder(root / "images")  # non-square: resized to 32 on the short side and cropped
    return {"sd15": make_tiny_sd15(root / "sd15"), "sdxl": make_tiny_sdxl(root / "sdxl"), "images": images,
            "root": root}


def method_for(folder: Path, variant: str, **kw):
    from distillkit.methods.diffusion import Diffusion
    from distillkit.models.stable_diffusion import stable_diffusion

    den = stable_diffusion(str(folder), variant=variant, **kw)
    return Diffusion(den, schedule_cfg={"name": "none", "num_steps": 4, "spacing": "trailing"},
                     input_shape=den.sample_shape).eval()


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_guided_sampling_equals_the_exported_pipeline(folders, tmp_path, variant):
    """distill-sample's images (our DDIM, our guidance) are the diffusers pipeline's, from the export."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from distillkit.export import export_pipeline
    from distillkit.sample import generate

    m = method_for(folders[variant], variant)
    assert m.student.prediction_type == "eps" and m.schedule.num_train_timesteps == 1000  # from scheduler_config.json
    ours = generate(m, 2, 4, seed=0, prompts=PROMPTS, guidance=3.0)
    out = export_pipeline(m, tmp_path / "export", use_ema=False)
    cls = StableDiffusionXLPipeline if variant == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(out), local_files_only=True)
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                  height=TINY_RESOLUTION, width=TINY_RESOLUTION, output_type="np").images
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2) * 2 - 1
    assert ours.shape == (2, 3, TINY_RESOLUTION, TINY_RESOLUTION)
    assert torch.allclose(ours, theirs, atol=2e-4), (ours - theirs).abs().max()
    # guidance 1 is the conditional branch alone; guidance matters
    assert not torch.allclose(ours, generate(m, 2, 4, seed=0, prompts=PROMPTS, guidance=1.0), atol=1e-3)


def test_unconditional_branch_is_built_as_the_pipelines_build_it(folders):
    sd15 = method_for(folders["sd15"], "sd15").student
    cond = sd15.encode_prompts(PROMPTS)
    null = sd15.null_condition(cond)
    assert torch.equal(null["encoder_hidden_states"], sd15.encode_prompts(["", ""])["encoder_hidden_states"])
    sdxl = method_for(folders["sdxl"], "sdxl").student
    cond = sdxl.encode_prompts(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (2, 77, 64) and cond["text_embeds"].shape == (2, 32)
    null = sdxl.null_condition(cond)
    assert not null["encoder_hidden_states"].any() and not null["text_embeds"].any()  # force_zeros_for_empty_prompt


def test_sdxl_added_conditioning_reaches_the_unet(folders):
    den = method_for(folders["sdxl"], "sdxl").student
    seen = {}
    den.unet.add_embedding.register_forward_hook(lambda mod, inp, out: seen.update(x=inp[0].clone()))
    cond = den.encode_prompts(PROMPTS)
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    with torch.no_grad():
        a = den(x, t, cond)
        add = seen["x"]
        # text_embeds, then the 6 time ids (original size, crop top-left, target size: 32 x 32 pixels)
        assert torch.equal(add[:, :32], cond["text_embeds"])
        b = den(x, t, {**cond, "original_size": torch.tensor([[64, 64], [64, 64]]),
                       "crop_top_left": torch.tensor([[8, 0], [8, 0]])})
    assert not torch.allclose(a, b)


def test_missing_or_incomplete_folder_is_one_error(folders, tmp_path, cli):
    import shutil

    from omegaconf import OmegaConf

    from distillkit.errors import DistillError
    from distillkit.models.loading import build_model

    (tmp_path / "p.txt").write_text("a cat\n")
    r = cli("method=diffusion", "dataset=prompts", f"dataset.path={tmp_path / 'p.txt'}", f"runs_dir={tmp_path}",
            "model=sd15", f"model.pretrained={tmp_path / 'nowhere'}")
    assert r.returncode == 2 and "model.pretrained=" in r.stderr and "no such folder" in r.stderr, r.output
    assert "Traceback" not in r.output

    def error(key: str, variant: str, folder) -> str:
        cfg = OmegaConf.create({"_target_": "distillkit.models.stable_diffusion.stable_diffusion",
                                "pretrained": str(folder), "variant": variant})
        with pytest.raises(DistillError) as e:
            build_model(cfg, key=key)
        return str(e.value)

    broken = tmp_path / "broken"
    shutil.copytree(folders["sd15"], broken)
    (broken / "vae" / "config.json").unlink()
    assert error("model", "sd15", broken) == f"model.pretrained={broken}: vae/config.json is missing"
    (broken / "vae" / "config.json").write_text("{}")
    for w in (broken / "unet").glob("*.safetensors"):
        w.unlink()
    assert "unet/ holds no weights" in error("model", "sd15", broken)
    msg = error("teacher", "sdxl", folders["sd15"])
    assert msg.startswith("teacher.pretrained=") and "no text_encoder_2/ subfolder" in msg


def _train(cli, folders, runs: Path, *extra: str):
    r = cli("method=diffusion", "model=sd15", f"model.pretrained={folders['sd15']}", "dataset=image_text_folder",
            f"dataset.data_dir={folders['images']}", f"dataset.resolution={TINY_RESOLUTION}", "dataset.batch_size=4",
            f"dataset.cache_dir={folders['root'] / 'cache'}", "dataset.val_fraction=0", "trainer.max_epochs=-1",
            "trainer.test_after_fit=false", "callbacks.progress=none", f"runs_dir={runs}", *extra)
    assert r.returncode == 0, r.output
    return r


def test_diffusion_on_latents_with_text_through_the_cli(folders, tmp_path, cli):
    _train(cli, folders, tmp_path, "trainer.max_steps=2")
    run = next((tmp_path / "default").iterdir())
    ckpt = torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["distillkit"]["image_shape"] == [4, 16, 16]  # latents of the 32-pixel images
    assert any(k.startswith("student.unet.") for k in ckpt["state_dict"])
    assert not any("vae" in k or "text_encoder" in k for k in ckpt["state_dict"])  # frozen parts stay out
    assert list((folders["root"] / "cache").glob("image_text_folder-*.safetensors"))  # latents cached once


def test_lora_run_keeps_the_adapter_alone_and_resumes_exactly(folders, tmp_path, cli):
    from safetensors.torch import load_file

    lora = ["model.lora_rank=4", "model.lora_alpha=8", "model.gradient_checkpointing=true", "optim.optimizer.lr=1e-2",
            "callbacks.checkpoint_every_n_steps=1"]
    _train(cli, folders, tmp_path / "whole", *lora, "trainer.max_steps=4")
    _train(cli, folders, tmp_path / "split", *lora, "trainer.max_steps=2")
    _train(cli, folders, tmp_path / "split", *lora, "trainer.max_steps=4")  # the same command resumes it
    whole = next((tmp_path / "whole" / "default").iterdir())
    split = next((tmp_path / "split" / "default").iterdir())
    ckpt = torch.load(split / "last.ckpt", map_location="cpu", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k for k in keys), keys[:5]
    assert ckpt["optimizer_states"][0]["state"]  # Adam's moments of the adapter
    assert json.loads((split / "results.json").read_text())["resumed_from"]
    a, b = load_file(str(whole / "student.safetensors")), load_file(str(split / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(str(whole / "student.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in start.items())  # the adapter trained

    # the adapter alone, exported: diffusers' load_lora_weights on the base pipeline draws distill-sample's images
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from distillkit.export import main as export_main
    from distillkit.models.loading import load_run_checkpoint
    from distillkit.sample import generate

    out = tmp_path / "lora_export"
    export_main([f"checkpoint={split / 'last.ckpt'}", f"out={out}"])
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "unet").exists()
    pipe = StableDiffusionPipeline.from_pretrained(str(folders["sd15"]), local_files_only=True,
                                                   scheduler=DDIMScheduler.from_pretrained(str(out / "scheduler")))
    pipe.load_lora_weights(str(out))
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                  height=TINY_RESOLUTION, width=TINY_RESOLUTION, output_type="np").images
    ours = generate(load_run_checkpoint(split / "last.ckpt"), 2, 4, seed=0, prompts=PROMPTS, guidance=2.0)
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2) * 2 - 1
    assert torch.allclose(ours, theirs, atol=2e-4), (ours - theirs).abs().max()
