"""The shared base of step distillation on a DDIM grid: progressive distillation
(:mod:`distillkit.methods.progressive`), DSD and TSD (:mod:`distillkit.methods.dsd`).

Grids. N is the number of sampling steps of the current round's teacher, on the trailing grid
``g = schedule.grid(N)`` (N timesteps, then the clean end -1). One student step covers two
teacher steps: from g[i] over g[i + 1] to g[i + 2]. Trailing grids nest when N halves (the N/2
grid is g[::2], checked at start), so a student of the round with N samples on its own N/2 grid
with :meth:`DiffusionMethod.sample`.

Rounds (progressive) or levels (DSDI). Round r = 1, 2, ... has the teacher step count
N_r = teacher_steps / 2^(r-1) and lasts ``updates_per_round`` optimizer updates (one count for
every round, or a list with one per round: the last rounds, whose targets are hardest, can get
more); the last round's student samples with ``final_steps``. The schedule is in updates
(``global_step``): the method caps ``trainer.max_steps`` at the end of the last round and lifts
``trainer.max_epochs`` (a smaller ``trainer.max_steps`` still stops earlier, and a larger one
resumes a stopped run).

Round teachers. Methods with a distinct frozen teacher (progressive, TSD) start round 1 from the
configured teacher (``teacher.checkpoint``) and, with ``init_from_teacher``, copy it into the
student ("the student starts as the teacher", Salimans & Ho 2022, Algorithm 2). When round r
ends, the student's evaluation network (its EMA when EMA is on) is written to
``<run_dir>/<round_name>_<r>.ckpt`` (the network's ``{"state_dict": ...}``, which any
``*.checkpoint`` key accepts, with the run's config: ``distill-sample`` and ``distill-export`` read
it like a last.ckpt and default to that round's step count) and becomes round r+1's teacher,
and the student restarts from it. The round index is in every checkpoint; a restarted or
requeued run reloads the teacher of its round from that file. DSD (no separate teacher) writes
the same files, ``level_<r>.ckpt``: the network after each level, for scoring and sampling at
that level's step count.

Loss. Every method here regresses in x-space, w(t) ||x_hat - x_tilde||^2, with the x_tilde of
``distillkit.diffusion.step_targets`` (Salimans & Ho 2022, Algorithm 2) and its weightings
(truncated_snr, snr_plus_one, latent).
"""
from __future__ import annotations

import bisect
import copy
import itertools
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from distillkit.cycles import cycle_lengths
from distillkit.diffusion import ddim_step_between, ddim_step_from_pred
from distillkit.diffusion.from_config import plain
from distillkit.diffusion.parameterization import canonical_pred_type
from distillkit.diffusion.step_targets import STEP_WEIGHTINGS, ddim_implied_x0, grids_nest, step_loss_weight
from distillkit.errors import DistillError
from distillkit.methods.diffusion import DiffusionMethod, copy_weights, mean_flat

log = logging.getLogger("distillkit")


# --------------------------------------------------------------------------- the maths
def x_space_loss(z_pred: torch.Tensor, z_target: torch.Tensor, z_t: torch.Tensor, t, s, schedule,
                 weighting: str) -> torch.Tensor:
    """Per-example w(t) ||x_hat - x_tilde||^2 for two latents at time s reached from z_t at time t:
    each is mapped to the x-prediction whose one DDIM step t -> s lands on it (Salimans & Ho 2022,
    Algorithm 2's x_tilde; for the prediction this is the network's own x_hat). With
    ``weighting="latent"`` this equals ||z_pred - z_target||^2 exactly."""
    x_hat = ddim_implied_x0(z_pred, z_t, t, s, schedule)
    x_tilde = ddim_implied_x0(z_target, z_t, t, s, schedule)
    return step_loss_weight(weighting, schedule, t, s, like=z_t).flatten() * mean_flat((x_hat - x_tilde) ** 2)


@torch.no_grad()
def two_ddim_steps(model_fn, z_t: torch.Tensor, t, t1, t2, schedule, pred_type: str, clip: Optional[float] = None):
    """Two deterministic DDIM steps t -> t1 -> t2 of ``model_fn`` (two evaluations, no gradient):
    the teacher's part of Salimans & Ho 2022, Algorithm 2. Returns (z_t1, z_t2). ``clip``: the
    x0 clamp of :func:`distillkit.diffusion.ddim_step_from_pred` (schedule.clip_sample)."""
    z_t1 = ddim_step_between(model_fn, z_t, t, t1, schedule, pred_type, clip=clip)
    return z_t1, ddim_step_between(model_fn, z_t1, t1, t2, schedule, pred_type, clip=clip)


def single_and_double_step(out: torch.Tensor, z_t: torch.Tensor, t, t1, t2, schedule, pred_type: str,
                           clip: Optional[float] = None):
    """From ONE network output at (z_t, t): the double step t -> t2 (differentiable: the prediction)
    and the single step t -> t1 (detached). Both are DDIM steps with the same (x_hat, eps_hat);
    ``clip`` clamps the single step's x0 only (a clamp would stop the prediction's gradient)."""
    double = ddim_step_from_pred(out, z_t, t, t2, schedule, pred_type)
    single = ddim_step_from_pred(out.detach(), z_t, t, t1, schedule, pred_type, clip=clip)
    return double, single


# --------------------------------------------------------------------------- the base
class StepDistillation(DiffusionMethod):
    """Rounds of step distillation on nested trailing DDIM grids (see the module docstring).

    Subclasses implement ``training_step``; they read ``self.teacher_steps_now`` (N of the
    current round), ``self.round_grid()`` and ``self.teacher_fn`` / ``self.teacher_pred_type``.
    """

    round_name = "round"            # files <run_dir>/<round_name>_<r>.ckpt, config key updates_per_<round_name>
    accepts_self_teacher = False    # teacher=self (the network is its own teacher): method=dsd only
    accepts_accumulation = True     # trainer.accumulate_grad_batches > 1 allowed

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None, *, weighting: str = "truncated_snr",
                 teacher_steps: int = 64, final_steps: Optional[int] = None, updates_per_round: int | list[int] = 1000,
                 teacher_prediction_type: Optional[str] = None, init_from_teacher: bool = True,
                 fresh_optimizer: bool = False, prediction_type: str = "v", **kw: Any):
        # The denoising loss of the base (anchors, from-scratch training) stays the plain MSE on
        # the prediction; ``weighting`` here is the step-distillation loss's.
        super().__init__(student, teacher=teacher, prediction_type=prediction_type, weighting="none",
                         teacher_prediction_type=teacher_prediction_type, **kw)
        if self.is_edm:
            raise DistillError(f"method={self.method_name} distils DDIM steps on a discrete VP grid: use a VP schedule "
                               "(schedule=cosine | linear | scaled_linear), not schedule=edm")
        if self.spacing != "trailing":
            raise DistillError(f"method={self.method_name} needs schedule.spacing=trailing: trailing grids nest when "
                               "the step count halves, so a student step is exactly two teacher steps")
        self.step_weighting = str(plain(weighting))
        if self.step_weighting not in STEP_WEIGHTINGS:
            raise DistillError(f"method.weighting={self.step_weighting!r}: allowed values are {', '.join(STEP_WEIGHTINGS)}")
        try:
            tp = plain(teacher_prediction_type)
            self._first_teacher_pred_type = canonical_pred_type(tp) if tp is not None else self.prediction_type
        except ValueError as e:
            raise DistillError(f"method.teacher_prediction_type: {e}") from None
        self.init_from_teacher = bool(init_from_teacher)
        self.fresh_optimizer = bool(fresh_optimizer)
        self.round_steps = self._round_steps(int(teacher_steps), final_steps)
        self.round_updates = self._round_updates(updates_per_round)
        self._round_ends = list(itertools.accumulate(self.round_updates))  # the update at which each round ends
        self.final_steps = self.round_steps[-1] // 2
        # The student's sampler default (distill-sample, export): the last round's step count.
        self.num_steps = self.final_steps
        self.round = 0                 # the round being trained (0: not started); checkpointed
        self._teacher_round = 1        # whose weights self.teacher holds (1: the configured teacher)
        self._grid: tuple = (None, None)  # (N, device) and its round_grid()
        self.run_dir: Optional[Path] = None  # set by the CLI; round teachers are written there

    def warn_on_type_change(self, remedy: str = "") -> None:
        """Say so when the student starts from the teacher's weights but reads their output as
        another prediction type (subclasses call it once constructed; ``remedy``: a method's own way out)."""
        if (self.init_from_teacher and self.needs_teacher and self._first_teacher_pred_type != self.prediction_type):
            log.warning("method=%s: the student starts from the teacher's weights but reads their output as %s, "
                        "where the teacher predicts %s: %s 1 has to re-learn the output layer (give it enough "
                        "updates: method.updates_per_%s%s), or train the teacher to predict %s", self.method_name,
                        self.prediction_type, self._first_teacher_pred_type, self.round_name, self.round_name, remedy,
                        self.prediction_type)

    # ------------------------------------------------------------------ rounds
    def _round_steps(self, teacher_steps: int, final_steps: Optional[int]) -> list[int]:
        final = teacher_steps // 2 if final_steps is None else int(final_steps)
        T = self.schedule.num_train_timesteps
        ratio = teacher_steps / final if final >= 1 else 0
        if final < 1 or teacher_steps > T or ratio < 2 or ratio != 2 ** round(math.log2(ratio)):
            raise DistillError(f"method.teacher_steps={teacher_steps}, method.final_steps={final_steps}: need "
                               f"teacher_steps <= T={T} and teacher_steps = final_steps * 2^k with k >= 1 "
                               "(each round halves the step count)")
        steps = [teacher_steps >> k for k in range(int(round(math.log2(ratio))))]
        bad = [n for n in steps if not grids_nest(self.schedule, n)]
        if bad:
            raise DistillError(f"the trailing grids of {bad} steps do not nest in T={T} training timesteps (the "
                               f"N/2 grid is not every other point of the N grid): choose schedule.num_train_timesteps "
                               f"divisible by method.teacher_steps={teacher_steps} (e.g. 1024)")
        return steps

    def _round_updates(self, value: Any) -> list[int]:
        """Updates of each round: one count for all, or a list with one per round."""
        key = f"method.updates_per_{self.round_name}"
        n = cycle_lengths(value, key, allow_zero=False)
        if len(n) == 1:
            return n * self.num_rounds
        if len(n) != self.num_rounds:
            raise DistillError(f"{key}={n}: {len(n)} counts for {self.num_rounds} {self.round_name}s "
                               f"(teacher steps {self.round_steps}); give one count per {self.round_name}, or one "
                               "number for all")
        return n

    @property
    def num_rounds(self) -> int:
        return len(self.round_steps)

    @property
    def total_updates(self) -> int:
        return self._round_ends[-1]

    def round_start(self, r: int) -> int:
        """The update at which round r (1-based) begins."""
        return self._round_ends[r - 2] if r > 1 else 0

    def round_of(self, step: int) -> int:
        """The 1-based round that update number ``step`` (= global_step before it) belongs to."""
        return min(bisect.bisect_right(self._round_ends, int(step)), self.num_rounds - 1) + 1

    def updates_into_round(self, step: int) -> int:
        return int(step) - self.round_start(self.round_of(step))

    @property
    def teacher_steps_now(self) -> int:
        """N of the round being trained (its teacher's steps; its student samples with N/2)."""
        return self.round_steps[max(self.round, 1) - 1]

    def round_grid(self, device=None) -> torch.Tensor:
        """g = schedule.grid(N) of the current round: N timesteps, then the clean end -1. Kept on the
        device for the round (a copy from the host per update would wait for the GPU); read-only."""
        key = (self.teacher_steps_now, torch.device(device or self.device))
        if self._grid[0] != key:
            self._grid = (key, self.schedule.grid(key[0]).to(key[1]))
        return self._grid[1]

    def grid_times(self, grid: torch.Tensor, i: torch.Tensor):
        """(g[i], g[i+1], g[i+2]) for per-sample indices i of shape (B,)."""
        return grid[i], grid[i + 1], grid[i + 2]

    # ------------------------------------------------------------------ the run's length
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit" or self._trainer is None:
            return
        loop = self.trainer.fit_loop
        cap = self.total_updates
        if loop.epoch_loop.max_steps < 0 or loop.epoch_loop.max_steps > cap:
            loop.epoch_loop.max_steps = cap
        elif loop.epoch_loop.max_steps < cap:  # allowed (a run in chunks), but easy to leave from a debug run
            stop = loop.epoch_loop.max_steps
            log.warning("trainer.max_steps=%d stops this run in %s %d of %d, before the end of its schedule (%d "
                        "updates): the same command with trainer.max_steps=%d, or without it, resumes it", stop,
                        self.round_name, self.round_of(stop - 1), self.num_rounds, cap, cap)
        loop.max_epochs = -1  # the schedule is in updates; epochs of the loader do not end it
        if self.accepts_accumulation is False and self.trainer.accumulate_grad_batches != 1:
            raise DistillError(f"method={self.method_name} advances its latents once per update: leave "
                               "trainer.accumulate_grad_batches=1")
        log.info("method=%s: %d %s(s) of %s updates, teacher steps %s, student samples with %d steps",
                 self.method_name, self.num_rounds, self.round_name,
                 self.round_updates[0] if len(set(self.round_updates)) == 1 else self.round_updates,
                 self.round_steps, self.final_steps)

    # ------------------------------------------------------------------ round teachers
    @property
    def has_round_teacher(self) -> bool:
        return self.teacher is not None

    @property
    def teacher_pred_type(self) -> str:
        """The configured teacher predicts teacher_prediction_type; later round teachers are students."""
        return self._first_teacher_pred_type if self._teacher_round == 1 else self.prediction_type

    def teacher_fn(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[dict] = None) -> torch.Tensor:
        assert self.teacher is not None
        return self.compiled("teacher", self.teacher)(x, t, cond).float()

    def round_path(self, r: int) -> Optional[Path]:
        return None if self.run_dir is None else Path(self.run_dir) / f"{self.round_name}_{r}.ckpt"

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.sync_round()

    def sync_round(self) -> None:
        """Enter the round of the coming update: at a boundary, finish the previous round; after a
        restart, reload the teacher of the round the checkpoint is in."""
        r = self.round_of(self.global_step)
        if r != self.round:
            prev, self.round = self.round, r
            self.begin_round(r, prev)
        elif self.has_round_teacher and self._teacher_round != r:
            self._load_round_teacher(r)

    def begin_round(self, r: int, prev: int) -> None:
        """Round r starts now (prev: the round before, 0 at a fresh start)."""
        if r > 1:
            # the student that finished round r-1 (and, with a teacher, the new teacher)
            self.save_round(r - 1)
        if self.has_round_teacher:
            if r > 1:
                self._set_teacher(copy.deepcopy(self.eval_network()), r)
            if self.init_from_teacher:
                copy_weights(self.student, self.teacher, f"method={self.method_name}: the student starts as the teacher")
        if r > 1 and self.fresh_optimizer and self._trainer is not None:
            # Moments of the previous round's loss would steer the first updates of this one.
            for opt in self.trainer.optimizers:
                opt.state.clear()
        log.info("method=%s: %s %d of %d, teacher steps %d -> student steps %d (update %d)", self.method_name,
                 self.round_name, r, self.num_rounds, self.round_steps[r - 1], self.round_steps[r - 1] // 2,
                 self.global_step)

    def save_round(self, r: int) -> None:
        """Write the student of round r (its EMA when on) to ``<run_dir>/<round_name>_<r>.ckpt``
        (atomically, rank 0), over an earlier attempt's file: a run that crosses the end of round r
        continues with this student as its teacher (or, after the last round, ships it), so the
        file must hold it (a requeued run that resumed from a checkpoint taken before the end of
        round r finishes the round again, on a GPU not bit for bit the same; a run extended with
        more updates finishes its last round again)."""
        path = self.round_path(r)
        if path is None or (self._trainer is not None and not self.trainer.is_global_zero):
            return
        if path.is_file():
            log.info("method=%s: %s exists from an earlier attempt of this run; this attempt finished %s %d "
                     "again and replaces it", self.method_name, path, self.round_name, r)
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().cpu().clone() for k, v in self.eval_network().state_dict().items()}
        payload = {"state_dict": sd, self.round_name: r, "teacher_steps": self.round_steps[r - 1],
                   "student_steps": self.round_steps[r - 1] // 2, "global_step": int(self.global_step),
                   "method": self.method_name, "prediction_type": self.prediction_type,
                   # the run's config, so that distill-sample / distill-export rebuild the network
                   # and its sampler from this file alone; "network": unprefixed network weights
                   "distillkit": {"method": self.method_name, "config": self.run_config, "weights": "network",
                                  "image_shape": list(self.image_shape)}}
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        log.info("method=%s: %s %d finished; its student is %s", self.method_name, self.round_name, r, path)

    def _set_teacher(self, net: nn.Module, r: int) -> None:
        net.to(self.device).eval().requires_grad_(False)
        object.__setattr__(self, "teacher", net)
        self._teacher_round = r

    def _load_round_teacher(self, r: int) -> None:
        """After a restart in round r > 1: the teacher is round r-1's student, from its file."""
        from distillkit.models.loading import read_state_dict

        path = self.round_path(r - 1)
        if path is None or not path.is_file():
            raise DistillError(f"method={self.method_name}: this run resumes in {self.round_name} {r}, whose teacher "
                               f"{path} is missing; restore that file or start the run afresh (another name=...)")
        net = copy.deepcopy(self.eval_network())
        net.load_state_dict(read_state_dict(path, key=f"{self.round_name} teacher"), strict=True)
        self._set_teacher(net, r)
        log.info("method=%s: %s %d resumes with the teacher %s", self.method_name, self.round_name, r, path)

    def on_train_end(self) -> None:
        # The last round's student is also saved as its own round file.
        if self.global_step >= self.total_updates:
            self.save_round(self.num_rounds)

    # ------------------------------------------------------------------ logging and checkpoints
    def log_round(self) -> None:
        self.log_scalar(self.round_name, self.round)
        self.log_scalar("teacher_steps", self.teacher_steps_now)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        r = max(self.round, 1)
        checkpoint["distillkit"]["step_distill"] = {
            "round_name": self.round_name, "round": int(self.round), "teacher_steps": int(self.round_steps[r - 1]),
            "student_steps": int(self.round_steps[r - 1] // 2),
            "teacher": str(self.round_path(r - 1)) if self.has_round_teacher and r > 1 else None,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("distillkit", {}).get("step_distill") or {}
        self.round = int(state.get("round", 0))


__all__ = ["StepDistillation", "x_space_loss", "two_ddim_steps", "single_and_double_step", "copy_weights"]
