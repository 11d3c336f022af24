"""Framework overhead per update: each method's digits experiment through `distill` against a plain loop.

    python scripts/bench_overhead.py                   # benchmarks/overhead_cpu.json + the table in docs/benchmarks.md
    python scripts/bench_overhead.py --only digits_kd  # a subset: its rows replace theirs in the JSON

What is measured (issue 29, item 9; target: at most 1.10x for every method):

- distill: `python -m distillkit.cli experiment=X runs_dir=TMP callbacks.progress=none
  trainer.max_steps=N`, one thread, everything else as a user gets it (checkpoint cadence,
  validation, logging, the non-finite check, the test at the end), at two lengths N1 < N2; the
  ms per update is (t2 - t1) / (N2 - N1), so start-up, building and the final test cancel out and
  the epoch ends, validations and checkpoints the longer run crosses are in it.
- plain: the same objects, built by distillkit from the same composed config (dataset, networks,
  method with its optimizer, LR schedule and EMA), driven by a bare `for` loop over a torch
  DataLoader of the same training split and batch size: the method's own `training_step` (its
  maths), then backward, gradient clipping where configured, optimizer and LR-schedule step and
  the EMA update (multi-role methods, DMD2, do all of that inside `training_step`). Lightning is
  replaced by a stub that holds the update count and the optimizers; `self.log` does nothing.
  Timed the same way, at the same two lengths, each length in a fresh process.

The runs alternate (distill N1, distill N2, plain N1, plain N2, repeated) and the medians are taken,
as the machine is shared. The ratio is of CPU time (the process's user + system time; one thread and
no loader workers, so it equals the wall time on an idle machine), which other jobs on the machine
do not inflate; the wall-time figures are kept alongside (`*_wall`). Teachers are trained first with a few updates, as `name=default`, where
the students' configs look for them.
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import resource
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

NAME = "overhead_cpu"
TARGET = 1.10
TEACHERS = {"digits_teacher": ["digits_kd", "digits_dkd", "digits_fitnet"],
            "digits_diffusion_teacher": ["digits_progressive", "digits_dsdi", "digits_tsd", "digits_dmd2",
                                         "digits_consistency"]}
EXPERIMENTS = ["digits_diffusion_teacher", "digits_progressive", "digits_dsdi", "digits_tsd", "digits_kd",
               "digits_dkd", "digits_fitnet", "digits_dmd2", "digits_consistency"]
# updates (generator updates for DMD2, each 5 batches) of the short and the long run: both cross several
# digits epochs (21 diffusion / 4 classifier updates) and checkpoint intervals
LENGTHS = {"digits_dmd2": (5, 20)}
DEFAULT_LENGTHS = (40, 160)


# --------------------------------------------------------------------------- the plain loop
class _Stub:
    """What the methods read of a Lightning trainer, and nothing else."""

    def __init__(self, cfg, dm, optimizers):
        self.global_step, self.current_epoch, self.global_rank, self.world_size, self.is_global_zero = 0, 0, 0, 1, True
        self.datamodule, self.optimizers, self.strategy, self.training = dm, optimizers, self, False
        self.max_epochs, self.max_steps = cfg.trainer.max_epochs, cfg.trainer.max_steps
        self.limit_train_batches, self.accumulate_grad_batches = cfg.trainer.limit_train_batches, 1

    def optimizer_step(self, optimizer, closure=None, model=None):
        return optimizer.step()


class _Opt:
    """A LightningOptimizer's surface: ``.optimizer``, ``step``, ``zero_grad``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def step(self):
        self.optimizer.step()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


def build(experiment: str, runs_dir: str, max_steps: int):
    """The dataset, method (student, teacher, optimizer, schedule, EMA) and clip value as `distill` builds them."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from distillkit import cli
    from distillkit.compose import register_resolvers
    from distillkit.config import register_configs
    from distillkit.models.loading import build_model, build_teacher

    register_configs()
    register_resolvers()
    overrides = [f"experiment={experiment}", f"runs_dir={runs_dir}", f"trainer.max_steps={max_steps}"]
    with initialize_config_dir(config_dir=cli.CONF_DIR, version_base="1.3", job_name="distill"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    torch.set_num_threads(int(cfg.trainer.cpu_threads or 1))
    torch.manual_seed(cfg.seed)
    dm = cli.build(cfg.dataset, "dataset", seed=cfg.seed, _convert_="all")
    cli.setup_data(dm)
    roles = cli.multi_role_settings(cfg)
    method = cli.build(
        cfg.method, "method", student=build_model(cfg.model, key="model"), teacher=build_teacher(cfg.teacher),
        optim_cfg=OmegaConf.to_container(cfg.optim, resolve=True),
        ema_cfg=OmegaConf.to_container(cfg.callbacks.ema, resolve=True), **roles,
        schedule_cfg=OmegaConf.to_container(cfg.schedule, resolve=True, enum_to_str=True),
        input_shape=tuple(dm.image_shape), num_classes=dm.num_classes, _recursive_=False, _convert_="all")
    return cfg, dm, method, cli.gradient_clip(cfg)


def plain_run(experiment: str, runs_dir: str, updates: int) -> dict:
    """Wall and CPU seconds of `updates` updates in a bare loop (building excluded; the caller subtracts two lengths anyway)."""
    import torch
    from torch.utils.data import DataLoader

    cfg, dm, method, clip = build(experiment, runs_dir, updates)
    stub = _Stub(cfg, dm, [])
    method._trainer = stub
    method.log = lambda *a, **k: None
    method.train()
    opt_cfg = method.configure_optimizers()
    if isinstance(opt_cfg, tuple):  # multi-role: ([optimizers], [{"scheduler": ...}])
        opts, scheds = opt_cfg[0], [s["scheduler"] for s in opt_cfg[1]]
    elif isinstance(opt_cfg, dict):
        opts, scheds = [opt_cfg["optimizer"]], [opt_cfg["lr_scheduler"]["scheduler"]]
    else:
        opts, scheds = [opt_cfg], []
    stub.optimizers = opts
    manual = not method.automatic_optimization
    if manual:  # the multi-role update (methods/roles.py) calls these on the module
        method.optimizers = lambda: [_Opt(o) for o in opts]
        method.lr_schedulers = lambda: scheds
        method.manual_backward = lambda loss, *a, **k: loss.backward()
        method.clip_gradients = lambda opt, gradient_clip_val, **k: torch.nn.utils.clip_grad_norm_(
            [p for g in opt.param_groups for p in g["params"]], gradient_clip_val)
    method.on_fit_start()
    loader = DataLoader(dm.train_set, batch_size=dm.batch_size, shuffle=True, drop_last=True)
    t0, c0 = time.perf_counter(), time.process_time()
    for stub.current_epoch in itertools.count():
        for i, batch in enumerate(loader):
            method.on_train_batch_start(batch, i)
            loss = method.training_step(batch, i)
            if manual:
                stub.global_step = method.updates_of(method.generator_role)
            else:
                opts[0].zero_grad(set_to_none=True)
                loss.backward()
                if clip:
                    torch.nn.utils.clip_grad_norm_(method.trainable_parameters(), float(clip))
                opts[0].step()
                for s in scheds:
                    s.step()
                method.update_ema()
                stub.global_step += 1
            if stub.global_step >= updates:
                break
        if stub.global_step >= updates:
            break
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}


# --------------------------------------------------------------------------- the driver
def cpu_of_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], env: dict) -> dict:
    """Wall and CPU seconds of one process, or, with --plain, of its loop alone."""
    t0, c0 = time.perf_counter(), cpu_of_children()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = {"wall": time.perf_counter() - t0, "cpu": cpu_of_children() - c0}
    if p.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]) if "--plain" in cmd else seconds


def distill_cmd(experiment: str, runs: str, updates: int, name: str) -> list[str]:
    return [sys.executable, "-m", "distillkit.cli", f"experiment={experiment}", f"runs_dir={runs}",
            "callbacks.progress=none", f"trainer.max_steps={updates}", f"name={name}"]


def plain_cmd(experiment: str, runs: str, updates: int) -> list[str]:
    # the loop's own time: a fresh process per length, as for distill
    return [sys.executable, __file__, "--plain", experiment, "--runs", runs, "--updates", str(updates)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="these experiments (their teachers are trained too)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / f"{NAME}.json")
    ap.add_argument("--plain", help=argparse.SUPPRESS)
    ap.add_argument("--runs", help=argparse.SUPPRESS)
    ap.add_argument("--updates", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plain:
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(plain_run(args.plain, args.runs, args.updates)))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    chosen = [e for e in EXPERIMENTS if not args.only or e in args.only]
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as runs:
        for teacher, students in TEACHERS.items():  # a few updates: the students need a checkpoint, not a good one
            if any(s in chosen for s in students):
                timed(distill_cmd(teacher, runs, 20, "default"), env)
        for exp in chosen:
            n1, n2 = LENGTHS.get(exp, DEFAULT_LENGTHS)
            times: dict[tuple[str, int], list[dict]] = {}
            for rep in range(args.repeats):
                for n in (n1, n2):  # each run in a fresh run dir of its own, so none resumes another
                    times.setdefault(("distill", n), []).append(timed(distill_cmd(exp, runs, n, f"r{rep}n{n}"), env))
                for n in (n1, n2):
                    times.setdefault(("plain", n), []).append(timed(plain_cmd(exp, runs, n), env))
            row: dict = {"experiment": exp, "updates": [n1, n2], "repeats": args.repeats}
            for clock in ("cpu", "wall"):
                med = {k: statistics.median(t[clock] for t in v) for k, v in times.items()}
                ms = {how: 1000 * (med[(how, n2)] - med[(how, n1)]) / (n2 - n1) for how in ("distill", "plain")}
                suffix = "" if clock == "cpu" else "_wall"
                row.update({f"ms_per_update_distill{suffix}": round(ms["distill"], 1),
                            f"ms_per_update_plain{suffix}": round(ms["plain"], 1),
                            f"ratio{suffix}": round(ms["distill"] / ms["plain"], 3)})
            print(f"{exp:28s} distill {row['ms_per_update_distill']:7.1f} ms  plain {row['ms_per_update_plain']:7.1f} ms"
                  f"  {row['ratio']:.2f}x (CPU time; wall {row['ratio_wall']:.2f}x)", flush=True)
            write(args.out, row)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_tables.py"), NAME], cwd=ROOT, check=True)


def write(out: Path, row: dict) -> None:
    """Each experiment's row as soon as it is measured, replacing that experiment's earlier row
    (a run with --only updates its rows and keeps the others)."""
    from bench_kd_digits import machine

    old = json.loads(out.read_text()) if out.is_file() else {}
    rows = [r for r in old.get("rows", []) if r["experiment"] != row["experiment"]] + [row]
    rows.sort(key=lambda r: EXPERIMENTS.index(r["experiment"]) if r["experiment"] in EXPERIMENTS else len(EXPERIMENTS))
    command = "python scripts/bench_overhead.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "")
    commands = [c for c in old.get("command", "").split("; ") if c and c != command] + [command]
    over = [r["experiment"] for r in rows if r["ratio"] > TARGET]
    verdict = [f"Target: at most {TARGET:.2f}x for every method; "
               + (f"above it: {', '.join(over)}." if over else "all measured within it.")]
    bench = {"name": NAME, "machine": machine(), "date": dt.date.today().isoformat(), "command": "; ".join(commands),
             "rows": rows, "verdict": verdict}
    out.write_text(json.dumps(bench, indent=1) + "\n")


if __name__ == "__main__":
    main()
