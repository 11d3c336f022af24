"""Consistency distillation and LCM on latent text-to-image models (tiny random SD1.5 and SDXL
folders, tests/tiny_sd.py), through the CLI: ``method=consistency`` on SD1.5 with a guided teacher,
``method=lcm`` on SDXL (the student gets LCM's guidance embedding, ``time_cond_proj_dim``), and
LCM-LoRA on SD1.5 (an adapter only; the teacher is the same UNet with the adapter off). Their
exports load in diffusers and, sampled with their ``LCMScheduler``, draw distill-sample's images for
the same prompts, seed, steps and guidance (the LCM student: the pipeline's guidance embedding of
``guidance_scale - 1``, no classifier-free guidance; LCM-LoRA: ``load_lora_weights`` on the base
pipeline).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import run_cli_all  # noqa: E402
from test_dmd_sd import folders  # noqa: E402,F401  (the tiny SD1.5 / SDXL folders and images)
from tiny_sd import TINY_RESOLUTION  # noqa: E402

PROMPTS = ["a cat", "a red dog"]
SEED = 5
STEPS = 2


def _args(folders: dict, method: str, variant: str, runs: Path, *extra: str) -> list[str]:
    folder = folders[variant]
    return [f"method={method}", f"model={variant}", f"model.pretrained={folder}", f"teacher={variant}",
            f"teacher.pretrained={folder}", "dataset=image_text_folder", f"dataset.data_dir={folders['images']}",
            f"dataset.resolution={TINY_RESOLUTION}", "dataset.batch_size=2", f"dataset.cache_dir={runs / 'cache'}",
            "dataset.val_fraction=0", "trainer.max_epochs=-1", "trainer.max_steps=2", "eval=none",
            "callbacks.progress=none", "trainer.test_after_fit=false", f"runs_dir={runs}", "name=r", *extra]


@pytest.fixture(scope="module")
def runs(folders) -> dict:
    root = folders["root"]
    jobs = {"cm": _args(folders, "consistency", "sd15", root / "cm", "method.teacher_guidance=3.0"),
            "lcm": _args(folders, "lcm", "sdxl", root / "lcm", "method.w_min=3", "method.w_max=15",
                         "optim.optimizer.lr=1e-3"),
            "lora": _args(folders, "lcm", "sd15", root / "lora", "model.lora_rank=4", "model.lora_alpha=4",
                          "optim.optimizer.lr=1e-2"),
            # LCM-LoRA on SDXL: what experiment=lcm_lora_sdxl trains (its adapter on the SDXL pipeline)
            "lora_xl": _args(folders, "lcm", "sdxl", root / "lora_xl", "model.lora_rank=4", "model.lora_alpha=4",
                             "optim.optimizer.lr=1e-2")}
    run_cli_all(jobs)
    return {name: root / name / "default" / "r" for name in jobs}


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)


def test_runs_keep_online_target_and_their_sizes(runs):
    lcm = _checkpoint(runs["lcm"])["state_dict"]
    assert any(k.startswith("student.unet.time_embedding.cond_proj") for k in lcm)
    assert any(k.startswith("target_net.module.unet.time_embedding.cond_proj") for k in lcm)
    lora = _checkpoint(runs["lora"])["state_dict"]
    nets = [k for k in lora if k.startswith(("student.", "target_net.")) and not k.endswith("n_averaged")]
    assert any(k.startswith("target_net.") for k in nets) and all("lora_" in k for k in nets), nets[:5]
    assert not any("cond_proj" in k for k in lora)  # LCM-LoRA: no guidance embedding
    assert not any(k.startswith("teacher.") for k in list(lcm) + list(lora))


def _ours(method, guidance: float):
    from distillkit.sample import generate, sampling_condition

    images = generate(method, len(PROMPTS), STEPS, seed=SEED, prompts=PROMPTS, guidance=guidance)
    g = torch.Generator().manual_seed(SEED)
    z = method.draw_noise(len(PROMPTS), g)
    cond = sampling_condition(method, len(PROMPTS), g, prompts=PROMPTS)
    latents = method.sample_from_noise(z, STEPS, generator=g, cond=cond, guidance=guidance, decode=False)
    return images, latents


def _pipe_images(pipe, guidance: float, output_type: str):
    out = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, generator=torch.Generator().manual_seed(SEED),
               height=TINY_RESOLUTION, width=TINY_RESOLUTION, output_type=output_type).images
    return out if output_type == "latent" else torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1


def _assert_same(pipe, method, guidance: float) -> None:
    images, latents = _ours(method, guidance)
    theirs = _pipe_images(pipe, guidance, "latent")
    assert (theirs - latents).abs().max() <= 1e-5 * latents.abs().max(), (theirs - latents).abs().max()
    assert torch.allclose(_pipe_images(pipe, guidance, "np"), images, atol=2e-4)


@pytest.mark.parametrize("name, guidance", [("cm", 1.0), ("lcm", 6.0)])
def test_export_draws_distill_samples_images_with_lcmscheduler(runs, tmp_path, name, guidance):
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from distillkit.export import main as export_main
    from distillkit.models.loading import load_run_checkpoint

    out = tmp_path / "export"
    export_main([f"checkpoint={runs[name] / 'last.ckpt'}", f"out={out}"])
    info = json.loads((out / "distillkit.json").read_text())
    assert info["scheduler"] == "LCMScheduler" and info["original_inference_steps"] == 50
    cls = StableDiffusionXLPipeline if name == "lcm" else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert (pipe.unet.config.time_cond_proj_dim is not None) == (name == "lcm")
    method = load_run_checkpoint(runs[name] / "last.ckpt")
    _assert_same(pipe, method, guidance)
    if name == "lcm":  # the guidance reaches the student through its embedding
        assert not torch.allclose(_ours(method, 2.0)[1], _ours(method, guidance)[1])


@pytest.mark.parametrize("name, variant", [("lora", "sd15"), ("lora_xl", "sdxl")])
def test_lcm_lora_export_loads_on_the_base_pipeline(runs, folders, tmp_path, name, variant):
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from distillkit.export import main as export_main
    from distillkit.models.loading import load_run_checkpoint

    out = tmp_path / "lora_export"
    export_main([f"checkpoint={runs[name] / 'last.ckpt'}", f"out={out}"])
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "unet").exists()
    scheduler = LCMScheduler.from_pretrained(str(out / "scheduler"))
    if variant == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(str(folders["sdxl"]), local_files_only=True, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(folders["sd15"]), local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False, scheduler=scheduler)
    base = _pipe_images(pipe, 1.0, "np")
    pipe.load_lora_weights(str(out))
    pipe.set_progress_bar_config(disable=True)
    method = load_run_checkpoint(runs[name] / "last.ckpt")
    _assert_same(pipe, method, 1.0)
    assert not torch.allclose(base, _ours(method, 1.0)[0], atol=1e-3)  # the adapter changes the images
