"""Methods with several trainable networks ("roles") updated in turn: DMD / DMD2's generator and
critic (the fake-score network with its GAN head).

Each role has its own optimizer and LR schedule (``optim`` for the generator; ``critic_optim``
overrides single settings for the critic, e.g. ``critic_optim.lr`` or ``critic_optim.scheduler_name``), its own gradient clipping
(``optim.gradient_clip_val``, ``critic_optim.gradient_clip_val``; ``trainer.gradient_clip_val``
is the default of both), and the sampling EMA (``callbacks.ema``) is of the generator.

The update counter. Lightning's ``global_step`` counts every ``LightningOptimizer.step``. Here only
the generator's optimizer steps through Lightning's wrapper; the other roles step through the
strategy's ``optimizer_step`` (precision plugins and DDP honoured, not counted). So
``trainer.global_step`` is the number of generator updates, and everything that reads it counts
generator updates: ``trainer.max_steps``, ``callbacks.checkpoint_every_n_steps``,
``eval.every_n_steps``, the LR schedules of every role (stepped once per generator update), the
progress bar and metrics.csv's ``step`` (not the step Lightning gives TensorBoard and wandb, which counts
batches: methods log ``generator_updates``). With ``method.critic_updates_per_generator_update = K`` (DMD2's
two time-scale rule) each batch makes one critic update and every K-th batch a generator update
first, as DMD2's code orders them; the per-role update counts are in every checkpoint
(``distillkit.role_updates``), so a run stopped between two generator updates resumes
mid-cycle.

Lightning runs such a module with manual optimization (``automatic_optimization = False``):
``trainer.accumulate_grad_batches`` must be 1, and under DDP the strategy must find unused
parameters (each backward reaches one role), which the CLI chooses for ``trainer.strategy=ddp``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn

from distillkit.errors import DistillError
from distillkit.methods.base import SCHEDULER_NAMES, DistillMethod

# critic_optim keys that override the generator's optimizer (optim.optimizer.<key>) or scheduler
# (optim.scheduler.<value>: the critic's own schedule, e.g. constant while the generator's decays)
CRITIC_OPTIMIZER_KEYS = ("lr", "weight_decay", "betas")
CRITIC_SCHEDULER_KEYS = {"warmup_steps": "warmup_steps", "scheduler_name": "name", "min_lr_ratio": "min_lr_ratio"}


def role_optim_cfg(optim_cfg: dict, overrides: Optional[dict]) -> dict:
    """``optim_cfg`` (the generator's) with ``critic_optim``'s non-null values put in."""
    import copy

    cfg = copy.deepcopy(optim_cfg)
    for key, value in (overrides or {}).items():
        if value is None or key == "gradient_clip_val":
            continue
        if key in CRITIC_OPTIMIZER_KEYS:
            cfg["optimizer"][key] = value
        elif key in CRITIC_SCHEDULER_KEYS:
            if key == "scheduler_name" and value not in SCHEDULER_NAMES:
                raise DistillError(f"critic_optim.scheduler_name={value!r}: allowed values are {', '.join(SCHEDULER_NAMES)}")
            cfg.setdefault("scheduler", {})[CRITIC_SCHEDULER_KEYS[key]] = value
        else:
            raise DistillError(f"critic_optim.{key}: not a setting of the critic's optimizer (allowed: "
                               f"{', '.join((*CRITIC_OPTIMIZER_KEYS, *CRITIC_SCHEDULER_KEYS))}, gradient_clip_val)")
    return cfg


class MultiRoleMethod(DistillMethod):
    """The base of methods with several trainable roles (see the module docstring). Subclasses
    define :meth:`role_parameters` (the generator first) and update each role inside
    ``with self.updating(name) as step: step(loss)``."""

    generator_role = "generator"

    def __init__(self, *args: Any, critic_optim_cfg: Optional[dict] = None, grad_clip: Optional[dict] = None, **kw: Any):
        super().__init__(*args, **kw)
        self.automatic_optimization = False
        self.critic_optim_cfg = critic_optim_cfg or {}
        # set by the CLI from optim / critic_optim / trainer.gradient_clip_val: role -> max norm or None
        self.grad_clip: dict[str, Optional[float]] = dict(grad_clip or {})
        self.role_updates: dict[str, int] = {}

    # ------------------------------------------------------------------ roles
    def role_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Role name -> its trainable parameters, the generator first."""
        raise NotImplementedError

    def role_optim(self, role: str) -> dict:
        return self.optim_cfg if role == self.generator_role else role_optim_cfg(self.optim_cfg, self.critic_optim_cfg)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for ps in self.role_parameters().values() for p in ps]

    def configure_optimizers(self) -> Any:
        roles = self.role_parameters()
        if next(iter(roles)) != self.generator_role:
            raise RuntimeError(f"{type(self).__name__}.role_parameters must list {self.generator_role!r} first")
        seen: set[int] = set()
        opts, scheds = [], []
        for name, params in roles.items():
            if not params:
                raise DistillError(f"method={self.method_name}: the {name} has no trainable parameters")
            if seen & {id(p) for p in params}:
                raise RuntimeError(f"method={self.method_name}: role {name} shares parameters with another role")
            seen |= {id(p) for p in params}
            opt, sched = self.build_optimizer(params, self.role_optim(name))
            opts.append(opt)
            if sched is not None:
                scheds.append({"scheduler": sched, "interval": "step"})
        return opts, scheds

    def steps_per_epoch(self) -> int:
        """Generator updates per epoch: one every ``critic_updates_per_generator_update`` batches."""
        k = int(getattr(self, "critic_updates_per_generator_update", 1) or 1)
        return max(1, -(-DistillMethod.steps_per_epoch(self) // k))

    # ------------------------------------------------------------------ updates
    @contextlib.contextmanager
    def updating(self, role: str) -> Iterator[Any]:
        """The other roles' parameters are frozen while this role's loss is built (no gradient is
        computed for them, and DDP finds them unused); ``step(loss)`` then backpropagates, clips
        and steps this role's optimizer (the generator's also steps every LR schedule and the EMA)."""
        roles = self.role_parameters()
        index = list(roles).index(role)  # the optimizers are in the roles' order (configure_optimizers)
        others = [p for name, ps in roles.items() if name != role for p in ps]
        was = [p.requires_grad for p in others]
        for p in others:
            p.requires_grad_(False)

        def step(loss: torch.Tensor) -> None:
            opt = self.optimizers()[index]
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            # callbacks.nonfinite: stops the run here, or drops a non-finite update's gradients (skip)
            self.check_update(opt, role)
            clip = self.grad_clip.get(role)
            if clip:
                self.clip_gradients(opt, gradient_clip_val=float(clip), gradient_clip_algorithm="norm")
            if role == self.generator_role:
                opt.step()  # counted: trainer.global_step is the generator's update count
                scheds = self.lr_schedulers() or []
                for s in scheds if isinstance(scheds, list) else [scheds]:
                    s.step()
                self.update_ema()
            else:
                self.trainer.strategy.optimizer_step(opt.optimizer, closure=lambda: None, model=self)
            opt.zero_grad(set_to_none=True)
            self.role_updates[role] = self.role_updates.get(role, 0) + 1

        try:
            yield step
        finally:
            for p, w in zip(others, was):
                p.requires_grad_(w)

    def updates_of(self, role: str) -> int:
        return int(self.role_updates.get(role, 0))

    # ------------------------------------------------------------------ checkpoints, DDP
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["distillkit"]["role_updates"] = dict(self.role_updates)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.role_updates = {k: int(v) for k, v in (checkpoint.get("distillkit", {}).get("role_updates") or {}).items()}

    def on_train_end(self) -> None:
        self.check_ranks_agree()

    @torch.no_grad()
    def check_ranks_agree(self) -> None:
        """Under DDP every role's parameters must be the same on every rank after training (each
        role's gradients are all-reduced at its own backward); a difference means a role was
        updated from a gradient that was not reduced. Compares one checksum per role."""
        from distillkit.parallel import is_fsdp

        if self.world_size_now() <= 1 or is_fsdp(self._trainer):  # FSDP: each weight has one copy, sharded
            return
        sums = {name: float(sum(p.double().sum() for p in ps)) for name, ps in self.role_parameters().items()}
        from distillkit.methods.base import gather_from_ranks

        every = gather_from_ranks(sums)
        if any(s != every[0] for s in every[1:]):
            raise RuntimeError(f"method={self.method_name}: the ranks' weights differ after training ({every})")


__all__ = ["MultiRoleMethod", "role_optim_cfg"]
