"""The model boundary: one :class:`Denoiser` for pixel, class-conditional and latent text-to-image models.

A denoiser owns everything that turns a noisy sample into a prediction, so that methods, samplers'
callers, evaluation, ``distill-sample`` and ``distill-export`` never call a bare ``net(x_t, t)``:

    unet             the network: diffusers' UNet2DModel (pixels, optional class embedding),
                     UNet2DConditionModel (text: SD1.5, SDXL), or any ``net(x_t, t)`` (e.g. the toy2d MLP)
    prediction_type  what the network outputs: eps, v or x0
    schedule         the noise schedule: a pretrained folder's scheduler_config.json, else the
                     ``schedule=`` group
    condition        none, class labels, or text (prompt embeddings; for SDXL the pooled embedding and
                     the added time ids: original size, crop top-left, target size)
    codec            optional frozen latent codec (VAE) and text encoders, shared by every copy
    guidance         classifier-free guidance in diffusers' convention, for every method:

                         out = out_uncond + w * (out_cond - out_uncond),     w = 1: no guidance

                     ``w`` a number or a per-sample tensor of shape (B,) (LCM draws w per sample);
                     the unconditional branch is built as the pipeline builds it: the null class,
                     the empty prompt's embeddings (SD1.5), zero embeddings (SDXL's
                     ``force_zeros_for_empty_prompt``). A network with a guidance-scale embedding
                     (LCM, Luo et al. 2023, Sec. 4.2; :meth:`Denoiser.add_guidance_embedding`, or an
                     LCM folder's ``time_cond_proj_dim``) is instead told w: one call, no
                     unconditional branch, its time embedding conditioned on LCM's w' = w - 1, as
                     diffusers' pipelines run such a network.

Conditions travel as a dict of batch-first tensors (``cond``): ``{}`` (none),
``{"class_labels": (B,)}``, ``{"encoder_hidden_states": (B, L, D)}`` plus, for SDXL,
``"text_embeds": (B, D2)``, ``"original_size": (B, 2)`` and ``"crop_top_left": (B, 2)``. A batch
of a dataset is ``(x0, labels)`` (digits), ``{"x": latents, "cond": {...}}`` or ``{"cond": {...}}``
(prompts only); :meth:`Denoiser.split_batch` reads all three.

The frozen codec and the schedule are not submodules: they never enter a state dict, an optimizer
or an EMA copy (``copy.deepcopy`` of a denoiser shares them), and follow the network's device.
State-dict keys are ``unet.*``: the layout distillkit's pixel checkpoints have always had.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from distillkit.diffusion.parameterization import canonical_pred_type
from distillkit.diffusion.samplers import guided
from distillkit.errors import DistillError

Cond = dict  # dict[str, torch.Tensor], batch-first
Guidance = Union[float, torch.Tensor, None]
CONDITION_KINDS = ("none", "class", "text")


def _is_unet2d(net: nn.Module) -> bool:
    from diffusers import UNet2DModel

    return isinstance(net, UNet2DModel)


def _is_unet2d_condition(net: nn.Module) -> bool:
    from diffusers import UNet2DConditionModel

    return isinstance(net, UNet2DConditionModel)


def cond_batch_size(cond: Optional[Cond]) -> Optional[int]:
    for v in (cond or {}).values():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return int(v.shape[0])
    return None


def map_cond(cond: Optional[Cond], fn: Callable[[torch.Tensor], torch.Tensor]) -> Cond:
    """``fn`` applied to every tensor of a condition dict (slicing, moving, repeating)."""
    return {k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in (cond or {}).items()}


def cat_cond(a: Cond, b: Cond) -> Cond:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def where_cond(keep: torch.Tensor, cond: Cond, other: Cond) -> Cond:
    """Per sample: ``cond`` where ``keep`` (B,) is true, else ``other`` (label dropout)."""
    out = {}
    for k, v in cond.items():
        m = keep.to(v.device).reshape(keep.shape + (1,) * (v.ndim - 1))
        out[k] = torch.where(m, v, other[k].to(v.dtype))
    return out


def no_guidance(w: Guidance) -> bool:
    return w is None or (not isinstance(w, torch.Tensor) and float(w) == 1.0)


_GUIDANCE_ATTR = "_distillkit_guidance"  # the embedding a UNet2DModel's time embedding reads, per call


def _guidance_dim(net: nn.Module) -> Optional[int]:
    """The width of the network's guidance-scale embedding (its time embedding's ``cond_proj``), or None."""
    proj = getattr(getattr(net, "time_embedding", None), "cond_proj", None)
    return proj.in_features if isinstance(proj, nn.Linear) else None


def _condition_time_embedding(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook on a UNet2DModel's time embedding, whose forward is called without a condition:
    it passes the embedding :meth:`Denoiser.forward` set on the module. A module-level function
    (no closure over a module), so a deep copy's hook reads the copy."""
    emb = module.__dict__.get(_GUIDANCE_ATTR)
    return (args, {**kwargs, "condition": emb}) if emb is not None else None


def _hook_time_embedding(module: nn.Module) -> None:
    if _condition_time_embedding not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_condition_time_embedding, with_kwargs=True)


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """(len(w), embedding_dim) float32 sinusoidal embedding of 1000 w: diffusers'
    ``StableDiffusionPipeline.get_guidance_scale_embedding`` (the embedding LCM's pipelines feed
    ``timestep_cond``) op for op on w's device, so the same values bit for bit, except that its
    constant log(10000) comes from a scalar filled on the device: diffusers' ``torch.tensor(10000.0)``
    is a copy from host memory (under a GPU default device), which waits for all queued GPU work at
    every network call."""
    assert w.ndim == 1
    w = w * 1000.0
    half_dim = embedding_dim // 2
    emb = torch.log(torch.full((), 10000.0, device=w.device)) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=torch.float32, device=w.device) * -emb)
    emb = w.to(torch.float32)[:, None] * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:  # zero pad
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class _Bottleneck(Exception):
    """Raised by the forward hook of :meth:`Denoiser.bottleneck` to stop the forward there."""


class Denoiser(nn.Module):
    """Network + prediction type + schedule + condition + optional codec + guidance (see the module
    docstring). ``forward(x_t, t, cond)`` is the network's raw output (of ``prediction_type``);
    :meth:`guided` and :meth:`model_fn` add guidance; samplers take :meth:`model_fn`'s closure."""

    def __init__(self, unet: nn.Module, prediction_type: Optional[str] = None, schedule: Any = None,
                 condition: str = "none", num_classes: int = 0, codec: Any = None,
                 sample_shape: Optional[tuple] = None, pretrained: Optional[str] = None):
        super().__init__()
        unet = getattr(unet, "unet", unet) if type(unet).__name__ == "DiffusersUNet" else unet
        self.unet = unet
        self.prediction_type = canonical_pred_type(prediction_type) if prediction_type else None
        object.__setattr__(self, "schedule", schedule)
        if condition not in CONDITION_KINDS:
            raise DistillError(f"condition={condition!r}: allowed values are {', '.join(CONDITION_KINDS)}")
        self.condition = condition
        self.num_classes = int(num_classes)
        object.__setattr__(self, "codec", codec)
        self.sample_shape = tuple(sample_shape) if sample_shape else None
        # the local folder this denoiser was loaded from (None: built from a config)
        self.pretrained = pretrained
        # the schedule came with the network (a pretrained folder's scheduler_config.json)
        self.owns_schedule = schedule is not None
        # LCM's guidance-scale embedding: its width, None without one (see add_guidance_embedding)
        self.guidance_embedding_dim = _guidance_dim(unet)
        if self.guidance_embedding_dim is not None and _is_unet2d(unet):
            _hook_time_embedding(unet.time_embedding)

    # ------------------------------------------------------------------ completion by the method
    def configure(self, schedule: Any, prediction_type: str) -> "Denoiser":
        """Give a denoiser built from a config the schedule and prediction type of the run (the
        ``schedule=`` group, ``method.prediction_type``); one loaded from a folder keeps its own."""
        if self.schedule is None:
            object.__setattr__(self, "schedule", schedule)
        if self.prediction_type is None:
            self.prediction_type = canonical_pred_type(prediction_type)
        return self

    def __deepcopy__(self, memo: dict) -> "Denoiser":
        # The frozen codec and the schedule are shared by every copy (EMA, targets, round teachers).
        shared = {id(self.codec): self.codec, id(self.schedule): self.schedule}
        memo.update({k: v for k, v in shared.items() if v is not None})
        cls = self.__class__
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            object.__setattr__(new, k, copy.deepcopy(v, memo))
        return new

    def _load_from_state_dict(self, state_dict, prefix, *args, **kw):
        # Networks other than diffusers UNets (toy2d's MLP) were once the student itself: their keys in
        # checkpoints written before this boundary lack "unet."; they load (and resume) as they are.
        own = self.unet.state_dict().keys()
        for k in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "unet.")]:
            if k[len(prefix):] in own:
                state_dict[prefix + "unet." + k[len(prefix):]] = state_dict.pop(k)
        super()._load_from_state_dict(state_dict, prefix, *args, **kw)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        device = self.device
        if self.schedule is not None and isinstance(self.schedule, nn.Module):
            self.schedule.to(device)
        if self.codec is not None:
            self.codec.to(device)
        return self

    @property
    def device(self) -> torch.device:
        for p in self.unet.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The network's input dtype: its (frozen) base weights' (a LoRA adapter stays float32)."""
        for name, p in self.unet.named_parameters():
            if "lora_" not in name:
                return p.dtype
        return torch.float32

    # ------------------------------------------------------------------ conditions
    @property
    def is_conditional(self) -> bool:
        return self.condition != "none"

    def split_batch(self, batch: Any) -> tuple[Optional[torch.Tensor], Cond]:
        """(x0 or None, cond) of a dataset batch: ``(x, labels)``, ``x``, ``{"x": ..., "cond": ...}``
        or ``{"cond": ...}``. Labels become ``class_labels`` for class-conditional models only."""
        if isinstance(batch, Mapping):
            x, raw = batch.get("x"), batch.get("cond") or {}
        elif isinstance(batch, (list, tuple)):
            x, raw = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, raw = batch, None
        if self.condition == "none":
            return x, {}
        if self.condition == "class":
            labels = raw.get("class_labels") if isinstance(raw, Mapping) else raw
            if labels is None:
                raise DistillError("a class-conditional model needs labelled data (the dataset gives none)")
            return x, {"class_labels": labels.long()}
        if not isinstance(raw, Mapping) or "encoder_hidden_states" not in raw:
            raise DistillError("a text-conditional model needs a dataset of prompts or captions, e.g. "
                               "dataset=prompts dataset.path=prompts.txt or dataset=image_text_folder")
        return x, dict(raw)

    def null_condition(self, cond: Cond) -> Cond:
        """The unconditional branch for a batch of conditions, as the pipelines build it."""
        if self.condition == "none":
            return {}
        if self.condition == "class":
            return {"class_labels": torch.full_like(cond["class_labels"], self.num_classes)}
        assert self.codec is not None
        return self.codec.null_condition(cond)

    def drop_condition(self, cond: Cond, p: float, generator: Optional[torch.Generator] = None) -> Cond:
        """Classifier-free guidance training (Ho & Salimans 2021): each sample's condition replaced by
        the unconditional one with probability ``p``."""
        B = cond_batch_size(cond)
        if not self.is_conditional or p <= 0 or B is None:
            return cond
        dev = generator.device if generator is not None else None
        keep = torch.rand(B, generator=generator, device=dev) >= p
        return where_cond(keep, cond, self.null_condition(cond))

    def draw_condition(self, n: int, generator: Optional[torch.Generator] = None,
                       classes: Optional[Any] = None) -> Cond:
        """Conditions to sample with: class labels drawn uniformly (from ``generator``) unless
        ``classes`` gives them (one label for all, or one per sample, repeated to ``n``)."""
        if self.condition == "none":
            return {}
        if self.condition == "class":
            if classes is not None:
                labels = torch.as_tensor(classes, dtype=torch.long).flatten()
                bad = labels[(labels < 0) | (labels >= self.num_classes)]
                if len(bad):
                    raise DistillError(f"class={bad[0].item()}: this model has classes 0..{self.num_classes - 1}")
                labels = labels.repeat((n + len(labels) - 1) // len(labels))[:n]
            else:
                dev = generator.device if generator is not None else torch.device("cpu")
                labels = torch.randint(0, self.num_classes, (n,), generator=generator, device=dev)
            return {"class_labels": labels.to(self.device)}
        raise DistillError("a text-conditional model samples from prompts: give prompts (a file or a list)")

    def encode_prompts(self, prompts: list[str]) -> Cond:
        if self.condition != "text" or self.codec is None:
            raise DistillError("prompts are for text-conditional models (model=sd15, model=sdxl)")
        return self.codec.encode_prompts(prompts)

    # ------------------------------------------------------------------ guidance embedding
    @property
    def embeds_guidance(self) -> bool:
        """Whether the network takes w in its time embedding (LCM) rather than by classifier-free guidance."""
        return self.guidance_embedding_dim is not None

    def add_guidance_embedding(self, dim: int = 256) -> "Denoiser":
        """Give the network LCM's guidance-scale embedding (Luo et al. 2023, Sec. 4.2), as diffusers'
        ``train_lcm_distill_sd_wds.py`` does (``time_cond_proj_dim=256``, the rest loaded from the
        teacher): a ``cond_proj`` Linear(dim, time embedding input, no bias, torch's default init)
        whose output is added to the timestep embedding. UNet2DConditionModel records the width in
        its config (``time_cond_proj_dim``: saved, reloaded, read by the pipelines); UNet2DModel
        gets it through a forward pre-hook on its time embedding, and :meth:`save_pretrained`
        records it in denoiser.json. Calling it again with the same ``dim`` does nothing (a folder
        that already has the embedding keeps its weights); another ``dim`` is an error."""
        net = self.unet
        if not (_is_unet2d(net) or _is_unet2d_condition(net)):
            raise DistillError(f"a guidance-scale embedding needs a diffusers UNet2DModel or UNet2DConditionModel; "
                               f"the network {type(net).__name__} has no time embedding to condition")
        if self.guidance_embedding_dim is not None:
            if self.guidance_embedding_dim != dim:
                raise DistillError(f"the network already has a guidance-scale embedding of width "
                                   f"{self.guidance_embedding_dim}, not {dim}")
            return self
        emb = net.time_embedding
        ref = emb.linear_1.weight
        emb.cond_proj = nn.Linear(dim, emb.linear_1.in_features, bias=False).to(ref.device, ref.dtype)
        if _is_unet2d_condition(net):
            net.register_to_config(time_cond_proj_dim=dim)
        else:
            _hook_time_embedding(emb)
        self.guidance_embedding_dim = dim
        return self

    def guidance_embedding(self, guidance: Guidance, batch: int, device: torch.device) -> torch.Tensor:
        """(batch, dim) embedding of diffusers' guidance scale ``w`` (None: 1), in the network's dtype:
        diffusers' ``get_guidance_scale_embedding`` (:func:`guidance_scale_embedding`, built on the device)
        of LCM's w' = w - 1, as the pipelines call it."""
        if isinstance(guidance, torch.Tensor):
            w = (guidance.to(device, torch.float32) - 1).reshape(-1).expand(batch)
        else:  # w - 1 in Python, as the pipelines' torch.tensor(guidance_scale - 1)
            w = torch.full((batch,), (1.0 if guidance is None else float(guidance)) - 1, device=device)
        return guidance_scale_embedding(w, self.guidance_embedding_dim).to(self.dtype)

    # ------------------------------------------------------------------ the network
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[Cond] = None,
                guidance: Guidance = None) -> torch.Tensor:
        """The network's output (of ``prediction_type``) at (x_t, t) for the condition ``cond``;
        ``guidance`` (diffusers' w, None: 1) reaches only a network with a guidance-scale embedding."""
        cond = cond or {}
        net = self.unet
        x = x_t.to(self.dtype) if x_t.dtype != self.dtype and x_t.is_floating_point() else x_t
        emb = self.guidance_embedding(guidance, x.shape[0], x.device) if self.embeds_guidance else None
        if _is_unet2d_condition(net):
            from distillkit.models.stable_diffusion import text_unet_inputs

            scale = self.codec.latent_scale if self.codec is not None else 8
            return net(x, t, **text_unet_inputs(cond, x, scale), timestep_cond=emb, return_dict=False)[0]
        if _is_unet2d(net):
            labels = cond.get("class_labels")
            if emb is None:
                return net(x, t, class_labels=labels, return_dict=False)[0]
            net.time_embedding.__dict__[_GUIDANCE_ATTR] = emb
            try:
                return net(x, t, class_labels=labels, return_dict=False)[0]
            finally:  # never left behind: not in a deep copy, not read by a later call
                del net.time_embedding.__dict__[_GUIDANCE_ATTR]
        return net(x, t)

    def bottleneck_module(self) -> nn.Module:
        """The layer whose output :meth:`bottleneck` returns: a diffusers UNet's mid block (DMD2's
        GAN classifier reads it, Yin et al. 2024, Sec. 4.3), an MLP's last residual block."""
        net = self.unet
        mid = getattr(net, "mid_block", None)
        if mid is not None:
            return mid
        blocks = getattr(net, "blocks", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return blocks[-1]
        raise DistillError(f"the network {type(net).__name__} has no bottleneck (a mid block) for a GAN head: "
                           "use a diffusers UNet with a mid block")

    @property
    def bottleneck_channels(self) -> int:
        """Channels (features) of :meth:`bottleneck`'s output."""
        cfg = getattr(self.unet, "config", None)
        if cfg is not None and getattr(self.unet, "mid_block", None) is not None:
            return int(cfg.block_out_channels[-1])
        return int(self.bottleneck_module()[-1].out_features)

    def bottleneck(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[Cond] = None,
                   guidance: Guidance = None) -> torch.Tensor:
        """The network's bottleneck features at (x_t, t, cond[, guidance]): its forward runs up to
        :meth:`bottleneck_module` and stops there (DMD2's ``classify_mode``): the layers after it
        are neither computed nor in the graph."""
        held: list = []

        def grab(module, inputs, output):
            held.append(output[0] if isinstance(output, tuple) else output)
            raise _Bottleneck()

        handle = self.bottleneck_module().register_forward_hook(grab)
        try:
            self(x_t, t, cond, guidance)
        except _Bottleneck:
            pass
        finally:
            handle.remove()
        return held[0]

    def guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: Optional[Cond] = None,
               guidance: Guidance = None, forward: Optional[Callable] = None) -> torch.Tensor:
        """Classifier-free guidance: one batched call on [x; x] with [uncond; cond] (as the pipelines
        make it), then ``uncond + w (cond - uncond)``; at w = 1 only the conditional half runs. A
        network with a guidance-scale embedding takes w in it instead: one call (the pipelines run
        no classifier-free guidance when ``time_cond_proj_dim`` is set). ``forward``: what is called
        instead of this denoiser (its torch.compile wrapper, ``trainer.compile``)."""
        net = self if forward is None else forward
        if self.embeds_guidance:
            return net(x_t, t, cond, guidance)
        if not self.is_conditional or no_guidance(guidance):
            return net(x_t, t, cond)
        both = cat_cond(self.null_condition(cond), cond)
        out_u, out_c = net(torch.cat([x_t, x_t]), torch.cat([t, t]), both).chunk(2)
        return guided(out_u, out_c, guidance)

    def model_fn(self, cond: Optional[Cond] = None, guidance: Guidance = None) -> Callable:
        """A closure ``fn(x_t, t)`` for the samplers, its output in float32."""
        return lambda x_t, t: self.guided(x_t, t, cond, guidance).float()

    # ------------------------------------------------------------------ latents
    @property
    def is_latent(self) -> bool:
        return self.codec is not None and getattr(self.codec, "vae", None) is not None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Samples of the network's space -> images in [-1, 1] (VAE decode for latent models)."""
        return self.codec.decode(z) if self.is_latent else z

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.encode_images(x) if self.is_latent else x

    # ------------------------------------------------------------------ files
    def save_pretrained(self, path, spacing: str = "trailing") -> None:
        """A diffusers-style folder: ``unet/`` (config.json + safetensors), ``scheduler/`` (the
        DDIMScheduler of this schedule and prediction type, stepping as distillkit's DDIM) and
        ``denoiser.json`` (condition, null class, guidance-embedding width). Text-to-image denoisers
        are written whole by ``distill-export`` (with their VAE and text encoders)."""
        import json
        from pathlib import Path

        from distillkit.export import ddim_scheduler_for

        if not hasattr(self.unet, "save_pretrained"):
            raise DistillError(f"save_pretrained needs a diffusers network; this one is {type(self.unet).__name__}")
        path = Path(path)
        unet = self.unet
        if getattr(self, "lora", None):  # the adapter fused: the plain network's folder
            from distillkit.models.lora import fused_copy

            unet = fused_copy(unet)
        unet.save_pretrained(str(path / "unet"), safe_serialization=True)
        ddim_scheduler_for(self.schedule, self.prediction_type, spacing).save_pretrained(str(path / "scheduler"))
        info = {"prediction_type": self.prediction_type, "condition": self.condition}
        if self.condition == "class":
            info.update({"num_classes": self.num_classes, "null_class": self.num_classes})
        if self.embeds_guidance:
            info["guidance_embedding_dim"] = self.guidance_embedding_dim
        (path / "denoiser.json").write_text(json.dumps(info, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path, **kw: Any) -> "Denoiser":
        """The denoiser of a local folder: a Stable Diffusion (XL) pipeline folder (``text_encoder/``
        there: :func:`distillkit.models.stable_diffusion.stable_diffusion`, ``kw`` its options), or one
        written by :meth:`save_pretrained` / ``distill-export`` (``unet/`` + ``scheduler/``). Nothing is
        downloaded."""
        import json
        from pathlib import Path

        from diffusers import UNet2DModel

        from distillkit.models.stable_diffusion import schedule_from_folder, stable_diffusion

        p = Path(path).expanduser()
        if (p / "text_encoder").is_dir():
            return stable_diffusion(str(p), variant="sdxl" if (p / "text_encoder_2").is_dir() else "sd15", **kw)
        if not (p / "unet" / "config.json").is_file() or not (p / "scheduler" / "scheduler_config.json").is_file():
            raise DistillError(f"pretrained={path}: no unet/config.json and scheduler/scheduler_config.json there")
        schedule, prediction_type = schedule_from_folder(p)
        info = {}
        for name in ("denoiser.json", "distillkit.json"):
            if (p / name).is_file():
                info = json.loads((p / name).read_text())
                break
        dim = info.get("guidance_embedding_dim")
        if dim:  # UNet2DModel has no cond_proj of its own: its from_pretrained would drop that weight
            unet = UNet2DModel.from_config(UNet2DModel.load_config(str(p / "unet"), local_files_only=True)).eval()
        else:
            unet = UNet2DModel.from_pretrained(str(p / "unet"), local_files_only=True)
        n = unet.config.num_class_embeds
        den = cls(unet, prediction_type, schedule, condition=info.get("condition", "class" if n else "none"),
                  num_classes=int(n) - 1 if n else 0, pretrained=str(p))
        if dim:
            from safetensors.torch import load_file

            den.add_guidance_embedding(int(dim))
            unet.load_state_dict(load_file(str(p / "unet" / "diffusion_pytorch_model.safetensors")))
        return den

    def extra_repr(self) -> str:
        extra = f", guidance_embedding={self.guidance_embedding_dim}" if self.embeds_guidance else ""
        return f"prediction_type={self.prediction_type}, condition={self.condition}, latent={self.is_latent}{extra}"


def as_denoiser(net: nn.Module, schedule: Any, prediction_type: str, condition: Optional[str] = None,
                num_classes: int = 0) -> Denoiser:
    """``net`` as a :class:`Denoiser` completed with the run's schedule and prediction type. A
    class-conditional diffusers UNet (``num_class_embeds``) is class-conditional with the last
    embedding as the null class."""
    if not isinstance(net, Denoiser):
        inner = getattr(net, "unet", net) if type(net).__name__ == "DiffusersUNet" else net
        n_embeds = getattr(getattr(inner, "config", None), "num_class_embeds", None) if _is_unet2d(inner) else None
        if condition is None:
            condition = "class" if n_embeds else "none"
        if condition == "class" and not n_embeds:
            raise DistillError("a class-conditional model needs a class embedding: set model.num_classes")
        lora = getattr(net, "lora_settings", None)
        net = Denoiser(net, condition=condition, num_classes=(int(n_embeds) - 1) if n_embeds else num_classes)
        if lora:
            from distillkit.models.lora import add_lora

            add_lora(net, *lora)
    return net.configure(schedule, prediction_type)


__all__ = ["Denoiser", "as_denoiser", "no_guidance", "guidance_scale_embedding", "map_cond", "cat_cond",
           "where_cond", "cond_batch_size", "CONDITION_KINDS"]
