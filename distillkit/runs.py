"""Run directories: one per (experiment, name), stable for the same command line.

A run dir holds ``config.yaml`` (the resolved config of the run that created it, written
once), ``last.ckpt``, ``metrics.csv``, ``results.json``, the exported student weights and
``commands.log`` (one entry per session: when, how it started, the command line, and where the
config changed, the ``config.<n>.yaml`` that holds that session's config).
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


NAME_HASH_LEN = 6


def is_path_value(value: Any) -> bool:
    """Whether an override's value is a path, to be shortened in the run name: it holds a '/' or
    names an existing file."""
    return isinstance(value, str) and ("/" in value or os.path.isfile(value))


def short_path(value: str) -> str:
    """A path as a run name shows it: the file's stem (a folder's name) and a short hash of the
    whole value. The path itself made names unreadable and ran into MAX_NAME_LEN; the hash keeps
    two files of the same name (every run's ``last.ckpt``) apart."""
    p = Path(value.rstrip("/") or value)
    base = p.name if p.is_dir() or not p.suffix else p.stem
    digest = hashlib.sha1(value.encode()).hexdigest()[:NAME_HASH_LEN]
    return f"{base or 'path'}-{digest}"


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


def config_diff(old: dict, new: dict, ignore: Iterable[str] = (), defaults: Optional[dict] = None) -> list[str]:
    """Human-readable differences between two resolved configs, minus ignored key prefixes. A key
    absent from ``old`` whose value in ``new`` is its entry in ``defaults`` (the schema's default,
    :func:`distillkit.config.schema_defaults`) is an option added since ``old`` was written, at the
    default that keeps what the run did: no difference."""
    ignore = tuple(ignore)
    defaults = defaults or {}

    def ignored(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in ignore)

    a, b = flatten(old), flatten(new)
    lines = []
    for k in sorted(set(a) | set(b)):
        if ignored(k):
            continue
        if k not in a:
            if k in defaults and defaults[k] == b[k]:
                continue
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


def check_run_dir(run_dir: Path, config: dict, resume: str, resume_safe_keys: Iterable[str],
                  defaults: Optional[dict] = None) -> tuple[Optional[Path], bool]:
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
    diff = config_diff(old, config, ignore=list(resume_safe_keys) + ["name"], defaults=defaults)
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


def next_config_file(run_dir: Path) -> Path:
    """``config.<n>.yaml`` with the first free n: every config a run dir held besides config.yaml,
    numbered in the order they were written (commands.log says which session each belongs to)."""
    n = 1
    while (run_dir / f"config.{n}.yaml").exists():
        n += 1
    return run_dir / f"config.{n}.yaml"


def write_run_config(run_dir: Path, config: dict) -> Optional[Path]:
    """Write ``config.yaml`` (rank 0 only). Never deletes a previous run's files: an earlier
    config is kept as ``config.<n>.yaml``, which is returned."""
    cfg_file = run_dir / CONFIG_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    kept = None
    if cfg_file.is_file():
        kept = next_config_file(run_dir)
        os.replace(cfg_file, kept)
        log.info("run dir %s: its earlier config is kept as %s", run_dir, kept.name)
    atomic_write_text(cfg_file, yaml.safe_dump(config, sort_keys=False))
    return kept


COMMANDS_LOG = "commands.log"
MAX_LOGGED_CHANGES = 50


def checkpoint_step_and_config(ckpt: Path) -> Optional[tuple[int, dict]]:
    """The global step of ``ckpt`` and the resolved config it was trained under (memory-mapped:
    the weights are not read); None for a checkpoint that is not a distillkit run's."""
    import torch

    try:
        state = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True)
        return int(state["global_step"]), dict((state.get("distillkit") or {}).get("config") or {})
    except Exception:  # not ours, or not readable: the resume path reports it
        return None


def start_session(run_dir: Path, config: dict, ckpt: Optional[Path], write_config: bool, command: str,
                  defaults: Optional[dict] = None) -> str:
    """Rank 0, right before training: write ``config.yaml`` where :func:`check_run_dir` says so;
    where ``config`` differs from the one ``last.ckpt`` was trained under (a larger
    ``trainer.max_steps``, ``resume=force``), keep it as this session's config file, so that the
    config of the latest checkpoint is always on disk; and append this session's entry to
    ``commands.log``. Returns the session's status: ``fresh``, ``resumed from step N`` (the last
    session stopped early) or ``extended from step N`` (it had finished)."""
    kept = write_run_config(run_dir, config) if write_config else None
    notes = [f"the earlier config.yaml is kept as {kept.name}"] if kept is not None else []
    if ckpt is None:
        status = "fresh"
    else:
        step, before = checkpoint_step_and_config(ckpt) or (None, None)
        results = read_results(run_dir)
        finished = (results is not None and step is not None and results.get("global_step") == step
                    and not any(k in results for k in SESSION_KEYS))
        status = f"{'extended' if finished else 'resumed'} from step {step}"
        changed = config_diff(before, config, ignore=["name"], defaults=defaults) if before else []
        if changed:
            own = CONFIG_FILE if write_config else _write_session_config(run_dir, config)
            shown = changed[:MAX_LOGGED_CHANGES] + (["..."] if len(changed) > MAX_LOGGED_CHANGES else [])
            notes.append(f"{own}: this session's config; changed since step {step}:")
            notes.extend(f"  {line}" for line in shown)
    append_command_log(run_dir, status, command, notes)
    return status


def _write_session_config(run_dir: Path, config: dict) -> str:
    path = next_config_file(run_dir)
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path.name


def append_command_log(run_dir: Path, status: str, command: str, notes: Iterable[str] = ()) -> None:
    """One entry per session in ``commands.log``: the UTC time, how it started and the command line,
    then indented notes. Appended in one write and synced, so that a crash never loses or cuts the
    earlier entries."""
    import datetime as dt

    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    text = f"{when} {status}: {command}\n" + "".join(f"  {n}\n" for n in notes)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / COMMANDS_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def is_new_run_dir(run_dir: Path) -> bool:
    """At a session's start: whether the run dir is this session's own, just made by Hydra (it
    holds nothing but Hydra's empty job log)."""
    try:
        entries = list(run_dir.iterdir())
    except FileNotFoundError:
        return True
    return all(e.is_file() and e.suffix == ".log" and e.stat().st_size == 0 for e in entries)


def remove_untrained_run_dir(run_dir: Path, user_error: bool) -> bool:
    """After a session that made ``run_dir`` (:func:`is_new_run_dir`) failed before training:
    remove it, and its experiment's dir where that is left empty, so that a mistyped command
    leaves no run dir behind (nor a stale config.yaml). After a user error (DistillError, found
    before training or at its first step) every file there is this session's set-up; after any
    other failure only Hydra's job logs may be there. Anything training wrote keeps it."""
    import shutil

    if not run_dir.is_dir():
        return False
    entries = list(run_dir.iterdir())
    trained = holds_training_output(run_dir) or any((run_dir / f).exists() for f in ("eval.jsonl", "samples"))
    metrics = run_dir / "metrics.csv"
    if metrics.is_file():
        with open(metrics) as f:
            trained = trained or sum(1 for _ in f) > 1  # rows beyond the header
    if trained or not (user_error or all(e.is_file() and e.suffix == ".log" for e in entries)):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        run_dir.parent.rmdir()  # only when empty: another run or a sweep's multirun.yaml keeps it
    except OSError:
        pass
    return not run_dir.exists()


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
    state = checkpoint_step_and_config(ckpt)
    return None if state is None else (state[0], state[1].get("trainer") or {})


def finished_run(run_dir: Path, config: dict, resume_safe_keys: Iterable[str],
                 defaults: Optional[dict] = None) -> Optional[tuple[str, dict]]:
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
    if config_diff(old, config, ignore=list(resume_safe_keys) + ["name"], defaults=defaults):
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
