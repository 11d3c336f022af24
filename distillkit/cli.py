"""The ``distill`` command: compose the config, validate it, build everything, fit, test.

    distill experiment=digits_kd                     # embedded data, runs anywhere
    distill method=dkd teacher=resnet32x4 teacher.checkpoint=PATH model=resnet8x4 dataset=cifar100 ...
    distill -m method=kd,dkd seed=0,1,2              # a Hydra sweep (any launcher, e.g. SLURM)

Flow: config (CLI overrides) -> schema validation -> dataset, teacher (frozen), student,
method -> run dir check (resume or refuse) -> Trainer.fit -> test -> results.json.
Errors in the user's input print one message and exit with status 2; set
HYDRA_FULL_ERROR=1 for the traceback. A non-finite loss or gradient stops training with one
message and exit status 3 (EXIT_NONFINITE; ``callbacks.nonfinite``, docs/long_runs.md); a stop
signal, after last.ckpt is written, with 128 + the signal's number.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from distillkit.compose import explain_compose_error, help_template, register_resolvers  # noqa: F401
from distillkit.config import REQUIRED_HINTS, out_of_bounds, register_configs, schema_defaults
from distillkit.errors import DistillError, root_cause
from distillkit.paths import CONF_DIR, find_conf_dir  # noqa: F401  (CONF_DIR is also imported from here)

log = logging.getLogger("distillkit")


# --------------------------------------------------------------------------- validation
def missing_required(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Keys whose value is ``???``, found without resolving interpolations."""
    out: list[str] = []
    for key in cfg.keys():
        full = f"{prefix}{key}"
        if full == "hydra":
            continue
        if OmegaConf.is_missing(cfg, key):
            out.append(full)
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_interpolation() and not node._is_none():
            out.extend(missing_required(node, full + "."))
    return sorted(out)


def missing_values(cfg: DictConfig) -> list[str]:
    """``???`` values, plus the teacher's weights: a teacher group option cannot mark
    ``checkpoint`` as ``???`` (OmegaConf keeps the model option's ``null`` when merging)."""
    keys = missing_required(cfg)
    teacher = cfg.get("teacher")
    if teacher is not None and teacher.get("_target_") and not teacher.get("checkpoint") and "pretrained" not in teacher:
        keys.append("teacher.checkpoint")
    return sorted(set(keys))


def explain_missing(keys: list[str]) -> str:
    lines = ["missing required values:"]
    for k in keys:
        hint = REQUIRED_HINTS.get(k, "")
        lines.append(f"  {k}: {hint}" if hint else f"  {k}")
    lines.append("Set each on the command line as key=value.")
    return "\n".join(lines)


def check_data_range(method, dm) -> None:
    """Diffusion methods sample images in [-1, 1] (clamped and written as such): refuse data
    scaled otherwise (CIFAR's classifier normalisation) before anything is trained."""
    from hydra.core.hydra_config import HydraConfig

    from distillkit.methods.diffusion import DiffusionMethod

    if (isinstance(method, DiffusionMethod) and method.is_image and not method.student.is_latent
            and dm.data_range != (-1.0, 1.0)):
        choice = HydraConfig.get().runtime.choices.get("dataset")
        raise DistillError(f"dataset={choice} gives images normalised for classifiers (mean/std), but method="
                           f"{method.method_name} models images in [-1, 1]: add dataset.normalize=minus_one_one "
                           "(and dataset.crop_padding=0 to train on flips only, as diffusion models do)")


def prevalidate(overrides: list[str], jobs: Optional[list[list[str]]] = None) -> None:
    """Compose with the same overrides (or each job's of a sweep) to report config errors as one
    clear message, before any run starts or any job is submitted."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="distill"):
        for job in jobs or [overrides]:
            where = f"the sweep's job {' '.join(job)}: " if jobs else ""
            try:
                cfg = compose(config_name="config", overrides=job)
            except Exception as e:  # Hydra/OmegaConf composition errors
                fail(where + explain_compose_error(e, job))
            keys = missing_values(cfg)
            if keys:
                fail(where + explain_missing(keys))
            bad = out_of_bounds(cfg)
            if bad:
                fail(where + "\n".join(bad))


def sweep_jobs(args: list[str]) -> Optional[list[list[str]]]:
    """The overrides of every job of ``distill -m ...`` as Hydra's basic sweeper expands them (the
    cartesian product of the comma lists and ranges), without the ``hydra`` ones (launcher, sweep
    dir), which the jobs' configs do not hold. None where another sweeper expands them (e.g.
    ``hydra/sweeper=optuna``) or the sweep does not parse: Hydra then reports it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        parsed = OverridesParser.create().parse_overrides(args)
        if any(o.get_key_element().startswith("hydra/sweeper") for o in parsed):
            return None
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception:
        return None
    return [[a for a in job if not a.lstrip("+~").startswith("hydra")] for job in jobs]


def fail(message: str, code: int = 2) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise DistillError(message)
    print(f"distill: error: {message}", file=sys.stderr)
    sys.exit(code)


# --------------------------------------------------------------------------- the run
def _quiet_known_warnings() -> None:
    for pattern in (
        ".*does not have many workers.*",
        ".*Experiment logs directory .* exists and is not empty.*",
        ".*The number of training batches .* is smaller than the logging interval.*",
        ".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
        ".*LeafSpec.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def _precision(cfg: DictConfig, accelerator: str) -> str:
    import torch

    if cfg.trainer.precision:
        return str(cfg.trainer.precision)
    on_gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    return "bf16-mixed" if on_gpu else "32-true"


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    from lightning.pytorch.loggers import TensorBoardLogger

    from distillkit.callbacks.csv_log import AppendingCSVLogger

    loggers: list = []
    if cfg.logger.csv:
        loggers.append(AppendingCSVLogger(save_dir=str(run_dir), name="", version=""))
    if cfg.logger.tensorboard:
        # No placeholder hp_metric (-1): the final metrics are logged as hparams metrics at the end.
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="",
                                         default_hp_metric=False))
    if cfg.logger.wandb:
        from lightning.pytorch.loggers import WandbLogger

        # The wandb run id lives in the run dir, so a restart continues the same wandb run.
        id_file = run_dir / "wandb_run_id"
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            import uuid

            run_id = uuid.uuid4().hex[:16]
            from lightning.pytorch.utilities.rank_zero import rank_zero_only

            if rank_zero_only.rank == 0:
                id_file.write_text(run_id + "\n")
        wandb_logger = WandbLogger(project=cfg.logger.wandb_project, entity=cfg.logger.wandb_entity,
                                   save_dir=str(run_dir), id=run_id, resume="allow",
                                   name=f"{cfg.experiment_name}/{cfg.name}")
        # Lightning passes anonymous=None to wandb.init, and wandb >= 0.19 warns on every run that
        # the setting has no effect (it warns for any value given): leave it out.
        getattr(wandb_logger, "_wandb_init", {}).pop("anonymous", None)
        loggers.append(wandb_logger)
    return loggers


def log_hyperparameters(loggers: list, config: dict) -> None:
    """Before training: the resolved config, flattened to dotted keys (``optim.optimizer.lr``), as
    the hyper-parameters of TensorBoard (hparams.yaml, the HPARAMS tab; Lightning writes lists as
    strings there) and wandb (the run's config). The CSV logger's record of them is config.yaml."""
    from distillkit.callbacks.csv_log import AppendingCSVLogger
    from distillkit.runs import flatten

    params = flatten(config)
    for lg in loggers:
        if not isinstance(lg, AppendingCSVLogger):
            lg.log_hyperparams(params)


def log_final_metrics(loggers: list, config: dict, results: dict) -> None:
    """After the run (rank 0): results.json's numbers as TensorBoard's hparams metrics (so runs
    compare by them in the HPARAMS tab) and as the wandb run's summary."""
    import math

    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    from distillkit.runs import flatten

    metrics = {k: float(v) for k, v in results.items()
               if ("/" in k or k in ("global_step", "wall_s")) and isinstance(v, (int, float))
               and not isinstance(v, bool) and math.isfinite(v)}
    for lg in loggers:
        if isinstance(lg, TensorBoardLogger) and metrics:
            from lightning.pytorch.core.saving import save_hparams_to_yaml

            lg.log_hyperparams(flatten(config), metrics=metrics, step=int(results.get("global_step", 0)))
            lg.finalize("success")  # the test already closed the writer; close the one this reopened
            # hparams.yaml is written once by Lightning: an extended run's holds its latest config.
            save_hparams_to_yaml(os.path.join(lg.log_dir, lg.NAME_HPARAMS_FILE), lg.hparams)
        elif isinstance(lg, WandbLogger):
            lg.experiment.summary.update(metrics)


@contextlib.contextmanager
def reported_as(key: str) -> Iterator[None]:
    """User-facing failures inside (a wrong path, a bad value, a file that is not what it should
    be) become a DistillError that names the config group, not a traceback or Hydra's wrapper."""
    try:
        yield
    except Exception as e:
        cause = root_cause(e)
        if isinstance(cause, DistillError):
            raise cause from None
        if isinstance(cause, (FileNotFoundError, ValueError, ImportError, KeyError)):
            raise DistillError(f"{key}: {cause}") from None
        raise


def setup_data(dm: Any) -> None:
    """Read the dataset's files (a damaged or foreign one is named) and check the batch size."""
    with reported_as("dataset"):
        dm.prepare_data()
        dm.setup("fit")
    dm.check_batch_size()


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` with :func:`reported_as`."""
    from hydra.utils import instantiate

    with reported_as(key):
        return instantiate(node, **kwargs)


def compile_mode(value: Any) -> Optional[str]:
    """``trainer.compile``: torch.compile's mode, or None; ``true`` means "default" (the schema
    types the key as a string, so a command line's true arrives as "True")."""
    if value is None or str(value).lower() == "false":
        return None
    return "default" if str(value).lower() == "true" else str(value)


def is_compile_failure(e: BaseException) -> bool:
    """Whether ``e`` is torch.compile failing to build a graph (no C++ compiler, a backend error),
    as opposed to an error in the model itself."""
    import torch

    kinds = tuple(k for k in (getattr(torch._dynamo.exc, "BackendCompilerFailed", None),
                              getattr(getattr(torch._inductor, "exc", None), "InductorError", None)) if k)
    return isinstance(e, kinds)


def build_trainer(cfg: DictConfig, run_dir: Path, accelerator: str, callbacks: list, loggers: list,
                  progress_bar: bool, manual: bool = False, module: Any = None) -> Any:
    """Lightning's Trainer from ``trainer.*``; settings it refuses (a strategy or precision it does
    not know, a GPU that is not there) become one message naming the trainer overrides given.
    ``manual``: the method updates several roles itself (distillkit.methods.roles): it clips their
    gradients, and under DDP each backward reaches one role, so DDP must find unused parameters.
    ``trainer.strategy=fsdp`` shards ``module``'s UNets block by block (distillkit.parallel)."""
    import lightning as L
    from hydra.core.hydra_config import HydraConfig
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    t = cfg.trainer
    strategy = "ddp_find_unused_parameters_true" if manual and t.strategy == "ddp" else t.strategy
    if t.strategy == "fsdp" and module is not None:
        from distillkit.parallel import fsdp_strategy

        strategy = fsdp_strategy(module)
    clip = None if manual else gradient_clip(cfg)
    try:
        return L.Trainer(
            max_epochs=t.max_epochs, max_steps=t.max_steps, accelerator=accelerator, devices=t.devices,
            num_nodes=t.num_nodes, strategy=strategy, precision=_precision(cfg, accelerator),
            logger=loggers or False, callbacks=callbacks,
            default_root_dir=str(run_dir), enable_checkpointing=False, enable_progress_bar=progress_bar,
            enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
            log_every_n_steps=t.log_every_n_steps, check_val_every_n_epoch=t.check_val_every_n_epoch,
            val_check_interval=t.val_check_interval, gradient_clip_val=clip,
            accumulate_grad_batches=t.accumulate_grad_batches, deterministic=t.deterministic,
            limit_train_batches=t.limit_train_batches, limit_val_batches=t.limit_val_batches,
            limit_test_batches=t.limit_test_batches,
        )
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as e:
        given = [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").startswith("trainer.")]
        where = f" (given: {' '.join(given)})" if given else ""
        raise DistillError(f"Lightning refused the trainer settings{where}: {str(e).strip().splitlines()[0]}") from None


@contextlib.contextmanager
def heap_frozen() -> Iterator[None]:
    """Train with every object built so far out of the cyclic garbage collector's sight
    (``gc.freeze``). Its full collections otherwise walk the whole heap (the networks, the config,
    the imported libraries: about half a million objects) every few hundred updates, 0.1 to 0.25 s
    each on a CPU, which was most of what ``distill`` added to a 7 ms digits update
    (scripts/bench_overhead.py). Unfrozen when training ends, so that what it dropped can be
    collected (the tests run many trainings in one process)."""
    import gc

    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def gradient_clip(cfg: DictConfig) -> Optional[float]:
    """The (generator's) gradient-norm clip: ``optim.gradient_clip_val``, else ``trainer.gradient_clip_val``."""
    return cfg.optim.gradient_clip_val if cfg.optim.gradient_clip_val is not None else cfg.trainer.gradient_clip_val


def multi_role_settings(cfg: DictConfig) -> dict:
    """The extra arguments of a method with several roles (DMD, DMD2: distillkit.methods.roles):
    the critic's optimizer overrides and each role's gradient clipping. Refuses ``critic_optim``
    values for methods with one role, and the trainer settings Lightning's manual optimization
    does not take."""
    from hydra.utils import get_class

    from hydra.core.hydra_config import HydraConfig

    from distillkit.methods.roles import MultiRoleMethod, role_optim_cfg

    critic = {k: v for k, v in OmegaConf.to_container(cfg.critic_optim, resolve=True).items() if v is not None}
    choice = HydraConfig.get().runtime.choices.get("method")
    if not issubclass(get_class(cfg.method._target_), MultiRoleMethod):
        if critic:
            raise DistillError(f"critic_optim.{next(iter(critic))}: method={choice} trains one network and has no critic; "
                               "critic_optim is for method=dmd / dmd2")
        return {}
    if cfg.trainer.accumulate_grad_batches != 1:
        raise DistillError(f"trainer.accumulate_grad_batches={cfg.trainer.accumulate_grad_batches}: method={choice} updates "
                           "its generator and critic in turn (manual optimization) and takes no accumulation; raise "
                           "dataset.batch_size instead")
    clip = gradient_clip(cfg)
    critic_clip = critic.pop("gradient_clip_val", clip)
    role_optim_cfg(OmegaConf.to_container(cfg.optim, resolve=True), critic)  # refuses a bad value now, not at fit
    return {"critic_optim_cfg": critic, "grad_clip": {"generator": clip, "critic": critic_clip}}


def session_command() -> str:
    """The command line as typed, for commands.log; a sweep's job adds its own overrides (a job
    started by a cluster launcher has the launcher's argv)."""
    import shlex

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "distill"
    prog = "python -m distillkit.cli" if prog in ("cli.py", "__main__.py") else prog
    command = " ".join([prog, *(shlex.quote(a) for a in sys.argv[1:])])
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        command += f"  # sweep job {hc.job.num}: {shlex.join(hc.overrides.task)}"
    return command


def resume_safe_keys() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().job.config.override_dirname.exclude_keys)


def run(cfg: DictConfig) -> dict:
    """Fit and test one configured run; returns the final metrics (also in results.json)."""
    _quiet_known_warnings()
    import lightning as L
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_class, instantiate
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from distillkit.callbacks.checkpoint import LastCheckpoint
    from distillkit.callbacks.nonfinite import NonFiniteGuard, NonFiniteStop
    from distillkit.callbacks.progress import PlainProgress, StepProgressBar, use_rich
    from distillkit.models.loading import build_model, build_teacher
    from distillkit.runs import check_run_dir, finished_run, merge_earlier_results, start_session, write_results

    keys = missing_values(cfg)
    if keys:
        raise DistillError(explain_missing(keys))
    bad = out_of_bounds(cfg)
    if bad:
        raise DistillError("\n".join(bad))
    if cfg.trainer.cpu_threads:
        torch.set_num_threads(int(cfg.trainer.cpu_threads))
    t0 = time.time()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    rank = rank_zero_only.rank
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(config, dict)
    # The same command again after the run finished: say so and touch nothing (no re-test).
    defaults = schema_defaults(cfg)  # options added since a run's config.yaml, at these values, change nothing
    finished = None if config["resume"] == "never" else finished_run(run_dir, config, resume_safe_keys(), defaults)
    if finished is not None:
        if rank == 0:
            print(finished[0], flush=True)
        return finished[1]

    # Build everything that can fail on bad input before touching the run dir.
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    method_cls = get_class(cfg.method._target_)
    method_cfg = OmegaConf.to_container(cfg.method, resolve=True)
    method_cls.check_config(method_cfg)  # before the data and the networks, which may take minutes to load
    roles = multi_role_settings(cfg)
    dm = build(cfg.dataset, "dataset", seed=cfg.seed, _convert_="all")
    gives_images = getattr(dm, "has_images", None)  # text-image data: images, or prompts only (others: None)
    if gives_images is not None:
        method_cls.check_config(method_cfg, dataset_gives_images=gives_images)
    # Latent text-to-image data is encoded by the model's own VAE and text encoders (and cached):
    # those datasets are read once the model is built.
    encoded = callable(getattr(dm, "attach_encoder", None))
    if not encoded:
        setup_data(dm)
    student = build_model(cfg.model, key="model")
    teacher = build_teacher(cfg.teacher)
    if encoded:
        codec = getattr(student, "codec", None)
        if codec is None:
            choice = HydraConfig.get().runtime.choices
            raise DistillError(f"dataset={choice.get('dataset')} is encoded by a latent text-to-image model's VAE and "
                               f"text encoders; model={choice.get('model')} has none: use model=sd15 or model=sdxl")
        dm.attach_encoder(codec)
        setup_data(dm)
    if cfg.teacher.get("self_distill"):  # teacher=self: only a method that is its own teacher takes it
        if not getattr(method_cls, "accepts_self_teacher", False):
            choice = HydraConfig.get().runtime.choices.get("method")
            raise DistillError(f"teacher=self (the network distils into itself) is for method=dsd; method={choice} "
                               "needs a distinct teacher: e.g. teacher=unet_digits teacher.checkpoint=PATH")
    method = build(
        cfg.method, "method", student=student, teacher=teacher,
        optim_cfg=OmegaConf.to_container(cfg.optim, resolve=True),
        ema_cfg=OmegaConf.to_container(cfg.callbacks.ema, resolve=True), **roles,
        schedule_cfg=OmegaConf.to_container(cfg.schedule, resolve=True, enum_to_str=True),
        input_shape=tuple(dm.image_shape), num_classes=dm.num_classes,
        _recursive_=False, _convert_="all",
    )
    check_data_range(method, dm)
    compiled = compile_mode(cfg.trainer.compile)
    if compiled is not None:
        method.set_compile(compiled)
    method.run_config = config
    method.run_dir = run_dir  # where methods write files of their own (progressive's round teachers)
    evaluation = None
    if cfg.eval.enabled:
        from distillkit.callbacks.evaluation import SampleEvaluation, has_sampler

        if not has_sampler(method):
            raise DistillError(f"eval={HydraConfig.get().runtime.choices.get('eval')} needs a generative method "
                               f"(one that samples images); method={HydraConfig.get().runtime.choices.get('method')} "
                               "does not: use eval=none")
        evaluation = SampleEvaluation.from_config(cfg.eval, dataset_name=HydraConfig.get().runtime.choices.get("dataset"))

    last_ckpt = LastCheckpoint(run_dir, cfg.callbacks.checkpoint_every_n_steps, started_at=t0,
                               every_seconds=cfg.callbacks.checkpoint_every_seconds)
    guard = NonFiniteGuard(config["callbacks"]["nonfinite"], cfg.callbacks.max_nonfinite_skips)
    callbacks: list = [guard, last_ckpt]  # the guard first: a batch that fails it writes no checkpoint
    progress = config["callbacks"]["progress"]  # plain strings: enums resolved by to_container
    rich = use_rich(progress)
    if rich:
        callbacks.append(StepProgressBar())
    elif progress != "none":
        callbacks.append(PlainProgress(cfg.trainer.log_every_n_steps))
    if evaluation is not None:
        callbacks.append(evaluation)
    ckpt, write_config = check_run_dir(run_dir, config, config["resume"], resume_safe_keys(), defaults)
    accelerator = str(cfg.trainer.accelerator)
    loggers = build_loggers(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir, accelerator, callbacks, loggers, progress_bar=rich, manual=bool(roles),
                            module=method)
    for lg in loggers:  # metrics.csv rows at the update count of the progress log, with the wall time
        if callable(getattr(lg, "follow", None)):
            lg.follow(trainer, wall_s=lambda: last_ckpt.wall_s)
    log_hyperparameters(loggers, config)
    if rank == 0:  # config.yaml where needed, this session's config where it changed, commands.log
        start_session(run_dir, config, ckpt, write_config, session_command(), defaults)
    if ckpt is not None:
        log.info("resuming from %s", ckpt)
    # Per-rank streams for what happens during training (noise, dropout, augmentation).
    L.seed_everything(cfg.seed + rank, workers=True, verbose=False)

    try:
        with heap_frozen():
            trainer.fit(method, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
    except NonFiniteStop as e:  # nothing was saved after the non-finite update, nor is now
        session_s = time.time() - t0
        saved = last_ckpt._last_saved_step if last_ckpt.path.is_file() else None
        if trainer.is_global_zero:
            stopped = {
                **{k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
                "stopped": "non-finite", "nonfinite": {"step": e.step, "term": e.term, "skipped": guard.skipped},
                "global_step": int(trainer.global_step), "last_ckpt_step": saved,
                "wall_s": round(last_ckpt.earlier_sessions_s + session_s, 3), "session_wall_s": round(session_s, 3),
                "run_dir": str(run_dir), "resumed_from": str(ckpt) if ckpt else None}
            write_results(run_dir, merge_earlier_results(run_dir, stopped) if ckpt is not None else stopped)
        kept = (f"{last_ckpt.path.name} holds step {saved}, the last finite checkpoint." if saved is not None
                else "No checkpoint was written before it.")
        skip = ", or skip such updates with callbacks.nonfinite=skip" if guard.mode == "stop" else ""
        raise NonFiniteStop(f"{e}. {kept} Lower the learning rate (optim.optimizer.lr) or clip gradients "
                            f"(optim.gradient_clip_val=1.0){skip}.", e.step, e.term) from None
    except Exception as e:
        if compiled is None or not is_compile_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DistillError(f"trainer.compile={compiled}: torch.compile could not build the networks' "
                           f"forward ({type(e).__name__}: {first[:300]}); train eagerly with trainer.compile=null "
                           "(the run resumes from its last checkpoint either way)") from None
    results: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items()
                                 if k.startswith(("val/", "fid/", "is/", "class_acc/", "clip_score/"))}
    if evaluation is not None:
        results["feature_net"] = evaluation.scorer.net_id
    if cfg.trainer.test_after_fit and not trainer.interrupted:
        tested = trainer.test(method, datamodule=dm, verbose=False)
        results.update({k: float(v) for k, v in (tested[0] if tested else {}).items()})
    session_s = time.time() - t0
    results.update({"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
                    "wall_s": round(last_ckpt.earlier_sessions_s + session_s, 3),
                    "session_wall_s": round(session_s, 3), "run_dir": str(run_dir),
                    "resumed_from": str(ckpt) if ckpt else None})
    if ckpt is not None:  # keep the earlier sessions' results (a val/loss this one did not measure)
        results = merge_earlier_results(run_dir, results)
    from distillkit.parallel import full_state_dict

    weights = full_state_dict(method.eval_network())  # collective under trainer.strategy=fsdp
    if trainer.is_global_zero:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(run_dir / "student.safetensors"))
        mask = os.umask(0)  # safetensors writes 0600: give it the mode of the user's umask (0644)
        os.umask(mask)
        os.chmod(run_dir / "student.safetensors", 0o666 & ~mask)
        write_results(run_dir, results)
        log.info("results: %s", json.dumps({k: v for k, v in results.items() if "/" in k}))
        log_final_metrics(loggers, config, results)
    return results


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "Tip:" not in msg and "`weights_only` was not set" not in msg


def _configure_logging() -> None:
    """Hydra's handlers (console + the run dir's log file) print everything once."""
    logging.getLogger("distillkit").setLevel(logging.INFO)
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = True
    for h in logging.getLogger().handlers:
        h.addFilter(_DropNoise())


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> Optional[float]:
    import lightning  # noqa: F401  (installs its own log handlers, which we remove)

    _configure_logging()
    from hydra.core.hydra_config import HydraConfig
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from distillkit.callbacks.nonfinite import EXIT_NONFINITE, NonFiniteStop
    from distillkit.runs import is_new_run_dir, remove_untrained_run_dir

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    new = is_new_run_dir(run_dir) and rank_zero_only.rank == 0
    try:
        run(cfg)
    except DistillError as e:
        if new:  # a run that fails before training leaves no run dir behind
            remove_untrained_run_dir(run_dir, user_error=True)
        fail(str(e))
    except NonFiniteStop as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if rank_zero_only.rank == 0:  # one message, not one per DDP rank
            print(f"distill: error: {e}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)
    except (Exception, KeyboardInterrupt):
        if new:  # a crash before this session wrote anything but Hydra's log
            remove_untrained_run_dir(run_dir, user_error=False)
        raise
    return None


def main() -> None:
    register_configs()
    register_resolvers()
    args = sys.argv[1:]
    flags = [a for a in args if a.startswith("-")]
    # Hydra's own flags (--cfg, --help, ...) go straight to Hydra; a sweep (-m) has each of its
    # jobs checked first, so that a typo does not fail in every job (or in every job of a cluster).
    if not flags:
        prevalidate(args)
    elif set(flags) <= {"-m", "--multirun"}:
        jobs = sweep_jobs([a for a in args if not a.startswith("-")])
        if jobs:
            prevalidate([], jobs)
    _hydra_main()
    if flags and set(flags) <= {"-m", "--multirun"}:  # every job has finished: the sweep's table
        from distillkit.report import print_sweep_summary

        print_sweep_summary([a for a in args if not a.startswith("-")])


if __name__ == "__main__":
    main()
