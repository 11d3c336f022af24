"""Run directories: one per (experiment, name), stable for the same command line.

A run dir holds ``config.yaml`` (the resolved config of the run that created it, written
once), ``last.ckpt``, ``metrics.csv``, ``results.json`` and the exported student weights.
Starting the same command again resumes from ``last.ckpt``. If the config differs (other
than in keys that may change on resume, such as ``trainer.max_steps`` or the loggers) and the
run dir holds a checkpoint or results, the run refuses to start and says how to start fresh or
resume anyway.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import hashlib
import zipfile
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from distillkit.errors import DistillError

log = logging.getLogger("distillkit")

CONFIG_FILE = "config.yaml"
LAST_CKPT = "last.ckpt"
MAX_NAME_LEN = 120


def run_name(override_dirname: str) -> str:
    """A directory-safe run name from Hydra's override_dirname (``default`` when empty)."""
    if not override_dirname:
        return "default"
    name = re.sub(r"[^A-Za-z0-9=,._+-]+", "_", override_dirname.replace("/", "_")).strip("_.")
    if len(name) > MAX_NAME_LEN:  # keep it readable and unique
        digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
        name = f"{name[: MAX_NAME_LEN - 11]}-{digest}"
    return name or "default"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        if not d and prefix:
            out[prefix[:-1]] = {}
    else:
        out[prefix[:-1]] = d
    return out


def config_diff(old: dict, new: dict, ignore: Iterable[str] = ()) -> list[str]:
    """Human-readable differences between two resolved configs, minus ignored key prefixes."""
    ignore = tuple(ignore)

    def ignored(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in ignore)

    a, b = flatten(old), flatten(new)
    lines = []
    for k in sorted(set(a) | set(b)):
        if ignored(k):
            continue
        if k not in a:
            lines.append(f"{k}: (absent) -> {b[k]!r}")
        elif k not in b:
            lines.append(f"{k}: {a[k]!r} -> (absent)")
        elif a[k] != b[k]:
            lines.append(f"{k}: {a[k]!r} -> {b[k]!r}")
    return lines


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def holds_training_output(run_dir: Path) -> bool:
    """Whether a run dir holds anything training wrote: a checkpoint (``last.ckpt``, progressive's
    ``round_<r>.ckpt``), ``results.json`` or the exported student."""
    return any(any(run_dir.glob(pattern)) for pattern in ("*.ckpt", "results.json", "student.safetensors"))


def check_run_dir(run_dir: Path, config: dict, resume: str, resume_safe_keys: Iterable[str]) -> tuple[Optional[Path], bool]:
    """Check ``run_dir`` against ``config`` without writing anything.

    Returns the checkpoint to resume from (None: start fresh) and whether ``config.yaml`` is to be
    written (:func:`write_run_config`): in a new run dir, after ``resume=force`` with a changed
    config, and where a run with another config stopped before it wrote anything but its config
    (e.g. a bad value found at the first step), so that correcting the command is enough.
    """
    cfg_file = run_dir / CONFIG_FILE
    ckpt = run_dir / LAST_CKPT
    found = ckpt if ckpt.is_file() else None
    if found is not None:
        check_readable(found)
    if not cfg_file.is_file():
        return found, True
    try:
        old = yaml.safe_load(cfg_file.read_text()) or {}
    except yaml.YAMLError as e:
        raise DistillError(f"{cfg_file} is not valid YAML ({e}); move it away to start this run") from None
    diff = config_diff(old, config, ignore=list(resume_safe_keys) + ["name"])
    if resume == "never" and ckpt.exists():
        raise DistillError(
            f"run dir {run_dir} already holds a run and resume=never. Pass another name=..., "
            f"or remove {run_dir} to start fresh."
        )
    if diff and resume != "force" and holds_training_output(run_dir):
        shown = "\n  ".join(diff[:20]) + ("\n  ..." if len(diff) > 20 else "")
        raise DistillError(
            f"run dir {run_dir} was made by a different config:\n  {shown}\n"
            f"To start fresh, pass another name=<new name> (or remove {run_dir}); "
            f"to resume from its last.ckpt with the new config, add resume=force."
        )
    return found, bool(diff)


def check_readable(ckpt: Path) -> None:
    """A checkpoint to resume from must be a whole torch zip archive. Reading its index (at the
    end of the file) is cheap, and finds a file cut short by a copy or a full disk before training
    starts, instead of torch's error from inside Lightning's restore."""
    try:
        with zipfile.ZipFile(ckpt) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise DistillError(
            f"{ckpt}: cannot be read as a checkpoint ({e}); the file is damaged (our writes are atomic, "
            f"so something cut it short or changed it afterwards). Put back a good copy to resume, or "
            f"move it away to start this run afresh."
        ) from None


def write_run_config(run_dir: Path, config: dict) -> None:
    """Write ``config.yaml`` (rank 0 only). Never deletes a previous run's files: an earlier
    config is kept as ``config.<n>.yaml``."""
    cfg_file = run_dir / CONFIG_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg_file.is_file():
        n = 1
        while (run_dir / f"config.{n}.yaml").exists():
            n += 1
        os.replace(cfg_file, run_dir / f"config.{n}.yaml")
        log.info("run dir %s: its earlier config is kept as config.%d.yaml", run_dir, n)
    atomic_write_text(cfg_file, yaml.safe_dump(config, sort_keys=False))


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf: not JSON) as None, recursively; tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_results(run_dir: Path, results: dict) -> None:
    """``results.json``: strict JSON, a non-finite number (a NaN validation loss) written as null."""
    text = json.dumps(json_safe(results), indent=2, sort_keys=True, allow_nan=False)
    atomic_write_text(run_dir / "results.json", text + "\n")


# Keys of results.json that describe one session's ending, not a result: not carried into the next.
SESSION_KEYS = ("stopped", "nonfinite", "last_ckpt_step")


def read_results(run_dir: Path) -> Optional[dict]:
    """``results.json`` as a dict, or None where there is none (or it is not a JSON object)."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) else None


def merge_earlier_results(run_dir: Path, results: dict) -> dict:
    """A resumed run's results: the earlier sessions' results.json (e.g. a ``val/loss`` or an FID
    this session did not measure again) updated with this session's, so that no result is lost."""
    earlier = read_results(run_dir) or {}
    return {**{k: v for k, v in earlier.items() if k not in SESSION_KEYS}, **results}


def _checkpoint_state(ckpt: Path) -> Optional[tuple[int, dict]]:
    """The global step of ``ckpt`` and the trainer settings it was written under (memory-mapped:
    the weights are not read)."""
    import torch

    try:
        state = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True)
        trainer = ((state.get("distillkit") or {}).get("config") or {}).get("trainer") or {}
        return int(state["global_step"]), trainer
    except Exception:  # not ours, or not readable: the resume path reports it
        return None


def finished_run(run_dir: Path, config: dict, resume_safe_keys: Iterable[str]) -> Optional[tuple[str, dict]]:
    """Whether ``run_dir`` holds this config's run, finished: its results.json belongs to its
    last.ckpt (same step, not a stopped session), its config.yaml equals ``config`` but for the
    keys that may change on resume, and training would stop at once: ``trainer.max_steps`` is
    reached, or the checkpoint was trained to the same ``max_steps`` / ``max_epochs`` (a larger
    one extends the run). Returns the message to print and the results, or None. Reads only."""
    results = read_results(run_dir)
    cfg_file = run_dir / CONFIG_FILE
    if results is None or any(k in results for k in SESSION_KEYS) or not cfg_file.is_file():
        return None
    try:
        old = yaml.safe_load(cfg_file.read_text()) or {}
    except yaml.YAMLError:
        return None
    if config_diff(old, config, ignore=list(resume_safe_keys) + ["name"]):
        return None
    step = results.get("global_step")
    if not isinstance(step, int):
        return None
    t = config.get("trainer") or {}
    max_steps, max_epochs = t.get("max_steps"), t.get("max_epochs")
    same_limits = False
    ckpt = run_dir / LAST_CKPT
    if ckpt.is_file():
        state = _checkpoint_state(ckpt)
        if state is None or state[0] != step:
            return None
        same_limits = (state[1].get("max_steps"), state[1].get("max_epochs")) == (max_steps, max_epochs)
    steps_reached = isinstance(max_steps, int) and max_steps >= 0 and step >= max_steps
    if not (steps_reached or same_limits):
        return None
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in sorted(results.items()) if "/" in k and isinstance(v, (int, float)))
    message = (f"distill: run {run_dir} is finished (step {step}; trainer.max_steps={max_steps}, "
               f"trainer.max_epochs={max_epochs}); nothing was changed.\n"
               f"  results: {run_dir / 'results.json'}" + (f"\n  {shown}" if shown else "") + "\n"
               f"  To train it further, raise trainer.max_steps (or trainer.max_epochs); to start afresh, "
               f"pass another name=...")
    return message, results
