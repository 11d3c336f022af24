"""Building networks from config and loading their weights from local files.

Accepted weight files (nothing is downloaded): a distillkit Lightning checkpoint (``.ckpt``,
the student's weights, EMA ones when the run kept an EMA), a plain state dict or one wrapped
as ``{"model": ...}`` / ``{"state_dict": ...}`` (RepDistiller and mdistiller save them so),
or a ``.safetensors`` file. Everything from outside is read with ``weights_only=True``.

Step distillation's round/level files (``round_<r>.ckpt``, ``level_<r>.ckpt``) hold one network's
weights, unprefixed, with the run's config (``["distillkit"]["weights"] == "network"``): they are
weight files for ``*.checkpoint`` keys and, like last.ckpt, run checkpoints for
:func:`load_run_checkpoint`.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from distillkit.errors import DistillError, root_cause

STUDENT_PREFIX = "student."
EMA_PREFIX = "ema.module."  # torch.optim.swa_utils.AveragedModel keeps the copy as .module
NETWORK_WEIGHTS = "network"  # ["distillkit"]["weights"] of a file holding one network's own keys
ROLES = {"model": "student", "teacher": "teacher"}  # what a *.checkpoint key's network is called in the log

log = logging.getLogger("distillkit")


def read_state_dict(path: str | Path, key: str = "teacher.checkpoint") -> dict[str, torch.Tensor]:
    """The network weights in ``path``, whatever the supported format; errors name ``key``."""
    return read_weights(path, key)[0]


def read_weights(path: str | Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`read_state_dict`, and what the file says of the weights, for the log line that tells
    a user which weights a run starts from: the update count of the run that wrote them
    (``step``), and whether they are that run's EMA (``ema``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DistillError(
            f"{key}={path}: no such file. Point {key} at a weights file: a distillkit "
            f"last.ckpt, a .pt/.pth state dict or a .safetensors file.{_written_by(p, key)}"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(p))), {}
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or not a weights file at all
        raise DistillError(
            f"{key}={path}: cannot read weights from this file ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). Is it complete, and a checkpoint or state dict?"
        ) from None
    info: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        if isinstance(obj.get("global_step"), int):
            info["step"] = obj["global_step"]
        if "distillkit" in obj and isinstance(obj.get("state_dict"), Mapping) and not _holds_network(obj):
            info["ema"] = any(k.startswith(EMA_PREFIX) for k in obj["state_dict"])
    return _unwrap(obj, key, path), info


def _written_by(path: Path, key: str) -> str:
    """The command that writes a missing ``<runs_dir>/<experiment>/<name>/last.ckpt``, as a hint:
    the experiments' teacher paths point at other experiments' runs (digits_kd at digits_teacher's),
    which a new user may not have trained yet."""
    from distillkit.paths import CONF_DIR

    experiment, name = path.parent.parent.name, path.parent.name
    if path.name != "last.ckpt" or not (Path(CONF_DIR) / "experiment" / f"{experiment}.yaml").is_file():
        return ""
    run = "" if name == "default" else f" (the run named {name!r})"
    hint = f" It is written by `distill experiment={experiment}`{run}: train that first."
    found = same_run_elsewhere(path)
    if found:
        hint += f" A run of it is in {_shown(found.parent.parent.parent)}: to use that one, add {key}={_shown(found)}"
    return hint


def same_run_elsewhere(path: Path) -> Path | None:
    """``<runs_dir>/<experiment>/<name>/last.ckpt`` under another runs dir near the working dir or
    ``runs_dir`` (``runs/demo``, where `make demo` trains the teacher the experiments point at;
    ``runs_bench``): the newest one. Bounded, so that an error stays instant: only dirs named
    ``runs*`` there, ``runs_dir`` itself, and two levels below each."""
    runs_dir = path.parent.parent.parent
    tail = Path(path.parent.parent.name, path.parent.name, path.name)
    roots: list[Path] = []
    for near in (Path.cwd(), runs_dir.parent):
        try:
            roots += sorted(d for d in near.glob("runs*") if d.is_dir())
        except OSError:
            continue
    if runs_dir.is_dir():
        roots.append(runs_dir)
    missing = path.absolute()
    found = {c.absolute() for root in dict.fromkeys(roots) for depth in ("", "*", "*/*")
             for c in root.glob(str(Path(depth) / tail)) if c.is_file()}
    found.discard(missing)
    return max(found, key=lambda c: c.stat().st_mtime) if found else None


def _shown(p: Path) -> str:
    """``p`` relative to the working dir where it is under it (as the user would type it)."""
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _unwrap(obj: Any, key: str, path: Any) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise DistillError(f"{key}={path}: the file holds a {type(obj).__name__}, not a state dict")
    if "distillkit" in obj and "state_dict" in obj and not _holds_network(obj):  # a run's Lightning checkpoint
        sd = obj["state_dict"]
        ema = {k[len(EMA_PREFIX):]: v for k, v in sd.items() if k.startswith(EMA_PREFIX)}
        return ema or {k[len(STUDENT_PREFIX):]: v for k, v in sd.items() if k.startswith(STUDENT_PREFIX)}
    for k in ("state_dict", "model", "net", "student"):
        if k in obj and isinstance(obj[k], Mapping):
            obj = obj[k]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise DistillError(f"{key}={path}: the file holds no tensors")
    # Lightning modules of other projects prefix the network's keys ("model.", "module.").
    for prefix in ("module.", "model.", "student."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def load_weights(net: nn.Module, path: str | Path, key: str) -> None:
    raw, info = read_weights(path, key)
    sd = matching_keys(net, raw)
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise DistillError(
            f"{key}={path}: the weights do not fit the configured architecture "
            f"({len(missing)} missing keys, e.g. {missing[:3]}; {len(unexpected)} unexpected, "
            f"e.g. {unexpected[:3]}; {len(wrong)} of another shape (file vs model), e.g. {wrong[:2]}). "
            f"Check that the architecture option and its settings match the file."
        )
    net.load_state_dict(sd, strict=True)
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank == 0:  # a run that starts from another's weights says which (once under DDP)
        role = ROLES.get(key.split(".")[0], key.split(".")[0])
        said = ([f"step {info['step']}"] if "step" in info else []) + (
            ["its EMA weights" if info["ema"] else "raw weights: that run kept no EMA"] if "ema" in info else [])
        log.info("%s: loaded %d tensors into the %s (%s) from %s%s", key, len(sd), role, type(net).__name__,
                 Path(path).expanduser().resolve(), f" ({', '.join(said)})" if said else "")


def build_model(cfg: DictConfig | Mapping, key: str = "model") -> nn.Module:
    """Instantiate ``cfg`` (a model/teacher group node) and load ``cfg.checkpoint`` if set."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    ckpt = c.pop("checkpoint", None)
    try:
        net = instantiate(c, _convert_="all")
    except Exception as e:
        inner = root_cause(e)
        if isinstance(inner, DistillError):
            # builders name their own argument ("pretrained=..."); the user typed "<key>.pretrained=..."
            msg = str(inner)
            raise DistillError(f"{key}.{msg}" if msg.startswith("pretrained=") else msg) from None
        cause = e.__cause__ or e  # what the target raised, inside Hydra's InstantiationException
        raise DistillError(f"{key}: cannot build {c.get('_target_')}: {type(cause).__name__}: {cause}") from None
    if ckpt:
        load_weights(net, ckpt, f"{key}.checkpoint")
    return net


def matching_keys(net: nn.Module, sd: dict) -> dict:
    """A denoiser's file (keys ``unet.*``) for a bare network, or the other way round: a checkpoint of
    a run whose student is a denoiser loads into the same network built alone, and a network's own
    state dict into a denoiser around it. Only :func:`load_weights` needs it, to compare the keys
    before loading; a denoiser's own ``load_state_dict`` maps bare keys by itself."""
    own = net.state_dict()
    if set(sd) == set(own):
        return sd
    if all(k.startswith("unet.") for k in sd) and {k[5:] for k in sd} == set(own):
        return {k[5:]: v for k, v in sd.items()}
    if all(k.startswith("unet.") for k in own) and {f"unet.{k}" for k in sd} == set(own):
        return {f"unet.{k}": v for k, v in sd.items()}
    return sd


def build_teacher(cfg: DictConfig) -> nn.Module | None:
    """The frozen teacher: eval mode, no gradients (docs/architecture.md, Decisions)."""
    if cfg.get("_target_") is None:
        return None
    teacher = build_model(cfg, key="teacher")
    teacher.eval().requires_grad_(False)
    dtype = getattr(teacher, "frozen_dtype", None)
    if dtype is not None:  # a pretrained denoiser: the frozen teacher is held in model.frozen_dtype
        teacher.to(dtype)
    return teacher


def _holds_network(ckpt: Mapping) -> bool:
    meta = ckpt.get("distillkit")
    return isinstance(meta, Mapping) and meta.get("weights") == NETWORK_WEIGHTS


def _data_shape(dataset_cfg: Mapping) -> tuple[tuple[int, ...], int]:
    """(image_shape, num_classes) of a dataset config, without reading any data."""
    from hydra.utils import get_class

    cls = get_class(dataset_cfg["_target_"])
    shape = tuple(getattr(cls, "image_shape", ()))
    if "image_size" in dataset_cfg and "channels" in dataset_cfg:  # image folders: set per config
        s = int(dataset_cfg["image_size"])
        shape = (int(dataset_cfg["channels"]), s, s)
    return shape, int(dataset_cfg.get("num_classes") or dataset_cfg.get("num_modes") or getattr(cls, "num_classes", 0))


def load_run_checkpoint(path: str | Path, key: str = "checkpoint"):
    """The method of a distillkit run, rebuilt from its ``last.ckpt`` alone, in eval mode on CPU.

    The network and the method are built from the resolved config the checkpoint carries
    (``ckpt["distillkit"]["config"]``) and get every weight of the run (student and EMA). A round
    or level file of step distillation gives its network to both the student and the EMA, and
    its step count (``student_steps``) becomes the sampler's default. The
    teacher is not rebuilt (``teacher=None``, also for methods that train with one): sampling
    and export use the student only. ``model.checkpoint`` (the student's initial weights) is
    not read either. Used by ``distill-sample`` and ``distill-export``. Errors name ``key``."""
    from hydra.utils import get_class

    p = Path(path).expanduser()
    if not p.is_file():
        raise DistillError(f"{key}={path}: no such file; point {key} at a distillkit run's last.ckpt "
                           f"(or a round_<r>.ckpt / level_<r>.ckpt of step distillation).{_written_by(p, key)}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DistillError(f"{key}={path}: cannot read this file ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''}); is it a complete distillkit last.ckpt?") from None
    meta = ckpt.get("distillkit") if isinstance(ckpt, Mapping) else None
    config = meta.get("config") if isinstance(meta, Mapping) else None
    if not config or "state_dict" not in ckpt:
        hint = (" It looks like a round/level file written before they carried the run's config: point "
                f"{key} at the run's last.ckpt, or load these weights into its network yourself "
                "(distillkit.models.loading.read_state_dict)." if isinstance(ckpt, Mapping) and "student_steps" in ckpt
                else " Point it at the last.ckpt in a run dir.")
        raise DistillError(f"{key}={path}: not a distillkit run checkpoint (it has no ['distillkit']['config']).{hint}")
    shape, num_classes = _data_shape(config["dataset"])
    if meta.get("image_shape"):
        shape = tuple(int(s) for s in meta["image_shape"])
    model_cfg = dict(config["model"])
    model_cfg["checkpoint"] = None
    student = build_model(model_cfg, key="model")
    method_cfg = dict(config["method"])
    target = method_cfg.pop("_target_")
    cls = get_class(target)
    if getattr(cls, "needs_teacher", False):  # rebuilt for sampling / export: no teacher
        cls = type(cls.__name__, (cls,), {"needs_teacher": False, "__module__": cls.__module__})
    try:
        method = cls(student=student, teacher=None, optim_cfg=config.get("optim"),
                     ema_cfg=(config.get("callbacks") or {}).get("ema"), schedule_cfg=config.get("schedule"),
                     input_shape=shape, num_classes=num_classes, **method_cfg)
    except DistillError:
        raise
    except Exception as e:
        raise DistillError(f"{key}={path}: cannot rebuild method {target} from the checkpoint's config "
                           f"({type(e).__name__}: {e})") from None
    if _holds_network(ckpt):
        _load_network(method, ckpt, key, path)
    else:
        missing, unexpected = method.load_state_dict(ckpt["state_dict"], strict=False)
        if missing or unexpected:
            raise DistillError(f"{key}={path}: the weights do not fit the network built from the checkpoint's "
                               f"config ({len(missing)} missing keys, e.g. {missing[:3]}; {len(unexpected)} "
                               f"unexpected, e.g. {unexpected[:3]})")
    method.run_config = config
    return method.eval()


def _load_network(method, ckpt: Mapping, key: str, path) -> None:
    """The one network of a round/level file into ``method``'s student and EMA; its step count
    becomes the sampler's default."""
    for net in [method.student] + ([method.ema.module] if method.ema is not None else []):
        try:
            net.load_state_dict(ckpt["state_dict"], strict=True)  # a denoiser maps a bare network's keys itself
        except RuntimeError as e:
            raise DistillError(f"{key}={path}: the weights do not fit the network built from the file's config "
                               f"({str(e).splitlines()[0][:200]})") from None
    if ckpt.get("student_steps"):
        method.num_steps = int(ckpt["student_steps"])
