"""Stable Diffusion 1.5 and SDXL from a local diffusers pipeline folder (``model=sd15``, ``model=sdxl``
and the same names under ``teacher=``), as :class:`~distillkit.models.denoiser.Denoiser` objects.

    distill method=diffusion model=sd15 model.pretrained=/models/stable-diffusion-v1-5 \\
            dataset=image_text_folder dataset.data_dir=/data/pokemon

The folder is what ``StableDiffusionPipeline.save_pretrained`` (or a hub download) writes:
``unet/`` (UNet2DConditionModel), ``vae/`` (AutoencoderKL), ``text_encoder/`` + ``tokenizer/``
(CLIP), for SDXL also ``text_encoder_2/`` (CLIPTextModelWithProjection) + ``tokenizer_2/``, and
``scheduler/scheduler_config.json``, whose noise schedule (betas, T) and prediction type the
denoiser takes. Everything is read with ``from_pretrained(..., local_files_only=True)``: nothing is
downloaded. A missing folder, subfolder or file is one error naming ``model.pretrained`` (or
``teacher.pretrained``) and what is missing.

Text conditioning follows the pipelines' ``encode_prompt``: SD1.5 takes the CLIP text encoder's last
hidden state (77 tokens) and builds its unconditional branch from the empty prompt; SDXL concatenates
the penultimate hidden states of both encoders, takes the pooled, projected embedding of the second
(``text_embeds``), adds the time ids (original size, crop top-left, target size; Podell et al. 2023,
Sec. 2.2) and, as ``force_zeros_for_empty_prompt`` says, uses zeros for the unconditional branch.
A UNet whose config has ``time_cond_proj_dim`` (an LCM folder: Luo et al. 2023, Sec. 4.2) takes the
guidance scale in its time embedding instead (``Denoiser.embeds_guidance``, ``timestep_cond``).

The frozen parts (VAE, text encoders; the whole network of a teacher) are held in
``frozen_dtype``: ``auto`` is bfloat16 on a GPU and float32 on a CPU. A VAE whose config asks
``force_upcast`` (SDXL's) stays in float32. ``gradient_checkpointing`` trades compute for the
activations' memory; ``lora_rank`` trains a LoRA adapter (peft, through diffusers' adapter API) on
``lora_target_modules`` of a frozen UNet instead of the whole network, and then only the adapter's
weights enter the state dict, the checkpoints and the optimizer.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from distillkit.errors import DistillError
from distillkit.models.denoiser import Cond, Denoiser
from distillkit.models.lora import DEFAULT_LORA_TARGETS, add_lora

VARIANTS = ("sd15", "sdxl")
# what each variant's folder must hold: subfolder -> the file that says what is there
REQUIRED = {
    "sd15": {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json", "tokenizer": None,
             "scheduler": "scheduler_config.json"},
    "sdxl": {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json", "tokenizer": None,
             "text_encoder_2": "config.json", "tokenizer_2": None, "scheduler": "scheduler_config.json"},
}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                "pytorch_model.bin", "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors")


def resolve_dtype(name: str) -> torch.dtype:
    """``frozen_dtype``: auto (bfloat16 on a GPU, float32 on a CPU), float32, bfloat16, float16."""
    if name in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise DistillError(f"frozen_dtype={name}: allowed values are auto, float32, bfloat16, float16")
    return table[name]


def check_folder(pretrained: str, variant: str) -> Path:
    """The pipeline folder, checked: every subfolder the variant needs, with its config and weights."""
    p = Path(str(pretrained)).expanduser()
    if not p.is_dir():
        raise DistillError(f"pretrained={pretrained}: no such folder. Point it at a local diffusers "
                           f"{'StableDiffusionXLPipeline' if variant == 'sdxl' else 'StableDiffusionPipeline'} folder "
                           "(nothing is downloaded at run time)")
    for sub, config in REQUIRED[variant].items():
        d = p / sub
        if not d.is_dir():
            raise DistillError(f"pretrained={pretrained}: no {sub}/ subfolder (a {variant} pipeline folder holds "
                               f"{', '.join(s + '/' for s in REQUIRED[variant])})")
        if config and not (d / config).is_file():
            raise DistillError(f"pretrained={pretrained}: {sub}/{config} is missing")
        if config == "config.json" and not any((d / w).is_file() for w in WEIGHT_FILES):
            raise DistillError(f"pretrained={pretrained}: {sub}/ holds no weights ({' or '.join(WEIGHT_FILES[:2])})")
        if config is None and not ((d / "vocab.json").is_file() or (d / "tokenizer.json").is_file()):
            raise DistillError(f"pretrained={pretrained}: {sub}/ holds no tokenizer (vocab.json + merges.txt)")
    return p


def folder_identity(folder: Path, parts: Sequence[str]) -> str:
    """A hash of the configs and weight files (names, sizes, modification times) of ``parts``: what
    a latent / text-embedding cache is keyed by, so a changed model never reads a stale cache."""
    h = hashlib.sha256()
    for sub in parts:
        for f in sorted((folder / sub).glob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{sub}/{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
                if f.suffix == ".json":
                    h.update(f.read_bytes())
    return h.hexdigest()[:16]


def schedule_from_folder(folder: Path):
    """The NoiseSchedule and prediction type of ``scheduler/scheduler_config.json``."""
    from distillkit.diffusion.schedules import BETA_SCHEDULES, NoiseSchedule

    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    name = cfg.get("beta_schedule", "linear")
    if name not in BETA_SCHEDULES or cfg.get("trained_betas"):
        raise DistillError(f"pretrained={folder}: scheduler/scheduler_config.json has beta_schedule={name!r} "
                           f"(distillkit reads {', '.join(sorted(set(BETA_SCHEDULES.values())))})")
    schedule = NoiseSchedule(name, num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
                             beta_start=cfg.get("beta_start"), beta_end=cfg.get("beta_end"),
                             rescale_betas_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)))
    schedule.scheduler_config = cfg
    return schedule, cfg.get("prediction_type", "epsilon")


class TextImageCodec(nn.Module):
    """The frozen parts of a latent text-to-image model: VAE, text encoders and tokenizers. It is the
    dataset's encoder (``encode_prompts``, ``encode_images``, ``identity``) and the denoiser's codec
    (``decode``, ``null_condition``, ``unet_inputs``). Shared, never copied: a deep copy is itself."""

    def __init__(self, folder: Path, variant: str, dtype: torch.dtype):
        super().__init__()
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        kw = {"local_files_only": True}
        self.variant = variant
        self.folder = folder
        self.frozen_dtype = dtype
        vae_config = json.loads((folder / "vae" / "config.json").read_text())
        self.vae_dtype = torch.float32 if vae_config.get("force_upcast", False) else dtype
        self.vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=self.vae_dtype, **kw)
        self.vae.eval().requires_grad_(False)
        self.tokenizers = [CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), **kw)]
        encoders = [CLIPTextModel.from_pretrained(str(folder / "text_encoder"), torch_dtype=dtype, **kw)]
        if variant == "sdxl":
            self.tokenizers.append(CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2"), **kw))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(str(folder / "text_encoder_2"),
                                                                        torch_dtype=dtype, **kw))
        self.text_encoders = nn.ModuleList(e.eval().requires_grad_(False) for e in encoders)
        self.scale = float(self.vae.config.scaling_factor)
        self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.latent_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = int(self.vae.config.latent_channels)
        index = folder / "model_index.json"
        self.force_zeros = bool(json.loads(index.read_text()).get("force_zeros_for_empty_prompt", variant == "sdxl")) \
            if index.is_file() else variant == "sdxl"
        self._identity = folder_identity(folder, [s for s in REQUIRED[variant] if s not in ("unet", "scheduler")])
        self._empty: Optional[Cond] = None

    def __deepcopy__(self, memo: dict) -> "TextImageCodec":
        return self

    def train(self, mode: bool = True) -> "TextImageCodec":
        return super().train(False)  # frozen: dropout off, always

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    def identity(self) -> str:
        """The folder's VAE, text encoders and tokenizers, and the dtype they run in."""
        return f"{self.variant}-{self._identity}-{str(self.frozen_dtype).removeprefix('torch.')}"

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Cond:
        """The pipelines' ``encode_prompt`` for a list of prompts (see the module docstring)."""
        prompts = list(prompts)
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            if self.variant == "sd15":
                hidden.append(enc(ids)[0])
                continue
            out = enc(ids, output_hidden_states=True)
            if out[0].ndim == 2:
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        cond = {"encoder_hidden_states": torch.cat(hidden, dim=-1)}
        if self.variant == "sdxl":
            cond["text_embeds"] = pooled
        return cond

    def null_condition(self, cond: Cond) -> Cond:
        """The unconditional branch: zeros where the pipeline forces them (SDXL), else the empty
        prompt's embeddings; SDXL's size conditioning is kept."""
        B = cond["encoder_hidden_states"].shape[0]
        if self.force_zeros:
            out = {k: torch.zeros_like(v) for k, v in cond.items() if k in ("encoder_hidden_states", "text_embeds")}
        else:
            if self._empty is None or self._empty["encoder_hidden_states"].device != self.device:
                self._empty = self.encode_prompts([""])
            out = {k: v.to(cond[k].device, cond[k].dtype).expand(B, *v.shape[1:]) for k, v in self._empty.items()}
        out.update({k: v for k, v in cond.items() if k in ("original_size", "crop_top_left")})
        return out

    def unet_inputs(self, cond: Cond, x: torch.Tensor) -> dict:
        return text_unet_inputs(cond, x, self.latent_scale)

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> latents (the VAE posterior's mean, shifted and scaled as
        the model was trained on them)."""
        z = self.vae.encode(x.to(self.device, self.vae_dtype)).latent_dist.mode()
        return ((z - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (the VAE's decoder; the pipelines' ``vae.decode(z / scale + shift)``)."""
        x = self.vae.decode((z / self.scale + self.shift).to(self.device, self.vae_dtype)).sample
        return x.float().clamp(-1, 1)


def text_unet_inputs(cond: Cond, x: torch.Tensor, latent_scale: int = 8) -> dict:
    """UNet2DConditionModel's keyword arguments for ``cond`` at latents ``x``: the text embeddings and,
    when ``cond`` has SDXL's pooled ``text_embeds``, the added time ids (original size, crop top-left,
    target size in pixels; the target is the latents' size times ``latent_scale``, and a missing
    original size or crop defaults to the target and (0, 0), as the pipeline's defaults)."""
    dtype = x.dtype
    kw: dict[str, Any] = {"encoder_hidden_states": cond["encoder_hidden_states"].to(dtype)}
    if "text_embeds" in cond:
        B, (h, w) = x.shape[0], x.shape[-2:]
        # filled on the device: a tensor copied from the host would wait for the GPU's queue every call
        target = torch.cat([torch.full((B, 1), float(h * latent_scale), device=x.device),
                            torch.full((B, 1), float(w * latent_scale), device=x.device)], dim=1)
        orig = cond.get("original_size")
        orig = target if orig is None else orig.to(x.device).float()
        crop = cond.get("crop_top_left")
        crop = torch.zeros(B, 2, device=x.device) if crop is None else crop.to(x.device).float()
        time_ids = torch.cat([orig, crop, target], dim=1)
        kw["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"].to(dtype), "time_ids": time_ids.to(dtype)}
    return kw


_CODECS: dict[tuple, TextImageCodec] = {}


def shared_codec(folder: Path, variant: str, dtype: torch.dtype) -> TextImageCodec:
    """One codec per (folder, variant, dtype) in a process: teacher and student of the same pipeline
    share their VAE and text encoders."""
    key = (str(folder.resolve()), variant, dtype, folder_identity(folder, ["vae", "text_encoder"]))
    if key not in _CODECS:
        _CODECS[key] = TextImageCodec(folder, variant, dtype)
    return _CODECS[key]


def stable_diffusion(pretrained: str, variant: str = "sd15", frozen_dtype: str = "auto",
                     gradient_checkpointing: bool = False, lora_rank: Optional[int] = None,
                     lora_alpha: Optional[float] = None, lora_target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
                     resolution: Optional[int] = None) -> Denoiser:
    """The denoiser of a local SD1.5 / SDXL pipeline folder (see the module docstring)."""
    from diffusers import UNet2DConditionModel

    if variant not in VARIANTS:
        raise DistillError(f"variant={variant!r}: allowed values are {', '.join(VARIANTS)}")
    folder = check_folder(pretrained, variant)
    dtype = resolve_dtype(frozen_dtype)
    schedule, prediction_type = schedule_from_folder(folder)
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), local_files_only=True)
    unet.train()  # from_pretrained returns eval mode; a teacher is put back in eval by build_teacher
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    codec = shared_codec(folder, variant, dtype)
    size = int(resolution or unet.config.sample_size * codec.latent_scale) // codec.latent_scale
    den = Denoiser(unet, prediction_type=prediction_type, schedule=schedule, condition="text", codec=codec,
                   sample_shape=(codec.latent_channels, size, size), pretrained=str(folder))
    den.variant = variant
    den.frozen_dtype = dtype
    den.lora = None
    if lora_rank:
        add_lora(den, int(lora_rank), float(lora_alpha or lora_rank), list(lora_target_modules))
        if dtype != torch.float32:  # the frozen base in frozen_dtype; the adapter stays float32 (master weights)
            for name, p in den.unet.named_parameters():
                if "lora_" not in name:
                    p.data = p.data.to(dtype)
    return den


__all__ = ["stable_diffusion", "TextImageCodec", "check_folder", "schedule_from_folder", "resolve_dtype", "add_lora",
           "DEFAULT_LORA_TARGETS", "VARIANTS"]
