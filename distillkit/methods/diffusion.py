"""Denoising diffusion training (``method=diffusion``): makes the teachers that step distillation
starts from, and is the base of every diffusion method (schedule, prediction type, denoising
loss, sampling, NFE counting).

VP schedules (linear, cosine, scaled_linear; Ho et al. 2020, Kingma et al. 2021). Per example,
t ~ U{0, ..., T-1}, eps ~ N(0, I), x_t = alpha_t x_0 + sigma_t eps, and the network F(x_t, t)
predicts ``prediction_type`` (eps, x0 or v = alpha eps - sigma x_0, Salimans & Ho 2022, Sec. 4).
The loss is a weighted MSE in ``loss_space`` (default: the prediction type itself), the
prediction converted there exactly by ``diffusion.convert``:

    L = E_t,eps [ w(t) || convert(F(x_t, t) -> loss_space) - target ||^2 ],
    target = eps | x_0 | alpha eps - sigma x_0.

Weightings w(t):
  none     w = 1: plain MSE on the prediction.
  min_snr  Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
           Strategy", eq. 10 with gamma = 5): the x_0-space loss weighted by min(SNR_t, gamma). Errors
           in the three spaces are proportional at fixed x_t (||d eps||^2 = SNR ||d x_0||^2,
           ||d v||^2 = (SNR + 1) ||d x_0||^2 for VP), so in the space the MSE is taken in:
               x0: min(SNR, gamma)    eps: min(SNR, gamma) / SNR    v: min(SNR, gamma) / (SNR + 1)
           (the same as diffusers' training scripts).

EDM (``schedule=edm``; Karras et al. 2022, Table 1 "Ours", NVlabs/edm training/loss.py EDMLoss).
ln(sigma) ~ N(P_mean, P_std^2), x = x_0 + sigma n, the network is preconditioned,
D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), and

    L = E [ lambda(sigma) || D(x; sigma) - x_0 ||^2 ],   lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.

Since lambda = 1 / c_out^2 this is exactly the plain MSE on the raw output F, whose target
(sigma x_0 - sigma_data^2 n) / (sigma_data sqrt(sigma^2 + sigma_data^2)) is -v for the data scaled by
1/sigma_data. So on the EDM schedule ``weighting`` none and edm are the same loss, F is a
(scaled) v-prediction (``prediction_type`` must stay v) and min_snr is not offered; on VP
schedules ``weighting=edm`` is refused (it needs EDM's sigma).

Sampling (:meth:`DiffusionMethod.sample`): deterministic DDIM (eta = schedule.eta) on the
schedule's grid for VP schedules, Heun (or Euler, ``schedule.solver``) on Karras' sigmas for EDM,
always with the EMA network when EMA is on (docs/architecture.md, Decisions).
"""
from __future__ import annotations

import inspect
from typing import Any, Optional, Sequence

import torch
from torch import nn

from distillkit.diffusion import (EDMPrecond, KarrasSchedule, NoiseSchedule, canonical_pred_type, convert,
                                  ddim_sample, euler_sample, heun_sample)
from distillkit.diffusion.from_config import plain, schedule_from_config
from distillkit.errors import DistillError
from distillkit.methods.base import DistillMethod
from distillkit.methods.ema import copy_sharing_frozen
from distillkit.models.denoiser import Cond, Denoiser, Guidance, as_denoiser, map_cond
from distillkit.models.lora import copy_into_base, set_adapters

WEIGHTINGS = ("none", "min_snr", "edm")
# Validation / test noise (t and eps) come from this seed plus the batch index, so the val/test
# loss of every step and every run is computed on the same noisy examples.
EVAL_NOISE_SEED = 20240


# --------------------------------------------------------------------------- the maths
def regression_target(space: str, x0: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The true value of ``space`` at x_t = alpha x_0 + sigma eps: eps, x_0, or
    v = alpha eps - sigma x_0 (Salimans & Ho 2022, Sec. 4)."""
    space = canonical_pred_type(space)
    if space == "eps":
        return eps
    if space == "x0":
        return x0
    return alpha * eps - sigma * x0


def min_snr_weight(snr: torch.Tensor, gamma: float, space: str) -> torch.Tensor:
    """Min-SNR-gamma weight (Hang et al. 2023) of an MSE taken in ``space``:
    min(SNR, gamma) / {x0: 1, eps: SNR, v: SNR + 1}.

    With zero terminal SNR (``schedule.rescale_betas_zero_snr``) SNR = 0 at t = T-1, where the eps
    weight is 0/0: it is 1 there, its limit (min(SNR, gamma) / SNR = 1 for SNR < gamma), as
    diffusers' training scripts set it (``mse_loss_weights[snr == 0] = 1.0``)."""
    space = canonical_pred_type(space)
    w = snr.clamp(max=gamma)
    if space == "eps":
        return torch.where(snr > 0, w / snr, torch.ones_like(snr))
    if space == "v":
        return w / (snr + 1)
    return w


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch."""
    return x.reshape(x.shape[0], -1).mean(1)


def _randn(shape: Sequence[int], generator: Optional[torch.Generator], device, dtype=torch.float32) -> torch.Tensor:
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype).to(device)


def copy_weights(dst: nn.Module, src: nn.Module, what: str) -> None:
    try:
        dst.load_state_dict(src.state_dict(), strict=True)
    except RuntimeError as e:
        raise DistillError(f"{what}: the networks differ ({str(e).splitlines()[0][:200]}). The student starts as "
                           "a copy of the teacher: give them the same architecture, or set "
                           "method.init_from_teacher=false") from None


# --------------------------------------------------------------------------- the base
class DiffusionMethod(DistillMethod):
    """A method whose student is a denoiser ``net(x_t, t)`` on ``schedule``.

    Subclasses count their network evaluations with :meth:`count_nfe` (logged as
    ``nfe_per_update`` and the cumulative ``nfe``) and may reuse :meth:`denoising_loss`."""

    method_name = "diffusion"

    def __init__(self, student: nn.Module, schedule_cfg: Optional[dict] = None, prediction_type: Optional[str] = None,
                 loss_space: Optional[str] = None, weighting: str = "none", min_snr_gamma: float = 5.0,
                 input_shape: Sequence[int] = (1, 8, 8), cond_dropout: float = 0.1, teacher: Optional[nn.Module] = None,
                 teacher_prediction_type: Optional[str] = None, **kw: Any):
        schedule_cfg = {k: plain(v) for k, v in dict(schedule_cfg or {}).items()}
        for net in (student, teacher):
            if net is not None and not isinstance(net, Denoiser):
                self._check_signature(net)
        owned = student.schedule if isinstance(student, Denoiser) and student.owns_schedule else None
        schedule = owned if owned is not None else schedule_from_config(schedule_cfg)
        if schedule is None:
            raise DistillError(f"method={self.method_name} needs a diffusion noise schedule: choose one, e.g. "
                               "schedule=cosine (options: linear, cosine, scaled_linear, edm)")
        try:
            own = student.prediction_type if isinstance(student, Denoiser) else None
            pred = canonical_pred_type(plain(prediction_type)) if prediction_type is not None else (own or "v")
            tp = plain(teacher_prediction_type)
            teacher_pred = canonical_pred_type(tp) if tp is not None else (
                teacher.prediction_type if isinstance(teacher, Denoiser) and teacher.prediction_type else pred)
        except ValueError as e:
            raise DistillError(f"method.prediction_type / method.loss_space: {e}") from None
        # Zero terminal SNR (schedule.rescale_betas_zero_snr; Lin et al. 2024): alpha = 0 at t = T-1, where
        # an eps-prediction says nothing about x_0 (x_0 = (x_t - sigma eps) / alpha is 0/0, and a sampler
        # starting there gives NaN; diffusers' DDIMScheduler divides the same way): refused, not guarded.
        if isinstance(schedule, NoiseSchedule) and float(schedule.alphas_cumprod[-1]) == 0.0:
            eps_nets = [k for k, p in (("method.prediction_type=eps", pred),
                                       ("a teacher that predicts eps (method.teacher_prediction_type)",
                                        teacher_pred if teacher is not None else None)) if p == "eps"]
            if eps_nets:
                raise DistillError(f"schedule.rescale_betas_zero_snr=true (zero terminal SNR: alpha = 0 at the last "
                                   f"timestep) cannot be used with {eps_nets[0]}: x_0 = (x_t - sigma eps) / alpha is "
                                   "undefined there and sampling gives NaN. Use method.prediction_type=v (as Lin et al. "
                                   "2024 and diffusers recommend), or schedule.rescale_betas_zero_snr=false")
        # The model boundary (distillkit.models.denoiser): student and teacher are denoisers that own
        # the network, its prediction type, schedule, condition and codec.
        student = as_denoiser(student, schedule, pred)
        student.prediction_type = pred
        if teacher is not None:
            teacher = as_denoiser(teacher, schedule, teacher_pred)
            if getattr(teacher, "lora", None):
                raise DistillError(f"teacher.lora_rank={teacher.lora['rank']}: the teacher is frozen whole; a LoRA "
                                   "adapter is the student's (model.lora_rank). Leave teacher.lora_rank unset")
        super().__init__(student, teacher=teacher, **kw)
        self.schedule_cfg = schedule_cfg
        self.schedule = schedule  # NoiseSchedule is a module (follows the device); KarrasSchedule is not
        self.is_edm = isinstance(schedule, KarrasSchedule)
        try:
            self.prediction_type = pred
            self.loss_space = canonical_pred_type(plain(loss_space)) if loss_space is not None else self.prediction_type
        except ValueError as e:
            raise DistillError(f"method.prediction_type / method.loss_space: {e}") from None
        self.cond_dropout = float(cond_dropout)
        if not 0 <= self.cond_dropout < 1:
            raise DistillError(f"method.cond_dropout={cond_dropout}: must lie in [0, 1)")
        self.weighting = plain(weighting)
        self.min_snr_gamma = float(min_snr_gamma)
        if self.weighting not in WEIGHTINGS:
            raise DistillError(f"method.weighting={self.weighting!r}: allowed values are {', '.join(WEIGHTINGS)}")
        if self.is_edm:
            if self.prediction_type != "v" or self.loss_space != "v":
                raise DistillError("schedule=edm trains EDM's preconditioned network (Karras et al. 2022, Table 1), "
                                   "whose raw output is a scaled v-prediction: leave method.prediction_type=v and "
                                   "method.loss_space unset")
            if self.weighting == "min_snr":
                raise DistillError("method.weighting=min_snr is defined for VP schedules; with schedule=edm use "
                                   "method.weighting=edm (Karras et al. 2022)")
        elif self.weighting == "edm":
            raise DistillError("method.weighting=edm is the weighting of the EDM schedule: use it with schedule=edm, "
                               "or choose method.weighting=none or min_snr")
        self.image_shape = tuple(int(s) for s in input_shape)
        self.num_steps = int(self.schedule_cfg.get("num_steps") or 50)
        self.spacing = str(self.schedule_cfg.get("spacing") or "trailing")
        self.eta = float(self.schedule_cfg.get("eta") or 0.0)
        # DDIM's x0 clamp (schedule.clip_sample): in sampling and in the no-grad steps of step
        # distillation's targets and trajectories; None: off
        self.clip_sample: Optional[float] = None
        if self.schedule_cfg.get("clip_sample"):
            r = self.schedule_cfg.get("clip_sample_range")
            self.clip_sample = 1.0 if r is None else float(r)
            if self.clip_sample <= 0:
                raise DistillError(f"schedule.clip_sample_range={r}: must be > 0 (1 for images in [-1, 1])")
        self.solver = str(self.schedule_cfg.get("solver") or "heun")

    def _check_signature(self, net: nn.Module) -> None:
        try:
            inspect.signature(net.forward).bind(None, None)
        except (TypeError, ValueError):
            raise DistillError(f"the network {type(net).__name__} is not a denoiser net(x_t, t): method="
                               f"{self.method_name} needs one of the data's shape, e.g. model=unet_digits (digits), "
                               "model=unet (images), model=mlp2d (toy2d)") from None

    # ------------------------------------------------------------------ the denoising loss
    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """w(t) of the VP loss for integer timesteps t of shape (B,)."""
        if self.weighting == "min_snr":
            return min_snr_weight(self.schedule.snr(t), self.min_snr_gamma, self.loss_space).float()
        return torch.ones(t.shape, device=t.device)

    def vp_loss(self, pred: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
        """Per-example w(t) || convert(pred -> loss_space) - target ||^2 (see the module docstring)."""
        alpha, sigma = self.schedule.alpha(t, like=x0), self.schedule.sigma(t, like=x0)
        out = convert(pred.float(), self.prediction_type, self.loss_space, x_t, alpha, sigma)
        target = regression_target(self.loss_space, x0, eps, alpha, sigma)
        return self.loss_weight(t).to(x0.device) * mean_flat((out - target) ** 2)

    def denoiser(self, net: nn.Module, cond: Optional[Cond] = None, guidance: Guidance = None) -> EDMPrecond:
        """EDM's D(x; sigma) around the denoiser ``net`` for the condition ``cond`` (not registered:
        the student's keys stay ``student.*``)."""
        if not cond and guidance is None:
            return EDMPrecond(net, self.schedule.sigma_data)
        return EDMPrecond(lambda x, c: net.guided(x, c, cond, guidance), self.schedule.sigma_data)

    def denoising_loss(self, net: nn.Module, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
                       cond: Optional[Cond] = None) -> torch.Tensor:
        """The per-example denoising loss of ``net`` on clean data x0 with condition ``cond``, with
        fresh noise (from ``generator`` when given, else the global RNG)."""
        B = x0.shape[0]
        if self.is_edm:
            sigma = self.schedule.sample_sigma(B, generator, device=x0.device).to(x0.dtype)
            x = self.schedule.add_noise(x0, _randn(x0.shape, generator, x0.device), sigma)
            D = self._checked(self.denoiser(net, cond)(x, sigma), x0)
            return self.schedule.loss_weight(sigma) * mean_flat((D.float() - x0) ** 2)
        T = self.schedule.num_train_timesteps
        if generator is None:
            t = torch.randint(0, T, (B,), device=x0.device)
        else:
            t = torch.randint(0, T, (B,), generator=generator, device=generator.device).to(x0.device)
        eps = _randn(x0.shape, generator, x0.device)
        x_t = self.schedule.add_noise(x0, eps, t)
        return self.vp_loss(self._checked(net(x_t, t, cond) if cond else net(x_t, t), x0), x_t, x0, eps, t)

    def _checked(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if out.shape != x.shape:
            model = (self.run_config.get("model") or {}).get("_target_") or type(self.student).__name__
            raise DistillError(f"the network ({model}) returns shape {tuple(out.shape)} for inputs of shape "
                               f"{tuple(x.shape)}: method={self.method_name} needs a denoiser net(x_t, t) of the "
                               "data's shape, e.g. model=unet_digits (digits), model=unet (images), model=mlp2d (toy2d)")
        return out

    # ------------------------------------------------------------------ noise
    def noise_generator(self, batch_idx: int = 0) -> torch.Generator:
        """The generator of this update's noise, seeded by (run seed, rank, global_step, batch_idx):
        the noise is a function of the update, so a resumed run draws exactly what an uninterrupted
        one would have, whatever else used the global RNG in between (e.g. a new loader iterator)."""
        seed = int((self.run_config or {}).get("seed", 0) or 0)
        key = ((seed * 1_000_003 + self.global_rank) * 1_000_000_007 + int(self.global_step)) * 65_537 + int(batch_idx)
        return torch.Generator(device=self.device).manual_seed(key % (2 ** 63 - 1))

    def randn(self, shape, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=generator, device=generator.device).to(self.device)

    # ------------------------------------------------------------------ evaluation
    def split_batch(self, batch: Any) -> tuple[torch.Tensor, Cond]:
        """(x0, cond) of a training batch, read by the student denoiser (labels only for
        class-conditional models; text embeddings for text-to-image ones)."""
        x0, cond = self.student.split_batch(batch)
        if x0 is None:
            raise DistillError(f"method={self.method_name} trains on data: the dataset gives prompts only; use a "
                               "dataset with images (e.g. dataset=image_text_folder or dataset=coco_captions with "
                               "dataset.image_dir)")
        return x0, map_cond(cond, lambda v: v.to(x0.device))

    def evaluated_denoiser(self) -> tuple[str, nn.Module]:
        """(metric name, denoiser) of the validation / test denoising loss: ``loss`` of the
        evaluation network here; methods whose student is no denoiser name another (DMD's fake score)."""
        return "loss", self.eval_network()

    def _evaluate(self, batch: Any, batch_idx: int, stage: str) -> None:
        x0, cond = self.split_batch(batch)
        g = torch.Generator().manual_seed(EVAL_NOISE_SEED + batch_idx)
        name, net = self.evaluated_denoiser()
        loss = self.denoising_loss(net, x0, generator=g, cond=cond).mean()
        self.log(f"{stage}/{name}", loss, prog_bar=stage == "val", sync_dist=True, batch_size=len(x0))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    # ------------------------------------------------------------------ sampling
    @property
    def is_image(self) -> bool:
        return len(self.image_shape) == 3

    def draw_noise(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The starting noise z ~ N(0, I) of shape (n, *image_shape), drawn in one call
        ``torch.randn((n, *image_shape), generator=generator)`` on the generator's device: the
        same draw as diffusers' pipelines (``randn_tensor``) make from the same generator."""
        return _randn((n, *self.image_shape), generator, self.device)

    @torch.no_grad()
    def sample_from_noise(self, z: torch.Tensor, num_steps: Optional[int] = None, use_ema: bool = True,
                          spacing: Optional[str] = None, generator: Optional[torch.Generator] = None,
                          cond: Optional[Cond] = None, guidance: Guidance = None, decode: bool = True) -> torch.Tensor:
        """Samples from the starting noise z ~ N(0, I) for the condition ``cond`` with guidance
        ``guidance`` (a number or per-sample tensor; default 1: none): DDIM from x_T = z over
        ``schedule.grid(num_steps, spacing)`` (VP), or Heun / Euler from sigma_max z over Karras'
        sigmas (EDM). Latent models' samples are decoded by their VAE. Images are clipped to [-1, 1].
        With ``decode=False`` the samples stay in the model's space: latent models' latents, neither
        decoded nor clipped (pixel images are still clipped), as ``distill-pairs`` stores them."""
        num_steps = int(num_steps or self.num_steps)
        net = self.eval_network() if use_ema else self.student
        was_training = net.training
        net.eval()
        z = z.to(self.device)
        cond = map_cond(cond, lambda v: v.to(z.device))
        try:
            x = self.run_sampler(net, z, num_steps, spacing, generator, cond, guidance)
            if decode:
                x = net.decode(x)
        finally:
            net.train(was_training)
        return x.clamp(-1, 1) if self.is_image and (decode or not getattr(net, "is_latent", False)) else x

    def run_sampler(self, net: nn.Module, z: torch.Tensor, num_steps: int, spacing: Optional[str],
                    generator: Optional[torch.Generator], cond: Cond, guidance: Guidance) -> torch.Tensor:
        """The sampler of :meth:`sample_from_noise` from z with the denoiser ``net``: DDIM (VP) or
        Heun / Euler (EDM). Few-step generators (DMD) sample their own way."""
        if self.is_edm:
            sigmas = self.schedule.sigmas(num_steps).to(z.device)
            solve = heun_sample if self.solver == "heun" else euler_sample
            return solve(self.denoiser(net, cond, guidance), z * sigmas[0].to(z.dtype), sigmas)
        return ddim_sample(net.model_fn(cond, guidance), z, self.schedule, num_steps, spacing or self.spacing,
                           eta=self.eta, generator=generator, pred_type=self.prediction_type, clip=self.clip_sample)

    def sample(self, n: int, num_steps: Optional[int] = None, generator: Optional[torch.Generator] = None,
               use_ema: bool = True, spacing: Optional[str] = None, cond: Optional[Cond] = None,
               guidance: Guidance = None, return_cond: bool = False):
        """``n`` samples (images in [-1, 1]) in ``num_steps`` sampler steps (default
        ``schedule.num_steps``), with the EMA network when EMA is on and ``use_ema``. A
        class-conditional model draws its classes uniformly from ``generator`` after the noise unless
        ``cond`` is given; with ``return_cond`` the conditions come back too."""
        z = self.draw_noise(n, generator)
        if cond is None:
            cond = self.student.draw_condition(n, generator)
        x = self.sample_from_noise(z, num_steps, use_ema, spacing, generator, cond, guidance)
        return (x, cond) if return_cond else x

    # ------------------------------------------------------------------ starting from the teacher
    def start_from_teacher(self, init_from_teacher: bool, lora: bool) -> None:
        """The student starts as the teacher (DMD, Sec. 3.1; CM, Sec. 4): its weights (and the sampling
        EMA's) are copied from it. A LoRA student over the teacher's own folder already is it; one built
        from a config (digits) gets the teacher's weights in its frozen base. Then the teacher becomes
        the student's frozen base with the adapter switched off (docs/memory.md)."""
        if self.teacher.prediction_type is None:
            self.teacher.prediction_type = self.prediction_type
        if self.teacher.prediction_type != self.prediction_type and init_from_teacher:
            raise DistillError(f"method.prediction_type={self.prediction_type}: the generator starts as the teacher, "
                               f"which predicts {self.teacher.prediction_type}; leave method.prediction_type unset "
                               "(or set method.init_from_teacher=false)")
        what = f"method={self.method_name}: the generator starts as the teacher"
        if init_from_teacher and not lora:
            copy_weights(self.student, self.teacher, what)
            if self.ema is not None:
                self.ema.module.load_state_dict(self.student.state_dict())
        # a LoRA student built from a config (digits): its frozen base becomes the teacher (the
        # sampling EMA shares that base); one from the teacher's own folder already is it
        filled = lora and init_from_teacher and getattr(self.student, "pretrained", None) is None
        if filled:
            copy_into_base(self.student, self.teacher, what)
        if lora and (filled or self.same_base(self.teacher)):
            # The teacher is the generator's frozen base with the adapter switched off: one base in
            # memory for all three networks (docs/memory.md), not a second frozen copy.
            shared = copy_sharing_frozen(self.student)
            set_adapters(shared.unet, False)
            shared.eval().requires_grad_(False)
            object.__setattr__(self, "teacher", shared)

    def same_base(self, teacher: nn.Module) -> bool:
        """Whether ``teacher`` is the LoRA student's base: the same local folder, in the same dtype,
        with no adapter of its own."""
        s = self.student
        return (getattr(s, "pretrained", None) is not None and getattr(teacher, "pretrained", None) == s.pretrained
                and getattr(teacher, "frozen_dtype", None) == getattr(s, "frozen_dtype", None)
                and not getattr(teacher, "lora", None) and type(teacher.unet) is type(s.unet))

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["distillkit"]["image_shape"] = list(self.image_shape)


class Diffusion(DiffusionMethod):
    """Plain denoising training: one network evaluation per update."""

    method_name = "diffusion"

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x0, cond = self.split_batch(batch)
        cond = self.student.drop_condition(cond, self.cond_dropout)  # classifier-free guidance training
        loss = self.denoising_loss(self.train_student, x0, cond=cond).mean()
        self.count_nfe(1)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, batch_size=len(x0))
        return loss


__all__ = ["DiffusionMethod", "Diffusion", "copy_weights", "regression_target", "min_snr_weight", "WEIGHTINGS"]
