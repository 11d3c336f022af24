"""Tiny random Stable Diffusion pipelines written to disk, for offline tests.

``make_tiny_sd15(path)`` and ``make_tiny_sdxl(path)`` write folders that
``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline.from_pretrained(path, local_files_only=True)``
load with nothing fetched from the Hugging Face hub. The weights are random (seeded, so every build
is the same); the point is the real file layout, configs and code paths of SD1.5 and SDXL at a size
that builds and runs in about a second on a CPU.

Sizes follow diffusers' own fast pipeline tests (tests/pipelines/stable_diffusion/test_stable_diffusion.py
and stable_diffusion_xl/test_stable_diffusion_xl.py): a (32, 64)-channel UNet2DConditionModel, a
2-block AutoencoderKL with 4 latent channels (downsampling factor 2), and 5-layer CLIP text encoders of
width 32. Unlike those tests, the CLIP tokenizer is not downloaded: it is built from a vocab.json and
merges.txt written here (CLIP's 256 byte-level symbols, their ``</w>`` forms, a few merges and the two
special tokens), with CLIP's model_max_length of 77.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: E402

TINY_RESOLUTION = 32  # image height = width, in pixels
VAE_SCALE_FACTOR = 2  # 2 VAE blocks -> one downsampling
LATENT_SIZE = TINY_RESOLUTION // VAE_SCALE_FACTOR  # 16, the UNet's sample_size
LATENT_CHANNELS = 4
TEXT_HIDDEN_SIZE = 32  # each CLIP text encoder's width (SD1.5 cross-attention dim; SDXL uses 2 x 32)
TOKENIZER_MAX_LENGTH = 77
TEXT_VOCAB_SIZE = 1000  # the text models' embedding rows; covers the 521-token tokenizer below

_MERGES = ["t h", "th e</w>", "a n", "an d</w>", "i n", "in g</w>", "o f</w>"]
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
# SD1.5 / SDXL training noise schedule.
_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) byte -> printable character map, 256 entries."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer_files(folder) -> tuple[Path, Path]:
    """Write the tiny CLIP BPE vocabulary to ``folder``/vocab.json and merges.txt: ids 0-511 are CLIP's 256
    byte-level symbols and their ``</w>`` forms, then the merges, then BOS and EOS (= pad) last, as in the
    real CLIP vocabulary (where EOS has the highest id)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in _MERGES] + [_BOS, _EOS]
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(_MERGES) + "\n", encoding="utf-8")
    return vocab_file, merges_file


def make_tokenizer() -> CLIPTokenizer:
    """The tiny CLIP tokenizer (521 tokens), built offline from the files ``write_tokenizer_files`` writes."""
    with tempfile.TemporaryDirectory() as d:
        tok = CLIPTokenizer(*map(str, write_tokenizer_files(d)), model_max_length=TOKENIZER_MAX_LENGTH)
    assert len(tok) <= TEXT_VOCAB_SIZE
    return tok


def _save(pipe, path: Path, tokenizer_dirs: list[str]) -> Path:
    pipe.save_pretrained(path, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; the vocab files let transformers 4's CLIPTokenizer load it too.
    for sub in tokenizer_dirs:
        write_tokenizer_files(path / sub)
    return path


def _text_config(tok: CLIPTokenizer, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=TEXT_VOCAB_SIZE, hidden_size=TEXT_HIDDEN_SIZE, intermediate_size=37, num_hidden_layers=5,
        num_attention_heads=4, layer_norm_eps=1e-5, max_position_embeddings=TOKENIZER_MAX_LENGTH,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra,
    )


def _vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=TINY_RESOLUTION,
    )


def _unet(seed: int, **kwargs) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        **kwargs,
    )


def write_image_text_folder(folder: Path, n: int = 8, size: tuple[int, int] = (40, 48)) -> Path:
    """``n`` random non-square RGB images (``size`` = height, width: centre-cropped and resized by the
    datasets and the evaluation) with a ``<stem>.txt`` caption each, as ``dataset=image_text_folder`` reads."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"picture number {i}")
    return folder


def make_tiny_sd15(path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny random SD1.5-style pipeline (unet, vae, text_encoder, tokenizer, DDIM scheduler) to ``path``."""
    path = Path(path)
    tok = make_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tok))
    scheduler = DDIMScheduler(**_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        vae=_vae(seed), text_encoder=text_encoder, tokenizer=tok,
        unet=_unet(seed, cross_attention_dim=TEXT_HIDDEN_SIZE), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return _save(pipe, path, ["tokenizer"])


def make_tiny_sdxl(path, seed: int = 0) -> Path:
    """Write a tiny random SDXL-style pipeline (two text encoders and tokenizers, Euler scheduler) to ``path``."""
    path = Path(path)
    tok = make_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(tok, hidden_act="gelu", projection_dim=TEXT_HIDDEN_SIZE))
    torch.manual_seed(seed + 1)  # not a copy of text_encoder, so swapping the two would show
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tok, hidden_act="gelu", projection_dim=TEXT_HIDDEN_SIZE))
    unet = _unet(
        seed, cross_attention_dim=2 * TEXT_HIDDEN_SIZE, attention_head_dim=(2, 4), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        # pooled text embeds (projection_dim 32) + 6 time ids x 8
        projection_class_embeddings_input_dim=TEXT_HIDDEN_SIZE + 6 * 8,
    )
    scheduler = EulerDiscreteScheduler(**_BETAS, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok,
        tokenizer_2=make_tokenizer(), unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return _save(pipe, path, ["tokenizer", "tokenizer_2"])


if __name__ == "__main__":
    import time

    torch.set_num_threads(1)
    kw = dict(prompt="a photo of the cat", num_inference_steps=2, guidance_scale=2.0,
              height=TINY_RESOLUTION, width=TINY_RESOLUTION, output_type="np")
    keys = ["latents", "prompt_embeds"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, make, cls, extra_keys in [
            ("sd15", make_tiny_sd15, StableDiffusionPipeline, []),
            ("sdxl", make_tiny_sdxl, StableDiffusionXLPipeline, ["add_text_embeds", "add_time_ids"]),
        ]:
            t0 = time.perf_counter()
            folder = make(Path(tmp, name))
            t1 = time.perf_counter()
            load_kw = {"safety_checker": None} if cls is StableDiffusionPipeline else {"add_watermarker": False}
            pipe = cls.from_pretrained(folder, local_files_only=True, **load_kw)
            pipe.set_progress_bar_config(disable=True)
            t2 = time.perf_counter()
            shapes = {}

            def grab(p, i, t, tensors, shapes=shapes):
                shapes.update({k: tuple(v.shape) for k, v in tensors.items()})
                return {}

            out = pipe(**kw, generator=torch.Generator().manual_seed(0), callback_on_step_end=grab,
                       callback_on_step_end_tensor_inputs=keys + extra_keys).images
            t3 = time.perf_counter()
            print(f"{name}: image {out.shape}, {shapes} (cfg doubles the batch of the embeddings); "
                  f"build {t1 - t0:.2f} s, load {t2 - t1:.2f} s, 2-step run {t3 - t2:.2f} s")
