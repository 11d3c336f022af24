"""DMD and DMD2 on digits: digits-FID, IS (and class accuracy) of one- and four-step generators.

    python scripts/bench_dmd_digits.py                       # 3 seeds, benchmarks/dmd_digits.json + README table
    python scripts/bench_dmd_digits.py --seeds 0 --only dmd2_1step --updates 400   # a subset (no README update)
    python scripts/bench_dmd_digits.py --demo --runs-dir runs/demo   # make demo: DMD2 one step, seed 0, 600 updates

Trains (or reuses) the digits teachers in --runs-dir (``experiment=digits_diffusion_teacher`` and
``experiment=digits_cond_teacher``), writes DMD's regression pairs once with ``distill-pairs`` (2,000
pairs of each teacher's 64-step DDIM, the class-conditional one guided at 2), then runs each
configuration below for each seed (``experiment=digits_dmd`` / ``digits_dmd2`` / ``digits_cond_dmd`` /
``digits_cond_dmd2`` with ``seed=S`` and
``trainer.max_steps=--updates`` generator updates). A finished run is reused, so an interrupted
benchmark continues where it stopped (a run stopped mid-way resumes from its last.ckpt).

Each row is the run's own final evaluation (``eval=digits``: 700 samples of the EMA generator at its
step count, the shipped digits feature network against the training digits, the protocol of every
digits benchmark here), with the generator updates, the network evaluations spent (``nfe``, teacher,
fake score and GAN passes included, from metrics.csv) and the training wall time.

Targets (issue "DMD and DMD2"): DMD2 one-step digits-FID at or below the teacher's 64-step (2.234,
benchmarks/step_distill_digits.json); DMD (no GAN) within 1.5x of DMD2; DMD2 one-step below
progressive distillation's best one-step at equal wall time (4.870 at 6,000 updates), judged at equal
training time: each side's updates priced at its experiment's per-update time from
benchmarks/overhead_cpu.json (pinned to one core on an idle machine; evaluation left out of both).
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import readme_tables  # noqa: E402
from bench_kd_digits import Runner, machine  # noqa: E402

FOUR = ["method.timesteps=[1023,767,511,255]", "eval.steps=[4]"]
# a rank-8 adapter over the frozen teacher: experiment=digits_cond_lcm_lora's layers and lr, for the other recipes
LORA = ["model.lora_rank=8", "model.lora_target_modules=[to_q,to_k,to_v,to_out.0,conv1,conv2,conv_shortcut,"
        "downsamplers.0.conv,upsamplers.0.conv,time_emb_proj]", "optim.optimizer.lr=1e-3"]
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "dmd_1step": ("digits_dmd", []),
    "dmd2_1step": ("digits_dmd2", []),
    "dmd2_4step_backward": ("digits_dmd2", [*FOUR, "method.generator_inputs=backward"]),
    "dmd2_4step_real": ("digits_dmd2", [*FOUR, "method.generator_inputs=real"]),
    "cond_dmd2_1step": ("digits_cond_dmd2", []),
    "cond_dmd_1step": ("digits_cond_dmd", []),
    "cond_dmd2_4step_backward": ("digits_cond_dmd2", [*FOUR, "method.generator_inputs=backward"]),
    "cond_dmd2_4step_real": ("digits_cond_dmd2", [*FOUR, "method.generator_inputs=real"]),
    # probes of the one-step recipe (docs/benchmarks.md; --out benchmarks/dmd_digits_probes.json)
    "dmd2_1step_cosine_lr": ("digits_dmd2", ["optim.scheduler.name=cosine"]),  # lr 1e-4 decayed to 0
    "dmd2_1step_ema999": ("digits_dmd2", ["callbacks.ema.decay=0.999"]),  # a sampling EMA over ~1,000 updates
    "dmd2_1step_gan1e-2": ("digits_dmd2", ["method.gan_generator_weight=1e-2"]),  # the generator's GAN weight x10
    "dmd2_1step_gan3e-2": ("digits_dmd2", ["method.gan_generator_weight=3e-2"]),  # x30
    "dmd2_1step_batch128": ("digits_dmd2", ["dataset.batch_size=128"]),  # half the gradient noise of each update
    # the critic's GAN weight raised, with the generator's at 3e-2: the head of the recipe stays near chance
    # (train/gan_critic_loss ~ 2 ln 2 throughout), so the fake score's features are made to separate real from fake
    "dmd2_1step_gan_critic1e-1": ("digits_dmd2", ["method.gan_generator_weight=3e-2", "method.gan_critic_weight=1e-1"]),
    "dmd2_1step_gan_critic1": ("digits_dmd2", ["method.gan_generator_weight=3e-2", "method.gan_critic_weight=1"]),
    "dmd2_1step_ttur10": ("digits_dmd2", ["method.critic_updates_per_generator_update=10"]),  # SD1.5's ratio
    # rank-8 adapters for the generator and the fake score over the teacher's frozen base, as LCM-LoRA on the same teacher
    "dmd2_1step_lora": ("digits_dmd2", LORA),
    # the class-conditional recipe with the real score unguided, as DMD2's ImageNet students are trained
    "cond_dmd2_1step_g1": ("digits_cond_dmd2", ["method.real_guidance=1.0"]),
    # DMD's regression then needs the unguided teacher's pairs: a file of their own
    "cond_dmd_1step_g1": ("digits_cond_dmd", ["method.real_guidance=1.0",
                                              "method.pairs=${runs_dir}/digits_cond_pairs_g1.safetensors"]),
    "cond_dmd2_4step_backward_g1": ("digits_cond_dmd2", ["method.real_guidance=1.0", *FOUR, "method.generator_inputs=backward"]),
    "cond_dmd2_4step_real_g1": ("digits_cond_dmd2", ["method.real_guidance=1.0", *FOUR, "method.generator_inputs=real"]),
    "cond_dmd2_1step_g1_gan_critic1": ("digits_cond_dmd2", ["method.real_guidance=1.0", "method.gan_generator_weight=3e-2",
                                                             "method.gan_critic_weight=1"]),
}
TEACHER_64 = 2.234  # the unconditional teacher's 64-step digits-FID (benchmarks/step_distill_digits.json)
DEMO_UPDATES = 600  # make demo's DMD2: about 3 minutes on one core, one-step digits-FID near 6 (dmd_digits.json's curves)
COND_TEACHER = ROOT / "benchmarks" / "cond_teacher_digits.json"
# the class-conditional recipes' real-score guidance (digits_cond_dmd sets the same)
COND_GUIDANCE = float(OmegaConf.load(ROOT / "conf" / "experiment" / "digits_cond_dmd2.yaml").method.real_guidance)
# progressive distillation's best one-step FID at 6,000 updates (the reference) and its best at any
# budget (annealed, 112,000 updates), benchmarks/step_distill_digits.json
PROGRESSIVE_1STEP = (4.870, 6000)
PROGRESSIVE_1STEP_LONG = (3.274, 112000)
# each method's training time per update, timed pinned to one core on an idle machine (scripts/bench_overhead.py):
# the runs' own wall_s shared the two cores with other runs and cannot be compared
OVERHEAD = ROOT / "benchmarks" / "overhead_cpu.json"
# each DMD experiment's regression pairs: the teacher run they come from and the file under the runs dir
# that its method.pairs names (bench_smoke and bench_overhead write them too)
PAIRS = {"digits_dmd": ("digits_diffusion_teacher", "digits_pairs.safetensors"),
         "digits_cond_dmd": ("digits_cond_teacher", "digits_cond_pairs.safetensors")}


def cond_teacher_64(guidance: float) -> Optional[tuple[float, float]]:
    """The class-conditional teacher's digits-FID and class accuracy at 64 DDIM steps and ``guidance``
    (benchmarks/cond_teacher_digits.json); None where that guidance was not measured."""
    rows = json.loads(COND_TEACHER.read_text())["rows"] if COND_TEACHER.is_file() else []
    r = next((r for r in rows if r.get("steps") == 64 and r.get("guidance") == guidance), None)
    return (round(r["fid"], 3), r["class_acc"]) if r else None


def override(config: str, key: str) -> Optional[str]:
    """The value a configuration's overrides give ``key`` (``eval.steps=[4]``: ``[4]``); None when they leave it."""
    return next((o.split("=", 1)[1] for o in CONFIGS[config][1] if o.startswith(f"{key}=")), None)


def real_guidance(config: str) -> float:
    """The real score's guidance of a class-conditional configuration: its override, else the recipe's."""
    given = override(config, "method.real_guidance")
    return COND_GUIDANCE if given is None else float(given)


def last_nfe(run_dir: Path) -> Optional[int]:
    """The cumulative network evaluations of the run's last logged update (metrics.csv)."""
    with open(run_dir / "metrics.csv") as f:
        vals = [r["nfe"] for r in csv.DictReader(f) if r.get("nfe")]
    return int(float(vals[-1])) if vals else None


def fid_curve(run_dir: Path, k: int) -> list[list[float]]:
    """[[generator updates, digits-FID], ...] of the run's evaluations (metrics.csv), one per update
    count: a run extended before 2026-12-05 evaluated the step it resumed at a second time."""
    with open(run_dir / "metrics.csv") as f:
        curve = {int(float(r["step"])): round(float(r[f"fid/{k}step"]), 3) for r in csv.DictReader(f) if r.get(f"fid/{k}step")}
    return [[u, fid] for u, fid in curve.items()]


def pairs_file(config: str) -> str:
    """The regression pairs' file (under the runs dir) of a DMD configuration: its method.pairs override's, else its experiment's."""
    given = override(config, "method.pairs")
    return given.split("/")[-1] if given else PAIRS[CONFIGS[config][0]][1]


def write_pairs(runs_dir: Path, teacher_ckpt: Path, experiment: str = "digits_dmd", *extra: str,
                name: Optional[str] = None) -> Path:
    """The experiment's regression pairs (its method.pairs, or runs_dir/``name``), written once from the
    teacher's 64-step DDIM."""
    out = runs_dir / (name or PAIRS[experiment][1])
    if not out.is_file():
        subprocess.run([sys.executable, "-m", "distillkit.pairs", f"checkpoint={teacher_ckpt}", "num_pairs=2000",
                        "steps=64", f"out={out}", *extra], cwd=ROOT, check=True)
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of each (configuration, updates)."""
    out = []
    for config in CONFIGS:
        for updates in sorted({r["updates"] for r in rows if r["config"] == config}):
            rs = [r for r in rows if r["config"] == config and r["updates"] == updates]
            out.append(_entry(config, updates, rs))
    return out


def _entry(config: str, updates: int, rs: list[dict]) -> dict:
    entry = {"config": config, "steps": rs[0]["steps"], "n": len(rs), "updates": updates}
    for k in ("fid", "is", "class_acc", "wall_s", "nfe"):
        vals = [r[k] for r in rs if r.get(k) is not None]
        if vals:
            entry[f"{k}_mean"] = statistics.fmean(vals)
            entry[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else None
    curves = [dict(r["fid_by_updates"]) for r in rs if r.get("fid_by_updates")]
    if len(curves) == len(rs):  # [updates, mean, std] of the seeds' FID at each update count every seed evaluated
        common = sorted(set.intersection(*(set(c) for c in curves)))
        entry["fid_by_updates"] = [[u, round(statistics.fmean(c[u] for c in curves), 3),
                                    round(statistics.stdev(c[u] for c in curves), 3) if len(curves) > 1 else None]
                                   for u in common]
    return entry


def at_equal_training_time(entry: dict, ms_per_update: dict, progressive: tuple = PROGRESSIVE_1STEP) -> Optional[str]:
    """A progressive distillation one-step run (FID, updates) against ``entry``'s seeds' mean FID at
    the last evaluation within the same training time, both priced at their experiment's per-update
    time from ``ms_per_update`` (experiment -> ms; evaluation time left out of both)."""
    pf, pu = progressive
    prog, dmd2 = ms_per_update.get("digits_progressive"), ms_per_update.get("digits_dmd2")
    if not (prog and dmd2 and entry.get("fid_by_updates")):
        return None
    seconds = pu * prog / 1000
    equal = seconds * 1000 / dmd2
    within = [x for x in entry["fid_by_updates"] if x[0] <= equal]
    if not within:
        return None
    u, f, sd = within[-1]
    return (f"{pu} progressive updates at {prog} ms train in {seconds:.0f} s, as many as {equal:.0f} DMD2 updates at "
            f"{dmd2} ms; {entry['config']} at {u} updates: {readme_tables.mean_std(f, sd)} ({entry['n']} seed{'s' * (entry['n'] > 1)}) "
            f"against progressive's best one-step {pf}: " + ("below" if f < pf else "not below"))


def dmd_against(summary: list[dict], dmd2: dict, what: str, dmd_config: str = "dmd_1step") -> list[str]:
    """DMD's one-step FID (``dmd_config``) as a multiple of ``dmd2``'s (a summary entry) at the same
    number of updates, against the target of 1.5x; no line when DMD has no runs of that length."""
    dmd = next((e for e in summary if e["config"] == dmd_config and e["updates"] == dmd2["updates"]), None)
    if dmd is None:
        return []
    ratio = dmd["fid_mean"] / dmd2["fid_mean"]
    where = "" if dmd_config == "dmd_1step" else f" ({dmd_config})"
    return [f"DMD (no GAN) one step{where} at {dmd2['updates']} updates: {dmd['fid_mean']:.3f} = {ratio:.2f}x {what} "
            "(target <= 1.5x): " + ("meets" if ratio <= 1.5 else "misses")]


def verdict(summary: list[dict], ms_per_update: Optional[dict] = None) -> list[str]:
    if ms_per_update is None:
        rows = json.loads(OVERHEAD.read_text())["rows"] if OVERHEAD.is_file() else []
        ms_per_update = {r["experiment"]: r["ms_per_update_distill"] for r in rows}
    by = {s["config"]: s for s in sorted(summary, key=lambda s: s["updates"])}  # each configuration's longest runs
    lines = []
    d2 = by.get("dmd2_1step")
    if d2:
        f = d2["fid_mean"]
        lines.append(f"DMD2 one step: digits-FID {f:.3f} after {d2['updates']} generator updates ({d2['wall_s_mean']:.0f} s) "
                     f"against the teacher's 64-step {TEACHER_64}: " + ("meets" if f <= TEACHER_64 else f"misses by {f - TEACHER_64:.3f}"))
        lines += [x for x in [at_equal_training_time(d2, ms_per_update),
                              at_equal_training_time(d2, ms_per_update, PROGRESSIVE_1STEP_LONG)] if x]
    strong = by.get("dmd2_1step_gan_critic1")
    if strong and strong["n"] > 1:
        f = strong["fid_mean"]
        lines.append(f"DMD2 one step with GAN weights 3e-2 / 1 (generator / critic): {f:.3f} after {strong['updates']} updates, "
                     + ("meets the teacher's 64-step" if f <= TEACHER_64 else f"misses the teacher's 64-step {TEACHER_64} by {f - TEACHER_64:.3f}"))
        lines += [x for x in [at_equal_training_time(strong, ms_per_update),
                              at_equal_training_time(strong, ms_per_update, PROGRESSIVE_1STEP_LONG)] if x]
    both = sorted({e["updates"] for e in summary if e["config"] == "dmd_1step"}
                  & {e["updates"] for e in summary if e["config"] == "dmd2_1step"})
    if both:  # at the most updates both have run
        lines += dmd_against(summary, next(e for e in summary if e["config"] == "dmd2_1step" and e["updates"] == both[-1]),
                             "DMD2's")
    if strong:
        lines += dmd_against(summary, strong, "DMD2's with GAN weights 3e-2 / 1")
    cond = by.get("cond_dmd2_1step_g1")
    if cond:  # the class-conditional teacher unguided, each at DMD2's longest runs
        lines += dmd_against(summary, cond, "DMD2's (cond_dmd2_1step_g1)", "cond_dmd_1step_g1")
    for config, entry in by.items():  # the class-conditional rows: no target, the teacher beside them
        if config.startswith("cond_") and entry.get("class_acc_mean") is not None:
            f, acc = entry["fid_mean"], entry["class_acc_mean"]
            w = real_guidance(config)
            teacher = cond_teacher_64(w)
            lines.append(f"{config} ({entry['steps']} step{'s' * (entry['steps'] > 1)}, {entry['updates']} updates, "
                         f"{entry['n']} seed{'s' * (entry['n'] > 1)}, real score at guidance {w:g}): "
                         f"{readme_tables.mean_std(f, entry.get('fid_std'))}, class accuracy {100 * acc:.1f}%; "
                         f"the class-conditional teacher's 64 steps at guidance {w:g}: "
                         + (f"{teacher[0]}, {100 * teacher[1]:.1f}%" if teacher else "not measured"))
    return lines


def demo_verdict(summary: list[dict], teacher_json: Path = ROOT / "benchmarks" / "teacher_digits_quick.json") -> list[str]:
    """make demo's line: the DMD2 one-step generator's FID at each evaluation, beside its teacher's
    DDIM at 1 and 64 steps (``teacher_json``: the demo's own teacher scoring, when it has run)."""
    entry = next((e for e in summary if e["config"] == "dmd2_1step"), None)
    if entry is None:
        return []
    curve = ", ".join(f"{f:.3f} at {u}" for u, f, _ in entry.get("fid_by_updates", []))
    rows = json.loads(teacher_json.read_text())["rows"] if teacher_json.is_file() else []
    teacher = {r["steps"]: r["fid"] for r in rows if r.get("method") == "teacher"}
    line = f"DMD2 one-step generator, digits-FID after {entry['updates']} generator updates: {entry['fid_mean']:.3f} ({curve})"
    if 1 in teacher and 64 in teacher:
        line += f"; its teacher's DDIM: {teacher[1]:.3f} at 1 step, {teacher[64]:.3f} at 64"
    return [line]


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs-dir", default="runs/bench_dmd", help="where the runs go (default %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--updates", type=int, default=None, help="generator updates per run (default: the experiments' 1000)")
    ap.add_argument("--only", nargs="+", choices=list(CONFIGS), default=None, help="a subset of the configurations")
    ap.add_argument("--out", default=None, help="JSON to write (default benchmarks/dmd_digits.json)")
    ap.add_argument("--demo", action="store_true", help=f"make demo: DMD2 one step, seed 0, {DEMO_UPDATES} updates, "
                    "benchmarks/dmd_digits_demo.json, no docs update")
    args = ap.parse_args(argv)
    if args.demo:
        args.only, args.seeds, args.updates = ["dmd2_1step"], [0], args.updates or DEMO_UPDATES
    name = "dmd_digits_demo" if args.demo else "dmd_digits"
    out = (ROOT / (args.out or f"benchmarks/{name}.json")).resolve()
    command = shlex.join(["python", "scripts/bench_dmd_digits.py", *(sys.argv[1:] if argv is None else argv)])
    runs_dir = (ROOT / args.runs_dir).resolve()
    run = Runner(runs_dir)
    t0 = time.time()
    teacher = run(["experiment=digits_diffusion_teacher"])
    print(f"teacher: {teacher['global_step']} updates" + (" (cached)" if teacher.get("cached") else ""), flush=True)
    configs = args.only or list(CONFIGS)
    if any(CONFIGS[c][0] in ("digits_cond_dmd2", "digits_cond_dmd") for c in configs):
        cond_teacher = run(["experiment=digits_cond_teacher"])
        for c in [c for c in configs if CONFIGS[c][0] == "digits_cond_dmd"]:  # guided as DMD's real score is
            write_pairs(runs_dir, Path(cond_teacher["run_dir"]) / "last.ckpt", "digits_cond_dmd",
                        f"guidance={real_guidance(c):g}", name=pairs_file(c))
    if any(CONFIGS[c][0] == "digits_dmd" for c in configs):
        write_pairs(runs_dir, Path(teacher["run_dir"]) / "last.ckpt")
    old = json.loads(out.read_text()) if out.is_file() else {}
    rows = [r for r in old.get("rows", [])]
    for config in configs:
        experiment, extra = CONFIGS[config]
        for seed in args.seeds:
            overrides = [f"experiment={experiment}", *extra, f"seed={seed}"]
            if args.updates:
                overrides.append(f"trainer.max_steps={args.updates}")
            res = run(overrides)
            k = int((override(config, "eval.steps") or "[1]").strip("[]"))
            r = {"config": config, "seed": seed, "steps": k, "updates": res["global_step"],
                 "fid": res.get(f"fid/{k}step"), "is": res.get(f"is/{k}step"), "class_acc": res.get(f"class_acc/{k}step"),
                 "wall_s": res["wall_s"], "nfe": last_nfe(Path(res["run_dir"])),
                 "fid_by_updates": fid_curve(Path(res["run_dir"]), k)}
            rows = [x for x in rows if (x["config"], x["seed"], x["updates"]) != (config, seed, r["updates"])] + [r]
            print(f"  {config:20s} seed {seed}  FID {r['fid']:7.3f}  IS {r['is']:.2f}  updates {r['updates']}  "
                  f"wall {r['wall_s']:.0f}s" + ("  (cached)" if res.get("cached") else ""), flush=True)
            bench = save_bench(out, name, command, rows, summarise, demo_verdict if args.demo else verdict)
    return report(out, bench, t0, docs=not args.demo)


def save_bench(out: Path, name: str, command: str, rows: list[dict], summarise, verdict) -> dict:
    """Write the benchmark JSON (rows, summary, verdict; the commands and dates of every sitting) after every
    run: an interrupted benchmark keeps its rows."""

    old = json.loads(out.read_text()) if out.is_file() else {}
    bench = {"name": name, "machine": machine(), **readme_tables.merge_provenance(old, command, dt.date.today().isoformat()),
             "rows": rows, "summary": summarise(rows)}
    bench["verdict"] = verdict(bench["summary"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(bench, indent=1) + "\n")
    return bench


def report(out: Path, bench: dict, t0: float, docs: bool = True) -> dict:
    """Print the table and the verdict, and rewrite the table in the docs page that holds its markers
    when ``docs`` and ``out`` is the benchmark's own file (benchmarks/NAME.json): a subset or probe
    written elsewhere (--out) leaves the page's table alone."""
    print(f"\nwrote {out} ({time.time() - t0:.0f} s)\n")
    print(readme_tables.render(bench["name"], bench))
    print("\n".join(bench["verdict"]))
    if not docs:
        return bench
    if out.resolve() != (ROOT / "benchmarks" / f"{bench['name']}.json").resolve():
        print(f"the docs' table of {bench['name']} left as it is: {out} is not benchmarks/{bench['name']}.json")
    elif readme_tables.update_readme(bench["name"], path=out):
        print("benchmark table updated")
    return bench


if __name__ == "__main__":
    main()
