"""Classifier distillation on the embedded digits set: teacher, student alone, KD, DKD, FitNet.

    python scripts/bench_kd_digits.py --seeds 3          # benchmarks/kd_digits.json + README table
    python scripts/bench_kd_digits.py --quick            # 1 seed, short schedule (make demo)

Every run is one ``distill experiment=digits_<method> seed=<s> runs_dir=<runs-dir>``
subprocess, so the benchmark measures exactly what a user's command does. The recipe (student
width, data fraction, schedule) lives in conf/experiment/digits_*.yaml, not here. The teacher
(experiment=digits_teacher, seed 0) is trained once and shared by every seed. The full run
also trains the student alone for twice the epochs, a check that the baseline has converged.

Resumable: a run whose results.json exists is read, not re-run (a run killed half-way
resumes from its last.ckpt, which the CLI does by itself). Relative paths are taken from the
repository root. Writes the benchmark JSON of docs/architecture.md, Benchmarks (rows per method
and seed, plus a summary) and regenerates the README table (scripts/readme_tables.py).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# (row method name, experiment); method names are the `method=` options, "student" the
# student trained without a teacher (docs/architecture.md, Benchmarks).
METHODS = [("student", "digits_student"), ("kd", "digits_kd"), ("dkd", "digits_dkd"),
           ("fitnet", "digits_fitnet")]
QUICK_EPOCHS = 50  # half the schedule: at 30 epochs KD/DKD had not caught up with CE (see the report)
# Overrides of every run that change neither the result's meaning nor the run dir's name:
# digits nets are tiny, so one CPU thread and no GPU (same numbers on any machine).
COMMON = ["trainer.accelerator=cpu", "trainer.cpu_threads=1", "callbacks.progress=none"]


# --------------------------------------------------------------------------- summary
def summarise(rows: Iterable[dict], metric: str = "test_acc",
              group_keys: tuple[str, ...] = ("method", "epochs")) -> list[dict]:
    """One entry per group of rows (first-seen order): mean and sample std of ``metric``
    (std None for a single run), n, mean wall time and the updates. Rows with a
    ``source`` (paper reference values) are skipped."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "source" in r or r.get(metric) is None:
            continue
        groups.setdefault(tuple(r.get(k) for k in group_keys), []).append(r)
    out = []
    for key, rs in groups.items():
        vals = [float(r[metric]) for r in rs]
        entry = {k: v for k, v in zip(group_keys, key) if v is not None}
        updates = sorted({r.get("updates") for r in rs})
        entry.update({
            f"{metric}_mean": statistics.fmean(vals),
            f"{metric}_std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals),
            "wall_s_mean": statistics.fmean(float(r["wall_s"]) for r in rs) if all("wall_s" in r for r in rs) else None,
            "updates": updates[0] if len(updates) == 1 else updates,
        })
        if any("note" in r for r in rs):
            entry["note"] = rs[0]["note"]
        out.append(entry)
    return out


# --------------------------------------------------------------------------- machine
def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "?"
    return f"{model}, {cores} cores, torch {torch_version}"


# --------------------------------------------------------------------------- runs
COMPARED = ("model", "teacher", "method", "schedule", "optim", "critic_optim", "dataset", "eval", "callbacks", "seed")


def config_drift(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between a run's saved config and the one a command composes
    now, among the keys both have (a key added to a schema since the run is not a difference)."""
    out: list[str] = []
    for k in saved.keys() & now.keys():
        a, b = saved[k], now[k]
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_drift(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return sorted(out)


class Runner:
    """Runs (or reuses) one ``distill`` command and returns its results.json. A finished run is
    reused only if its config.yaml agrees with what the command composes now (:func:`config_drift`
    over COMPARED): a run dir named by the overrides alone would otherwise hand back a run of an
    earlier default (a recipe's changed value is left out of the name like any default)."""

    def __init__(self, runs_dir: Path):
        from hydra import compose, initialize_config_dir

        from distillkit.cli import CONF_DIR, register_resolvers
        from distillkit.config import register_configs

        register_configs()
        register_resolvers()
        self.runs_dir = runs_dir
        self._compose, self._init = compose, initialize_config_dir
        self._conf_dir = CONF_DIR

    def _plan(self, overrides: list[str]) -> tuple[Path, tuple[str, int], dict]:
        """(run dir, (results key, value) that a finished run has, the COMPARED sections resolved)
        for these overrides."""
        from omegaconf import OmegaConf

        from distillkit.compose import run_name_for

        with self._init(config_dir=self._conf_dir, version_base="1.3", job_name="distill"):
            cfg = self._compose("config", overrides=overrides, return_hydra_config=True)
            explicit = [o.split("=", 1)[1].strip("'\"") for o in overrides if o.startswith("name=")]
            # the CLI's own naming (the name resolver of conf/config.yaml), from the config just composed;
            # the resolver is handed hydra.overrides.task with its interpolations resolved
            # ('method.pairs=${runs_dir}/p.safetensors' is named by the path it resolves to)
            task = [str(o) for o in OmegaConf.to_container(cfg.hydra.overrides.task, resolve=True)]
            name = explicit[0] if explicit else run_name_for(
                task, list(cfg.hydra.job.config.override_dirname.exclude_keys), cfg)
            sections = {}
            for k in COMPARED:
                try:
                    v = cfg.get(k)
                    sections[k] = OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                except Exception:  # an interpolation only the CLI resolves: not compared
                    pass
        done = ("global_step", int(cfg.trainer.max_steps)) if int(cfg.trainer.max_steps) > 0 \
            else ("epoch", int(cfg.trainer.max_epochs))
        return self.runs_dir / cfg.experiment_name / name, done, sections

    def __call__(self, overrides: list[str]) -> dict:
        overrides = [*overrides, f"runs_dir={self.runs_dir}", *COMMON]
        run_dir, (key, want), sections = self._plan(overrides)
        results = run_dir / "results.json"
        if (run_dir / "config.yaml").is_file():
            import yaml

            saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
            drift = config_drift({k: saved[k] for k in sections if k in saved}, sections)
            if drift:
                sys.exit(f"{run_dir} holds a run of another configuration ({', '.join(drift[:5])} differ from what "
                         f"{shlex.join(overrides[:4])} composes now): delete it or use another --runs-dir")
        if results.is_file():
            res = json.loads(results.read_text())
            if int(res.get(key, -1)) > want:
                sys.exit(f"{run_dir} holds a run with {key}={res.get(key)}, this benchmark wants "
                         f"{want}: delete it or use another --runs-dir")
            if int(res.get(key, -1)) == want:
                res["cached"] = True
                return res
            # a shorter finished run: the same command with a larger limit resumes and extends it
        cmd = [sys.executable, "-m", "distillkit.cli", *overrides]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            try:
                stdout, stderr = proc.communicate()
            except KeyboardInterrupt:  # Ctrl-C reached the run too: let it write last.ckpt (subprocess.run kills it)
                proc.communicate()
                raise
        if proc.returncode != 0 or not results.is_file():
            sys.stderr.write(stdout[-3000:] + stderr[-3000:])
            sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}")
        return json.loads(results.read_text())


def row(method: str, seed: int, res: dict, epochs: Optional[int] = None) -> dict:
    r = {"method": method, "seed": seed, "test_acc": res["test/acc"], "val_acc": res["val/acc"],
         "wall_s": res["wall_s"], "updates": res["global_step"], "epochs": epochs or res.get("epoch")}
    return r


def _print_row(r: dict, cached: bool) -> None:
    print(f"  {r['method']:8s} seed {r['seed']}  epochs {r['epochs']:4d}  test {100 * r['test_acc']:6.2f}  "
          f"val {100 * r['val_acc']:6.2f}  updates {r['updates']:5d}  wall {r['wall_s']:6.1f}s"
          + ("  (cached)" if cached else ""), flush=True)


def verdict(summary: list[dict]) -> list[str]:
    """Each distillation method against the student alone, in units of their stds."""
    by = {(s["method"], s.get("note")): s for s in summary}
    base = by.get(("student", None))
    lines = []
    if not base:
        return lines
    for m in ("kd", "dkd", "fitnet"):
        s = by.get((m, None))
        if not s:
            continue
        d = s["test_acc_mean"] - base["test_acc_mean"]
        stds = [x for x in (s["test_acc_std"], base["test_acc_std"]) if x is not None]
        bar = max(stds) if stds else None
        if bar is None:
            judged = "(one seed: no std)"
        else:
            judged = "beats student alone by more than one std" if d > bar else "does NOT beat student alone by more than one std"
        lines.append(f"{m}: {100 * d:+.2f} points vs student alone; {judged}"
                     + (f" (larger std {100 * bar:.2f})" if bar is not None else ""))
    return lines


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per method (default 3)")
    ap.add_argument("--runs-dir", default="runs/bench_kd_digits", help="where the runs go (default %(default)s)")
    ap.add_argument("--quick", action="store_true",
                    help=f"1 seed, students for {QUICK_EPOCHS} epochs, no convergence check, no README update")
    ap.add_argument("--out", default="benchmarks/kd_digits.json", help="the JSON to write (default %(default)s)")
    args = ap.parse_args(argv)
    command = shlex.join(["python", os.path.relpath(__file__, ROOT) if Path(__file__).is_absolute() else __file__,
                          *(sys.argv[1:] if argv is None else argv)])
    runs_dir = (ROOT / args.runs_dir).resolve()
    out = (ROOT / args.out).resolve()
    seeds = range(1 if args.quick else args.seeds)
    name = "kd_digits_quick" if args.quick else "kd_digits"
    t0 = time.time()

    run = Runner(runs_dir)
    rows = []
    print(f"{name}: runs in {runs_dir}", flush=True)
    res = run(["experiment=digits_teacher"])  # seed 0 (the default), run dir .../default
    rows.append(row("teacher", 0, res))
    _print_row(rows[-1], res.get("cached", False))
    extra = [f"trainer.max_epochs={QUICK_EPOCHS}"] if args.quick else []
    for seed in seeds:
        for method, experiment in METHODS:
            res = run([f"experiment={experiment}", f"seed={seed}", *extra])
            rows.append(row(method, seed, res))
            _print_row(rows[-1], res.get("cached", False))
        if not args.quick:  # the baseline must have converged: twice the epochs, same recipe
            base_epochs = rows[-len(METHODS)]["epochs"]
            long = 2 * base_epochs
            res = run(["experiment=digits_student", f"seed={seed}", f"trainer.max_epochs={long}",
                       f"name='seed={seed},max_epochs={long}'"])
            rows.append({**row("student", seed, res, long), "note": "convergence check"})
            _print_row(rows[-1], res.get("cached", False))

    bench = {"name": name, "machine": machine(), "date": dt.date.today().isoformat(), "command": command,
             "rows": rows, "summary": summarise(rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(bench, indent=1) + "\n")

    import readme_tables

    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} "
          f"({time.time() - t0:.0f} s)\n")
    print(readme_tables.render(name, bench))
    print()
    for line in verdict(bench["summary"]):
        print(line)
    if not args.quick:
        if readme_tables.update_readme(name, path=out):
            print("README.md table updated")
    return bench


if __name__ == "__main__":
    main()
