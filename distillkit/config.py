"""Schemas of every config group, registered in Hydra's ConfigStore.

Each yaml option under ``conf/<group>/`` starts its defaults list with
``/schema/<group>/<kind>@_here_``, so Hydra merges it into one of the dataclasses below.
That makes a misspelt key, a wrong type or an unknown option fail at composition time,
before any data is read or any weights are loaded (``distillkit.cli`` turns those failures
into one-paragraph messages that name the key and what is allowed).

Values that must be given on the command line are ``MISSING`` (``???`` in yaml); the CLI
lists them with :data:`REQUIRED_HINTS` before starting.
"""
from __future__ import annotations

from dataclasses import MISSING as MISSING_FIELD
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


def bounded(default: Any, at_least: Optional[float] = None, above: Optional[float] = None,
            at_most: Optional[float] = None) -> Any:
    """A numeric field with bounds, checked by :func:`out_of_bounds` when the config is composed,
    so that a value such as ``dataset.batch_size=0`` fails with a message naming the key before the
    run dir is touched, not as torch's error from inside training. A subclass that changes the
    default must declare the field with ``bounded`` again (a plain override drops the bounds)."""
    return field(default=default, metadata={"bounds": (at_least, above, at_most)})


class ResumeMode(str, Enum):
    auto = "auto"  # resume from last.ckpt when the run dir holds the same config
    force = "force"  # resume even though the config changed
    never = "never"  # refuse to start in a run dir that already holds a run


class Progress(str, Enum):
    auto = "auto"  # rich bar on an interactive terminal, plain log lines otherwise
    rich = "rich"
    plain = "plain"
    none = "none"


# --------------------------------------------------------------------------- dataset
@dataclass
class DatasetConfig:
    _target_: str = MISSING
    batch_size: int = bounded(64, at_least=1)
    eval_batch_size: int = bounded(256, at_least=1)
    num_workers: int = bounded(0, at_least=0)
    # Seed of the fixed train/val/test split; independent of the run's seed so that
    # every run of every method sees the same split.
    split_seed: int = 0


@dataclass
class DigitsConfig(DatasetConfig):
    val_fraction: float = 0.15
    test_fraction: float = 0.25
    # Fraction of the training split used for training (1.0: all of it); the held-out
    # val/test splits do not change with it.
    train_fraction: float = 1.0


@dataclass
class CifarConfig(DatasetConfig):
    data_dir: str = MISSING
    num_classes: int = 100
    augment: bool = True
    # mean_std: per-channel mean/std (classifiers, the KD literature); minus_one_one: [-1, 1]
    # (diffusion models)
    normalize: str = "mean_std"
    # random crop of the image padded by this many pixels (0: horizontal flip only, as diffusion
    # models train on CIFAR-10)
    crop_padding: int = bounded(4, at_least=0)
    num_workers: int = bounded(4, at_least=0)


@dataclass
class ImageFolderConfig(DatasetConfig):
    data_dir: str = MISSING
    image_size: int = 32
    channels: int = 3
    augment: bool = True
    val_fraction: float = 0.1
    test_fraction: float = 0.1


@dataclass
class Toy2DConfig(DatasetConfig):
    """A 2-D mixture of num_modes Gaussians N(mu_k, std^2 I), means on a circle of radius."""

    batch_size: int = bounded(256, at_least=1)
    eval_batch_size: int = bounded(1024, at_least=1)
    num_train: int = 8192
    num_val: int = 1024
    num_test: int = 1024
    num_modes: int = 8
    radius: float = 1.0
    std: float = 0.1


@dataclass
class TextImageConfig(DatasetConfig):
    """Latent text-to-image data (distillkit.data.text_image): prompts (and images) encoded once by
    the model's text encoders (and VAE), which the method attaches, and cached in cache_dir."""

    batch_size: int = bounded(16, at_least=1)
    eval_batch_size: int = bounded(16, at_least=1)
    # side of the square images: shorter side resized to it (bilinear), then centre-cropped; also
    # SDXL's original_size for prompts without images
    resolution: int = bounded(512, at_least=8)
    val_fraction: float = bounded(0.05, at_least=0, at_most=1)
    test_fraction: float = bounded(0.0, at_least=0, at_most=1)
    # encoded prompts and latents, one safetensors file per dataset keyed by model and data
    # (None: $DISTILLKIT_CACHE/latents or ~/.cache/distillkit/latents)
    cache_dir: Optional[str] = None
    # prompts / images per encoder call while the cache is built
    encode_batch_size: int = bounded(16, at_least=1)


@dataclass
class PromptsConfig(TextImageConfig):
    """`dataset=prompts`: a UTF-8 text file, one prompt a line (no images)."""

    path: str = MISSING


class CaptionChoice(str, Enum):
    first = "first"  # one item per image: its first caption
    all = "all"  # one item per caption


@dataclass
class CocoCaptionsConfig(TextImageConfig):
    """`dataset=coco_captions`: COCO's captions JSON, with the images of image_dir or prompts only."""

    captions_file: str = MISSING
    # the folder of the jpgs (e.g. train2014/); None: captions only, no images
    image_dir: Optional[str] = None
    caption_choice: CaptionChoice = CaptionChoice.first
    # the first max_items items by image id (None: all)
    max_items: Optional[int] = bounded(None, at_least=1)


@dataclass
class ImageTextFolderConfig(TextImageConfig):
    """`dataset=image_text_folder`: images with <stem>.txt captions or a metadata.jsonl."""

    data_dir: str = MISSING
    # metadata.jsonl's caption key
    caption_column: str = "text"


# --------------------------------------------------------------------------- models
@dataclass
class ModelConfig:
    """A network. The same option in `model=` and `teacher=` builds the same architecture."""

    _target_: str = MISSING
    # the CIFAR-100 classifiers' (resnet*, wrn_*, timm); DigitsCNNConfig sets 10
    num_classes: int = 100
    in_channels: int = 3
    # Weights loaded after construction: a distillkit checkpoint (.ckpt), a plain state
    # dict (.pt/.pth, also {"model": state_dict} as RepDistiller/mdistiller save them) or a
    # .safetensors file. Required for a teacher.
    checkpoint: Optional[str] = None


@dataclass
class DigitsCNNConfig(ModelConfig):
    width: int = 32
    num_classes: int = 10
    in_channels: int = 1


@dataclass
class TimmConfig(ModelConfig):
    model_name: str = MISSING
    # Local weights file for the timm model (nothing is downloaded at run time).
    pretrained_path: Optional[str] = None


@dataclass
class DenoiserConfig:
    """A denoising network ``net(x_t, t)`` (diffusion student or teacher)."""

    _target_: str = MISSING
    # Weights loaded after construction (see ModelConfig.checkpoint).
    checkpoint: Optional[str] = None


# LoRA's default layers, the attention projections (distillkit.models.lora takes them from here)
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass
class UNetConfig(DenoiserConfig):
    """diffusers' UNet2DModel (distillkit.models.unet.DiffusersUNet)."""

    _target_: str = "distillkit.models.unet.DiffusersUNet"
    sample_size: int = 32
    in_channels: int = 3
    # None: the same as in_channels
    out_channels: Optional[int] = None
    block_out_channels: List[int] = field(default_factory=lambda: [128, 256, 256, 256])
    layers_per_block: int = 2
    # diffusers block names, one per block_out_channels entry (empty: plain ResNet blocks)
    down_block_types: List[str] = field(default_factory=list)
    up_block_types: List[str] = field(default_factory=list)
    attention_head_dim: Optional[int] = None
    norm_num_groups: int = 32
    dropout: float = 0.0
    # self-attention in the middle block
    add_attention: bool = True
    # class-conditional: a class embedding of num_classes + 1 entries (the last is the null class of
    # classifier-free guidance); None: unconditional
    num_classes: Optional[int] = bounded(None, at_least=1)
    # train a LoRA adapter of this rank on the network, frozen as the teacher's copy (LCM-LoRA, DMD on
    # digits; distillkit.models.lora) instead of the whole network (None: full)
    lora_rank: Optional[int] = bounded(None, at_least=1)
    # LoRA's alpha (None: the rank, a scale of 1)
    lora_alpha: Optional[float] = bounded(None, above=0)
    lora_target_modules: List[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class PretrainedUNetConfig(DenoiserConfig):
    """A diffusers UNet2DModel from a local folder (distillkit.models.pretrained.pretrained_unet)."""

    _target_: str = "distillkit.models.pretrained.pretrained_unet"
    # folder with config.json + weights (or a pipeline folder with unet/); nothing is downloaded
    pretrained: str = MISSING


@dataclass
class StableDiffusionModelConfig(DenoiserConfig):
    """SD1.5 / SDXL from a local diffusers pipeline folder (distillkit.models.stable_diffusion): the
    UNet, VAE, text encoders and tokenizers, and the folder's scheduler_config.json."""

    _target_: str = "distillkit.models.stable_diffusion.stable_diffusion"
    # a local StableDiffusionPipeline / StableDiffusionXLPipeline folder; nothing is downloaded
    pretrained: str = MISSING
    variant: str = "sd15"
    # VAE and text encoders (and a teacher's UNet): auto = bfloat16 on a GPU, float32 on a CPU
    frozen_dtype: str = "auto"
    gradient_checkpointing: bool = False
    # train a LoRA adapter of this rank on a frozen UNet instead of the whole UNet (None: full)
    lora_rank: Optional[int] = bounded(None, at_least=1)
    # LoRA's alpha (None: the rank, a scale of 1)
    lora_alpha: Optional[float] = bounded(None, above=0)
    lora_target_modules: List[str] = field(default_factory=lambda: list(LORA_TARGETS))
    # image side in pixels (None: the UNet's sample_size times the VAE's downsampling)
    resolution: Optional[int] = bounded(None, at_least=8)


@dataclass
class MLPDenoiserConfig(DenoiserConfig):
    """An MLP denoiser for low-dimensional points (distillkit.models.mlp.MLPDenoiser)."""

    _target_: str = "distillkit.models.mlp.MLPDenoiser"
    dim: int = 2
    hidden: int = 128
    depth: int = 3
    time_embed_dim: int = 64
    # t is multiplied by this before the sinusoidal embedding (raise it for EDM's c_noise).
    time_scale: float = 1.0


@dataclass
class NoTeacherConfig:
    """`teacher=none`: methods that need a teacher refuse to start with it."""

    _target_: Optional[str] = None


@dataclass
class SelfTeacherConfig:
    """`teacher=self`: the network is its own teacher (method=dsd); other methods refuse it."""

    _target_: Optional[str] = None
    self_distill: bool = True


# --------------------------------------------------------------------------- methods
@dataclass
class MethodConfig:
    _target_: str = MISSING


@dataclass
class SupervisedConfig(MethodConfig):
    label_smoothing: float = bounded(0.0, at_least=0, at_most=1)


@dataclass
class KDConfig(MethodConfig):
    """Hinton et al. 2015: ce_weight * CE + kd_weight * T^2 * KL(teacher_T || student_T)."""

    temperature: float = bounded(4.0, above=0)
    ce_weight: float = bounded(0.1, at_least=0)
    kd_weight: float = bounded(0.9, at_least=0)


@dataclass
class DKDConfig(MethodConfig):
    """Zhao et al. 2022 (Decoupled KD), eq. (7): alpha * TCKD + beta * NCKD."""

    alpha: float = bounded(1.0, at_least=0)
    beta: float = bounded(8.0, at_least=0)
    temperature: float = bounded(4.0, above=0)
    ce_weight: float = bounded(1.0, at_least=0)
    # The KD term is scaled by min(epoch / warmup_epochs, 1) (mdistiller's warm-up).
    warmup_epochs: float = bounded(20.0, at_least=0)


@dataclass
class FitNetConfig(MethodConfig):
    """Romero et al. 2015: CE + hint_weight * ||connector(student_hint) - teacher_hint||^2."""

    student_layer: str = MISSING
    teacher_layer: str = MISSING
    hint_weight: float = bounded(100.0, at_least=0)
    ce_weight: float = bounded(1.0, at_least=0)


class PredictionType(str, Enum):
    v = "v"  # v = alpha eps - sigma x0 (Salimans & Ho 2022)
    eps = "eps"
    x0 = "x0"


class Weighting(str, Enum):
    none = "none"  # plain MSE on the prediction
    min_snr = "min_snr"  # Hang et al. 2023, min(SNR, gamma) in x0 space
    edm = "edm"  # Karras et al. 2022 (schedule=edm only)


@dataclass
class DiffusionConfig(MethodConfig):
    """Denoising training (distillkit.methods.diffusion): the network predicts prediction_type;
    the MSE is taken in loss_space (None: the prediction type) with weighting w(t)."""

    # None: the model's own (a pretrained folder's scheduler_config.json), else v
    prediction_type: Optional[PredictionType] = None
    loss_space: Optional[PredictionType] = None
    weighting: Weighting = Weighting.none
    min_snr_gamma: float = bounded(5.0, above=0)
    # classifier-free guidance training: each sample's condition (class, prompt) is replaced by the
    # unconditional one with this probability (conditional models only)
    cond_dropout: float = bounded(0.1, at_least=0, at_most=0.99)


class StepWeighting(str, Enum):
    truncated_snr = "truncated_snr"  # max(SNR_t, 1) ||x - x_hat||^2 (Salimans & Ho 2022, Sec. 4)
    snr_plus_one = "snr_plus_one"  # (SNR_t + 1) ||x - x_hat||^2, the v-loss
    latent = "latent"  # plain MSE between the latents both steps land on


class DSDVariant(str, Enum):
    dsdn = "dsdn"  # one level at N = teacher_steps, sampled with N/2 steps
    dsdi = "dsdi"  # levels N, N/2, ... down to 2 * final_steps


class DSDTarget(str, Enum):
    online = "online"  # evaluation 2 by the network itself (the literal method; collapses)
    ema = "ema"  # evaluation 2 by an EMA target network (target_decay)


class LatentSource(str, Enum):
    noise = "noise"  # data-free: trajectories from pure noise, advanced by the single step
    data = "data"  # forward-noised data batches


@dataclass
class StepDistillConfig(MethodConfig):
    """Step distillation on nested trailing DDIM grids (distillkit.methods.step_distill): N =
    teacher_steps at the start, halved each round/level down to final_steps sampling steps."""

    # what the student predicts (v or x0: Salimans & Ho 2022, Sec. 4)
    prediction_type: PredictionType = PredictionType.v
    weighting: StepWeighting = StepWeighting.truncated_snr
    teacher_steps: int = 64
    final_steps: Optional[int] = None
    # each round/level starts with a fresh optimizer state (Adam moments, step count), as each
    # halving of the official progressive code starts a new training state
    fresh_optimizer: bool = False


@dataclass
class ProgressiveConfig(StepDistillConfig):
    """Salimans & Ho 2022, Algorithm 2 (distillkit.methods.progressive)."""

    final_steps: Optional[int] = 1
    # updates per round: one count for every round, or a list with one per round
    # (distillkit.cycles; the last rounds, 2 -> 1 step, gain most from more)
    updates_per_round: Any = 1000
    # what the first teacher predicts (None: prediction_type); later teachers are students
    teacher_prediction_type: Optional[PredictionType] = None
    # each round's student starts as its teacher
    init_from_teacher: bool = True
    # the first updates of round 1 teach the student the teacher's x-prediction in its own
    # parameterisation (one teacher evaluation, no step skipped); for a change of prediction type
    convert_updates: int = 0


@dataclass
class SweepDistillConfig(StepDistillConfig):
    """DSD / TSD (distillkit.methods.dsd): index sweep over the grid's pairs of steps."""

    variant: DSDVariant = DSDVariant.dsdn
    # updates per level: one count for every level, or a list with one per level
    updates_per_level: Any = 1008
    latents: LatentSource = LatentSource.noise
    # trajectories per update (None: the dataset's batch size)
    latent_batch_size: Optional[int] = bounded(None, at_least=1)
    # weight of the denoising loss on data (an anchor; 0: data-free; one more evaluation)
    denoise_weight: float = 0.0


@dataclass
class DSDConfig(SweepDistillConfig):
    target: DSDTarget = DSDTarget.ema
    # decay of the target network (target=ema); separate from callbacks.ema
    target_decay: float = 0.99
    # denoising training (weight 1) plus distill_weight * the DSD loss from update distill_start
    from_scratch: bool = False
    distill_weight: float = bounded(1.0, at_least=0)
    distill_start: int = bounded(0, at_least=0)


@dataclass
class TSDConfig(SweepDistillConfig):
    teacher_prediction_type: Optional[PredictionType] = None
    init_from_teacher: bool = True


# --------------------------------------------------------------------------- schedule
class Spacing(str, Enum):
    trailing = "trailing"
    leading = "leading"
    linspace = "linspace"


class EDMSolver(str, Enum):
    heun = "heun"
    euler = "euler"


@dataclass
class ScheduleConfig:
    """Diffusion noise schedule; `schedule=none` for classifier distillation. Built by
    distillkit.diffusion.from_config.schedule_from_config (linear, cosine, scaled_linear, edm)."""

    name: str = "none"
    # VP schedules: T, the number of discrete training timesteps
    num_train_timesteps: int = bounded(1000, at_least=1)
    # default number of sampling steps
    num_steps: int = bounded(50, at_least=1)
    # timestep grid of the sampler (VP schedules)
    spacing: Spacing = Spacing.trailing
    # DDIM eta: 0 deterministic, 1 DDPM-like ancestral (VP schedules)
    eta: float = bounded(0.0, at_least=0)


@dataclass
class VPScheduleConfig(ScheduleConfig):
    """diffusers' beta tables; None: the schedule's usual betas (DDPM / Stable Diffusion)."""

    beta_start: Optional[float] = None
    beta_end: Optional[float] = None
    rescale_betas_zero_snr: bool = False
    # DDIM: clamp each step's x0-prediction to [-clip_sample_range, clip_sample_range], eps kept
    # (diffusers' DDIMScheduler clip_sample); eps-networks need it at the top of a trailing grid
    clip_sample: bool = False
    clip_sample_range: float = 1.0


@dataclass
class EDMScheduleConfig(ScheduleConfig):
    """Karras et al. 2022 (Table 1, "Ours"): sampling sigmas of eq. (5), training ln sigma ~ N(p_mean, p_std^2)."""

    name: str = "edm"
    # Heun's 18 steps (35 network evaluations), Karras et al.'s CIFAR-10 setting
    num_steps: int = bounded(18, at_least=1)
    sigma_min: float = bounded(0.002, above=0)
    sigma_max: float = bounded(80.0, above=0)
    rho: float = bounded(7.0, above=0)
    sigma_data: float = bounded(0.5, above=0)
    p_mean: float = -1.2
    p_std: float = bounded(1.2, above=0)
    solver: EDMSolver = EDMSolver.heun


class GeneratorInputs(str, Enum):
    backward = "backward"  # backward simulation: the generator's own no-grad steps, re-noised (DMD2, Sec. 4.5)
    real = "real"  # forward-noised real data (the training-inference mismatch DMD2 avoids)


@dataclass
class DMDConfig(MethodConfig):
    """Distribution matching distillation (distillkit.methods.dmd; Yin et al., CVPR 2024): a one-step
    (or few-step) generator, a fake-score critic trained online, the frozen teacher as real score."""

    # the generator's and the fake score's prediction type (None: the teacher's own)
    prediction_type: Optional[PredictionType] = None
    teacher_prediction_type: Optional[PredictionType] = None
    # the fake score's denoising loss (diffusion's loss_space / weighting)
    loss_space: Optional[PredictionType] = None
    weighting: Weighting = Weighting.none
    min_snr_gamma: float = bounded(5.0, above=0)
    # classifier-free guidance of the real score (teacher), diffusers' convention (1: none)
    real_guidance: float = bounded(1.0, at_least=0)
    # the generator's conditioning timesteps, descending (None: [T-1], one step); e.g. [999, 749, 499, 249]
    timesteps: Optional[List[int]] = None
    dm_weight: float = bounded(1.0, at_least=0)
    # the distribution-matching loss's t ~ U[dm_t_min T, dm_t_max T] (DMD2's 0.02 / 0.98)
    dm_t_min: float = bounded(0.02, at_least=0, at_most=1)
    dm_t_max: float = bounded(0.98, at_least=0, at_most=1)
    # DMD's regression loss on the teacher's noise-image pairs (written by distill-pairs); 0: none
    regression_weight: float = bounded(0.25, at_least=0)
    pairs: Optional[str] = None
    # pairs per update (None: the dataset's batch size)
    regression_batch_size: Optional[int] = bounded(None, at_least=1)
    # two time-scale update rule: critic updates per generator update (DMD2: 5, SD1.5 10)
    critic_updates_per_generator_update: int = bounded(1, at_least=1)
    # DMD2's GAN on the fake score's bottleneck features: generator and critic weights (0: no GAN)
    gan_generator_weight: float = bounded(0.0, at_least=0)
    gan_critic_weight: float = bounded(0.0, at_least=0)
    # the diffusion GAN's t ~ U{0, ..., gan_max_timestep - 1} (None: T)
    gan_max_timestep: Optional[int] = bounded(None, at_least=1)
    # multi-step generators: where the input at a later step comes from
    generator_inputs: GeneratorInputs = GeneratorInputs.backward
    # the generator and the fake score start as the teacher
    init_from_teacher: bool = True


@dataclass
class DMD2Config(DMDConfig):
    """DMD2 (Yin et al., NeurIPS 2024): no regression loss, TTUR, a GAN, backward simulation."""

    regression_weight: float = bounded(0.0, at_least=0)
    critic_updates_per_generator_update: int = bounded(5, at_least=1)
    gan_generator_weight: float = bounded(1e-3, at_least=0)
    gan_critic_weight: float = bounded(1e-2, at_least=0)


class Curriculum(str, Enum):
    fixed = "fixed"  # method.num_timesteps steps throughout
    ict = "ict"  # iCT's exponential curriculum from curriculum_start to curriculum_end steps (Song & Dhariwal 2023)


class ConsistencyDistance(str, Enum):
    huber = "huber"  # pseudo-Huber sqrt(||a - b||^2 + c^2) - c (iCT)
    huber_elementwise = "huber_elementwise"  # per element, averaged (diffusers' LCM scripts, c = 0.001)
    l2 = "l2"  # mean squared error (LCM's l2)


@dataclass
class ConsistencyConfig(MethodConfig):
    """Consistency distillation (distillkit.methods.consistency; Song et al. 2023): the student,
    starting as the teacher, is trained so that f(x_{t_{n+k}}) matches an EMA target's f at the
    teacher's ODE step to t_n."""

    # the student's prediction type (None: the teacher's own) and the teacher's
    prediction_type: Optional[PredictionType] = None
    teacher_prediction_type: Optional[PredictionType] = None
    # steps of the discretisation (VP: LCM's 50 on T = 1000, i.e. points 0, 19, ..., 999; EDM: Karras'
    # num_timesteps + 1 sigmas, CM's 17 for N = 18) and the teacher's ODE step spans skip of them
    num_timesteps: int = bounded(50, at_least=1)
    skip: int = bounded(1, at_least=1)
    curriculum: Curriculum = Curriculum.fixed
    curriculum_start: int = bounded(10, at_least=1)
    curriculum_end: int = bounded(1280, at_least=1)
    # the target network theta^- <- mu theta^- + (1 - mu) theta (LCM 0.95; iCT 0: the online network)
    target_decay: float = bounded(0.95, at_least=0, at_most=1)
    distance: ConsistencyDistance = ConsistencyDistance.huber
    # the pseudo-Huber c (None: iCT's 0.00054 sqrt(d) for huber, 0.001 for huber_elementwise)
    huber_c: Optional[float] = bounded(None, above=0)
    # LCM's boundary condition c_skip = 0.25 / ((s t)^2 + 0.25) on VP schedules (diffusers' LCMScheduler: 10)
    timestep_scaling: float = bounded(10.0, above=0)
    # classifier-free guidance of the teacher's ODE step, diffusers' convention (1: none)
    teacher_guidance: float = bounded(1.0, at_least=0)
    # the times of a len(sampling_timesteps)-step sample (None: LCMScheduler's choice from the discretisation)
    sampling_timesteps: Optional[List[float]] = None
    init_from_teacher: bool = True


@dataclass
class LCMConfig(ConsistencyConfig):
    """Latent consistency distillation (Luo et al. 2023): the teacher's guided step with w ~ U[w_min,
    w_max] per sample (LCM's convention: cond + w (cond - uncond)), w given to the student through a
    guidance-scale embedding (LCM-LoRA, model.lora_rank: none)."""

    w_min: float = bounded(5.0, at_least=0)
    w_max: float = bounded(15.0, at_least=0)
    # the embedding's width (None: 256, LCM's time_cond_proj_dim; 0 / LoRA: none)
    guidance_embedding_dim: Optional[int] = bounded(None, at_least=0)


# --------------------------------------------------------------------------- optim
@dataclass
class SchedulerConfig:
    # none | multistep | cosine | linear
    name: str = "none"
    # multistep: epochs at which the lr is multiplied by gamma
    milestones: List[int] = field(default_factory=list)
    gamma: float = bounded(0.1, above=0)
    # cosine, linear: lr decays to lr * min_lr_ratio over the run
    min_lr_ratio: float = bounded(0.0, at_least=0, at_most=1)
    # cosine: linear warmup over the first warmup_steps updates
    warmup_steps: int = bounded(0, at_least=0)
    # linear: restart the decay every cycle_steps updates (0: one decay over the run), or after
    # each of a list of lengths in turn; step distillation's per-round anneal is
    # cycle_steps=${method.updates_per_round}, whether that is one count or a list
    cycle_steps: Any = 0


@dataclass
class OptimizerConfig:
    _target_: str = MISSING
    _partial_: bool = True
    lr: float = bounded(1e-3, at_least=0)
    weight_decay: float = bounded(0.0, at_least=0)


@dataclass
class SGDConfig(OptimizerConfig):
    _target_: str = "torch.optim.SGD"
    lr: float = bounded(0.05, at_least=0)
    momentum: float = bounded(0.9, at_least=0)
    nesterov: bool = False
    weight_decay: float = bounded(5e-4, at_least=0)


@dataclass
class AdamConfig(OptimizerConfig):
    _target_: str = "torch.optim.Adam"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = bounded(1e-8, at_least=0)


@dataclass
class AdamWConfig(AdamConfig):
    _target_: str = "torch.optim.AdamW"
    weight_decay: float = bounded(0.01, at_least=0)


@dataclass
class OptimConfig:
    optimizer: Any = MISSING
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # clip the gradient norm to this (None: trainer.gradient_clip_val, else no clipping)
    gradient_clip_val: Optional[float] = bounded(None, at_least=0)


@dataclass
class CriticOptimConfig:
    """The critic's optimizer in methods with several roles (DMD, DMD2): the generator's (``optim``)
    with these values put in; None: the generator's value."""

    lr: Optional[float] = bounded(None, at_least=0)
    weight_decay: Optional[float] = bounded(None, at_least=0)
    betas: Optional[List[float]] = None
    warmup_steps: Optional[int] = bounded(None, at_least=0)
    # the critic's own schedule (optim.scheduler.name's values) and its floor, e.g. constant while the generator's decays
    scheduler_name: Optional[str] = None
    min_lr_ratio: Optional[float] = bounded(None, at_least=0, at_most=1)
    gradient_clip_val: Optional[float] = bounded(None, at_least=0)


# --------------------------------------------------------------------------- trainer etc.
@dataclass
class TrainerConfig:
    max_epochs: int = bounded(10, at_least=-1)
    max_steps: int = bounded(-1, at_least=-1)
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = bounded(1, at_least=1)
    strategy: str = "auto"
    # None: bf16-mixed on GPU, 32-true on CPU (docs/architecture.md, Decisions).
    precision: Optional[str] = None
    gradient_clip_val: Optional[float] = bounded(None, at_least=0)
    accumulate_grad_batches: int = bounded(1, at_least=1)
    log_every_n_steps: int = bounded(10, at_least=1)
    check_val_every_n_epoch: int = bounded(1, at_least=1)
    val_check_interval: Optional[float] = None
    # Lightning's meaning: an int is a number of batches (1: one batch), a float in [0, 1] a fraction
    # (1.0: all); None: all. Typed Any so that an int stays an int (a float field made 1 into 1.0).
    limit_train_batches: Any = bounded(None, at_least=0)
    limit_val_batches: Any = bounded(None, at_least=0)
    limit_test_batches: Any = bounded(None, at_least=0)
    deterministic: bool = False
    # torch's intra-op threads on CPU (None: torch's default). Small networks run fastest
    # with 1, and DDP processes on one CPU should share the cores, not oversubscribe them.
    cpu_threads: Optional[int] = bounded(None, at_least=1)
    # Evaluate the test split with the final weights after fitting.
    test_after_fit: bool = True
    # torch.compile's mode for the student's and the teacher's forwards in training (null: eager). On an H200 "default"
    # took the CIFAR-10 teacher's update from 0.104 to 0.056 s, after 77 s of compiling (README).
    compile: Optional[str] = None


@dataclass
class LoggerConfig:
    csv: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "distillkit"
    wandb_entity: Optional[str] = None


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = bounded(0.999, at_least=0, at_most=1)


class NonFinite(str, Enum):
    stop = "stop"  # a non-finite loss, logged training term or gradient stops the run (exit status 3)
    skip = "skip"  # such an update is not applied (counted: train/nonfinite_skipped)


@dataclass
class CallbacksConfig:
    # last.ckpt is rewritten (atomically) every this many seconds of wall time (0: off), every
    # checkpoint_every_n_steps optimizer steps (0: off), at the end of training and on a stop
    # signal; not at every epoch's end (distillkit/callbacks/checkpoint.py, docs/long_runs.md).
    checkpoint_every_seconds: float = bounded(600.0, at_least=0)
    checkpoint_every_n_steps: int = bounded(0, at_least=0)
    progress: Progress = Progress.auto
    ema: EMAConfig = field(default_factory=EMAConfig)
    # A non-finite loss (any logged train/ term) or gradient: stop the run at that update, before it
    # is applied (last.ckpt stays the last finite checkpoint; exit status 3), or skip the update;
    # skip stops too after max_nonfinite_skips non-finite updates in a row (docs/long_runs.md).
    nonfinite: NonFinite = NonFinite.stop
    max_nonfinite_skips: int = bounded(10, at_least=1)


# --------------------------------------------------------------------------- eval
@dataclass
class EvalConfig:
    """Sample quality (FID/IS, and the CLIP score of text-to-image models) during training;
    `eval=none` turns it off; `eval=coco` is DMD2's COCO-2014 protocol (docs/coco_evaluation.md).

    See distillkit.callbacks.evaluation.SampleEvaluation, distillkit.metrics.fid and
    distillkit.metrics.clip_score."""

    enabled: bool = False
    # Evaluate every this many optimizer steps (0: only at the end of training), or at the end
    # of each of a list of lengths (${method.updates_per_round}: after every round)
    every_n_steps: Any = 1000
    # Sampling step counts; each is logged as fid/{k}step and is/{k}step.
    steps: List[int] = field(default_factory=lambda: [1, 2, 4])
    # Generated images per evaluation (all ranks together). FID depends on it: digits
    # numbers (and the floor) use 700.
    num_samples: int = 700
    # digits (the shipped digits CNN) | inception (needs inception_weights and the extra
    # distillkit[inception])
    feature_net: str = "digits"
    inception_weights: Optional[str] = None
    # Real-statistics cache (None: $DISTILLKIT_CACHE/fid_stats or ~/.cache/distillkit/fid_stats).
    cache_dir: Optional[str] = None
    batch_size: int = bounded(256, at_least=1)
    # The sampling noise seed, the same at every evaluation so numbers are comparable.
    seed: int = 0
    # Classifier-free guidance of conditional models' samples: uncond + w (cond - uncond), 1: none
    guidance: float = bounded(1.0, at_least=0)
    # Text-to-image models (model=sd15 / sdxl; see distillkit.callbacks.evaluation). feature_net may
    # also be none there (no FID / IS: the CLIP score alone).
    # The prompts sampled: a UTF-8 file, one prompt a line, or COCO's captions JSON (the first caption
    # of each image, images in id order); the first num_samples, repeated if fewer. None: the
    # datamodule's validation prompts (else its training prompts).
    prompts: Optional[str] = None
    # A local transformers CLIPModel folder (e.g. a download of openai/clip-vit-large-patch14): logs
    # clip_score/{k}step, 100 * mean cos(image, prompt) (torchmetrics' CLIPScore). None: no CLIP score.
    clip_weights: Optional[str] = None
    # Put before every prompt for the CLIP score only (DMD2's code uses "A photo depicts ").
    clip_prefix: str = ""
    # Images are centre-cropped and resized (Lanczos) to resolution x resolution before FID / IS / CLIP
    # (COCO protocols score at 256 or 512); None: as generated.
    resolution: Optional[int] = bounded(None, at_least=1)
    # FID reference of text-to-image models: a folder of image files (e.g. COCO's val2014/), resized
    # like the samples; the text-image datasets hold latents, not images.
    reference_images: Optional[str] = None
    # The first this many reference images (sorted by path); None: all.
    num_reference: Optional[int] = bounded(None, at_least=2)
    # coco (set by eval=coco): prompts, reference_images and inception_weights are required and
    # checked before training. None: no protocol.
    protocol: Optional[str] = None


# --------------------------------------------------------------------------- top level
@dataclass
class Config:
    dataset: Any = MISSING
    model: Any = MISSING
    teacher: Any = MISSING
    method: Any = MISSING
    schedule: Any = MISSING
    optim: OptimConfig = MISSING
    critic_optim: CriticOptimConfig = field(default_factory=CriticOptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    eval: Any = MISSING
    seed: int = 0
    # Run dir: <runs_dir>/<experiment_name>/<name>. `name` defaults to the command-line
    # overrides (minus those that may change on resume or set a key to its value anyway, a path
    # as <file stem>-<hash>: compose.run_name_for), so the same command line always lands in the
    # same run dir and resumes there.
    name: str = MISSING
    experiment_name: str = "default"
    runs_dir: str = "runs"
    resume: ResumeMode = ResumeMode.auto


SCHEMAS: dict[str, dict[str, type]] = {
    "dataset": {"digits": DigitsConfig, "cifar": CifarConfig, "image_folder": ImageFolderConfig,
                "toy2d": Toy2DConfig, "prompts": PromptsConfig, "coco_captions": CocoCaptionsConfig,
                "image_text_folder": ImageTextFolderConfig},
    "model": {"classifier": ModelConfig, "digits_cnn": DigitsCNNConfig, "timm": TimmConfig,
              "unet": UNetConfig, "mlp": MLPDenoiserConfig, "unet_pretrained": PretrainedUNetConfig,
              "stable_diffusion": StableDiffusionModelConfig},
    "teacher": {"none": NoTeacherConfig, "self": SelfTeacherConfig},
    "method": {
        "supervised": SupervisedConfig,
        "kd": KDConfig,
        "dkd": DKDConfig,
        "fitnet": FitNetConfig,
        "diffusion": DiffusionConfig,
        "progressive": ProgressiveConfig,
        "dsd": DSDConfig,
        "tsd": TSDConfig,
        "dmd": DMDConfig,
        "dmd2": DMD2Config,
        "consistency": ConsistencyConfig,
        "lcm": LCMConfig,
    },
    "schedule": {"none": ScheduleConfig, "vp": VPScheduleConfig, "edm": EDMScheduleConfig},
    "optim/optimizer": {"sgd": SGDConfig, "adam": AdamConfig, "adamw": AdamWConfig},
    "optim": {"optim": OptimConfig},
    "eval": {"eval": EvalConfig},
}

# Shown when a required (???) value is missing, keyed by its config path suffix.
REQUIRED_HINTS = {
    "teacher.checkpoint": "the teacher's weights: a distillkit run's last.ckpt, a state dict "
    "(.pt/.pth) or a .safetensors file, e.g. teacher.checkpoint=runs/digits_teacher/default/last.ckpt",
    "dataset.data_dir": "the folder holding the dataset files, e.g. dataset.data_dir=/data/cifar-100-python",
    "dataset.path": "a UTF-8 text file with one prompt a line, e.g. dataset.path=/data/prompts.txt",
    "dataset.captions_file": "COCO's captions JSON, e.g. dataset.captions_file=/data/coco/annotations/captions_val2014.json",
    "method.pairs": "the teacher's noise-image pairs of DMD's regression loss, written once by distill-pairs, e.g. "
    "method.pairs=runs/pairs.safetensors (or method.regression_weight=0)",
    "method.student_layer": "the module path of the student's hint layer, e.g. method.student_layer=layer2",
    "method.teacher_layer": "the module path of the teacher's hint layer, e.g. method.teacher_layer=layer2",
    "model.model_name": "a timm model name, e.g. model.model_name=resnet18",
    "model.pretrained": "a local diffusers folder: a UNet (config.json + weights) for unet_pretrained, e.g. "
    "model.pretrained=/models/ddpm-celebahq-256, or a pipeline (unet/, vae/, text_encoder/, tokenizer/, scheduler/) "
    "for sd15 / sdxl, e.g. model.pretrained=/models/stable-diffusion-v1-5",
    "teacher.pretrained": "a local diffusers folder: a UNet (config.json + weights) for unet_pretrained, e.g. "
    "teacher.pretrained=/models/ddpm-celebahq-256, or a pipeline (unet/, vae/, text_encoder/, tokenizer/, scheduler/) "
    "for sd15 / sdxl, e.g. teacher.pretrained=/models/stable-diffusion-v1-5",
}


def register_configs() -> None:
    """Put every schema into Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, options in SCHEMAS.items():
        for name, node in options.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def field_names(schema: type) -> list[str]:
    """The keys a schema allows, for error messages."""
    if not is_dataclass(schema):
        return []
    return [f.name for f in fields(schema)]


def _describe(at_least: Optional[float], above: Optional[float], at_most: Optional[float]) -> str:
    if at_least is not None and at_most is not None:
        return f"must lie in [{at_least:g}, {at_most:g}]"
    if above is not None:
        return f"must be above {above:g}"
    return f"must be at least {at_least:g}" if at_least is not None else f"must be at most {at_most:g}"


def schema_defaults(cfg: DictConfig, prefix: str = "") -> dict[str, Any]:
    """``{flattened key: its schema default}`` for every field of the schemas in ``cfg`` that has a
    default. The rerun check (distillkit.runs.config_diff) takes an option absent from an earlier
    run's config.yaml at this value as no change: an option added since then, at its default,
    does what the run did."""
    schema = OmegaConf.get_type(cfg)
    out: dict[str, Any] = {}
    if is_dataclass(schema):
        for f in fields(schema):
            if f.default is not MISSING_FIELD:  # an Enum as the resolved config writes it: its name
                out[f"{prefix}{f.name}"] = f.default.name if isinstance(f.default, Enum) else f.default
            elif f.default_factory is not MISSING_FIELD:
                default = f.default_factory()
                if isinstance(default, (list, dict, str, int, float, bool)):
                    out[f"{prefix}{f.name}"] = default
    for key in cfg.keys():
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and f"{prefix}{key}" != "hydra" and not node._is_none() \
                and not node._is_interpolation():
            out.update(schema_defaults(node, f"{prefix}{key}."))
    return out


def out_of_bounds(cfg: DictConfig, prefix: str = "") -> list[str]:
    """``key=value: must be ...`` for each value outside the bounds its schema field declares
    (:func:`bounded`); interpolations that do not resolve are left to the code that reads them."""
    schema = OmegaConf.get_type(cfg)
    bounds = {f.name: f.metadata["bounds"] for f in fields(schema) if "bounds" in f.metadata} if is_dataclass(schema) else {}
    out: list[str] = []
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if full == "hydra" or OmegaConf.is_missing(cfg, key):
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            if not node._is_none() and not node._is_interpolation():
                out.extend(out_of_bounds(node, full + "."))
            continue
        if key not in bounds:
            continue
        try:
            value = cfg[key]
        except Exception:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        at_least, above, at_most = bounds[key]
        if ((at_least is not None and value < at_least) or (above is not None and value <= above)
                or (at_most is not None and value > at_most)):
            out.append(f"{full}={value}: {_describe(at_least, above, at_most)}")
    return out
