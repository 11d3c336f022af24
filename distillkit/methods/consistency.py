"""Consistency distillation (``method=consistency``; Song et al., "Consistency Models", ICML 2023,
Algorithm 2) and latent consistency models (``method=lcm``; Luo et al., "Latent Consistency Models",
2023, Algorithm 1; LCM-LoRA, Luo et al. 2023b). The maths is in :mod:`distillkit.diffusion.consistency`.

The student F starts as the teacher and is read through the consistency function
f(x, t) = c_skip(t) x + c_out(t) F(x, t), exact at the boundary (the sigma form on EDM schedules,
LCM's discrete form with ``timestep_scaling`` on VP schedules). Per update, for each sample a pair
t_{n+k} > t_n of the discretisation (``num_timesteps`` steps, skip k = ``skip``; the steps fixed or
on iCT's curriculum), x_{n+k} = alpha x_0 + sigma eps from the data, and

    x_hat_n = teacher's ODE step t_{n+k} -> t_n      (DDIM on VP, Heun on EDM; no gradient)
    L       = d( f_online(x_{n+k}, t_{n+k}),  f_target(x_hat_n, t_n) )     (no gradient to the target)

``target_decay`` mu: the target network is an EMA of the online network,
theta^- <- mu theta^- + (1 - mu) theta after every update (LCM 0.95, CM 0.999 / 0.9999...), kept
apart from the sampling EMA (``callbacks.ema``) and checkpointed; mu = 0 is iCT's choice (the
target is the online network under stop-gradient; no copy is kept). The first update copies the
online network (torch's AveragedModel convention, :mod:`distillkit.methods.ema`), so the average
starts from theta_1 (mu = 1 keeps theta_1); LCM's scripts average from theta_0 instead, which on
digits trained more slowly at every checkpoint (docs/consistency.md, "The target's first update").

LCM (``method=lcm``) distils the *guided* teacher. Per sample, w ~ U[w_min, w_max] in LCM's
convention (the teacher's step uses cond + w (cond - uncond), diffusers' guidance scale 1 + w);
the student, online and target, gets w through a guidance-scale embedding (sinusoidal on 1000 w,
``guidance_embedding_dim`` 256, added to the time embedding: ``Denoiser.add_guidance_embedding``), so
it samples at any w in one network call per step. LCM-LoRA (``model.lora_rank``): no embedding; only
the adapter trains, the teacher is the same UNet with the adapter switched off, and the target
network is an EMA of the adapter alone (the frozen base is shared, not copied).

Sampling: the multistep consistency sampler (CM, Algorithm 1) over times chosen from the
discretisation as diffusers' ``LCMScheduler`` chooses them (``original_inference_steps`` =
``num_timesteps``), so an export with that scheduler draws the same images.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from distillkit.diffusion import ddim_step_between, edm_precond, expand_like, heun_step, multistep_sample, to_x0
from distillkit.diffusion.consistency import (DISTANCES, apply_boundary, cm_boundary, consistency_distance,
                                              consistency_sample_edm, ict_discretisation, ict_discretisation_values,
                                              karras_ascending, lcm_boundary, lcm_timesteps)
from distillkit.diffusion.from_config import plain
from distillkit.errors import DistillError
from distillkit.methods.base import eval_mode
from distillkit.methods.diffusion import DiffusionMethod
from distillkit.methods.ema import EMA
from distillkit.models.denoiser import Cond, Guidance
from distillkit.models.lora import has_lora

CURRICULA = ("fixed", "ict")


class ConsistencyDistillation(DiffusionMethod):
    """Consistency distillation (module docstring); :class:`LCM` adds the guidance distribution."""

    method_name = "consistency"
    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None, *, num_timesteps: int = 50,
                 skip: int = 1, curriculum: str = "fixed", curriculum_start: int = 10, curriculum_end: int = 1280,
                 target_decay: float = 0.95, distance: str = "huber", huber_c: Optional[float] = None,
                 timestep_scaling: float = 10.0, teacher_guidance: float = 1.0,
                 sampling_timesteps: Optional[list] = None, init_from_teacher: bool = True,
                 prediction_type: Optional[str] = None, **kw: Any):
        if prediction_type is None and teacher is not None:  # the student starts as the teacher
            prediction_type = getattr(teacher, "prediction_type", None)
        kw.pop("cond_dropout", None)
        super().__init__(student, teacher=teacher, prediction_type=prediction_type, cond_dropout=0.0, **kw)
        self.num_timesteps, self.skip = int(num_timesteps), int(skip)
        self.curriculum = str(plain(curriculum))
        self.curriculum_range = (int(curriculum_start), int(curriculum_end))
        if self.curriculum not in CURRICULA:
            raise DistillError(f"method.curriculum={self.curriculum!r}: allowed values are {', '.join(CURRICULA)}")
        if self.skip < 1:
            raise DistillError(f"method.skip={skip}: must be at least 1")
        if self.curriculum == "ict" and not 1 <= self.curriculum_range[0] <= self.curriculum_range[1]:
            raise DistillError(f"method.curriculum_start={curriculum_start}, method.curriculum_end={curriculum_end}: "
                               "need 1 <= curriculum_start <= curriculum_end (iCT: 10, 1280)")
        limit = None if self.is_edm else self.schedule.num_train_timesteps
        for key, n in (("num_timesteps", self.num_timesteps), ("curriculum_end", self.curriculum_range[1])):
            if key == "curriculum_end" and self.curriculum != "ict":
                continue
            if n < self.skip or (limit is not None and n > limit):
                raise DistillError(f"method.{key}={n}: the discretisation's steps must lie in [method.skip={self.skip}, "
                                   f"{limit if limit is not None else 'inf'}] (LCM: 50 on T = 1000, CM: 17 on EDM)")
        self.target_decay = float(target_decay)
        if not 0 <= self.target_decay <= 1:
            raise DistillError(f"method.target_decay={target_decay}: must lie in [0, 1] (LCM: 0.95; iCT: 0)")
        self.distance = str(plain(distance))
        if self.distance not in DISTANCES:
            raise DistillError(f"method.distance={self.distance!r}: allowed values are {', '.join(DISTANCES)}")
        self.huber_c = None if huber_c is None else float(huber_c)
        if self.huber_c is not None and self.huber_c <= 0:
            raise DistillError(f"method.huber_c={huber_c}: must be > 0, or null for iCT's 0.00054 sqrt(d)")
        self.timestep_scaling = float(timestep_scaling)
        self.teacher_guidance = float(teacher_guidance)
        self.sampling_timesteps_cfg: Optional[list] = None
        self.num_steps = 4
        if sampling_timesteps is not None:
            self.use_sampling_times([plain(t) for t in sampling_timesteps])
        if self.teacher is not None:
            lora = has_lora(self.student)
            self.start_from_teacher(init_from_teacher, lora)
        self.prepare_student()
        # The target network theta^-: an EMA of the online network, apart from the sampling EMA.
        self.target_net: Optional[EMA] = None
        self._device_points: dict[tuple[int, str], torch.Tensor] = {}
        if self.target_decay > 0:
            self.target_net = EMA(self.student, self.target_decay)
            self.target_net.requires_grad_(False)

    def prepare_student(self) -> None:
        """Changes to the student's network after it got the teacher's weights and before the
        target network copies it (LCM's guidance embedding)."""

    # ------------------------------------------------------------------ the target network
    def target_network(self) -> nn.Module:
        return self.target_net.module if self.target_net is not None else self.student

    def update_ema(self) -> None:
        super().update_ema()
        if self.target_net is not None:
            self.target_net.update_parameters(self.student)

    # ------------------------------------------------------------------ discretisation
    def steps_now(self) -> int:
        """The discretisation's number of steps at this update (fixed, or iCT's curriculum over
        ``trainer.max_steps``)."""
        if self.curriculum == "fixed":
            return self.num_timesteps
        return ict_discretisation(int(self.global_step), self.total_steps(), *self.curriculum_range)

    def points(self, steps: Optional[int] = None) -> torch.Tensor:
        """The discretisation, ascending, boundary first: LCM's timesteps [0, k-1, ..., T-1] (VP) or
        Karras' sigmas from sigma_min (EDM); ``steps`` + 1 points."""
        steps = self.steps_now() if steps is None else int(steps)
        if self.is_edm:
            return karras_ascending(self.schedule, steps + 1)
        return lcm_timesteps(self.schedule.num_train_timesteps, steps)

    def discretisation_steps(self) -> list[int]:
        """Every number of steps :meth:`steps_now` can give: ``num_timesteps``, or each of iCT's
        curriculum (curriculum_start doubled until curriculum_end)."""
        if self.curriculum == "fixed":
            return [self.num_timesteps]
        return ict_discretisation_values(*self.curriculum_range)

    def device_points(self, steps: int) -> torch.Tensor:
        """:meth:`points` of ``steps`` on this device, copied there once (:meth:`on_fit_start` copies every
        step count of the run before its first update: a copy from host memory inside an update would
        wait for all the work queued on a GPU)."""
        key = (int(steps), str(self.device))
        if key not in self._device_points:
            self._device_points[key] = self.points(steps).to(self.device)
        return self._device_points[key]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        for steps in self.discretisation_steps():
            self.device_points(steps)

    def pair_times(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_{n+k}, t_n) per sample: n ~ U{0, ..., steps - k} on :meth:`points`, on this device
        (drawn, indexed and kept there: nothing read back)."""
        pts = self.device_points(self.steps_now())
        idx = torch.randint(0, len(pts) - self.skip, (n,), generator=g, device=g.device).to(self.device)
        return pts[idx + self.skip], pts[idx]

    # ------------------------------------------------------------------ the consistency function
    def consistency(self, net: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond,
                    guidance: Guidance = None) -> torch.Tensor:
        """f(x, t) = c_skip x + c_out F (module docstring), in float32. ``guidance`` reaches an
        embedded-guidance network's embedding (LCM)."""
        x = x.float()
        if self.is_edm:
            sd, smin = self.schedule.sigma_data, self.schedule.sigma_min
            _, _, c_in, c_noise = edm_precond(t.to(x.dtype), sd)
            F_x = net.guided(expand_like(c_in, x) * x, c_noise, cond, guidance)
            return apply_boundary(x, F_x.float(), *cm_boundary(t, smin, sd))
        out = net.guided(x, t, cond, guidance)
        x0 = to_x0(out.float(), self.prediction_type, x, self.schedule.alpha(t, like=x), self.schedule.sigma(t, like=x))
        return apply_boundary(x, x0, *lcm_boundary(t, self.timestep_scaling))

    def student_guidance(self, w: Optional[torch.Tensor]) -> Guidance:
        """What the student is told of the teacher's guidance (LCM: the embedding's w)."""
        return None

    @torch.no_grad()
    def teacher_step(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: Cond,
                     guidance: Guidance) -> torch.Tensor:
        """The teacher's ODE step from t to s (per sample): DDIM (VP) or Heun (EDM), guided with
        ``guidance`` (diffusers' convention)."""
        if self.is_edm:
            return heun_step(self.denoiser(self.teacher, cond, guidance), x, t.to(x.dtype), s.to(x.dtype)).float()
        fn = self.teacher.model_fn(cond, guidance)
        return ddim_step_between(fn, x, t, s, self.schedule, self.teacher.prediction_type).float()

    def consistency_loss(self, x0: torch.Tensor, cond: Cond, g: torch.Generator) -> tuple[torch.Tensor, int]:
        """The consistency distillation loss of a data batch x0 (module docstring) and its network
        evaluations."""
        B = x0.shape[0]
        t, s = self.pair_times(B, g)
        w = self.draw_w(B, g)
        teacher_guidance = self.teacher_guidance if w is None else 1 + w
        eps = self.randn(x0.shape, g)
        x_t = self.schedule.add_noise(x0.float(), eps, t)  # x0 + sigma eps on EDM schedules
        online = self.consistency(self.train_student, x_t, t, cond, self.student_guidance(w))
        x_s = self.teacher_step(x_t, t, s, cond, teacher_guidance)
        with torch.no_grad(), eval_mode(self.target_network()) as target_net:
            target = self.consistency(target_net, x_s, s, cond, self.student_guidance(w))
        guided = self.student.is_conditional and (w is not None or self.teacher_guidance != 1)
        nfe = 1 + (2 if self.is_edm else 1) * (2 if guided else 1) + 1
        return consistency_distance(online, target.detach(), self.distance, self.huber_c), nfe

    def draw_w(self, n: int, g: torch.Generator) -> Optional[torch.Tensor]:
        """LCM's per-sample guidance w (None: the teacher's fixed ``teacher_guidance``)."""
        return None

    # ------------------------------------------------------------------ one update
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x0, cond = self.split_batch(batch)
        loss, nfe = self.consistency_loss(x0, cond, self.noise_generator(batch_idx))
        loss = loss.mean()
        self.count_nfe(nfe)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, batch_size=len(x0))
        if self.curriculum != "fixed":
            self.log_scalar("discretisation_steps", self.steps_now())
        return loss

    # ------------------------------------------------------------------ sampling
    def use_sampling_times(self, ts: list) -> None:
        """Sample ``len(ts)`` steps at ``ts`` (``method.sampling_timesteps``; ``distill-sample
        timesteps=``): descending times the sampler can start from, timesteps in [0, T - 1] on a VP
        schedule, noise levels in [sigma_min, sigma_max] on EDM's."""
        if self.is_edm:
            lo, hi, what = self.schedule.sigma_min, self.schedule.sigma_max, "noise levels"
            inside = all(isinstance(t, (int, float)) and lo <= t <= hi for t in ts)
        else:
            lo, hi, what = 0, self.schedule.num_train_timesteps - 1, "integer timesteps"
            inside = all(isinstance(t, (int, float)) and float(t).is_integer() and lo <= t <= hi for t in ts)
        if not ts or not inside or any(a <= b for a, b in zip(ts, ts[1:])):
            shown = "[" + ", ".join(f"{t:g}" if isinstance(t, (int, float)) else repr(t) for t in ts) + "]"
            raise DistillError(f"method.sampling_timesteps={shown}: give {what} that descend strictly within "
                               f"[{lo:g}, {hi:g}], one per sampling step (e.g. [{hi:g}, {hi / 2:.0f}] for two), "
                               "or null for LCMScheduler's choice from the discretisation")
        self.sampling_timesteps_cfg = list(ts) if self.is_edm else [int(t) for t in ts]
        self.num_steps = len(ts)

    def sampling_times(self, num_steps: int) -> list:
        """The times of a ``num_steps``-step sample, descending: ``method.sampling_timesteps`` when it
        has that many, else LCMScheduler's choice from the discretisation (``original_inference_steps``
        = num_timesteps): its points without the boundary, descending, at indices
        floor(i N / num_steps), i = 0 .. num_steps - 1."""
        if self.sampling_timesteps_cfg and len(self.sampling_timesteps_cfg) == num_steps:
            return list(self.sampling_timesteps_cfg)
        origin = self.points(self.num_timesteps)[1:].flip(0)
        if not 1 <= num_steps <= len(origin):
            raise DistillError(f"steps={num_steps}: a consistency model samples with 1 to {len(origin)} steps "
                               f"(its discretisation, method.num_timesteps={self.num_timesteps})")
        idx = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
        return origin[torch.from_numpy(idx)].tolist()

    def run_sampler(self, net: nn.Module, z: torch.Tensor, num_steps: int, spacing: Optional[str],
                    generator: Optional[torch.Generator], cond: Cond, guidance: Guidance) -> torch.Tensor:
        """The multistep consistency sampler (CM, Algorithm 1) over :meth:`sampling_times`."""
        times = self.sampling_times(num_steps)
        if self.is_edm:
            return consistency_sample_edm(lambda x, s: self.consistency(net, x, s, cond, guidance), z, times,
                                          self.schedule.sigma_min, generator)
        scaling = self.timestep_scaling
        return multistep_sample(net.model_fn(cond, guidance), z, self.schedule, [int(t) for t in times],
                                generator=generator, pred_type=self.prediction_type,
                                boundary=lambda t: lcm_boundary(t, scaling))


class LCM(ConsistencyDistillation):
    """Latent consistency distillation of a guided teacher (module docstring)."""

    method_name = "lcm"

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None, *, w_min: float = 5.0,
                 w_max: float = 15.0, guidance_embedding_dim: Optional[int] = None, **kw: Any):
        if not 0 <= float(w_min) <= float(w_max):
            raise DistillError(f"method.w_min={w_min}, method.w_max={w_max}: need 0 <= w_min <= w_max "
                               "(LCM's convention: the teacher's step uses cond + w (cond - uncond))")
        self._lcm = (float(w_min), float(w_max), guidance_embedding_dim)
        super().__init__(student, teacher, **kw)
        self.w_range = self._lcm[:2]

    def prepare_student(self) -> None:
        if not self.student.is_conditional:
            raise DistillError("method=lcm distils a guided teacher: use a conditional model (class-conditional "
                               "digits: experiment=digits_cond_lcm; text: model=sd15 / sdxl), or method=consistency")
        student = self.student
        lora = has_lora(student)
        dim = self._lcm[2]
        dim = (0 if lora else 256) if dim is None else int(dim)
        if dim and lora:
            raise DistillError(f"method.guidance_embedding_dim={dim} with model.lora_rank: LCM-LoRA trains an adapter "
                               "only and has no guidance embedding; leave method.guidance_embedding_dim unset")
        if dim and not getattr(student, "embeds_guidance", False):
            # LCM: UNet(**teacher.config, time_cond_proj_dim=256), the teacher's weights loaded non-strictly
            student.add_guidance_embedding(dim)
            if self.ema is not None:  # the sampling EMA copies the student with its embedding
                self.ema = EMA(student, self.ema.decay)

    def draw_w(self, n: int, g: torch.Generator) -> Optional[torch.Tensor]:
        lo, hi = self.w_range
        return (lo + (hi - lo) * torch.rand(n, generator=g, device=g.device, dtype=torch.float64)).float().to(self.device)

    def student_guidance(self, w: Optional[torch.Tensor]) -> Guidance:
        # an embedded-guidance student takes diffusers' scale 1 + w (the pipelines' convention);
        # LCM-LoRA's student is told nothing and learns the guided teacher's ODE
        return 1 + w if w is not None and getattr(self.student, "embeds_guidance", False) else None


__all__ = ["ConsistencyDistillation", "LCM", "CURRICULA"]
