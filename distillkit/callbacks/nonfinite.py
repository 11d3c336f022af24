"""Non-finite updates (``callbacks.nonfinite``, ``callbacks.max_nonfinite_skips``; docs/long_runs.md).

Before each optimizer step, the update's loss (what ``backward`` was called on), every training
term the method logged for it (``train/...``) and the gradients the optimizer is about to apply
are checked for NaN and inf: one reduction over all of them (the gradients' max-norms from one
``torch._foreach_norm``), all-reduced across DDP ranks so that every rank takes the same decision.

- ``stop`` (the default): the verdict stays on the device, so no update waits for the host (a GPU
  never idles for the check; tests/test_host_reads.py). It is read before every checkpoint is
  written, at the end of training and every 4,096 updates (``FLUSH_EVERY``, bounding what is
  held): the first non-finite update then raises :class:`NonFiniteStop`, naming that update's step
  and term. Nothing is saved after it (``last.ckpt`` stays the last finite checkpoint); the
  ``distill`` command prints one message and exits with :data:`EXIT_NONFINITE`. The updates between
  the non-finite one and the next read (``callbacks.checkpoint_every_seconds``,
  ``callbacks.checkpoint_every_n_steps``) still run, on weights that are discarded.
- ``skip``: one host read per update (the decision to skip must be taken before the optimizer
  step). The update is not applied (its gradients are dropped, so the optimizer step changes
  neither the weights nor the optimizer's moments), counted in ``train/nonfinite_skipped``, and the
  run goes on; ``max_nonfinite_skips`` non-finite updates in a row (per optimizer: a multi-role
  method's generator and critic count apart) stop it as above.

"Step N" in the messages is the N-th update (trainer.global_step + 1 when its batch started; a
multi-role method's critic updates belong to the generator update in progress): the progress line
of step N shows that update's loss.

Automatic optimization is checked in ``on_before_optimizer_step`` (after the whole accumulation
window's backward passes, before gradient clipping). Manual optimization (``distillkit.methods.roles``)
calls :meth:`DistillMethod.check_update` after each role's backward, before its clipping; terms a
manual method logs after its steps are checked at the end of the batch, before any checkpoint of
that batch is written (this callback runs before :class:`~distillkit.callbacks.checkpoint.LastCheckpoint`).
With ``precision=16-mixed`` the gradient scaler skips steps with inf gradients itself (and lowers its
scale): only the losses and logged terms are checked there.
"""
from __future__ import annotations

import logging
import math
import numbers
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

log = logging.getLogger("distillkit")

# The exit status of a run stopped by a non-finite update (2: bad input; 128 + n: a signal).
EXIT_NONFINITE = 3
SKIPPED_METRIC = "train/nonfinite_skipped"


class NonFiniteStop(Exception):
    """A run stopped by a non-finite update: ``step`` (the update, 1-based), ``term`` (what was
    non-finite: a logged term such as ``train/loss``, a loss, or ``gradient of <parameter>``)."""

    def __init__(self, message: str, step: int, term: str):
        super().__init__(message)
        self.step, self.term = step, term


class NonFiniteGuard(Callback):
    def __init__(self, mode: str = "stop", max_skips: int = 10):
        mode = getattr(mode, "value", mode)
        if mode not in ("stop", "skip"):
            raise ValueError(f"callbacks.nonfinite={mode!r}: allowed values are stop, skip")
        self.mode = mode
        self.max_skips = max(1, int(max_skips))
        self.skipped = 0  # updates skipped in the whole run (kept in checkpoints in skip mode)
        self.in_a_row: dict[str, int] = {}  # per optimizer (role)
        self._terms: list[tuple[str, Any]] = []  # logged since the last check
        self._losses: list[torch.Tensor] = []  # backward since the last check
        self._checked: Any = None  # the optimizer check_update saw, so its step's hook does not check again
        self._step = 0
        self._skipped_in_batch = False
        # stop mode, since the last flush: one "all finite" flag per check (on the device) and what it checked
        self._flags: list[torch.Tensor] = []
        self._pending: list[tuple[int, list[str], list, torch.Tensor]] = []  # (step, names, params, values)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": dict(self.in_a_row)} if self.mode == "skip" else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.in_a_row = {k: int(v) for k, v in (state_dict.get("in_a_row") or {}).items()}

    # ------------------------------------------------------------------ what is checked
    def record(self, name: str, value: Any) -> None:
        """A training term the method logged (``DistillMethod.log``)."""
        if name != SKIPPED_METRIC:
            self._terms.append((name, value))

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if stage == "fit":
            object.__setattr__(pl_module, "_nonfinite_guard", self)

    def teardown(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if stage == "fit":
            pl_module.__dict__.pop("_nonfinite_guard", None)

    def on_train_batch_start(self, trainer: "L.Trainer", pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step + 1
        self._skipped_in_batch = False

    def on_before_backward(self, trainer: "L.Trainer", pl_module: Any, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer: "L.Trainer", pl_module: Any, optimizer: Any) -> None:
        if self._checked is optimizer:  # checked by the method before its clipping (check_update)
            self._checked = None
            return
        self._check(trainer, pl_module, optimizer, None)

    def check_update(self, trainer: "L.Trainer", pl_module: Any, optimizer: Any, role: Optional[str] = None) -> None:
        """The check of one manual update (``DistillMethod.check_update``), before its optimizer step."""
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer's torch optimizer
        self._check(trainer, pl_module, optimizer, role)
        self._checked = optimizer

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # terms a manual method logged after its updates (those updates stand); under DDP on every
        # batch, so that every rank takes part in the reduction whatever it logged
        if not pl_module.automatic_optimization and (self._terms or self._losses or trainer.world_size > 1):
            self._check(trainer, pl_module, None, None)
        if self.mode == "skip":
            pl_module.log(SKIPPED_METRIC, torch.full((), float(self.skipped), device=pl_module.device),
                          on_step=True, on_epoch=False)

    def on_train_end(self, trainer: "L.Trainer", pl_module: Any) -> None:
        self.flush(trainer, pl_module)  # (the checkpoint callback flushes before its own saves too)

    # ------------------------------------------------------------------ the check
    def _check(self, trainer: "L.Trainer", pl_module: Any, optimizer: Any, role: Optional[str]) -> None:
        terms, self._terms = self._terms, []
        losses, self._losses = self._losses, []
        loss_name = f"{role} loss" if role else "loss"
        named: list[tuple[str, torch.Tensor]] = []
        host_bad: Optional[str] = None
        for name, v in terms:
            if isinstance(v, torch.Tensor):
                named.append((name, v))
            elif host_bad is None and isinstance(v, numbers.Real) and not math.isfinite(v):
                host_bad = name  # (a torchmetrics Metric logged as a value is not checked)
        named += [(loss_name, v) for v in losses]
        params = self._params_with_grad(trainer, optimizer)
        device = losses[0].device if losses else pl_module.device  # (the module's property costs more)
        with torch.no_grad():
            parts = self._flat([v for _, v in named], device)
            norms = self._grad_max_norms(params, device) if params else None
        if norms is not None:
            parts.append(norms)
        if self.mode == "stop" and host_bad is None and parts:
            self._defer(trainer, pl_module, torch.cat(parts), [n for n, _ in named], params)
            return
        flag = (~torch.isfinite(torch.cat(parts)).all()).int() if parts else torch.zeros((), dtype=torch.int, device=device)
        if host_bad is not None:
            flag = flag + 1
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag)  # every rank decides alike
        key = (role or "model") if optimizer is not None else "logged terms"
        if int(flag.item()) == 0:  # the one host sync of an update
            self.in_a_row[key] = 0
            return
        # Failure path: name the first non-finite thing (in logging order, then the loss, then the
        # parameters' order); under DDP the first rank that found one names it on every rank.
        what = host_bad or next((n for n, v in named if not bool(torch.isfinite(v.detach()).all())), None)
        if what is None and norms is not None:
            names = {id(p): n for n, p in pl_module.named_parameters()}
            bad = (~torch.isfinite(norms)).nonzero().flatten().tolist()
            if bad:
                what = f"gradient of {names.get(id(params[bad[0]]), 'an unnamed parameter')}"
        what = self._agree(trainer, what)
        self._nonfinite(trainer, optimizer, key, what)

    # ------------------------------------------------------------------ stop mode: no read per update
    def _defer(self, trainer: "L.Trainer", pl_module: Any, values: torch.Tensor, names: list[str], params: list) -> None:
        """Stop mode keeps the verdict on the device: one flag per check (are all its values finite?),
        two operations an update. :meth:`flush` reads them, before every checkpoint is written and at
        the end (and every :attr:`FLUSH_EVERY` checks, to bound what is held), so no update waits for
        the host and no non-finite weights are ever saved."""
        self._flags.append(torch.isfinite(values).all())
        self._pending.append((self._step, names, params, values))
        if len(self._flags) >= self.FLUSH_EVERY:
            self.flush(trainer, pl_module)

    FLUSH_EVERY = 4096  # checks held between two reads at most (one host read per this many updates)

    def flush(self, trainer: "L.Trainer", pl_module: Any) -> None:
        """Read the deferred verdict (one host read); raise :class:`NonFiniteStop` for the first
        non-finite update since the last flush."""
        flags, pending = self._flags, self._pending
        self._flags, self._pending = [], []
        first = None
        if flags:
            ok = torch.stack(flags).tolist()
            first = next((pending[k] for k, good in enumerate(ok) if not good), None)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([0 if first is None else 1], device=pl_module.device)
            torch.distributed.all_reduce(flag)
            if int(flag.item()) == 0:
                return
        elif first is None:
            return
        what = None
        if first is not None:
            step, names, params, values = first
            idx = int((~torch.isfinite(values)).int().argmax())
            if idx < len(names):
                what = names[idx]
            else:
                pnames = {id(p): n for n, p in pl_module.named_parameters()}
                what = f"gradient of {pnames.get(id(params[idx - len(names)]), 'an unnamed parameter')}"
        what = self._agree(trainer, what)
        step_now = self._step or trainer.global_step
        step = first[0] if first is not None else step_now  # (under DDP another rank may hold the bad update)
        raise NonFiniteStop(f"non-finite {what} at step {step}: the run stopped at step {step_now} before writing "
                            "a checkpoint (callbacks.nonfinite=stop)", step, what)

    @staticmethod
    def _flat(values: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """``values`` as 1-d float tensors on ``device``: one ``stack`` for the usual scalars there."""
        if not values:
            return []
        if all(v.dim() == 0 and v.device == device for v in values):
            return [torch.stack(values).float()]
        return [v.reshape(-1).float().to(device) for v in values]

    @staticmethod
    def _params_with_grad(trainer: "L.Trainer", optimizer: Any) -> list[torch.Tensor]:
        if optimizer is None or getattr(trainer.precision_plugin, "scaler", None) is not None:
            return []  # a GradScaler handles inf gradients itself
        return [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None and p.grad.numel()]

    @staticmethod
    def _grad_max_norms(params: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """max |g| of each gradient (NaN where it holds a NaN, inf where an inf) as one tensor. Under
        trainer.strategy=fsdp of this device's shard of it (a DTensor's local part; an empty shard
        counts as 0): the ranks' verdicts are combined where they are read."""
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
        grads = [g if g.numel() else g.new_zeros(1) for g in grads]
        if any(g.is_sparse for g in grads):
            norms = [torch.linalg.vector_norm(g.coalesce().values(), float("inf")) for g in grads]
        else:
            norms = list(torch._foreach_norm(grads, float("inf")))
        if all(n.device == device for n in norms):
            return torch.stack(norms).float()  # one kernel (stack promotes mixed dtypes)
        return torch.stack([n.float().to(device) for n in norms])  # gradients on several devices

    @staticmethod
    def _agree(trainer: "L.Trainer", what: Optional[str]) -> str:
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            every: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, what)
            rank, found = next(((r, w) for r, w in enumerate(every) if w), (None, None))
            if found:
                return found if rank == 0 else f"{found} (on rank {rank})"
        return what or "a value"

    def _nonfinite(self, trainer: "L.Trainer", optimizer: Any, key: str, what: str) -> None:
        step = self._step or trainer.global_step + 1
        if self.mode == "stop":
            when = "before applying that update" if optimizer is not None else "after that update"
            raise NonFiniteStop(f"non-finite {what} at step {step}: the run stopped {when} "
                                "(callbacks.nonfinite=stop)", step, what)
        if optimizer is None:  # logged after an update already applied: it stands
            if self._skipped_in_batch:
                return  # that update was skipped, and counted
        else:
            optimizer.zero_grad(set_to_none=True)  # the step then changes nothing
            self.skipped += 1
            self._skipped_in_batch = True
        n = self.in_a_row[key] = self.in_a_row.get(key, 0) + 1
        if n >= self.max_skips:
            raise NonFiniteStop(f"non-finite {what} at step {step}: {n} updates in a row were non-finite, and the "
                                f"run stopped (callbacks.nonfinite=skip, callbacks.max_nonfinite_skips={self.max_skips})",
                                step, what)
        if trainer.is_global_zero:
            done = "update skipped" if optimizer is not None else "found after its update, which stands"
            log.warning("non-finite %s at step %d: %s (%d in a row, %d skipped in all; the run stops at %d in a row: "
                        "callbacks.max_nonfinite_skips)", what, step, done, n, self.skipped, self.max_skips)


__all__ = ["EXIT_NONFINITE", "NonFiniteGuard", "NonFiniteStop", "SKIPPED_METRIC"]
