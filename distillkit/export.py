"""``distill-export``: a diffusion run -> a diffusers ``DDIMPipeline`` folder.

    distill-export checkpoint=runs/digits_diffusion_teacher/default/last.ckpt out=exported/digits [use_ema=true]

    from diffusers import DDIMPipeline
    pipe = DDIMPipeline.from_pretrained("exported/digits")
    images = pipe(batch_size=16, num_inference_steps=16, eta=0.0, generator=torch.Generator().manual_seed(0)).images

The folder holds ``model_index.json``, ``unet/`` (``config.json`` +
``diffusion_pytorch_model.safetensors``: the EMA weights by default, the raw student with
``use_ema=false``), ``scheduler/`` (a ``DDIMScheduler`` carrying the run's noise schedule:
num_train_timesteps, beta_schedule, beta_start / beta_end, rescale_betas_zero_snr; the network's
prediction type in diffusers' names, eps -> epsilon, v -> v_prediction, x0 -> sample;
``timestep_spacing`` = the run's schedule.spacing; ``set_alpha_to_one=True``, our clean end
t = -1; ``clip_sample=False`` and no thresholding, as our sampler), ``distillkit.json``
(where it came from) and ``README.md``, a Hugging Face model card (:func:`model_card`: the method
and its paper, the teacher, the steps and guidance to sample with, a diffusers snippet filled in
with them, the run's FID when its results.json holds one). Every file and folder gets the mode
of the user's umask (0644 / 0755 under 022; :func:`apply_umask`).

Text-to-image runs (``model=sd15`` / ``sdxl``) are written as a ``StableDiffusionPipeline`` /
``StableDiffusionXLPipeline`` folder: the student's UNet, the VAE, text encoders and tokenizers of its
pretrained folder, and the same ``DDIMScheduler`` as above; ``pipe(prompt, num_inference_steps=N,
guidance_scale=w, generator=torch.Generator().manual_seed(seed))`` draws the images ``distill-sample
prompts=... guidance=w steps=N seed=seed`` draws. A LoRA run (``model.lora_rank``) writes only its
adapter, ``pytorch_lora_weights.safetensors`` (with its rank and alpha), which
``pipe.load_lora_weights(out)`` adds to the base pipeline; ``lora=false`` writes the whole pipeline
with the adapter fused instead. Class-conditional pixel runs write ``unet/`` and ``scheduler/``:
diffusers has no class-conditional ``UNet2DModel`` pipeline, so ``DDIMPipeline`` cannot call it
(``distill-sample class=...`` can).

Limitation. diffusers' ``DDIMScheduler.step`` always steps from t to t - T // N, while our
samplers step along ``schedule.grid(N, spacing)`` (see ``distillkit.diffusion.samplers``). The
two agree, and the pipeline reproduces ``distill-sample``'s images for the same seed (up to
float rounding), exactly when that grid is evenly spaced by T // N: ``spacing=leading`` for
any N, ``spacing=trailing`` when N divides T. For that reason the digits teacher uses
T = 1024, so every power-of-two step count agrees. Otherwise (e.g. T = 1000, trailing, N = 64)
the pipeline steps off our grid, its last step ends at t = 0 (alphas_cumprod[0] < 1) instead
of the clean end, and its images differ. Runs on the EDM schedule have no DDIM equivalent and
are refused.

Few-step generators (``method=dmd`` / ``dmd2``). The generator is sampled at the timesteps it was
trained at (``method.timesteps``, e.g. [999] or [999, 749, 499, 249]): at each it predicts x0, which
is re-noised with fresh noise to the next (:func:`distillkit.diffusion.multistep_sample`). That is
diffusers' ``LCMScheduler`` stepping over explicit timesteps, which DMD2's model cards use, so the
export's ``scheduler/`` is an ``LCMScheduler`` (:func:`lcm_scheduler_for`: the run's betas,
num_train_timesteps and prediction type, ``clip_sample=False``, no thresholding) and
``distillkit.json`` records the trained ``timesteps``::

    pipe = StableDiffusionXLPipeline.from_pretrained(out)          # scheduler: LCMScheduler
    images = pipe(prompt, num_inference_steps=4, timesteps=[999, 749, 499, 249], guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(seed)).images

A LoRA generator's export is its adapter and ``scheduler/``: ``pipe.load_lora_weights(out)`` and
``pipe.scheduler = LCMScheduler.from_pretrained(out, subfolder="scheduler")`` on the base pipeline.
The images are ``distill-sample``'s for the same seed: distill-sample draws the starting latents and
then the later steps' noise from one ``torch.Generator().manual_seed(seed)``, as the pipeline does
with ``generator=torch.Generator().manual_seed(seed)`` (when distill-sample makes all its samples in
one batch, ``batch_size >= num_samples``). Two settings make LCMScheduler our sampler:

* ``original_inference_steps = num_train_timesteps``: LCM's "training schedule" is then every
  timestep, so explicit timesteps are never off it (no warning), and ``num_inference_steps=N``
  without ``timesteps`` picks T-1 - floor(i T / N), our trailing grid (what distill-sample uses for a
  step count the generator was not trained at) when N divides T.
* ``timestep_scaling = 10`` (diffusers' default, what ``LCMScheduler.from_config`` gives): LCM
  returns c_skip(t) x_t + c_out(t) x0 with c_skip = 0.25 / (0.25 + (10 t)^2), c_out = 10 t /
  sqrt(0.25 + (10 t)^2), where our generator returns x0. At t = 999 c_skip = 2.5e-9 and
  1 - c_out = 1.3e-9, at t = 249 4.0e-8 and 2.0e-8: below float32 rounding of unit-sized latents.
  At t = 0, though, c_skip = 1 and c_out = 0 (LCM returns its input): a generator trained with 0
  among its timesteps cannot be sampled exactly this way (the export warns).

Pixel generators are written as a ``DDIMPipeline`` folder whose ``scheduler/`` is the LCMScheduler:
``DDIMPipeline.from_pretrained`` turns it into the DDIMScheduler of the same betas (trailing), which
equals the generator's sampler for one step (``method.timesteps=[T-1]``, ``num_inference_steps=1``);
more steps need the loop over ``UNet2DModel`` and ``LCMScheduler`` of the folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from distillkit.errors import DistillError
from distillkit.kvargs import Arg, command_main, parse_bool, parse_kv
from distillkit.models.lora import fused_copy

PROG = "distill-export"
DIFFUSERS_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}

ARGS = [
    Arg("checkpoint", str, help="a diffusion run's last.ckpt, or a round_<r>.ckpt / level_<r>.ckpt"),
    Arg("out", str, help="output folder (a diffusers DDIMPipeline)"),
    Arg("use_ema", parse_bool, True, "export the EMA weights (when the run kept an EMA)"),
    Arg("lora", parse_bool, True, "LoRA runs: write the adapter alone (false: the pipeline with it fused)"),
]


def ddim_scheduler(method):
    """The ``DDIMScheduler`` equivalent to ``method``'s schedule and sampler settings."""
    return ddim_scheduler_for(method.schedule, method.prediction_type, method.spacing, method.schedule_cfg)


def _schedule_kwargs(sch, prediction_type: str, schedule_cfg: Optional[dict] = None) -> dict:
    """The scheduler arguments of a NoiseSchedule's betas and a prediction type, in diffusers' names."""
    from distillkit.diffusion.schedules import DEFAULT_BETAS

    # a pretrained model's schedule comes from its folder's scheduler_config.json, others' from schedule=
    cfg = getattr(sch, "scheduler_config", None) or schedule_cfg or {}
    start, end = DEFAULT_BETAS.get(sch.beta_schedule, (1e-4, 0.02))
    return dict(num_train_timesteps=sch.num_train_timesteps, beta_schedule=sch.beta_schedule,
                beta_start=float(cfg.get("beta_start") or start), beta_end=float(cfg.get("beta_end") or end),
                rescale_betas_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
                prediction_type=DIFFUSERS_PREDICTION[prediction_type])


def _check_alphas(scheduler, sch) -> None:
    if not torch.allclose(scheduler.alphas_cumprod.double(), sch.alphas_cumprod.cpu(), rtol=0, atol=1e-6):
        raise DistillError(f"the exported {type(scheduler).__name__}'s alphas_cumprod differ from the run's schedule")


def ddim_scheduler_for(sch, prediction_type: str, spacing: str = "trailing", schedule_cfg: Optional[dict] = None):
    """The ``DDIMScheduler`` of a NoiseSchedule, prediction type and timestep spacing, stepping as
    distillkit's DDIM does (``set_alpha_to_one``: the last step lands on the clean end)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**_schedule_kwargs(sch, prediction_type, schedule_cfg), timestep_spacing=spacing,
                              set_alpha_to_one=True, clip_sample=False, thresholding=False, steps_offset=0)
    _check_alphas(scheduler, sch)
    return scheduler


def generator_timesteps(method) -> Optional[list[int]]:
    """The conditioning timesteps of a few-step generator (``method=dmd`` / ``dmd2``), else None."""
    from distillkit.methods.dmd import DMD

    return [int(t) for t in method.timesteps] if isinstance(method, DMD) else None


def lcm_scheduler(method):
    """The ``LCMScheduler`` that steps as ``method``'s few-step generator samples (module docstring)."""
    return lcm_scheduler_for(method.schedule, method.prediction_type, method.schedule_cfg)


def lcm_scheduler_for(sch, prediction_type: str, schedule_cfg: Optional[dict] = None):
    """The ``LCMScheduler`` of a NoiseSchedule and prediction type that, given explicit ``timesteps``,
    takes the steps of :func:`~distillkit.diffusion.multistep_sample` (x0 at each timestep, re-noised
    with fresh noise to the next): ``original_inference_steps`` = T (every timestep is on LCM's
    training schedule), diffusers' default ``timestep_scaling`` = 10 (the boundary condition's
    c_skip(t) <= 4e-8 for t >= 249), ``timestep_spacing="trailing"`` (only read when the config is
    turned into another scheduler, e.g. by ``DDIMPipeline``), no clipping or thresholding."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(**_schedule_kwargs(sch, prediction_type, schedule_cfg), timestep_spacing="trailing",
                             original_inference_steps=sch.num_train_timesteps, timestep_scaling=10.0,
                             set_alpha_to_one=True, clip_sample=False, thresholding=False,
                             steps_offset=1)  # not read by LCMScheduler; StableDiffusionPipeline warns at 0
    _check_alphas(scheduler, sch)
    return scheduler


def is_consistency(method) -> bool:
    from distillkit.methods.consistency import ConsistencyDistillation

    return isinstance(method, ConsistencyDistillation)


def consistency_scheduler(method):
    """The ``LCMScheduler`` that samples as a consistency / LCM student does: LCM's boundary
    condition with the run's ``timestep_scaling``, and its step counts chosen from the run's
    discretisation (``original_inference_steps`` = ``method.num_timesteps``), as
    ``ConsistencyDistillation.sampling_times`` chooses them."""
    from diffusers import LCMScheduler

    sch = method.schedule
    scheduler = LCMScheduler(**_schedule_kwargs(sch, method.prediction_type, method.schedule_cfg),
                             original_inference_steps=method.num_timesteps, timestep_scaling=method.timestep_scaling,
                             set_alpha_to_one=True, clip_sample=False, thresholding=False, steps_offset=1)
    _check_alphas(scheduler, sch)
    return scheduler


def sampling_scheduler(method):
    """The scheduler an export carries: LCMScheduler for few-step generators and consistency
    models, else DDIMScheduler."""
    if is_consistency(method):
        return consistency_scheduler(method)
    ts = generator_timesteps(method)
    if ts is None:
        return ddim_scheduler(method)
    if 0 in ts:
        import warnings

        warnings.warn(f"method.timesteps={ts} holds t = 0, where LCMScheduler's boundary condition returns its input "
                      "(c_skip = 1, c_out = 0) instead of the generator's x0-prediction there: the exported pipeline's "
                      "last step differs from distill-sample's", stacklevel=2)
    return lcm_scheduler(method)


def export_text_to_image(method, net, out: Path, lora: bool = True) -> str:
    """A text-to-image denoiser as a StableDiffusion(XL)Pipeline folder, or its LoRA adapter alone."""
    import copy

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if getattr(net, "variant", "sd15") == "sdxl" else StableDiffusionPipeline
    if getattr(net, "lora", None) and lora:
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(net.unet)
        meta = net.unet.peft_config["default"].to_dict()
        kw = {"unet_lora_adapter_metadata": meta}
        out.mkdir(parents=True, exist_ok=True)
        cls.save_lora_weights(str(out), unet_lora_layers=layers, safe_serialization=True, **kw)
        # the sampler distill-sample uses, for pipe.scheduler = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
        # (few-step generators: LCMScheduler.from_pretrained)
        sampling_scheduler(method).save_pretrained(str(out / "scheduler"))
        return "LoRA weights (pipe.load_lora_weights)"
    unet = net.unet
    if getattr(net, "lora", None):
        unet = copy.deepcopy(unet)
        unet.fuse_lora()
        unet.unload_lora()
    pipe = cls.from_pretrained(net.pretrained, unet=unet.float(), scheduler=sampling_scheduler(method),
                               local_files_only=True, **({} if cls is StableDiffusionXLPipeline else
                                                          {"safety_checker": None, "requires_safety_checker": False}))
    pipe.save_pretrained(str(out), safe_serialization=True)
    return cls.__name__


def export_pipeline(method, out: str | Path, use_ema: bool = True, source: str = "", lora: bool = True) -> Path:
    """Write ``method``'s network and schedule as a diffusers pipeline folder at ``out`` (DDIMPipeline
    for pixel models, StableDiffusion(XL)Pipeline for text-to-image ones, or a LoRA adapter)."""
    from diffusers import DDIMPipeline, UNet2DModel

    if method.is_edm:
        raise DistillError("distill-export writes a DDIMPipeline, which has no EDM sampler: runs with "
                           "schedule=edm cannot be exported this way")
    net = method.eval_network() if use_ema else method.student
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise DistillError(f"out={out}: exists and is not a folder")
    if net.condition == "text":
        what = export_text_to_image(method, net, out, lora)
        write_model_card(method, out, write_provenance(method, net, out, use_ema, source, what), source)
        apply_umask(out)
        return out
    unet = getattr(net, "unet", None)
    if not isinstance(unet, UNet2DModel):
        model = (method.run_config.get("model") or {}).get("_target_", type(net).__name__)
        raise DistillError(f"distill-export needs a diffusers UNet student (model=unet_digits or model=unet); "
                           f"this run's network is {model}")
    if getattr(net, "lora", None):  # a digits LoRA student: the adapter fused into its base
        unet = fused_copy(unet)
    pipe = DDIMPipeline(unet=unet, scheduler=ddim_scheduler(method))
    if generator_timesteps(method) is not None or is_consistency(method):
        # DDIMPipeline turns any scheduler into a DDIMScheduler; the folder keeps the LCMScheduler
        pipe.register_modules(scheduler=sampling_scheduler(method))
    pipe.save_pretrained(str(out), safe_serialization=True)
    write_model_card(method, out, write_provenance(method, net, out, use_ema, source, "DDIMPipeline"), source)
    apply_umask(out)
    return out


def write_provenance(method, net, out: Path, use_ema: bool, source: str, what: str) -> dict:
    """``distillkit.json``: where the export ``net`` came from and how distillkit samples it."""
    info = {"checkpoint": source, "method": method.method_name, "exported": what,
            "use_ema": bool(use_ema and method.ema is not None), "prediction_type": method.prediction_type,
            "num_inference_steps": method.num_steps, "timestep_spacing": method.spacing, "eta": method.eta,
            "condition": net.condition,
            "guidance": float(((method.run_config or {}).get("eval") or {}).get("guidance") or 1.0)}
    if net.condition == "class":
        info.update({"num_classes": net.num_classes, "null_class": net.num_classes})
    if net.condition == "text":  # the pipeline that loads it (a LoRA: the base pipeline it is added to)
        xl = getattr(net, "variant", "sd15") == "sdxl"
        info["pipeline"] = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
    if getattr(net, "lora", None):
        info["lora"] = net.lora
    if is_consistency(method):  # LCMScheduler over the run's discretisation
        info.update({"scheduler": "LCMScheduler", "original_inference_steps": method.num_timesteps,
                     "timestep_scaling": method.timestep_scaling, "timestep_spacing": "lcm"})
        if getattr(net, "embeds_guidance", False):
            info["guidance_embedding_dim"] = net.guidance_embedding_dim
        if method.sampling_timesteps_cfg and not method.is_edm:  # pipe(..., timesteps=these) samples as we do
            info["timesteps"] = list(method.sampling_timesteps_cfg)
    ts = generator_timesteps(method)
    if ts is not None:  # a few-step generator: LCMScheduler over the timesteps it was trained at
        info.update({"scheduler": "LCMScheduler", "timesteps": ts, "num_inference_steps": len(ts),
                     "timestep_spacing": "trailing"})
    (out / "distillkit.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# --------------------------------------------------------------------------- the model card
# The paper of each method, for the model card.
PAPERS = {
    "diffusion": ('Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020 '
                  "([arXiv:2006.11239](https://arxiv.org/abs/2006.11239)); sampled with DDIM (Song et al., "
                  '"Denoising Diffusion Implicit Models", ICLR 2021, [arXiv:2010.02502](https://arxiv.org/abs/2010.02502))'),
    "progressive": ('Salimans & Ho, "Progressive Distillation for Fast Sampling of Diffusion Models", ICLR 2022 '
                    "([arXiv:2202.00512](https://arxiv.org/abs/2202.00512))"),
    "dsd": '"Self-distillation for diffusion models" (direct self-distillation)',
    "tsd": '"Self-distillation for diffusion models" (its teacher-student baseline)',
    "consistency": ('Song et al., "Consistency Models", ICML 2023 '
                    "([arXiv:2303.01469](https://arxiv.org/abs/2303.01469))"),
    "lcm": ('Luo et al., "Latent Consistency Models", 2023 ([arXiv:2310.04378](https://arxiv.org/abs/2310.04378)); '
            'LoRA: "LCM-LoRA", [arXiv:2311.05556](https://arxiv.org/abs/2311.05556)'),
    "dmd": ('Yin et al., "One-step Diffusion with Distribution Matching Distillation", CVPR 2024 '
            "([arXiv:2311.18828](https://arxiv.org/abs/2311.18828))"),
    "dmd2": ('Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis", NeurIPS 2024 '
             "([arXiv:2405.14867](https://arxiv.org/abs/2405.14867))"),
}


def teacher_description(config: dict) -> str:
    """The run's teacher, as its config names it: a checkpoint, a pretrained folder, itself, or none."""
    teacher = config.get("teacher") or {}
    if teacher.get("self_distill"):
        return "the network itself (`teacher=self`: self-distillation)"
    if not teacher.get("_target_"):
        return "none (trained from data)"
    if teacher.get("checkpoint"):
        return f"`{teacher['checkpoint']}`"
    if teacher.get("pretrained"):
        return f"the pretrained model `{teacher['pretrained']}`"
    return f"`{teacher['_target_']}`"


def measured_fid(source: str) -> Optional[dict]:
    """The run's results.json next to ``source`` when it holds ``fid/<k>step`` keys (and ``source``
    is the run's last.ckpt, whose network they measured), else None."""
    path = Path(source).expanduser()
    if not source or path.name != "last.ckpt":
        return None
    try:
        results = json.loads((path.parent / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict) or not any(str(k).startswith("fid/") for k in results):
        return None
    return results


def usage_snippet(info: dict, out: str, pretrained: Optional[str]) -> str:
    """Python that samples the export at ``out`` with the run's steps and guidance."""
    out = json.dumps(out)  # a quoted Python string literal
    steps, guidance, ts = int(info["num_inference_steps"]), float(info.get("guidance") or 1.0), info.get("timesteps")
    lcm = info.get("scheduler") == "LCMScheduler"
    sched = "LCMScheduler" if lcm else "DDIMScheduler"
    kw = f"num_inference_steps={steps}" + (f", timesteps={ts}" if ts else "")
    exported = info["exported"]
    if info.get("condition") == "text":
        cls = info.get("pipeline") or ("StableDiffusionXLPipeline" if "XL" in exported else "StableDiffusionPipeline")
        if exported.startswith("LoRA"):
            load = (f"pipe = {cls}.from_pretrained({json.dumps(str(pretrained))}, torch_dtype=dtype).to(device)\n"
                    f"pipe.load_lora_weights({out})\n"
                    f"pipe.scheduler = {sched}.from_pretrained({out}, subfolder=\"scheduler\")\n")
            imports = f"from diffusers import {sched}, {cls}\n"
        else:
            load = f"pipe = {cls}.from_pretrained({out}, torch_dtype=dtype).to(device)\n"
            imports = f"from diffusers import {cls}\n"
        return ("import torch\n" + imports + "\n"
                "device = \"cuda\" if torch.cuda.is_available() else \"cpu\"\n"
                "dtype = torch.float16 if device == \"cuda\" else torch.float32\n" + load +
                f"image = pipe(\"a photo of a cat\", {kw}, guidance_scale={guidance:g},\n"
                "             generator=torch.Generator().manual_seed(0)).images[0]\n"
                "image.save(\"sample.png\")\n")
    if not lcm and info.get("condition") != "class":
        return ("import torch\nfrom diffusers import DDIMPipeline\n\n"
                f"pipe = DDIMPipeline.from_pretrained({out})\n"
                f"images = pipe(batch_size=16, num_inference_steps={steps}, eta={float(info.get('eta') or 0.0):g},\n"
                "              generator=torch.Generator().manual_seed(0)).images\n"
                "images[0].save(\"sample.png\")\n")
    # No diffusers pipeline samples this folder as the run does (a class-conditional UNet2DModel, or
    # the LCMScheduler, which DDIMPipeline would turn into a DDIMScheduler): the loop over both.
    cond = info.get("condition") == "class"
    step_kw = "generator=generator" if lcm else f"eta={float(info.get('eta') or 0.0):g}"
    lines = ["import torch", f"from diffusers import {sched}, UNet2DModel", "",
             f"unet = UNet2DModel.from_pretrained({out}, subfolder=\"unet\").eval()",
             f"scheduler = {sched}.from_pretrained({out}, subfolder=\"scheduler\")",
             f"scheduler.set_timesteps({f'timesteps={ts}' if ts else f'num_inference_steps={steps}'})",
             "generator = torch.Generator().manual_seed(0)",
             "size = unet.config.sample_size",
             "size = (size, size) if isinstance(size, int) else tuple(size)",
             "x = torch.randn((16, unet.config.in_channels, *size), generator=generator)"]
    if cond:
        lines.append("labels = torch.full((16,), 3)  # the class to draw")
    lines += ["with torch.no_grad():", "    for t in scheduler.timesteps:"]
    if cond:
        lines.append("        out = unet(x, t, class_labels=labels).sample")
        if guidance != 1.0:
            null = int(info.get("null_class", 0))
            lines += [f"        null = torch.full_like(labels, {null})  # classifier-free guidance",
                      "        uncond = unet(x, t, class_labels=null).sample",
                      f"        out = uncond + {guidance:g} * (out - uncond)"]
    else:
        lines.append("        out = unet(x, t).sample")
    lines += [f"        x = scheduler.step(out, t, x, {step_kw}).prev_sample",
              "images = (x / 2 + 0.5).clamp(0, 1)  # N x C x H x W in [0, 1]"]
    return "\n".join(lines) + "\n"


def model_card(method, out: Path, info: dict, source: str) -> str:
    """The export's README.md: a Hugging Face model card (YAML front matter) saying what the model
    is, its teacher and method, the steps and guidance to sample with, the code, and its FID."""
    config = getattr(method, "run_config", None) or {}
    name = method.method_name
    text = info.get("condition") == "text"
    lora = str(info["exported"]).startswith("LoRA")
    pretrained = (config.get("model") or {}).get("pretrained") or getattr(method.student, "pretrained", None)
    steps, guidance = int(info["num_inference_steps"]), float(info.get("guidance") or 1.0)
    task = "text-to-image" if text else "unconditional-image-generation"
    tags = ["diffusers", "distillkit", *(["distillation"] if name != "diffusion" else []), name, task,
            *(["lora"] if lora else [])]
    front = ["---", "library_name: diffusers", f"pipeline_tag: {task}", "tags:", *[f"- {t}" for t in tags], "---", ""]
    run = f"{config.get('experiment_name', 'run')}/{config.get('name', '')}".rstrip("/")
    ts = info.get("timesteps")
    if ts:
        sampler = f"LCMScheduler at the timesteps the generator was trained at, `timesteps={ts}`"
    elif info.get("scheduler") == "LCMScheduler":
        sampler = "LCMScheduler (multistep consistency sampling)"
    else:
        eta = float(info.get("eta") or 0.0)
        sampler = f"DDIMScheduler ({info.get('timestep_spacing', 'trailing')} spacing, eta={eta:g})"
    conditional = info.get("condition") in ("text", "class")
    guided = f"guidance scale {guidance:g}" if conditional else "no guidance (unconditional)"
    weights = "EMA" if info.get("use_ema") else "raw"
    kind = "distilled" if name != "diffusion" else "trained"
    body = [f"# {run}", "",
            f"A {steps}-step diffusion model {kind} with distillkit's `method={name}`: "
            f"{PAPERS.get(name, name)}.", "",
            f"- **Method**: `method={name}`",
            f"- **Teacher**: {teacher_description(config)}",
            *([f"- **Base model**: `{pretrained}`"] if pretrained else []),
            f"- **Exported**: {info['exported']}, {weights} weights, from `{source or 'a run'}`",
            f"- **Sample with**: {steps} step{'s' if steps != 1 else ''}, {guided}; {sampler}",
            f"- **Prediction type**: {info.get('prediction_type')}",
            "", "## Usage", "",
            f"diffusers' default is 50 steps: pass `num_inference_steps={steps}`"
            + (f" and `timesteps={ts}`" if ts else "") + (f" with `guidance_scale={guidance:g}`" if text else "")
            + ".", "",
            "```python", usage_snippet(info, str(out), pretrained).rstrip("\n"), "```", ""]
    if info.get("condition") == "class":
        body += [f"Class-conditional: diffusers has no pipeline for a class-conditional `UNet2DModel`; "
                 f"the class {info.get('num_classes')} (`null_class`) is the unconditional one. "
                 f"`distill-sample checkpoint={source or '...'} class=3` draws them too.", ""]
    if info.get("guidance_embedding_dim") and not text:
        body += ["This network takes the guidance scale in an embedding that diffusers' `UNet2DModel` does "
                 f"not read: sample it with `distill-sample checkpoint={source or '...'}`.", ""]
    body += ["## Evaluation", ""]
    results = measured_fid(source)
    if results is None:
        body.append("No FID was measured for this run (its results.json holds no `fid/<k>step`); "
                    "`distill ... eval=digits` / `eval=coco` measures it during training.")
    else:
        net = results.get("feature_net", "")
        body += [f"Measured by the run (results.json, step {results.get('global_step')}"
                 + (f", features: {net}" if net else "") + "):", "",
                 "| sampling steps | FID | IS |", "|---|---|---|"]
        fids = sorted(((int(k[4:-4]), v) for k, v in results.items()
                       if k.startswith("fid/") and k.endswith("step") and k[4:-4].isdigit()), key=lambda kv: kv[0])
        for k, v in fids:
            is_ = results.get(f"is/{k}step")
            fid = f"{v:.3f}" if isinstance(v, (int, float)) else str(v)
            body.append(f"| {k} | {fid} | {f'{is_:.3f}' if isinstance(is_, (int, float)) else ''} |")
    body += ["", "## Files", "",
             "`distillkit.json` records where this export came from and how distillkit samples it "
             "(steps, timesteps, guidance, spacing); diffusers does not read it.", ""]
    return "\n".join(front + body)


def write_model_card(method, out: Path, info: dict, source: str) -> None:
    (out / "README.md").write_text(model_card(method, out, info, source))


def apply_umask(out: Path) -> None:
    """Give every file and folder under ``out`` the mode the user's umask gives new ones (0644 and
    0755 under umask 022): diffusers and safetensors write through temporary files, which are 0600."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    os.chmod(out, 0o777 & ~mask)
    for root, dirs, files in os.walk(out):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def run(argv: Sequence[str]) -> Path:
    args = parse_kv(argv, PROG, ARGS)
    from distillkit.models.loading import load_run_checkpoint

    method = load_run_checkpoint(args.checkpoint)
    if not hasattr(method, "is_edm"):
        raise DistillError(f"checkpoint={args.checkpoint}: method={method.method_name} is not a diffusion model; "
                           "distill-export needs a diffusion run")
    out = export_pipeline(method, args.out, args.use_ema, source=str(args.checkpoint), lora=args.lora)
    info = json.loads((out / "distillkit.json").read_text())
    sampler = f"; LCMScheduler, timesteps={info['timesteps']}" if "timesteps" in info else (
        f"; LCMScheduler, {info['num_inference_steps']} steps" if info.get("scheduler") == "LCMScheduler" else "")
    steps = int(info["num_inference_steps"])
    conditional = info.get("condition") in ("text", "class")
    guidance = f", guidance_scale={float(info.get('guidance') or 1.0):g}" if conditional else ""
    print(f"{PROG}: wrote {out} ({info['exported']}, {'EMA' if args.use_ema and method.ema is not None else 'raw'} "
          f"weights{sampler}); sample with {steps} step{'s' if steps != 1 else ''} "
          f"(num_inference_steps={steps}{guidance}; model card: {out / 'README.md'})")
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    command_main(PROG, run, argv)


if __name__ == "__main__":
    main()
