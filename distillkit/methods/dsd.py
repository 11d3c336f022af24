"""Direct Self-Distillation (``method=dsd``, variants DSDN and DSDI) and its teacher-student
baseline (``method=tsd``), from "Self-distillation for diffusion models" (the seed paper; its
public review thread, with the authors' answers, is the only public description of it).

Notation: N sampling steps on the trailing grid g = schedule.grid(N), g[N] = -1 the clean end;
a step index i goes g[i] -> g[i+1]; a pair of consecutive steps i, i+1 goes g[i] -> g[i+2]
(i = 0 .. N-2, the N-1 pairs of the grid). Per update, from a latent x_t at t = g[i]:

    DSD (the network F is its own teacher, 2 evaluations per update)
      evaluation 1, with gradient:  out = F(x_t, t) -> (x_hat, eps_hat)
          prediction  x_t'' = DDIM(out; t -> t'')              the double step
          single      x_t'  = DDIM(out; t -> t'), detached      the same evaluation's single step
      evaluation 2, no gradient:    x_t''_target = DDIM(F_target(x_t', t'); t' -> t'')
      loss: the prediction regressed onto the target.
    TSD: prediction from the student (1 evaluation), target = two DDIM steps of a frozen teacher
      (2 evaluations): 3 per update, like progressive distillation.

Choices where the paper is vague, taken from progressive distillation's maths (Salimans & Ho
2022), see :mod:`distillkit.methods.step_distill`: the regression is in x-space, both latents
mapped by Algorithm 2's x_tilde (the double step's x_tilde is the network's own x_hat), weighted
by max(SNR_t, 1) (``method.weighting=truncated_snr``); ``weighting=latent`` is the plain MSE between
the two latents x_t'' (the paper's literal "squared distance"), ``snr_plus_one`` the v-loss.

Latents (``method.latents``). ``noise`` (data-free, the paper's): a batch of trajectories starts
from pure noise at g[0] = T-1 and advances along the model's own trajectory by the detached
single step x_t' (TSD: the teacher's), so it costs no extra evaluation and visits every index
0 .. N-2 in turn; after index N-2 it restarts from fresh noise. ``data``: x_t = alpha_t x + sigma_t eps
from the data batch instead. The latents are checkpointed (every rank's under DDP).

Index sweep (the review: "DSDN loops from step 0-63 and updates each step against the consecutive
sampling step's output"): update k of a level trains the pair i = k mod (N - 1), so every pair gets
the same number of updates (exactly, when updates_per_level is a multiple of N - 1).

Variants (``method.variant``). ``dsdn``: one level at N = teacher_steps (default 64); the network
then samples with N/2 steps. ``dsdi``: levels N, N/2, ..., 2 final_steps of updates_per_level
updates each: the previous level's double step g[i] -> g[i+2] is the next level's single step
(the N/2 grid is g[::2]), so the network samples with final_steps steps.

Stabilisers. Pure self-distillation has a collapse: any network whose x0-prediction is constant
along its own DDIM trajectories makes the loss zero, so nothing holds it to the data. On digits
the literal method (online target, no data) collapsed within 1,000 updates; the stabilisers:
``method.target=ema`` (evaluation 2 by a target network, an EMA of the student with
``target_decay``, separate from the sampling EMA of ``callbacks.ema``; both checkpointed) and
``method.denoise_weight`` (adds the ordinary denoising loss on a data batch: one more evaluation,
counted; 0 keeps the method data-free). ``method.from_scratch=true`` trains with the denoising
loss (weight 1) and adds the self-distillation loss with ``distill_weight`` from update
``distill_start`` on.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from distillkit.diffusion import ddim_step_between
from distillkit.diffusion.from_config import plain
from distillkit.errors import DistillError
from distillkit.methods.base import eval_mode, gather_from_ranks, this_ranks
from distillkit.methods.ema import EMA
from distillkit.methods.step_distill import StepDistillation, single_and_double_step, two_ddim_steps, x_space_loss

log = logging.getLogger("distillkit")

VARIANTS = ("dsdn", "dsdi")
TARGETS = ("online", "ema")
LATENTS = ("noise", "data")


# --------------------------------------------------------------------------- the maths
def sweep_index(k: int, num_steps: int) -> int:
    """The pair trained by update k of a level with N = num_steps: i = k mod (N - 1)."""
    return int(k) % (int(num_steps) - 1)


def dsd_prediction_and_target(net, target_fn, x_t: torch.Tensor, t, t1, t2, schedule, pred_type: str,
                              clip: Optional[float] = None):
    """DSD's 2 evaluations from x_t at t: evaluation 1 of ``net`` (with gradient) gives the double
    step t -> t2 (the prediction) and the detached single step t -> t1; evaluation 2 of
    ``target_fn`` (no gradient; the network itself when the target is online) steps t1 -> t2 (the
    target). Returns (prediction, target, single). ``clip``: the x0 clamp of the no-grad steps."""
    double, single = single_and_double_step(net(x_t, t).float(), x_t, t, t1, t2, schedule, pred_type, clip)
    with torch.no_grad():
        target = ddim_step_between(target_fn, single, t1, t2, schedule, pred_type, clip=clip)
    return double, target, single


def tsd_prediction_and_target(net, teacher_fn, x_t: torch.Tensor, t, t1, t2, schedule, pred_type: str,
                              teacher_pred_type: str, clip: Optional[float] = None):
    """TSD's 3 evaluations: the student's double step t -> t2 (with gradient) and two DDIM steps
    t -> t1 -> t2 of the frozen teacher (no gradient). Returns (prediction, target, teacher's single)."""
    double, _ = single_and_double_step(net(x_t, t).float(), x_t, t, t1, t2, schedule, pred_type, clip)
    single, target = two_ddim_steps(teacher_fn, x_t, t, t1, t2, schedule, teacher_pred_type, clip)
    return double, target, single


def eval_mode_fn(net: nn.Module):
    """``net`` as a function evaluated in eval mode (no dropout), its mode restored afterwards: the
    no-gradient target evaluation of a network that is also being trained."""
    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with eval_mode(net):
            return net(x, t).float()
    return fn


def sweep_final_steps(variant: str, teacher_steps: int, final_steps: Optional[int]) -> int:
    """The sampling steps a DSD/TSD run ends with: N/2 for ``dsdn`` (one level at N), else
    ``final_steps`` (8 when unset) for ``dsdi``."""
    if plain(variant) == "dsdn":
        if final_steps is not None and int(final_steps) != int(teacher_steps) // 2:
            raise DistillError(f"method.variant=dsdn trains one level at N=method.teacher_steps={teacher_steps} "
                               f"and samples with N/2 steps: leave method.final_steps unset (got {final_steps}), "
                               "or use method.variant=dsdi to halve down to it")
        return int(teacher_steps) // 2
    return 8 if final_steps is None else int(final_steps)


# --------------------------------------------------------------------------- the base of DSD and TSD
class SweepDistillation(StepDistillation):
    """Levels (dsdn: one, dsdi: halving), the index sweep, latents and the denoising anchor."""

    round_name = "level"
    accepts_accumulation = False  # latents advance once per update

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None, *, variant: str = "dsdn",
                 teacher_steps: int = 64, final_steps: Optional[int] = None, updates_per_level: int | list[int] = 1008,
                 latents: str = "noise", latent_batch_size: Optional[int] = None, denoise_weight: float = 0.0,
                 convert_updates: int = 0, **kw: Any):
        if convert_updates:
            # the base takes unknown keys silently; this one a user may carry over from progressive
            raise DistillError(f"method={self.method_name}: method.convert_updates is progressive's (the sweep has "
                               "no conversion phase)")
        self.variant = str(plain(variant))
        if self.variant not in VARIANTS:
            raise DistillError(f"method.variant={self.variant!r}: allowed values are {', '.join(VARIANTS)}")
        final_steps = sweep_final_steps(self.variant, teacher_steps, final_steps)
        super().__init__(student, teacher=teacher, teacher_steps=teacher_steps, final_steps=final_steps,
                         updates_per_round=updates_per_level, **kw)
        pairs, upl = int(teacher_steps) - 1, self.round_updates[0]
        if self.variant == "dsdn" and pairs > 0 and upl % pairs:
            log.warning("method.updates_per_level=%d is not a multiple of the %d pairs of steps at N = %d: some "
                        "pairs get one update more than others; %d or %d gives every pair the same number",
                        upl, pairs, int(teacher_steps), max(pairs, upl // pairs * pairs), (upl // pairs + 1) * pairs)
        if self.student.is_conditional:
            raise DistillError(f"method={self.method_name} distils unconditional models (its latents start from "
                               "noise, with no condition to follow); for a conditional model use method=progressive")
        self.latent_source = str(plain(latents))
        if self.latent_source not in LATENTS:
            raise DistillError(f"method.latents={self.latent_source!r}: allowed values are {', '.join(LATENTS)}")
        self.latent_batch_size = int(latent_batch_size) if latent_batch_size else None
        self.denoise_weight = float(denoise_weight)
        if self.denoise_weight < 0:
            raise DistillError(f"method.denoise_weight={denoise_weight}: must be >= 0 (0: data-free)")
        self._latents: Optional[torch.Tensor] = None  # the trajectories' current x_t (latents=noise)
        self._latent_index = -1                       # their grid index
        self.warn_on_type_change()

    # ------------------------------------------------------------------ sweep and latents
    def sweep_start(self) -> int:
        """The update at which the current sweep began: the start of the level."""
        return self.round_start(self.round_of(self.global_step))

    def current_index(self) -> int:
        return sweep_index(self.global_step - self.sweep_start(), self.teacher_steps_now)

    def begin_round(self, r: int, prev: int) -> None:
        super().begin_round(r, prev)
        self._latents, self._latent_index = None, -1  # a new grid: trajectories restart from noise

    def latents_at(self, i: int, x0: torch.Tensor, grid: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, int]:
        """The batch x_t at t = grid[i], and the extra network evaluations spent on it (0 but after
        a restart whose checkpoint holds no latents)."""
        if self.latent_source == "data":
            t = grid[i].expand(x0.shape[0])
            return self.schedule.add_noise(x0, self.randn(x0.shape, g), t), 0
        if i == 0 or self._latents is None or self._latent_index != i:
            n = self.latent_batch_size or x0.shape[0]
            x = self.randn((n, *self.image_shape), g)
            extra = 0
            if i > 0:  # no stored trajectory at this index: run the no-grad sampler up to it
                fn = self.trajectory_fn()
                with torch.no_grad():
                    for k in range(i):
                        x = ddim_step_between(fn, x, int(grid[k]), int(grid[k + 1]), self.schedule,
                                              self.trajectory_pred_type, clip=self.clip_sample)
                extra = i
                log.warning("method=%s: no stored latents at index %d; %d sampler steps spent to rebuild them",
                            self.method_name, i, i)
            return x, extra
        return self._latents.to(x0.device), 0  # (restored from a checkpoint before the move to the device)

    def advance(self, single: torch.Tensor, i: int) -> None:
        """The trajectory moves on by the (detached) single step to index i + 1."""
        if self.latent_source == "noise":
            self._latents, self._latent_index = single.detach(), i + 1

    def trajectory_fn(self):
        raise NotImplementedError

    @property
    def trajectory_pred_type(self) -> str:
        return self.prediction_type

    # ------------------------------------------------------------------ the update
    def prediction_and_target(self, x_t, t, t1, t2):
        """(prediction, target, single step) and the number of network evaluations."""
        raise NotImplementedError

    def distill_loss(self, x0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, int]:
        """The mean x-space loss of one update on the sweep's pair, and its network evaluations."""
        grid = self.round_grid(x0.device)
        i = self.current_index()
        x_t, extra = self.latents_at(i, x0, grid, g)
        B = x_t.shape[0]
        t, t1, t2 = (grid[i + k].expand(B) for k in range(3))
        pred, target, single, nfe = self.prediction_and_target(x_t, t, t1, t2)
        loss = x_space_loss(pred, target, x_t, t, t2, self.schedule, self.step_weighting).mean()
        self.advance(single, i)
        self.log_scalar("sweep_index", i)
        return loss, nfe + extra

    def loss_weights(self) -> tuple[float, float]:
        """(weight of the distillation loss, weight of the denoising loss) of the coming update."""
        return 1.0, self.denoise_weight

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x0 = (batch[0] if isinstance(batch, (list, tuple)) else batch).float()
        w_sd, w_dn = self.loss_weights()
        loss, nfe, g = x0.new_zeros(()), 0, self.noise_generator(batch_idx)
        if w_sd > 0:
            l_sd, n = self.distill_loss(x0, g)
            loss, nfe = loss + w_sd * l_sd, nfe + n
            self.log("train/distill_loss", l_sd.detach(), on_step=True, on_epoch=False)
        if w_dn > 0:
            l_dn = self.denoising_loss(self.train_student, x0, generator=g).mean()
            loss, nfe = loss + w_dn * l_dn, nfe + 1
            self.log("train/denoise_loss", l_dn.detach(), on_step=True, on_epoch=False)
        self.count_nfe(nfe)
        self.log_round()
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, batch_size=x0.shape[0])
        return loss

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        x = None if self._latents is None else self._latents.detach().cpu().clone()
        state = {"x": x, "index": int(self._latent_index)}
        if self.world_size_now() > 1:  # every rank follows its own trajectories
            state["x_per_rank"] = gather_from_ranks(x)
        checkpoint["distillkit"]["latents"] = state

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("distillkit", {}).get("latents") or {}
        saved = state.get("x_per_rank") or [state.get("x")]
        x = this_ranks(saved, self)
        if x is None and state.get("x") is not None:
            # resumed with another number of ranks: copies of one rank's trajectories would
            # repeat the same examples on every rank, so they restart (rebuilt at the index)
            log.warning("method=%s: the checkpoint's latents are from %d rank(s), this run has %d; they are "
                        "rebuilt from noise", self.method_name, len(saved), self.world_size_now())
        self._latents = None if x is None else x.to(self.device)
        self._latent_index = int(state.get("index", -1)) if x is not None else -1


# --------------------------------------------------------------------------- DSD
class DSD(SweepDistillation):
    """Direct Self-Distillation: the network is its own teacher (``teacher=self``); see the module
    docstring for the update, the variants and the stabilisers."""

    method_name = "dsd"
    accepts_self_teacher = True

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None, *, target: str = "ema",
                 target_decay: float = 0.99, from_scratch: bool = False, distill_weight: float = 1.0,
                 distill_start: int = 0, **kw: Any):
        if teacher is not None:
            raise DistillError("method=dsd distils the network into itself: use teacher=self (the network's own "
                               "steps are the targets); for targets from a frozen teacher use method=tsd")
        super().__init__(student, teacher=None, **kw)
        self.target = str(plain(target))
        if self.target not in TARGETS:
            raise DistillError(f"method.target={self.target!r}: allowed values are {', '.join(TARGETS)}")
        self.target_decay = float(target_decay)
        if not 0 <= self.target_decay < 1:
            raise DistillError(f"method.target_decay={target_decay}: must lie in [0, 1)")
        self.from_scratch = bool(from_scratch)
        self.distill_weight = float(distill_weight)
        self.distill_start = int(distill_start)
        # The target network: an EMA of the student, separate from the sampling EMA (callbacks.ema).
        self.target_net: Optional[EMA] = None
        if self.target == "ema":
            self.target_net = EMA(student, self.target_decay)
            self.target_net.requires_grad_(False)

    def target_network(self) -> nn.Module:
        """The network of evaluation 2: the target EMA, or the online network itself."""
        return self.target_net.module if self.target_net is not None else self.student

    def trajectory_fn(self):
        return eval_mode_fn(self.target_network())

    def update_ema(self) -> None:
        super().update_ema()
        if self.target_net is not None:
            self.target_net.update_parameters(self.student)

    def sweep_start(self) -> int:
        start = super().sweep_start()
        return max(start, self.distill_start) if self.from_scratch else start

    def loss_weights(self) -> tuple[float, float]:
        if self.from_scratch:
            return (self.distill_weight if self.global_step >= self.distill_start else 0.0), 1.0
        return self.distill_weight, self.denoise_weight

    def prediction_and_target(self, x_t, t, t1, t2):
        pred, tgt, single = dsd_prediction_and_target(self.train_student, eval_mode_fn(self.target_network()), x_t, t, t1,
                                                      t2, self.schedule, self.prediction_type, self.clip_sample)
        return pred, tgt, single, 2


# --------------------------------------------------------------------------- TSD
class TSD(SweepDistillation):
    """Teacher-student distillation, DSD's baseline: the same sweep and latents, the target from two
    DDIM steps of a frozen teacher (the configured teacher; with dsdi, each level's teacher is the
    previous level's student, written to ``level_<r>.ckpt``); latents follow the teacher's trajectories."""

    method_name = "tsd"
    needs_teacher = True

    def trajectory_fn(self):
        return self.teacher_fn

    @property
    def trajectory_pred_type(self) -> str:
        return self.teacher_pred_type

    def prediction_and_target(self, x_t, t, t1, t2):
        pred, tgt, single = tsd_prediction_and_target(self.train_student, self.teacher_fn, x_t, t, t1, t2, self.schedule,
                                                      self.prediction_type, self.teacher_pred_type, self.clip_sample)
        return pred, tgt, single, 3


__all__ = ["DSD", "TSD", "SweepDistillation", "sweep_index", "dsd_prediction_and_target",
           "tsd_prediction_and_target", "VARIANTS", "TARGETS", "LATENTS"]
