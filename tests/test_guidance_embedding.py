"""LCM's guidance-scale embedding (Luo et al. 2023, Sec. 4.2) at the model boundary.

``Denoiser.add_guidance_embedding`` gives a UNet the ``cond_proj`` of diffusers'
``train_lcm_distill_sd_wds.py``; such a network is told diffusers' w as LCM's w' = w - 1 through
``get_guidance_scale_embedding`` in one call, exactly as ``StableDiffusionPipeline`` runs a UNet with
``time_cond_proj_dim``: checked against a hand call of the UNet and against the pipeline itself with
an LCMScheduler. UNet2DModel (no ``timestep_cond`` argument) gets it through a hook that survives
deep copies and a save / load round trip.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_sd import TINY_RESOLUTION, make_tiny_sd15, write_tokenizer_files  # noqa: E402

from distillkit.diffusion import NoiseSchedule  # noqa: E402
from distillkit.errors import DistillError  # noqa: E402
from distillkit.models.denoiser import Denoiser, as_denoiser  # noqa: E402

PROMPTS = ["a cat", "a red dog"]


def embedding(w_minus_1: torch.Tensor, dim: int = 256) -> torch.Tensor:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.get_guidance_scale_embedding(None, w_minus_1, embedding_dim=dim)


def pixel_denoiser(num_classes=3, dim=None) -> Denoiser:
    from distillkit.models.unet import DiffusersUNet

    torch.manual_seed(0)
    net = DiffusersUNet(sample_size=8, in_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                        norm_num_groups=4, add_attention=False, num_classes=num_classes)
    den = as_denoiser(net, NoiseSchedule("cosine", 1024), "v").eval()
    if dim:
        den.add_guidance_embedding(dim)
    return den


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """A tiny SD1.5 folder, its denoiser given a 256-wide guidance embedding, and that written back as
    an LCM pipeline folder (LCMScheduler, unet config with time_cond_proj_dim)."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from distillkit.models.stable_diffusion import stable_diffusion

    root = tmp_path_factory.mktemp("lcm")
    base = make_tiny_sd15(root / "base")
    plain = stable_diffusion(str(base), frozen_dtype="float32").eval()
    den = stable_diffusion(str(base), frozen_dtype="float32").eval()
    assert not den.embeds_guidance and den.guidance_embedding_dim is None
    torch.manual_seed(0)
    den.add_guidance_embedding(256)
    pipe = StableDiffusionPipeline.from_pretrained(str(base), local_files_only=True, unet=den.unet,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(str(root / "lcm"), safe_serialization=True)
    write_tokenizer_files(root / "lcm" / "tokenizer")  # as tiny_sd does, for transformers 4
    return {"plain": plain, "den": den, "lcm": root / "lcm", "cond": den.encode_prompts(PROMPTS)}


def inputs(B=2, shape=(1, 8, 8)):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, *shape, generator=g), torch.tensor([50, 700])[:B]


def test_the_embedding_is_diffusers_bit_for_bit_built_without_a_host_copy():
    """distillkit's copy of get_guidance_scale_embedding fills its one constant on the device (diffusers'
    torch.tensor(10000.0) is a host copy at every network call on a GPU): the same values, even and odd
    widths, any w dtype."""
    from distillkit.models.denoiser import guidance_scale_embedding

    ws = [torch.zeros(3), torch.tensor([0.0, 1.0, 2.5, 14.0]), torch.rand(5, dtype=torch.float64) * 14,
          torch.linspace(-1, 20, 9).half()]
    for dim in (4, 17, 256):
        for w in ws:
            ours, theirs = guidance_scale_embedding(w, dim), embedding(w, dim)
            assert ours.dtype == theirs.dtype == torch.float32 and torch.equal(ours, theirs), (dim, w.dtype)


def test_add_guidance_embedding_is_idempotent_and_only_for_unets():
    from distillkit.models.mlp import MLPDenoiser

    den = pixel_denoiser()
    assert not den.embeds_guidance and den.guidance_embedding_dim is None
    den.add_guidance_embedding(16)
    proj = den.unet.time_embedding.cond_proj
    assert den.embeds_guidance and den.guidance_embedding_dim == 16
    assert proj.in_features == 16 and proj.out_features == den.unet.time_embedding.linear_1.in_features
    assert proj.bias is None and "unet.time_embedding.cond_proj.weight" in den.state_dict()
    assert den.add_guidance_embedding(16).unet.time_embedding.cond_proj is proj  # again: nothing happens
    with pytest.raises(DistillError, match="width 16, not 32"):
        den.add_guidance_embedding(32)
    mlp = as_denoiser(MLPDenoiser(hidden=16, depth=1), NoiseSchedule("cosine", 1024), "v")
    with pytest.raises(DistillError, match="MLPDenoiser"):
        mlp.add_guidance_embedding()


def test_the_embedding_changes_the_output_and_zero_weights_are_the_plain_network():
    plain, den = pixel_denoiser(), pixel_denoiser(dim=16)
    x, t = inputs()
    cond = {"class_labels": torch.tensor([0, 2])}
    with torch.no_grad():
        a, b = den(x, t, cond), den(x, t, cond, guidance=8.0)  # w' = 0 and w' = 7
        assert not torch.allclose(a, b)
        assert torch.equal(den(x, t, cond, guidance=1.0), a)
        den.unet.time_embedding.cond_proj.weight.zero_()
        assert torch.equal(den(x, t, cond, guidance=8.0), plain(x, t, cond))
    # the hook leaves nothing behind on the module
    assert "_distillkit_guidance" not in den.unet.time_embedding.__dict__


def test_per_sample_guidance_and_one_call_for_pixel_unets():
    den = pixel_denoiser(dim=16)
    x, t = inputs()
    cond = {"class_labels": torch.tensor([1, 1])}
    calls = []
    den.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    with torch.no_grad():
        per_sample = den.guided(x, t, cond, torch.tensor([1.0, 5.0]))
        assert calls == [2]  # one call, no unconditional branch
        assert torch.allclose(per_sample[0], den(x, t, cond, 1.0)[0], atol=1e-6)
        assert torch.allclose(per_sample[1], den(x, t, cond, 5.0)[1], atol=1e-6)
        assert torch.equal(den.model_fn(cond, 5.0)(x, t), den(x, t, cond, 5.0))


def test_deep_copies_condition_with_their_own_weights():
    den = pixel_denoiser(dim=16)
    twin = copy.deepcopy(den)
    x, t = inputs()
    cond = {"class_labels": torch.tensor([0, 1])}
    with torch.no_grad():
        assert torch.equal(twin(x, t, cond, 6.0), den(x, t, cond, 6.0))
        twin.unet.time_embedding.cond_proj.weight.mul_(3)
        changed = twin(x, t, cond, 6.0)
        assert not torch.allclose(changed, den(x, t, cond, 6.0))
        twin.unet.time_embedding.cond_proj.weight.zero_()  # the copy's hook reads the copy's weights
        assert torch.equal(twin(x, t, cond, 6.0), pixel_denoiser()(x, t, cond))


def test_pixel_save_and_from_pretrained_keep_the_embedding(tmp_path):
    den = pixel_denoiser(dim=16)
    den.save_pretrained(tmp_path / "den")
    assert json.loads((tmp_path / "den" / "denoiser.json").read_text())["guidance_embedding_dim"] == 16
    back = Denoiser.from_pretrained(tmp_path / "den").eval()
    assert back.embeds_guidance and back.guidance_embedding_dim == 16 and back.condition == "class"
    assert torch.equal(back.unet.time_embedding.cond_proj.weight, den.unet.time_embedding.cond_proj.weight)
    x, t = inputs()
    cond = {"class_labels": torch.tensor([2, 0])}
    with torch.no_grad():
        w = torch.tensor([2.0, 7.5])
        assert torch.equal(back.guided(x, t, cond, w), den.guided(x, t, cond, w))


def test_sd15_guided_is_one_call_with_the_pipelines_timestep_cond(sd15):
    den, plain, cond = sd15["den"], sd15["plain"], sd15["cond"]
    assert den.unet.config.time_cond_proj_dim == 256
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 499])
    calls = []
    handle = den.unet.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    with torch.no_grad():
        ours = den.guided(x, t, cond, 7.5)
        handle.remove()
        assert calls == [2]
        by_hand = den.unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"],
                           timestep_cond=embedding(torch.tensor(7.5 - 1).repeat(2))).sample
        assert torch.equal(ours, by_hand)
        assert not torch.allclose(ours, den.guided(x, t, cond, 1.0))
        per_sample = den.guided(x, t, cond, torch.tensor([1.0, 7.5]))
        assert torch.allclose(per_sample[1], ours[1], atol=1e-6)
        assert torch.allclose(per_sample[0], den.guided(x, t, cond, None)[0], atol=1e-6)
        saved = den.unet.time_embedding.cond_proj.weight.clone()
        den.unet.time_embedding.cond_proj.weight.zero_()
        try:
            assert torch.equal(den(x, t, cond, 7.5), plain(x, t, cond))
        finally:
            den.unet.time_embedding.cond_proj.weight.copy_(saved)


def test_lcm_folder_loads_with_its_embedding_and_matches_the_pipeline(sd15):
    """The folder loads through model=sd15's loader with the embedding, and the diffusers pipeline with
    an LCMScheduler at guidance_scale=w draws what a hand loop over den.guided(x, t, cond, w) draws."""
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from diffusers.utils.torch_utils import randn_tensor

    from distillkit.models.stable_diffusion import stable_diffusion

    den, cond = sd15["den"], sd15["cond"]
    back = stable_diffusion(str(sd15["lcm"]), frozen_dtype="float32").eval()
    assert back.embeds_guidance and back.guidance_embedding_dim == 256
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 600])
    with torch.no_grad():
        assert torch.equal(back.guided(x, t, cond, 3.0), den.guided(x, t, cond, 3.0))

    w = 3.0
    pipe = StableDiffusionPipeline.from_pretrained(str(sd15["lcm"]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, LCMScheduler)
    theirs = pipe(PROMPTS, guidance_scale=w, num_inference_steps=2, output_type="latent",
                  generator=torch.Generator().manual_seed(0), height=TINY_RESOLUTION, width=TINY_RESOLUTION).images

    scheduler = LCMScheduler.from_pretrained(str(sd15["lcm"]), subfolder="scheduler")
    scheduler.set_timesteps(2)
    g = torch.Generator().manual_seed(0)
    z = randn_tensor(theirs.shape, generator=g) * scheduler.init_noise_sigma
    with torch.no_grad():
        for step_t in scheduler.timesteps:
            out = back.guided(scheduler.scale_model_input(z, step_t), step_t.expand(len(z)), cond, w)
            z = scheduler.step(out, step_t, z, generator=g).prev_sample
    assert torch.allclose(z, theirs, atol=1e-5), (z - theirs).abs().max()
    # guidance matters through the embedding
    other = pipe(PROMPTS, guidance_scale=1.0, num_inference_steps=2, output_type="latent",
                 generator=torch.Generator().manual_seed(0), height=TINY_RESOLUTION, width=TINY_RESOLUTION).images
    assert not torch.allclose(other, theirs, atol=1e-3)
