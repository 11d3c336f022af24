"""DMD2 on latent text-to-image models (tiny random SD1.5 and SDXL folders, tests/tiny_sd.py).

Through the CLI: ``method=dmd2`` with ``model=`` / ``teacher=sd15`` or ``sdxl`` on real latents
(``dataset=image_text_folder``, so the GAN has real data) and a guided real score, a few generator
updates; the checkpoint holds the fake score and the GAN head, a LoRA run's only the adapters of the
generator and of the fake score. The runs' exports load in diffusers and, sampled with their
``LCMScheduler`` over the trained timesteps, draw distill-sample's images.

Same noise in both: distill-sample (:func:`distillkit.sample.generate`) draws the starting latents and
then the later steps' re-noising from one generator seeded with ``seed``, as a diffusers pipeline
does with ``generator=torch.Generator().manual_seed(seed)``.

The one difference left is LCMScheduler's consistency boundary condition: it returns
c_skip(t) x_t + c_out(t) x0 where our sampler returns x0, c_skip = 0.25 / (0.25 + (10 t)^2) and
1 - c_out ~ c_skip / 2 (timestep_scaling = 10): 2.5e-9 at t = 999, 1.0e-8 at 499, 4.0e-8 at 249. On
the tiny random models' latents (|x| ~ 70, their x0-predictions at t = 999 are eps / alpha_999) it
moves the last step's latents by ~4e-6 (~6e-8 relative, measured against timestep_scaling = 1e6), the
float32 rounding of the two computations by about as much; decoded, both stay ~1e-6. The tests
compare latents to 1e-6 relative and images to 2e-4 (test_stable_diffusion's tolerance).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import run_cli_all  # noqa: E402
from tiny_sd import TINY_RESOLUTION, make_tiny_sd15, make_tiny_sdxl, write_image_text_folder  # noqa: E402

PROMPTS = ["a cat", "a red dog"]
SEED = 3
TIMESTEPS = {"sd15": [999, 499], "sdxl": [999, 749, 499, 249]}  # the latter: experiment=dmd2_sdxl_4step's
GUIDANCE = {"sd15": 1.75, "sdxl": 8.0}  # the real score's, as experiment=dmd2_sd15 / dmd2_sdxl


def _args(folders: dict, variant: str, runs: Path, *extra: str) -> list[str]:
    folder = folders[variant]
    return ["method=dmd2", f"model={variant}", f"model.pretrained={folder}", f"teacher={variant}",
            f"teacher.pretrained={folder}", "dataset=image_text_folder", f"dataset.data_dir={folders['images']}",
            f"dataset.resolution={TINY_RESOLUTION}", "dataset.batch_size=2", f"dataset.cache_dir={runs / 'cache'}",
            "dataset.val_fraction=0", "trainer.max_epochs=-1", "trainer.max_steps=2",
            "method.critic_updates_per_generator_update=2", f"method.real_guidance={GUIDANCE[variant]}",
            f"method.timesteps=[{','.join(map(str, TIMESTEPS[variant]))}]", "eval=none", "callbacks.progress=none",
            "trainer.test_after_fit=false", f"runs_dir={runs}", "name=r", *extra]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny_sd")
    return {"sd15": make_tiny_sd15(root / "sd15"), "sdxl": make_tiny_sdxl(root / "sdxl"),
            "images": write_image_text_folder(root / "images"), "root": root}


@pytest.fixture(scope="module")
def runs(folders) -> dict:
    """Three dmd2 runs through the CLI, at once (each is mostly ~13 s of single-threaded
    imports): SD1.5 and SDXL with full generators, and SD1.5 with LoRA adapters."""
    root = folders["root"]
    jobs = {"sd15": _args(folders, "sd15", root / "sd15_runs"), "sdxl": _args(folders, "sdxl", root / "sdxl_runs"),
            "lora": _args(folders, "sd15", root / "lora_runs", "model.lora_rank=4", "model.lora_alpha=4",
                          "optim.optimizer.lr=1e-2", "optim.scheduler.warmup_steps=0")}  # the paper's 500 would stall it
    run_cli_all(jobs)
    return {name: root / f"{name}_runs" / "default" / "r" for name in jobs}


def _checkpoint(run: Path) -> dict:
    return torch.load(run / "last.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_dmd2_trains_on_latents_with_a_guided_real_score(runs, variant):
    run = runs[variant]
    res = json.loads((run / "results.json").read_text())
    assert res["global_step"] == 2  # generator updates
    ckpt = _checkpoint(run)
    keys = list(ckpt["state_dict"])
    for prefix in ("student.unet.", "fake_score.unet.", "gan_head."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert not any(k.startswith("teacher.") or "vae" in k or "text_encoder" in k for k in keys)
    # batches 0 and 2 update the generator, each batch the critic: stopped at the 2nd generator update
    assert ckpt["distillkit"]["role_updates"] == {"generator": 2, "critic": 3}
    assert len(ckpt["optimizer_states"]) == 2 and all(o["state"] for o in ckpt["optimizer_states"])
    assert ckpt["distillkit"]["image_shape"] == [4, 16, 16]
    config = ckpt["distillkit"]["config"]["method"]
    assert config["timesteps"] == TIMESTEPS[variant] and config["real_guidance"] == GUIDANCE[variant]


def test_lora_dmd2_keeps_only_the_adapters_of_generator_and_fake_score(runs):
    ckpt = _checkpoint(runs["lora"])
    keys = list(ckpt["state_dict"])
    nets = [k for k in keys if k.startswith(("student.", "fake_score."))]
    assert any(k.startswith("student.") for k in nets) and any(k.startswith("fake_score.") for k in nets)
    assert all("lora_" in k for k in nets), [k for k in nets if "lora_" not in k][:5]  # no base weights
    assert any(k.startswith("gan_head.") for k in keys)  # the GAN head is small and trained whole
    assert set(keys) == set(nets) | {k for k in keys if k.startswith("gan_head.")}
    student = {k[len("student."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    fake = {k[len("fake_score."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("fake_score.")}
    assert student.keys() == fake.keys()
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in student.items())  # the generator's adapter trained


def _pipeline_images(pipe, timesteps, seed: int, output_type: str = "np", **kw):
    """The pipeline's samples with the generator seeded with ``seed`` (latents, then re-noising)."""
    out = pipe(PROMPTS, num_inference_steps=len(timesteps), timesteps=timesteps, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(seed), height=TINY_RESOLUTION, width=TINY_RESOLUTION,
               output_type=output_type, **kw).images
    return out if output_type == "latent" else torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1


def _ours(method, steps: int, seed: int = SEED):
    """distill-sample's images and, undecoded, its latents; and the starting latents z."""
    from distillkit.sample import generate, sampling_condition

    images = generate(method, len(PROMPTS), steps, seed=seed, prompts=PROMPTS, guidance=1.0)
    g = torch.Generator().manual_seed(seed)
    z = method.draw_noise(len(PROMPTS), g)
    cond = sampling_condition(method, len(PROMPTS), g, prompts=PROMPTS)
    latents = method.sample_from_noise(z, steps, generator=g, cond=cond, decode=False)
    return images, latents, z


def _check_lcm(scheduler, timesteps) -> None:
    from diffusers import LCMScheduler

    c = scheduler.config
    assert isinstance(scheduler, LCMScheduler)
    assert (c.num_train_timesteps, c.beta_schedule, c.beta_start, c.beta_end, c.prediction_type) == \
        (1000, "scaled_linear", 0.00085, 0.012, "epsilon")  # tiny_sd's SD schedule
    assert (c.original_inference_steps, c.timestep_scaling, c.clip_sample, c.thresholding) == (1000, 10.0, False, False)
    scheduler.set_timesteps(len(timesteps))  # trailing, evenly spaced timesteps need no explicit list
    assert scheduler.timesteps.tolist() == timesteps


def _assert_close(latents, ours_latents, images, ours_images) -> None:
    scale = ours_latents.abs().max()
    assert (latents - ours_latents).abs().max() <= 1e-6 * scale, ((latents - ours_latents).abs().max(), scale)
    assert images.shape == ours_images.shape == (len(PROMPTS), 3, TINY_RESOLUTION, TINY_RESOLUTION)
    assert torch.allclose(images, ours_images, atol=2e-4), (images - ours_images).abs().max()


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_export_samples_with_lcm_over_the_trained_timesteps_as_distill_sample(runs, tmp_path, capsys, variant):
    from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from distillkit.export import main as export_main
    from distillkit.models.loading import load_run_checkpoint

    ts = TIMESTEPS[variant]
    out = tmp_path / "export"
    export_main([f"checkpoint={runs[variant] / 'last.ckpt'}", f"out={out}"])
    assert f"timesteps={ts}" in capsys.readouterr().out
    info = json.loads((out / "distillkit.json").read_text())
    assert (info["method"], info["scheduler"], info["timesteps"], info["num_inference_steps"]) == \
        ("dmd2", "LCMScheduler", ts, len(ts))
    cls = StableDiffusionXLPipeline if variant == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    _check_lcm(pipe.scheduler, ts)

    method = load_run_checkpoint(runs[variant] / "last.ckpt")
    ours, ours_latents, z = _ours(method, len(ts))
    latents = _pipeline_images(pipe, ts, SEED, "latent")
    _assert_close(latents, ours_latents, _pipeline_images(pipe, ts, SEED), ours)
    # the boundary condition alone (timestep_scaling 10 against ~ infinity) is as small as promised
    lcm, pipe.scheduler = pipe.scheduler, LCMScheduler.from_config(pipe.scheduler.config, timestep_scaling=1e6)
    boundary = (latents - _pipeline_images(pipe, ts, SEED, "latent")).abs().max()
    pipe.scheduler = lcm
    assert boundary <= 5e-7 * ours_latents.abs().max(), boundary  # measured: ~6e-8 relative, 1 float32 ulp

    # one step (t = 999, the trailing grid of 1): no re-noising, the pipeline's own draw from the seed
    one = pipe(PROMPTS, num_inference_steps=1, timesteps=[999], guidance_scale=1.0,
               generator=torch.Generator().manual_seed(SEED), height=TINY_RESOLUTION, width=TINY_RESOLUTION,
               output_type="np").images
    one = torch.from_numpy(one).permute(0, 3, 1, 2) * 2 - 1
    assert torch.allclose(one, _ours(method, 1)[0], atol=2e-4)
    assert not torch.allclose(one, ours, atol=1e-2)  # the steps matter
    # one step from pure noise at t = 399, as experiment=dmd2_sdxl trains and DMD2's model card samples
    # (LCMScheduler, timesteps=[399]): a generator with those timesteps samples so through distill-sample
    method.timesteps, method.num_steps = [399], 1
    at399 = pipe(PROMPTS, num_inference_steps=1, timesteps=[399], guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(SEED), height=TINY_RESOLUTION, width=TINY_RESOLUTION,
                 output_type="np").images
    at399 = torch.from_numpy(at399).permute(0, 3, 1, 2) * 2 - 1
    assert torch.allclose(at399, _ours(method, 1)[0], atol=2e-4)
    assert not torch.allclose(at399, one, atol=1e-2)


def test_lora_export_samples_with_lcm_on_the_base_pipeline(runs, folders, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from distillkit.export import main as export_main
    from distillkit.models.loading import load_run_checkpoint

    ts = TIMESTEPS["sd15"]
    out = tmp_path / "lora_export"
    export_main([f"checkpoint={runs['lora'] / 'last.ckpt'}", f"out={out}"])
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "unet").exists()
    assert json.loads((out / "distillkit.json").read_text())["timesteps"] == ts
    pipe = StableDiffusionPipeline.from_pretrained(str(folders["sd15"]), local_files_only=True,
                                                   scheduler=LCMScheduler.from_pretrained(str(out / "scheduler")))
    pipe.set_progress_bar_config(disable=True)
    _check_lcm(pipe.scheduler, ts)
    method = load_run_checkpoint(runs["lora"] / "last.ckpt")
    ours, ours_latents, z = _ours(method, len(ts))
    base = _pipeline_images(pipe, ts, SEED)
    pipe.load_lora_weights(str(out))
    _assert_close(_pipeline_images(pipe, ts, SEED, "latent"), ours_latents,
                  _pipeline_images(pipe, ts, SEED), ours)
    assert not torch.allclose(base, ours, atol=1e-3)  # the adapter matters


def test_pixel_generator_export_loads_as_ddim_pipeline_and_steps_with_its_lcm_scheduler(tmp_path):
    """A pixel DMD2 generator's DDIMPipeline folder carries the LCMScheduler: DDIMPipeline turns it into
    the trailing DDIMScheduler (the generator's sampler at one step); the LCM loop over the folder's
    UNet2DModel and scheduler draws distill-sample's multi-step images."""
    from diffusers import DDIMPipeline, DDIMScheduler, LCMScheduler, UNet2DModel

    from distillkit.export import export_pipeline
    from distillkit.methods.dmd import DMD2
    from distillkit.models.unet import DiffusersUNet
    from distillkit.sample import generate

    def unet():
        torch.manual_seed(0)
        return DiffusersUNet(sample_size=8, in_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                             down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                             up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32, norm_num_groups=8)

    ts = [1023, 511]
    m = DMD2(unet(), unet(), schedule_cfg={"name": "cosine", "num_train_timesteps": 1024}, input_shape=(1, 8, 8),
             optim_cfg={"optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True}}, timesteps=ts).eval()
    out = export_pipeline(m, tmp_path / "export", use_ema=False)
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == ["diffusers", "LCMScheduler"]
    pipe = DDIMPipeline.from_pretrained(str(out))
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.timestep_spacing == "trailing"
    one = pipe(batch_size=3, generator=torch.Generator().manual_seed(SEED), num_inference_steps=1, output_type="np")
    one = torch.from_numpy(one.images).permute(0, 3, 1, 2) * 2 - 1
    assert torch.allclose(one, generate(m, 3, 1, seed=SEED), atol=1e-5)

    net = UNet2DModel.from_pretrained(str(out), subfolder="unet")
    scheduler = LCMScheduler.from_pretrained(str(out), subfolder="scheduler")
    scheduler.set_timesteps(timesteps=ts)
    g = torch.Generator().manual_seed(SEED)  # the latents, then the re-noising, as distill-sample draws them
    x = torch.randn((3, 1, 8, 8), generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t).sample, t, x, generator=g).prev_sample
    assert torch.allclose(x.clamp(-1, 1), generate(m, 3, len(ts), seed=SEED), atol=1e-5)
