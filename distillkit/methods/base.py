"""The shared base of every method: a student, an optional frozen teacher, optimizers,
an optional EMA of the student, and what a checkpoint must carry to resume exactly.

The teacher is held outside the module tree (not a registered submodule), so it is never
in ``state_dict`` or the optimizer, never switched to train mode by Lightning, and never
wrapped by DDP: its weights and BatchNorm statistics cannot change (docs/architecture.md,
Decisions).
"""
from __future__ import annotations

import bisect
import logging
import math
import random
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import lightning as L
import numpy as np
import torch
from torch import nn

from distillkit.cycles import cycle_lengths, cycle_position
from distillkit.errors import DistillError
from distillkit.methods.ema import EMA

log = logging.getLogger("distillkit")
SCHEDULER_NAMES = ("none", "multistep", "cosine", "linear")  # optim.scheduler.name (configure_optimizers)


class DistillMethod(L.LightningModule):
    needs_teacher: bool = False
    method_name: str = "?"

    @classmethod
    def check_config(cls, cfg: dict, num_train_timesteps: Optional[int] = None,
                     dataset_gives_images: Optional[bool] = None) -> None:
        """Refuse ``method.*`` values (``cfg``) that are wrong whatever the networks, before any loads
        (the CLI calls it first); methods whose loading is slow check theirs here."""

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None,
                 optim_cfg: Any = None, ema_cfg: Any = None, **_: Any):
        super().__init__()
        if self.needs_teacher and teacher is None:
            raise DistillError(
                f"method={self.method_name} needs a teacher: choose its architecture and weights, "
                f"e.g. teacher=cnn_digits teacher.checkpoint=PATH"
            )
        self.student = student
        object.__setattr__(self, "teacher", teacher)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.optim_cfg = optim_cfg
        self.ema: Optional[EMA] = None
        if ema_cfg is not None and ema_cfg.get("enabled", False):
            decay = float(ema_cfg["decay"])
            if not 0.0 <= decay <= 1.0:
                raise DistillError(f"callbacks.ema.decay={decay}: must lie in [0, 1] (e.g. 0.999)")
            self.ema = EMA(student, decay)
            self.ema.requires_grad_(False)
        # Set by the CLI: the resolved config (plain types) stored in every checkpoint.
        self.run_config: dict = {}
        self.nfe = 0  # network evaluations in training so far (kept in the checkpoint)

    # ------------------------------------------------------------------ NFE
    def count_nfe(self, n: int) -> None:
        """Record one update that cost ``n`` (batched) network evaluations, teacher's included;
        logged as ``nfe_per_update`` and the cumulative ``nfe``."""
        self.nfe += int(n)
        self.log_scalar("nfe_per_update", n)
        self.log_scalar("nfe", self.nfe)

    def log_scalar(self, name: str, value: float) -> None:
        """Log a number of this update. The tensor is filled on the device: ``self.log(name, float)``
        would build it with ``torch.tensor(value, device=...)``, a copy from host memory that waits
        for every kernel queued on the GPU (pytorch/pytorch#190217), draining the pipeline once per
        call and update. Logged only on the updates the loggers write (``trainer.log_every_n_steps``):
        on the others Lightning would store the number and drop it, at a cost of about a millisecond
        per call on a CPU (scripts/bench_overhead.py)."""
        if self.logged_now():
            self.log(name, torch.full((), float(value), device=self.device), on_step=True, on_epoch=False)

    def logged_now(self) -> bool:
        """Whether the loggers write this training update's metrics (Lightning's own test; true
        outside training). Asked once per training batch (:meth:`on_train_batch_start`): the
        answer costs a dozen property lookups, and a method logs several terms an update."""
        t = self._trainer
        cached = self.__dict__.get("_logs_this_batch")
        if cached is not None and t is not None:
            return cached or t.should_stop  # (a stop requested during the batch: Lightning logs it)
        if t is None or not t.training or t.sanity_checking:
            return True
        return bool(t._logger_connector.should_update_logs)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Optional[int]:
        self.__dict__["_logs_this_batch"] = None
        self.__dict__["_logs_this_batch"] = self.logged_now()
        return None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.__dict__["_logs_this_batch"] = None

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's ``log``; a training term (``train/...``) also goes to the non-finite check of
        its update (``callbacks.nonfinite``: :mod:`distillkit.callbacks.nonfinite`), no host sync.
        A per-update training term reaches Lightning only on the updates the loggers write
        (``trainer.log_every_n_steps``, :meth:`logged_now`): on the others Lightning stores it and
        drops it, at about half a millisecond a call on a CPU, several calls an update
        (scripts/bench_overhead.py). Terms averaged over the epoch (``on_epoch=True``) go every time,
        and so do those of methods with several roles (distillkit.methods.roles), whose generator
        terms, logged on the generator's batch, Lightning writes on a later batch's log step."""
        guard = self.__dict__.get("_nonfinite_guard")
        if guard is not None and name.startswith("train/"):
            guard.record(name, value)
        if (name.startswith("train/") and self.automatic_optimization and not kwargs.get("on_epoch")
                and not self.logged_now()):
            return
        super().log(name, value, *args, **kwargs)

    def check_update(self, optimizer: Any, role: Optional[str] = None) -> None:
        """For manual optimization, after the backward of one update and before its clipping and
        step: the non-finite check (``callbacks.nonfinite``) of its loss, the terms logged so far and
        the gradients ``optimizer`` holds. Raises :class:`~distillkit.callbacks.nonfinite.NonFiniteStop`,
        or, to skip the update, drops the gradients (the step then changes nothing). Automatic
        optimization is checked by the callback itself."""
        guard = self.__dict__.get("_nonfinite_guard")
        if guard is not None:
            guard.check_update(self.trainer, self, optimizer, role)

    def configure_model(self) -> None:
        """Under ``trainer.strategy=fsdp``: shard the networks over the devices (distillkit.parallel),
        once (Lightning calls this hook again for testing after fitting)."""
        from distillkit.parallel import is_fsdp, shard

        if is_fsdp(self._trainer) and not self.__dict__.get("_sharded", False):
            mesh = self.device_mesh["data_parallel"]
            units = shard(self, mesh)
            self.__dict__["_sharded"] = True
            if self.global_rank == 0:
                log.info("trainer.strategy=fsdp: %d units (diffusers blocks and networks) sharded over %d devices",
                         units, mesh.size())

    # ------------------------------------------------------------------ teacher
    def _teacher_to_device(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device).eval()

    def on_fit_start(self) -> None:
        self._teacher_to_device()

    def on_validation_start(self) -> None:
        self._teacher_to_device()

    def on_test_start(self) -> None:
        self._teacher_to_device()

    @torch.no_grad()
    def teacher_forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.teacher is not None
        return self.compiled("teacher", self.teacher)(x)

    # ------------------------------------------------------------------ torch.compile
    COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
    # torch.compile's CUDA-graph modes, untried here: a replay may overwrite outputs still in use,
    # and an update replays the teacher's and the student's graphs several times before backward
    CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")

    def set_compile(self, mode: str) -> None:
        """Train through ``torch.compile(net, mode=mode)`` (``trainer.compile``): the student's
        forward and the frozen teacher's, the networks every update evaluates (and DMD's fake score).

        Each compiled wrapper shares its network's parameters but is kept out of the module tree,
        so checkpoints hold the same keys and a run compiled or not resumes the other's files. The
        EMA, DSD's target network and evaluation and sampling stay eager: ``nn.Module.compile`` in
        place would carry into every copy and recompile for eval mode, no-grad and each sampling
        batch size, with no measured gain."""
        if mode in self.CUDA_GRAPH_MODES:
            raise DistillError(f"trainer.compile={mode}: CUDA-graph modes are not supported (a replay may "
                               "overwrite outputs still in use, and an update calls the networks several times; "
                               f"untried here); use one of {', '.join(self.COMPILE_MODES)}")
        if mode not in self.COMPILE_MODES:
            raise DistillError(f"trainer.compile={mode!r}: choose one of {', '.join(self.COMPILE_MODES)} "
                               "(torch.compile's mode), or null to train eagerly")
        object.__setattr__(self, "_compile_mode", mode)

    def compiled(self, role: str, net: nn.Module) -> nn.Module:
        """``net`` as the update calls it: through torch.compile when ``trainer.compile`` is set.
        One wrapper per role, made afresh when the role's network changes (a new round's teacher)."""
        mode = self.__dict__.get("_compile_mode")
        if mode is None:
            return net
        held = self.__dict__.get(f"_compiled_{role}")
        if held is None or held._orig_mod is not net:
            held = torch.compile(net, mode=mode)
            object.__setattr__(self, f"_compiled_{role}", held)
        return held

    @property
    def train_student(self) -> nn.Module:
        """The student as the training update calls it: compiled when ``trainer.compile`` is set."""
        return self.compiled("student", self.student)

    # ------------------------------------------------------------------ EMA
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # The EMA is updated right after the optimizer step, before any callback's
        # on_train_batch_end, so a checkpoint written there already includes this update.
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.student)

    def eval_network(self) -> nn.Module:
        """The network used for evaluation and sampling: the EMA when there is one."""
        return self.ema.module if self.ema is not None else self.student

    # ------------------------------------------------------------------ optimizers
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, from the train loader's length (not from iterating it)."""
        t = self.trainer
        n = len(t.datamodule.train_dataloader())
        limit = t.limit_train_batches
        if isinstance(limit, int):
            n = min(n, limit)
        elif limit is not None:
            n = int(n * float(limit))
        return max(1, math.ceil(n / t.accumulate_grad_batches))

    def total_steps(self) -> int:
        """Optimizer steps of the whole run, like ``trainer.estimated_stepping_batches`` but
        without iterating the train loader before a checkpoint restores its position."""
        t = self.trainer
        per_epoch = self.steps_per_epoch()
        total = per_epoch * t.max_epochs if t.max_epochs and t.max_epochs > 0 else float("inf")
        if t.max_steps and t.max_steps > 0:
            total = min(total, t.max_steps)
        return max(1, int(total))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        opt, s = self.build_optimizer(self.trainable_parameters(), self.optim_cfg)
        if s is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": s, "interval": "step"}}

    def build_optimizer(self, params: list, optim_cfg: dict) -> tuple[torch.optim.Optimizer, Any]:
        """The optimizer ``optim_cfg["optimizer"]`` over ``params`` and its per-update LR scheduler
        (``optim_cfg["scheduler"]``; None for ``name: none``). The schedulers are ``LambdaLR`` of the
        update count: stepped once per (generator) update."""
        from hydra.utils import instantiate

        opt = instantiate(optim_cfg["optimizer"], _convert_="all")(params)
        sched = optim_cfg.get("scheduler") or {}
        name = sched.get("name", "none")
        if name == "none":
            return opt, None
        if name == "multistep":
            # MultiStepLR's epochs (lr * gamma^(milestones passed)), stepped per update from the
            # epoch the update is in: Lightning skips an epoch-interval scheduler's step when it
            # resumes from a checkpoint taken at an epoch's end, which would shift the milestones.
            milestones, gamma, per_epoch = sorted(int(m) for m in sched["milestones"]), float(sched["gamma"]), self.steps_per_epoch()

            def factor(step: int) -> float:
                return gamma ** bisect.bisect_right(milestones, step // per_epoch)

            return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
        if name == "cosine":
            total = self.total_steps()
            warm = int(sched.get("warmup_steps", 0))
            floor = float(sched.get("min_lr_ratio", 0.0))

            def factor(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                prog = min(1.0, (step - warm) / max(1, total - warm))
                return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog))

            return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
        if name == "linear":
            # Linear decay to lr * min_lr_ratio, restarted every cycle_steps updates when set (the
            # per-halving anneal of Salimans & Ho's progressive distillation: the official
            # config's learning_rate_anneal_steps = steps_per_iter).
            # A list of cycle lengths restarts it at the end of each (rounds of unequal length).
            cycles = cycle_lengths(sched.get("cycle_steps", 0) or 0, "optim.scheduler.cycle_steps")
            total = 0 if cycles else self.total_steps()
            floor = float(sched.get("min_lr_ratio", 0.0))

            def factor(step: int) -> float:
                pos, period = cycle_position(step, cycles) if cycles else (step, total)
                return 1.0 - (1.0 - floor) * min(1.0, pos / max(1, period))

            return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
        raise DistillError(f"optim.scheduler.name={name!r}: allowed values are {', '.join(SCHEDULER_NAMES)}")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        rng = capture_rng()
        checkpoint["distillkit"] = {
            "method": self.method_name,
            "config": self.run_config,
            "rng": rng,
            "nfe": int(self.nfe),
        }
        if self.world_size_now() > 1:  # each rank draws its own stream (rank 0 writes the file)
            checkpoint["distillkit"]["rng_per_rank"] = gather_from_ranks(rng)
        # Everything else Lightning put in (optimizer, scheduler, loop states) must also be
        # plain types and tensors, so that torch.load(weights_only=True) accepts the file.
        for k in list(checkpoint):
            checkpoint[k] = to_plain(checkpoint[k])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("distillkit", {})
        self.nfe = int(meta.get("nfe", 0))
        rng = this_ranks(meta.get("rng_per_rank"), self) or meta.get("rng")
        if rng:
            restore_rng(rng)

    def world_size_now(self) -> int:
        return int(self.trainer.world_size) if self._trainer is not None else 1


@contextmanager
def eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """``net`` in eval mode (no dropout) inside the block, its mode restored afterwards: the target
    evaluation of a network that is also being trained (DSD's, the consistency target)."""
    was = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was)


def to_plain(obj: Any) -> Any:
    """numpy scalars -> Python numbers, numpy arrays -> tensors, recursively."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, dict):
        return type(obj)((k, to_plain(v)) for k, v in obj.items()) if type(obj) is not dict else {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain(v) for v in obj]
    if isinstance(obj, tuple) and type(obj) is tuple:
        return tuple(to_plain(v) for v in obj)
    return obj


def gather_from_ranks(obj: Any) -> list:
    """[obj of rank 0, obj of rank 1, ...]: a collective, so every rank must call it (checkpoints
    are: Lightning builds the checkpoint dict on every rank and rank 0 writes it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def this_ranks(per_rank: Optional[list], method: "DistillMethod") -> Any:
    """This rank's entry of a gathered list when the run resumes with as many ranks, else None."""
    if not per_rank or len(per_rank) != method.world_size_now():
        return None
    return per_rank[method.global_rank]


# The RNG states in plain types and tensors, so checkpoints load with weights_only=True.
def capture_rng() -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
