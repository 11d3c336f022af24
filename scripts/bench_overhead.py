"""Framework overhead per update: each method's digits experiment through `distill` against a plain loop.

    python scripts/bench_overhead.py                   # benchmarks/overhead_cpu.json + the table in docs/benchmarks.md
    python scripts/bench_overhead.py --only digits_kd  # a subset: its rows replace theirs in the JSON

What is measured (issue 29, item 9; target: at most 1.10x for every method):

- distill: `python -m distillkit.cli experiment=X runs_dir=TMP callbacks.progress=none
  trainer.max_steps=N2`, one thread, everything else as a user gets it (checkpoint cadence,
  validation, logging, the non-finite check). The ms per update is read inside the run: the
  difference of metrics.csv's `wall_s` at its first row at or after update N1 and its last at or
  before N2 (the loggers write every `trainer.log_every_n_steps`), over the updates between. Start-up, building, the
  final checkpoint and test fall outside, and the epoch ends, validations and checkpoints between N1
  and N2 are in it. (Timing whole processes at two lengths, as this script first did, left the
  answer to the noise of two ~10 s start-ups: a 120-update difference of ~1 s moved by 30%.)
- plain: the same objects, built by distillkit from the same composed config (dataset, networks,
  method with its optimizer, LR schedule and EMA), driven by a bare `for` loop over a torch
  DataLoader of the same training split and batch size: the method's own `training_step` (its
  maths), then backward, gradient clipping where configured, optimizer and LR-schedule step and
  the EMA update (multi-role methods, DMD2, do all of that inside `training_step`). At the end of
  the epochs where the run validates (`trainer.check_val_every_n_epoch`) it runs the method's own
  `validation_step` over the same validation loader, in eval mode without gradients: the run's
  validation maths, so that the ratio prices the framework, not the computing of the validation
  numbers (Lightning's evaluation loop around them counts as overhead). Lightning is replaced by a
  stub that holds the update count and the optimizers; `self.log` does nothing. Timed the same
  way: the clock at updates N1 and N2 of one run.

The runs come in pairs, one of each, their order alternating from pair to pair (distill first,
then plain first), and the ratio is the median over the pairs of each pair's distill / plain. This
machine's speed drifts by 10-20% over minutes, the same on both sides (a plain loop run six times
in a row took 5.2 to 7.6 ms an update): the two runs of a pair see the same state, so each pair's
ratio cancels the drift that the ratio of the two sides' medians keeps (also reported,
``ratio_of_medians``). The clock is the wall clock (one thread, no loader workers): run it on an
otherwise idle machine. Teachers are trained first with a few updates, as `name=default`, where the students'
configs look for them.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dmd_digits import PAIRS  # noqa: E402

NAME = "overhead_cpu"
TARGET = 1.10
TEACHERS = {"digits_teacher": ["digits_kd", "digits_dkd", "digits_fitnet"],
            "digits_diffusion_teacher": ["digits_progressive", "digits_dsdi", "digits_tsd", "digits_dmd", "digits_dmd2",
                                         "digits_consistency"],
            "digits_cond_teacher": ["digits_cond_lcm"]}
EXPERIMENTS = ["digits_diffusion_teacher", "digits_progressive", "digits_dsdi", "digits_tsd", "digits_kd",
               "digits_dkd", "digits_fitnet", "digits_dmd", "digits_dmd2", "digits_consistency", "digits_cond_lcm"]
# updates (generator updates for DMD2, each 5 batches) of the short and the long run: both cross several
# digits epochs (21 diffusion / 4 classifier updates) and checkpoint intervals
# The classifier updates take ~7 ms: 350 of them (their whole 100-epoch runs from the first metrics row
# after 40 updates, the experiments writing one every 50) give a window of ~2.5 s, where 120 gave ~1 s and
# left the ratio to the noise of a few milliseconds.
LENGTHS = {"digits_dmd2": (10, 30), "digits_kd": (50, 400), "digits_dkd": (50, 400), "digits_fitnet": (50, 400)}
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


def plain_run(experiment: str, runs_dir: str, updates: int, first: int) -> dict:
    """Wall-clock seconds of updates ``first + 1`` to ``updates`` in a bare loop."""
    import torch
    from torch.utils.data import DataLoader

    cfg, dm, method, clip = build(experiment, runs_dir, updates)
    validate_every = int(cfg.trainer.check_val_every_n_epoch)
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
    # as `distill` trains (cli.heap_frozen): this process imported and built the same libraries, a
    # heap that a plain script's garbage collector would not walk
    gc.freeze()
    t_first = None
    for stub.current_epoch in itertools.count():
        if stub.current_epoch and stub.current_epoch % validate_every == 0:  # Lightning's epoch-end validation
            validate(method, dm, cfg.trainer.limit_val_batches)
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
            if stub.global_step == first and t_first is None:
                t_first = time.perf_counter()
            if stub.global_step >= updates:
                break
        if stub.global_step >= updates:
            break
    return {"wall": time.perf_counter() - t_first}


def validate(method, dm, limit) -> None:
    """The method's validation maths over the validation loader (``limit``: trainer.limit_val_batches,
    a count or a fraction), in eval mode without gradients, its logging a no-op."""
    import torch
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if limit == 0 or not is_overridden("validation_step", method):
        return
    loader = dm.val_dataloader()
    n = len(loader) if limit is None else (min(len(loader), limit) if isinstance(limit, int) else int(len(loader) * float(limit)))
    method.eval()
    with torch.no_grad():
        for i, batch in zip(range(n), loader):
            method.validation_step(batch, i)
    method.train()


# --------------------------------------------------------------------------- the driver
CPU: set[int] | None = None  # --cpu: the one core every timed process is pinned to


def run(cmd: list[str], env: dict) -> str:
    pin = (lambda: os.sched_setaffinity(0, CPU)) if CPU else None
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, preexec_fn=pin)
    if p.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    return p.stdout


def distill_ms(experiment: str, runs: str, n1: int, n2: int, name: str, env: dict, *overrides: str) -> float:
    """ms per update between updates n1 and n2 of one `distill` run (:func:`ms_between`)."""
    run([sys.executable, "-m", "distillkit.cli", f"experiment={experiment}", f"runs_dir={runs}",
         "callbacks.progress=none", f"trainer.max_steps={n2}", f"name={name}", *overrides], env)
    return ms_between(Path(runs) / experiment / name / "metrics.csv", n1, n2)


def ms_between(metrics_csv: Path, n1: int, n2: int) -> float:
    """ms per update from a run's metrics.csv's wall_s: between its first row at or after update n1
    and its last at or before n2 (DMD2's rows fall on the generator updates its logging batches
    end, not on multiples of 10)."""
    import csv

    wall: dict[int, float] = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get("wall_s") and row.get("step") and n1 <= int(float(row["step"])) <= n2:
                wall.setdefault(int(float(row["step"])), float(row["wall_s"]))
    if len(wall) < 2:
        raise SystemExit(f"{metrics_csv}: fewer than two rows with wall_s between steps {n1} and {n2}")
    a, b = min(wall), max(wall)
    return 1000 * (wall[b] - wall[a]) / (b - a)


def plain_ms(experiment: str, runs: str, n1: int, n2: int, env: dict) -> float:
    out = run([sys.executable, __file__, "--plain", experiment, "--runs", runs, "--updates", str(n2),
               "--first", str(n1)], env)
    return 1000 * json.loads(out.strip().splitlines()[-1])["wall"] / (n2 - n1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="these experiments (their teachers are trained too)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / f"{NAME}.json")
    ap.add_argument("--cpu", type=int, help="pin every timed process to this core (both sides on the same one: "
                    "no migrations between cores, whose caches and clocks differ)")
    ap.add_argument("--plain", help=argparse.SUPPRESS)
    ap.add_argument("--runs", help=argparse.SUPPRESS)
    ap.add_argument("--updates", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plain:
        import warnings

        warnings.filterwarnings("ignore")
        print(json.dumps(plain_run(args.plain, args.runs, args.updates, args.first)))
        return
    global CPU
    CPU = None if args.cpu is None else {args.cpu}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    chosen = [e for e in EXPERIMENTS if not args.only or e in args.only]
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as runs:
        for teacher, students in TEACHERS.items():  # a few updates: the students need a checkpoint, not a good one
            if any(s in chosen for s in students):
                run([sys.executable, "-m", "distillkit.cli", f"experiment={teacher}", f"runs_dir={runs}",
                     "callbacks.progress=none", "trainer.max_steps=20", "name=default"], env)
        if "digits_dmd" in chosen:  # DMD's regression pairs, where its config looks for them (a few suffice)
            teacher, pairs = PAIRS["digits_dmd"]
            run([sys.executable, "-m", "distillkit.pairs", f"checkpoint={runs}/{teacher}/default/last.ckpt",
                 "num_pairs=256", "steps=8", f"out={runs}/{pairs}"], env)
        for exp in chosen:
            n1, n2 = LENGTHS.get(exp, DEFAULT_LENGTHS)
            ms: dict[str, list[float]] = {"distill": [], "plain": []}
            for rep in range(args.repeats):  # each distill run in a fresh run dir of its own, so none resumes another
                timed = {"distill": lambda: distill_ms(exp, runs, n1, n2, f"r{rep}", env),
                         "plain": lambda: plain_ms(exp, runs, n1, n2, env)}
                for side in (("distill", "plain") if rep % 2 == 0 else ("plain", "distill")):
                    ms[side].append(timed[side]())
            row = overhead_row(exp, (n1, n2), args.repeats, args.cpu, ms)
            print(f"{exp:28s} distill {row['ms_per_update_distill']:7.2f} ms  plain {row['ms_per_update_plain']:7.2f} ms"
                  f"  {row['ratio']:.2f}x", flush=True)
            write(args.out, row)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_tables.py"), NAME], cwd=ROOT, check=True)


def overhead_row(exp: str, updates: tuple[int, int], repeats: int, cpu: Optional[int], ms: dict[str, list[float]]) -> dict:
    """One experiment's row: each side's median ms per update, and the ratio, the median of the
    pairs' ratios (run i of each side form pair i; see the module docstring)."""
    med = {k: statistics.median(v) for k, v in ms.items()}
    pairs = [d / p for d, p in zip(ms["distill"], ms["plain"])]
    return {"experiment": exp, "updates": list(updates), "repeats": repeats, "cpu": cpu,
            "ms_per_update_distill": round(med["distill"], 2), "ms_per_update_plain": round(med["plain"], 2),
            "ratio": round(statistics.median(pairs), 3), "ratio_of_medians": round(med["distill"] / med["plain"], 3),
            "pair_ratios": [round(r, 3) for r in pairs],
            "runs_ms_distill": [round(v, 2) for v in ms["distill"]], "runs_ms_plain": [round(v, 2) for v in ms["plain"]]}


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
