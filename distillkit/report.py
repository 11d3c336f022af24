"""``distill-report PATH...``: the results of runs side by side, in one page.

    distill-report runs/digits_kd                      # a sweep's run dirs (runs_dir/experiment_name)
    distill-report runs/digits_kd/seed=0 runs/digits_student -o report/kd
    distill-report 'runs/*/debug=smoke*'               # a glob (quoted: expanded here, not by the shell)

Each PATH is a run dir (it holds ``config.yaml``), a folder searched below for run dirs (a sweep's
``runs_dir/experiment_name``, a whole runs dir), or a glob of either. Read top to bottom, this
module does what the command does:

1. find the run dirs (:func:`find_run_dirs`);
2. load each run (:func:`load_run`): ``config.yaml``, ``results.json`` (the final metrics),
   ``metrics.csv`` (the curves), ``eval.jsonl`` (FID / IS during training), the latest grid of
   ``samples/`` per sampling step count, and the training network evaluations from ``last.ckpt``;
3. group the runs whose resolved configs differ only in ``seed`` and in the keys that do not name a
   run (they may change on resume: conf/config.yaml's ``hydra.job.config.override_dirname.exclude_keys``,
   e.g. ``trainer.max_steps``, the loggers) (:func:`group_runs`);
4. the table: each group's final metrics (FID / IS / class accuracy / CLIP score per sampling step
   count, accuracies and losses, updates, network evaluations, wall time), mean ± std over its runs
   (std from two runs up), n shown (:func:`summary_table`);
5. the plots, with matplotlib: loss and FID against updates, network evaluations and wall time,
   one line per group (the mean over its seeds, their std shaded) (:func:`plot_curves`);
6. the page (:func:`write_report`): ``report.html``, self-contained (the plots and the sample grids
   are embedded as data URIs), with ``report.md`` and ``report.csv`` (the table), ``runs.csv``
   (each run's final metrics) and the plots' PNGs, in ``--out``.

``distill -m ...`` prints the same table for its own runs at its end (:func:`print_sweep_summary`);
``scripts/bench_step_distill_digits.py`` draws the benchmark's FID-vs-network-evaluations plot with
:func:`plot_fid_vs_nfe`, on the same drawing code as the report's FID curves.
"""
from __future__ import annotations

import argparse
import base64
import csv
import datetime as dt
import glob
import html
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import yaml

from distillkit.errors import DistillError
from distillkit.paths import CONF_DIR
from distillkit.runs import CONFIG_FILE, LAST_CKPT, flatten, read_results

# Files of a run dir that training writes (a folder holding config.yaml and none of these, found by
# searching below a PATH, is not taken for a run: Hydra's own config root also holds a config.yaml).
TRAINING_FILES = ("results.json", "metrics.csv", LAST_CKPT, "eval.jsonl")
GRID = re.compile(r"step(\d+)_(\d+)step\.png$")
X_AXES = (("updates", "updates"), ("nfe", "network evaluations"), ("wall_s", "wall time"))
PLOTS = ("loss.png", "fid.png")


# --------------------------------------------------------------------------- 1. find the run dirs
def is_run_dir(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def find_run_dirs(paths: Iterable[str]) -> list[Path]:
    """The run dirs named by ``paths`` (run dirs, folders searched below, globs), each once, in the
    order given (sorted within a folder or a glob). A path that does not exist, a glob that matches
    nothing, or a folder without a run dir below it is a :class:`DistillError` naming it."""
    found: list[Path] = []
    for arg in paths:
        if Path(arg).exists():
            matches = [Path(arg)]
        elif glob.has_magic(arg):
            matches = [Path(m) for m in sorted(glob.glob(arg, recursive=True))]
            if not matches:
                raise DistillError(f"{arg}: the pattern matches nothing")
        else:
            raise DistillError(f"{arg}: no such file or directory")
        dirs = [d for m in matches for d in _run_dirs_below(m)]
        if not dirs:
            raise DistillError(f"{arg}: no run dir found (a run dir holds {CONFIG_FILE} and what training wrote: "
                               f"{', '.join(TRAINING_FILES)})")
        found.extend(dirs)
    unique: dict[Path, None] = {}
    for d in found:
        unique.setdefault(d, None)
    return list(unique)


def _run_dirs_below(path: Path) -> list[Path]:
    """``path`` itself when it is a run dir, else the run dirs below it (not descending into a run
    dir: its tensorboard/ and wandb/ folders hold files of their own)."""
    if path.is_dir() and is_run_dir(path):
        return [path]
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if CONFIG_FILE in files and any(f in files for f in TRAINING_FILES):
            out.append(Path(root))
            dirs[:] = []
    return out


# --------------------------------------------------------------------------- 2. load each run
@dataclass
class Run:
    path: Path
    config: dict
    results: dict  # results.json; {} while the run has written none
    metrics: list[dict[str, float]]  # metrics.csv's rows, blank cells left out
    evals: list[dict]  # eval.jsonl's rows
    grids: dict[int, Path] = field(default_factory=dict)  # sampling steps -> the latest sample grid
    grid_step: Optional[int] = None  # the update count of those grids
    nfe: Optional[float] = None  # network evaluations in training, up to the end

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    @property
    def status(self) -> str:
        if not self.results:
            return "running or stopped (no results.json)"
        return f"stopped: {self.results['stopped']}" if self.results.get("stopped") else "finished"

    @property
    def updates(self) -> Optional[float]:
        if isinstance(self.results.get("global_step"), (int, float)):
            return float(self.results["global_step"])
        steps = [r["step"] for r in self.metrics if "step" in r]
        return max(steps) if steps else None

    def series(self, key: str) -> list[tuple[float, float]]:
        """(update, value) of ``key`` from metrics.csv, one per update (the last logged: a resumed
        session logs again the updates after its checkpoint)."""
        by_step = {r["step"]: r[key] for r in self.metrics if key in r and "step" in r}
        return sorted(by_step.items())

    def fid_series(self, k: int, metric: str = "fid") -> list[tuple[float, float]]:
        """(update, FID or IS at ``k`` sampling steps): eval.jsonl's rows, else metrics.csv's."""
        by_step = {float(r["step"]): float(r[metric]) for r in self.evals
                   if r.get("sampling_steps") == k and isinstance(r.get(metric), (int, float))}
        return sorted(by_step.items()) if by_step else self.series(f"{metric}/{k}step")

    def to_axis(self, steps: Sequence[float], axis: str) -> Optional[list[float]]:
        """``steps`` (updates) as ``axis``: updates, network evaluations (interpolated in the logged
        cumulative count) or wall time (the logged ``wall_s``; runs logged before metrics.csv had it:
        results.json's wall time pro rata of the updates). None where the run has no such record."""
        if axis == "updates":
            return [float(s) for s in steps]
        import numpy as np

        known = self.series("nfe" if axis == "nfe" else "wall_s")
        if axis == "nfe" and known and known[0][0] > 0:
            known = [(0.0, 0.0), *known]  # none spent before the first update
        if len(known) >= 2:
            xs, ys = zip(*known)
            return [float(v) for v in np.interp(steps, xs, ys)]
        if axis == "wall_s" and isinstance(self.results.get("wall_s"), (int, float)) and self.updates:
            return [float(self.results["wall_s"]) * s / self.updates for s in steps]
        return None

    def final(self) -> dict[str, float]:
        """The run's final numbers: results.json's metrics (``fid/4step``, ``test/acc``, ...), else
        the last logged values of metrics.csv, with ``updates``, ``nfe`` and ``wall_s``."""
        if self.results:
            out = {k: float(v) for k, v in self.results.items()
                   if "/" in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
            wall = self.results.get("wall_s")
        else:
            out = {k: self.series(k)[-1][1] for k in self.csv_keys() if "/" in k and not k.startswith("train/")}
            wall = self.series("wall_s")[-1][1] if self.series("wall_s") else None
        if self.updates is not None:
            out["updates"] = self.updates
        if self.nfe is not None:
            out["nfe"] = self.nfe
        if isinstance(wall, (int, float)):
            out["wall_s"] = float(wall)
        return out

    def csv_keys(self) -> list[str]:
        return sorted({k for r in self.metrics for k in r})

    def sampling_steps(self) -> set[int]:
        """The sampling step counts of the run's FID measurements."""
        ks = {int(e["sampling_steps"]) for e in self.evals if isinstance(e.get("sampling_steps"), int)}
        return ks | {int(m.group(1)) for m in (re.fullmatch(r"fid/(\d+)step", k) for k in self.csv_keys()) if m}


def load_run(path: Path) -> Run:
    """Read one run dir (see the module docstring, step 2)."""
    try:
        config = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise DistillError(f"{path / CONFIG_FILE}: cannot be read ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise DistillError(f"{path / CONFIG_FILE}: not a run's config (not a mapping)")
    run = Run(path=path, config=config, results=read_results(path) or {}, metrics=read_metrics(path / "metrics.csv"),
              evals=read_jsonl(path / "eval.jsonl"))
    grids: dict[int, tuple[int, Path]] = {}
    for p in (path / "samples").glob("step*_*step.png"):
        m = GRID.match(p.name)
        if m and int(m.group(1)) >= grids.get(int(m.group(2)), (-1, p))[0]:
            grids[int(m.group(2))] = (int(m.group(1)), p)
    if grids:
        run.grid_step = max(s for s, _ in grids.values())
        run.grids = {k: p for k, (s, p) in sorted(grids.items()) if s == run.grid_step}
    run.nfe = checkpoint_nfe(path / LAST_CKPT, run.updates)
    if run.nfe is None and run.series("nfe"):
        run.nfe = run.series("nfe")[-1][1]
    return run


def read_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.csv's rows as {column: number}, blank and non-numeric cells left out."""
    rows: list[dict[str, float]] = []
    try:
        with path.open(newline="") as f:
            for rec in csv.DictReader(f):
                row = {}
                for k, v in rec.items():
                    try:
                        row[k] = float(v)
                    except (TypeError, ValueError):
                        pass
                rows.append(row)
    except OSError:
        pass
    return rows


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a stopped run
                continue
            if isinstance(row, dict):
                rows.append(row)
    except OSError:
        pass
    return rows


def checkpoint_nfe(ckpt: Path, updates: Optional[float]) -> Optional[float]:
    """The methods' own count of training network evaluations, kept in last.ckpt (memory-mapped:
    the weights are not read); None where there is no checkpoint of the run's last update."""
    if not ckpt.is_file():
        return None
    import torch

    try:
        state = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=True)
        nfe, step = state.get("distillkit", {}).get("nfe"), state.get("global_step")
    except Exception:  # not ours, damaged: the count is then read from metrics.csv
        return None
    if nfe is None or (updates is not None and step != updates):
        return None
    return float(nfe)


# --------------------------------------------------------------------------- 3. group by config minus seed
@dataclass
class Group:
    runs: list[Run]
    label: str = ""

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]


def resume_safe_keys() -> list[str]:
    """The keys that do not name a run (conf/config.yaml, ``hydra.job.config.override_dirname.exclude_keys``)."""
    conf = yaml.safe_load((Path(CONF_DIR) / "config.yaml").read_text())
    return list(conf["hydra"]["job"]["config"]["override_dirname"]["exclude_keys"])


def _ignored(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def comparable_config(run: Run, ignore: Sequence[str]) -> dict[str, Any]:
    """The run's flattened config without the keys in ``ignore`` (and their sub-keys)."""
    return {k: v for k, v in flatten(run.config).items() if not _ignored(k, ignore)}


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs whose configs are equal but for ``seed`` and the resume-safe keys, in one group each;
    groups in the order of their first run, labelled by :func:`group_labels`."""
    ignore = [*resume_safe_keys(), "seed", "name"]
    groups: dict[str, Group] = {}
    for run in runs:
        key = json.dumps(sorted(comparable_config(run, ignore).items()), default=str)
        groups.setdefault(key, Group([])).runs.append(run)
    out = list(groups.values())
    for g, label in zip(out, group_labels(out, ignore)):
        g.label = label
    return out


def group_labels(groups: Sequence[Group], ignore: Sequence[str], shown: int = 4) -> list[str]:
    """Each group's experiment name, followed, where groups of one experiment differ, by the keys
    they differ in (the first ``shown``) with the group's values, and by its first run dir's name
    where those still read alike."""
    by_exp: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_exp.setdefault(str(g.runs[0].config.get("experiment_name", g.runs[0].path.parent.name)), []).append(i)
    labels = [""] * len(groups)
    for exp, members in by_exp.items():
        flats = [comparable_config(groups[i].runs[0], ignore) for i in members]
        keys = sorted({k for f in flats for k in f if len({json.dumps(f.get(k), default=str) for f in flats}) > 1})
        for i, f in zip(members, flats):
            parts = [f"{k}={_short(f.get(k))}" for k in keys[:shown]]
            if len(keys) > shown:
                parts.append(f"+{len(keys) - shown} more")
            labels[i] = exp + (f": {', '.join(parts)}" if parts else "")
    # groups told apart only by keys past the first `shown`: their run dirs' names tell them apart
    alike = {label for label in labels if labels.count(label) > 1}
    return [f"{label} [{g.runs[0].path.name}]" if label in alike else label for label, g in zip(labels, groups)]


def _short(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


# --------------------------------------------------------------------------- 4. the table
def metric_columns(runs: Sequence[Run]) -> list[str]:
    """The final metrics any run has, in the table's order: per sampling step count FID, IS, class
    accuracy, CLIP score; then accuracies, losses and other val/test metrics; updates, nfe, wall time."""
    keys = {k for r in runs for k in r.final()}

    def order(k: str) -> tuple:
        m = re.fullmatch(r"(fid|is|class_acc|clip_score)/(\d+)step", k)
        if m:
            return (0, ("fid", "is", "class_acc", "clip_score").index(m.group(1)), int(m.group(2)), k)
        if k in ("updates", "nfe", "wall_s"):
            return (3, ("updates", "nfe", "wall_s").index(k), 0, k)
        return (1 if k.endswith("acc") else 2, 0, 0, k)

    return sorted(keys, key=order)


def mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """Mean and (from two values up) the sample standard deviation; Nones when there are no values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else None)


def fmt(mean: Optional[float], std: Optional[float] = None) -> str:
    """``566.15 ± 0.12``: the std to two significant digits and the mean to as many decimals; a
    lone value (or an std of 0) to four significant digits; integers as integers."""
    if mean is None:
        return "—"
    if std:
        d = min(6, max(0, 1 - math.floor(math.log10(abs(std)))))
        return f"{mean:.{d}f} ± {std:.{d}f}"
    if float(mean).is_integer() and abs(mean) < 1e15:
        return str(int(mean))
    d = min(6, max(0, 3 - math.floor(math.log10(abs(mean))))) if mean else 0
    return f"{mean:.{d}f}"


@dataclass
class Table:
    columns: list[str]  # metric keys
    rows: list[dict]  # per group: label, n, seeds, runs, and per metric (mean, std, count)


def summary_table(groups: Sequence[Group]) -> Table:
    columns = metric_columns([r for g in groups for r in g.runs])
    rows = []
    for g in groups:
        finals = [r.final() for r in g.runs]
        row: dict[str, Any] = {"label": g.label, "n": g.n, "seeds": g.seeds, "runs": [str(r.path) for r in g.runs]}
        for c in columns:
            values = [f[c] for f in finals if c in f]
            row[c] = (*mean_std(values), len(values))
        rows.append(row)
    return Table(columns, rows)


def markdown_table(table: Table) -> str:
    """The table as markdown: a cell is ``mean ± std``, with ``(n=k)`` where only k of the group's
    runs have the metric."""
    head = ["run", "n", *table.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    for row in table.rows:
        cells = [row["label"].replace("|", "\\|"), str(row["n"])]
        for c in table.columns:
            mean, std, count = row[c]
            cells.append(fmt(mean, std) + (f" (n={count})" if 0 < count < row["n"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table_csv(table: Table, path: Path) -> None:
    """One row per group: label, n, seeds, then ``<metric>`` (the mean) and ``<metric>_std`` for each
    metric, then the run dirs."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "n", "seeds", *[x for c in table.columns for x in (c, f"{c}_std")], "run_dirs"])
        for row in table.rows:
            values = [("" if v is None else v) for c in table.columns for v in row[c][:2]]
            w.writerow([row["label"], row["n"], " ".join(map(str, row["seeds"])), *values, " ".join(row["runs"])])


def write_runs_csv(groups: Sequence[Group], columns: Sequence[str], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run_dir", "group", "seed", "status", *columns])
        for g in groups:
            for r in g.runs:
                final = r.final()
                w.writerow([str(r.path), g.label, r.seed, r.status, *[final.get(c, "") for c in columns]])


# --------------------------------------------------------------------------- 5. the plots
@dataclass
class Curve:
    label: str
    x: list[float]
    y: list[float]
    std: Optional[list[float]] = None  # shaded y ± std where given
    color: Any = None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, the same on a cluster node
    import matplotlib.pyplot as plt

    return plt


def compact(v: float) -> str:
    """A tick label: 500, 2000, 20k, 1.5M (not 5x10^2: the numbers are read off the axis)."""
    for scale, suffix in ((1e6, "M"), (1e4, "k")):
        if abs(v) >= scale:
            return f"{v / (scale if suffix == 'M' else 1e3):g}{suffix}"
    return f"{v:g}"


def _log_axis(axis: Any) -> None:
    """Ticks at 1, 2 and 5 times the powers of ten, written plainly (:func:`compact`)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: compact(v)))
    axis.set_minor_formatter(NullFormatter())
    axis.set_tick_params(labelsize="small")  # 1, 2, 5 per decade: plain labels would touch


def draw_curves(ax: Any, curves: Sequence[Curve], xlabel: str, ylabel: str, logx: bool = False, logy: bool = False,
                reference: Optional[tuple[str, float]] = None, markers: bool = True) -> None:
    """One line per curve (markers at its points, its std shaded), and ``reference`` = (label,
    value) as a dashed horizontal line: the drawing of the report's curves and of the benchmark's
    FID-vs-nfe plot."""
    for c in curves:
        dots = markers or len(c.x) <= 30  # a curve of a few points shows where they are
        ax.plot(c.x, c.y, color=c.color, label=c.label, linewidth=1.6, marker="o" if dots else None,
                markersize=4 if markers else 2.5)
        if c.std is not None:
            lo = [y - s for y, s in zip(c.y, c.std)]
            hi = [y + s for y, s in zip(c.y, c.std)]
            if logy:
                lo = [max(v, y * 1e-3) for v, y in zip(lo, c.y)]
            ax.fill_between(c.x, lo, hi, color=c.color, alpha=0.2, linewidth=0)
    if reference is not None:
        ax.axhline(reference[1], color="#5a5a5a", linestyle=(0, (5, 5)), linewidth=1, label=reference[0])
    if logx:
        ax.set_xscale("log")
        _log_axis(ax.xaxis)
    if logy:
        ax.set_yscale("log")
        _log_axis(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", color="#e6e6e6", linewidth=0.6)


def group_curve(g: Group, axis: str, values: Any, color: Any) -> Optional[Curve]:
    """The group's mean curve of ``values(run) -> [(update, y)]`` against ``axis`` at the updates its
    runs all logged (the std of y over its runs where there are two or more); None when none did."""
    per_run = [(r, dict(values(r))) for r in g.runs]
    per_run = [(r, v) for r, v in per_run if v]
    if not per_run:
        return None
    steps = sorted(set.intersection(*(set(v) for _, v in per_run)))
    if not steps:  # runs of one config that logged at different updates: the longest run alone
        r, v = max(per_run, key=lambda rv: len(rv[1]))
        per_run, steps = [(r, v)], sorted(v)
    xs_per_run = [r.to_axis(steps, axis) for r, _ in per_run]
    if any(x is None for x in xs_per_run):
        return None
    ys = [[v[s] for s in steps] for _, v in per_run]
    x = [statistics.fmean(col) for col in zip(*xs_per_run)]
    y = [statistics.fmean(col) for col in zip(*ys)]
    std = [statistics.stdev(col) for col in zip(*ys)] if len(ys) > 1 else None
    return Curve(f"{g.label} (n={len(ys)})", x, y, std, color)


def _time_unit(curves: Sequence[Curve]) -> tuple[str, float]:
    longest = max((max(c.x) for c in curves if c.x), default=0.0)
    return ("h", 3600.0) if longest > 3 * 3600 else ("min", 60.0) if longest > 180 else ("s", 1.0)


def plot_curves(groups: Sequence[Group], rows: Sequence[tuple[str, Any, bool]], path: Path) -> Optional[Path]:
    """A grid of panels: one row per (ylabel, values(run) -> [(update, y)], log y) of ``rows``, one
    column per x axis (updates, network evaluations, wall time), one line per group. None (nothing
    written) when no group has any of these values."""
    colors = _colors(len(groups))
    panels = []
    for ylabel, values, logy in rows:
        row = []
        for axis, _ in X_AXES:
            curves = [c for c in (group_curve(g, axis, values, colors[i]) for i, g in enumerate(groups)) if c]
            row.append(curves)
        if any(row):
            panels.append((ylabel, logy, row))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), len(X_AXES), figsize=(4.2 * len(X_AXES), 3.0 * len(panels) + 0.6),
                             squeeze=False)
    for (ylabel, logy, row), axrow in zip(panels, axes):
        for (axis, xlabel), curves, ax in zip(X_AXES, row, axrow):
            if not curves:
                ax.set_axis_off()
                continue
            if axis == "wall_s":
                unit, scale = _time_unit(curves)
                curves = [Curve(c.label, [v / scale for v in c.x], c.y, c.std, c.color) for c in curves]
                xlabel = f"{xlabel} ({unit})"
            draw_curves(ax, curves, xlabel, ylabel, logy=logy, markers=False)
    handles, labels = {}, []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.tight_layout()
    # below the panels, as many columns as the labels' length allows; the saved image grows to hold it
    ncol = max(1, min(3, len(labels), 150 // max(len(lab) for lab in labels)))
    fig.legend([handles[lab] for lab in labels], labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol,
               frameon=False, fontsize="small")
    return _save(fig, path, tight=True)


def _colors(n: int) -> list[Any]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig: Any, path: Path, dpi: int = 110, tight: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight" if tight else None)
    _pyplot().close(fig)
    return path


def plot_report(groups: Sequence[Group], out: Path) -> list[Path]:
    """``loss.png`` (the training loss, and the validation loss where there is one) and ``fid.png``
    (one row per sampling step count, log y), each against updates, network evaluations and wall time."""
    runs = [r for g in groups for r in g.runs]
    loss_rows = [(k, (lambda key: lambda r: r.series(key))(k), False)
                 for k in ("train/loss", "val/loss") if any(r.series(k) for r in runs)]
    ks = sorted(set().union(*(r.sampling_steps() for r in runs)))
    fid_rows = [(f"FID, {k} step{'s' if k > 1 else ''}", (lambda k: lambda r: r.fid_series(k))(k), True) for k in ks]
    written = [plot_curves(groups, loss_rows, out / PLOTS[0]), plot_curves(groups, fid_rows, out / PLOTS[1])]
    return [p for p in written if p is not None]


def plot_fid_vs_nfe(rows: Sequence[dict], path: Path, steps: int = 4, colors: Optional[dict[str, Any]] = None,
                    title: Optional[str] = None, reference: str = "teacher", reference_label: Optional[str] = None,
                    feature_net: str = "digits") -> Optional[Path]:
    """A benchmark's FID at ``steps`` sampling steps of every checkpoint against the cumulative
    network evaluations spent up to it (log x, log y: a collapsed run sits orders of magnitude above
    the rest), one line per method (the mean over seeds at each count), and the ``reference``
    method's FID at ``steps`` as a dashed line. ``rows`` are benchmark rows (docs/architecture.md,
    Benchmarks: ``method``, ``steps``, ``nfe``, ``fid``; ``curve`` rows and ``floor`` are left out).
    None (nothing written) when no row has network evaluations."""
    pts: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        if r.get("steps") != steps or r.get("curve") or r.get("method") in ("floor", reference):
            continue
        if r.get("nfe") and r.get("fid") is not None:
            pts.setdefault(r["method"], {}).setdefault(float(r["nfe"]), []).append(float(r["fid"]))
    if not pts:
        return None
    colors = colors or {}
    default = _colors(len(pts))
    curves = []
    for i, (m, d) in enumerate(pts.items()):
        xy = sorted((x, statistics.fmean(v)) for x, v in d.items())
        curves.append(Curve(m, [x for x, _ in xy], [y for _, y in xy], None, colors.get(m, default[i])))
    ref = [float(r["fid"]) for r in rows if r.get("method") == reference and r.get("steps") == steps
           and r.get("fid") is not None]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.2))
    draw_curves(ax, curves, "cumulative network evaluations (log)", f"{feature_net}-FID (log)", logx=True, logy=True,
                reference=(reference_label or f"{reference} (dashed)", statistics.fmean(ref)) if ref else None)
    ax.set_title(title or f"{feature_net}-FID (log) at {steps} steps vs training nfe", loc="left", fontsize="medium")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize="small")
    fig.tight_layout()
    return _save(fig, path, dpi=100)


# --------------------------------------------------------------------------- 6. the page
CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img.plot { max-width: 100%; }
img.grid { image-rendering: pixelated; max-width: 360px; }
code { font-size: 0.9em; }
"""


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def html_page(groups: Sequence[Group], table: Table, plots: Sequence[Path]) -> str:
    e = html.escape
    runs = [r for g in groups for r in g.runs]
    parts = [f"<!doctype html>\n<html><head><meta charset='utf-8'><title>distill-report</title>"
             f"<style>{CSS}</style></head><body>",
             "<h1>distill-report</h1>",
             f"<p>{len(runs)} run{'s' * (len(runs) != 1)} in {len(groups)} group{'s' * (len(groups) != 1)} "
             f"(runs whose configs differ only in <code>seed</code> and in the keys that may change on resume "
             f"form one group: mean ± std over its runs, n runs); written {e(dt.datetime.now().isoformat(' ', 'seconds'))}.</p>",
             "<h2>Final metrics</h2>", _html_table(table)]
    if plots:
        parts.append("<h2>Curves</h2>")
        parts += [f"<p><img class='plot' alt='{e(p.stem)}' src='{data_uri(p)}'></p>" for p in plots]
    with_grids = [(g, r) for g in groups for r in g.runs if r.grids]
    if with_grids:
        ks = sorted({k for _, r in with_grids for k in r.grids})
        parts.append("<h2>Samples</h2><p>Each run's latest sample grids (<code>samples/</code>), by sampling "
                     "step count.</p><table><tr><th>run</th>"
                     + "".join(f"<th>{k} step{'s' * (k > 1)}</th>" for k in ks) + "</tr>")
        for g, r in with_grids:
            cells = "".join(f"<td><img class='grid' alt='{e(g.label)}, seed {r.seed}, {k} step{'s' * (k > 1)}' "
                            f"src='{data_uri(r.grids[k])}'></td>" if k in r.grids else "<td></td>" for k in ks)
            parts.append(f"<tr><td title='{e(str(r.path))}'>{e(g.label)}<br>seed {e(str(r.seed))}, "
                         f"update {r.grid_step}</td>{cells}</tr>")
        parts.append("</table>")
    columns = table.columns
    parts.append("<h2>Runs</h2><table><tr><th>run dir</th><th>group</th><th>seed</th><th>status</th>"
                 + "".join(f"<th>{e(c)}</th>" for c in columns) + "</tr>")
    for g in groups:
        for r in g.runs:
            final = r.final()
            parts.append(f"<tr><td><code>{e(str(r.path))}</code></td><td>{e(g.label)}</td><td>{e(str(r.seed))}</td>"
                         f"<td>{e(r.status)}</td>" + "".join(f"<td>{fmt(final.get(c))}</td>" for c in columns) + "</tr>")
    parts.append("</table></body></html>\n")
    return "\n".join(parts)


def _html_table(table: Table) -> str:
    e = html.escape
    out = ["<table><tr><th>run</th><th>n</th>" + "".join(f"<th>{e(c)}</th>" for c in table.columns) + "</tr>"]
    for row in table.rows:
        cells = []
        for c in table.columns:
            mean, std, count = row[c]
            cells.append(f"<td>{e(fmt(mean, std))}" + (f" (n={count})" if 0 < count < row["n"] else "") + "</td>")
        title = e("seeds " + " ".join(map(str, row["seeds"])) + "\n" + "\n".join(row["runs"]))
        out.append(f"<tr><td title='{title}'>{e(row['label'])}</td><td>{row['n']}</td>{''.join(cells)}</tr>")
    out.append("</table>")
    return "\n".join(out)


def write_report(runs: Sequence[Run], out: Path) -> dict[str, Path]:
    """Group ``runs``, write the table, the plots and the page into ``out``; returns what was written."""
    groups = group_runs(runs)
    table = summary_table(groups)
    out.mkdir(parents=True, exist_ok=True)
    for stale in PLOTS:  # an earlier report's plot that this one does not draw would linger beside it
        (out / stale).unlink(missing_ok=True)
    written = {"md": out / "report.md", "csv": out / "report.csv", "runs_csv": out / "runs.csv"}
    written["md"].write_text(markdown_table(table) + "\n")
    write_table_csv(table, written["csv"])
    write_runs_csv(groups, table.columns, written["runs_csv"])
    plots = plot_report(groups, out)
    written.update({p.stem: p for p in plots})
    written["html"] = out / "report.html"
    written["html"].write_text(html_page(groups, table, plots))
    return written


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(
        prog="distill-report",
        description="Compare runs: a table of their final metrics (mean ± std over runs that differ only by seed), "
                    "plots of loss and FID against updates, network evaluations and wall time, and the sample "
                    "grids, as one self-contained HTML page (and PNGs, report.md, report.csv) in --out.")
    ap.add_argument("paths", nargs="+", metavar="PATH",
                    help="run dirs, folders to search below for run dirs (a sweep's runs_dir/experiment_name), "
                         "or globs of either")
    ap.add_argument("-o", "--out", default="report", help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        runs = [load_run(d) for d in find_run_dirs(args.paths)]
        written = write_report(runs, Path(args.out))
    except DistillError as e:
        print(f"distill-report: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # --out is a file, or not writable
        print(f"distill-report: error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    print(written["md"].read_text(), end="")
    print(f"\n{len(runs)} runs; wrote {written['html']} (and {', '.join(p.name for k, p in written.items() if k != 'html')})")


# --------------------------------------------------------------------------- the end of a sweep
def sweep_run_dirs(overrides: Sequence[str]) -> Optional[list[Path]]:
    """The run dir of every job of ``distill -m <overrides>``, as Hydra's basic sweeper expands the
    jobs and Hydra names their dirs (``hydra.sweep.dir`` / ``hydra.sweep.subdir`` of each job's
    config); None where another sweeper expands the jobs."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from distillkit.compose import register_resolvers
    from distillkit.config import register_configs

    register_configs()
    register_resolvers()
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    if any(o.get_key_element().startswith("hydra/sweeper") for o in parsed):
        return None
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    dirs = []
    before = HydraConfig.instance().cfg
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="distill"):
            for job in jobs:
                cfg = compose(config_name="config", overrides=job, return_hydra_config=True)
                HydraConfig.instance().set_config(cfg)  # the run's name resolves ${hydra:...} of its job
                dirs.append(Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir))
    finally:
        HydraConfig.instance().cfg = before
    return dirs


def print_sweep_summary(overrides: Sequence[str], file: Any = None) -> None:
    """After ``distill -m <overrides>``: the table of this sweep's runs (not of other runs in the same
    folders). A failure here is reported in one line: the sweep itself went through."""
    file = file or sys.stdout
    try:
        dirs = sweep_run_dirs(overrides)
        if dirs is None:
            return
        runs = [load_run(d) for d in dirs if is_run_dir(d)]
        if not runs:
            return
        table = markdown_table(summary_table(group_runs(runs)))
    except Exception as e:  # noqa: BLE001  (the report must not turn a finished sweep into a failure)
        print(f"distill: the sweep's summary could not be made ({type(e).__name__}: {e})", file=sys.stderr)
        return
    parents = list(dict.fromkeys(str(d.parent) for d in dirs))
    print(f"\nThe sweep's {len(runs)} runs (plots and sample grids: distill-report {' '.join(parents)}):\n\n"
          f"{table}", file=file, flush=True)


if __name__ == "__main__":
    main()
