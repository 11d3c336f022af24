"""Consistency distillation and LCM on digits: digits-FID, IS (and class accuracy) at 1, 2 and 4 steps.

    python scripts/bench_consistency_digits.py                 # 3 seeds, benchmarks/consistency_digits.json + README table
    python scripts/bench_consistency_digits.py --seeds 0 --only cm --updates 400   # a subset (no README update)

Trains (or reuses) the digits teachers in --runs-dir (``experiment=digits_diffusion_teacher`` and
``experiment=digits_cond_teacher``), then runs each configuration below for each seed with
``seed=S`` and ``trainer.max_steps=--updates``. A finished run is reused; a run stopped mid-way
resumes from its last.ckpt.

Each row is the run's own final evaluation (``eval=digits``: 700 samples of the sampling-EMA
student at 1, 2 and 4 steps of the multistep consistency sampler, the shipped digits feature
network against the training digits, the protocol of every digits benchmark here), with the
updates, the network evaluations spent (online, teacher and target passes, from metrics.csv) and
the training wall time.

Targets (issue "Consistency distillation and LCM"): the consistency student's few-step FID against
progressive distillation's best on the same teacher at equal updates (benchmarks/step_distill_digits.json:
2.961 at 4 steps after 4,032 updates, 3.778 at 2 after 5,040, both annealed; 4.870 at 1 after 6,000,
annealed with a heavy last round): 2 and 4 steps at or below, 1 step within 1.2x; and the teacher's own
64-step 2.234; whether LCM's EMA target (0.95) helps against iCT's online target (0); LCM at 4 steps
within 1.5x of the class-conditional teacher's 64-step FID at the same guidance (2: 3.172; 1: 0.869), its class accuracy
within 1 point of the teacher's (99.86% at guidance 2, 99.14% at 1).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import readme_tables  # noqa: E402
from bench_dmd_digits import LORA, _entry, cond_teacher_64, fid_curve, last_nfe, report, save_bench  # noqa: E402
from bench_kd_digits import Runner  # noqa: E402

STEPS = (1, 2, 4)
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "cm": ("digits_consistency", []),  # LCM's EMA target 0.95, pseudo-Huber
    "cm_online_target": ("digits_consistency", ["method.target_decay=0"]),  # iCT's target
    # guided teacher, w ~ U[0, 2], sampled at guidance 2, on the 32-step discretisation of the recipe before 2026-12-04
    "lcm_cond": ("digits_cond_lcm", ["method.num_timesteps=32"]),
    "lcm_cond_g1": ("digits_cond_lcm", ["method.num_timesteps=32", "eval.guidance=1"]),  # the same, sampled at guidance 1
    "lcm_cond_n64": ("digits_cond_lcm", ["method.num_timesteps=64"]),  # the recipe's 64 steps since then
    "lcm_cond_n64_g1": ("digits_cond_lcm", ["method.num_timesteps=64", "eval.guidance=1"]),  # sampled at guidance 1
    # probes of the consistency recipe (docs/consistency.md; --out benchmarks/consistency_digits_probes.json)
    "cm_cosine_lr": ("digits_consistency", ["optim.scheduler.name=cosine"]),  # lr 1e-4 decayed to 0
    "cm_n64": ("digits_consistency", ["method.num_timesteps=64"]),  # a finer discretisation
    "cm_n128": ("digits_consistency", ["method.num_timesteps=128"]),
    "cm_ict_32_512": ("digits_consistency", ["method.curriculum=ict", "method.curriculum_start=32",
                                             "method.curriculum_end=512"]),  # iCT's curriculum, 32 to 512 steps
    "lcm_cond_n128": ("digits_cond_lcm", ["method.num_timesteps=128"]),
    "cm_target_099": ("digits_consistency", ["method.target_decay=0.99"]),  # a slower target network
    "cm_target_0999": ("digits_consistency", ["method.target_decay=0.999"]),
    "cm_l2": ("digits_consistency", ["method.distance=l2"]),  # squared L2 instead of pseudo-Huber
    # a rank-8 adapter over the frozen teacher (digits_cond_lcm_lora's layers and lr) instead of the whole network
    "cm_lora": ("digits_consistency", LORA),
    "cm_lora_target099": ("digits_consistency", [*LORA, "method.target_decay=0.99"]),
    "cm_n64_target099": ("digits_consistency", ["method.num_timesteps=64", "method.target_decay=0.99"]),
    "cm_n64_target0985": ("digits_consistency", ["method.num_timesteps=64", "method.target_decay=0.985"]),
    "cm_n64_target0992": ("digits_consistency", ["method.num_timesteps=64", "method.target_decay=0.992"]),
    "cm_n64_target0994": ("digits_consistency", ["method.num_timesteps=64", "method.target_decay=0.994"]),
    "cm_n96_target099": ("digits_consistency", ["method.num_timesteps=96", "method.target_decay=0.99"]),
    # the lr decayed to 0 over the run, as progressive distillation's best runs anneal theirs
    "cm_n64_target0992_cosine": ("digits_consistency", ["method.num_timesteps=64", "method.target_decay=0.992",
                                                        "optim.scheduler.name=cosine"]),
    "cm_n64_target099_cosine": ("digits_consistency", ["method.num_timesteps=64", "method.target_decay=0.99",
                                                       "optim.scheduler.name=cosine"]),
    "cm_n64_target0992_lr2e-4": ("digits_consistency", ["method.num_timesteps=64", "method.target_decay=0.992",
                                                        "optim.optimizer.lr=2e-4"]),
    "cm_n64_target0992_ema995": ("digits_consistency", ["method.num_timesteps=64", "method.target_decay=0.992",
                                                        "callbacks.ema.decay=0.995"]),  # a longer sampling EMA
    "cm_n64_target0992_l2": ("digits_consistency", ["method.num_timesteps=64", "method.target_decay=0.992",
                                                    "method.distance=l2"]),
    # the two-step sampler's intermediate time, which the CM paper tunes: 767 instead of LCMScheduler's 511
    "cm_n64_target0992_t767": ("digits_consistency", ["method.num_timesteps=64", "method.target_decay=0.992",
                                                      "method.sampling_timesteps=[1023,767]"]),
    "cm_n64_target0992_huber02": ("digits_consistency", ["method.num_timesteps=64", "method.target_decay=0.992",
                                                         "method.huber_c=0.02"]),  # iCT's default here: 0.00432
    # LCM-LoRA: a rank-8 adapter, the teacher guided at 2, its target network an EMA (0.95) of the adapter or
    # (as the peer scripts have it) the online adapter under stop-gradient
    "lcm_lora": ("digits_cond_lcm_lora", []),
    "lcm_lora_online_target": ("digits_cond_lcm_lora", ["method.target_decay=0"]),
    "lcm_lora_g1": ("digits_cond_lcm_lora", ["method.w_min=0", "method.w_max=0"]),  # the unguided teacher (w = 0)
    "lcm_lora_g1_target099": ("digits_cond_lcm_lora", ["method.w_min=0", "method.w_max=0", "method.target_decay=0.99"]),
    "lcm_lora_target099": ("digits_cond_lcm_lora", ["method.target_decay=0.99"]),
}
# the LCM rows the verdict judges: configuration -> (the guidance its samples are judged at, the
# discretisation's steps, what it is); LCM-LoRA samples unguided a student of the teacher guided at 2
LCM_ROWS = {"lcm_cond": (2.0, 32, "LCM"), "lcm_cond_g1": (1.0, 32, "LCM"), "lcm_cond_n64": (2.0, 64, "LCM"),
            "lcm_cond_n64_g1": (1.0, 64, "LCM"), "lcm_lora": (2.0, 64, "LCM-LoRA"),
            "lcm_lora_g1": (1.0, 64, "LCM-LoRA"), "lcm_lora_target099": (2.0, 64, "LCM-LoRA, EMA target 0.99"),
            "lcm_lora_g1_target099": (1.0, 64, "LCM-LoRA, EMA target 0.99")}
# EMA target network against the online target: (EMA-target configuration, online-target configuration, what)
TARGET_PAIRS = [("cm", "cm_online_target", "Consistency distillation"), ("lcm_lora", "lcm_lora_online_target", "LCM-LoRA")]
# consistency configurations judged at progressive distillation's update counts (their FID every 200 updates)
EQUAL_UPDATES = [("cm", "Consistency distillation"),
                 ("cm_n64_target099", "Consistency distillation, 64-step grid, EMA target 0.99"),
                 ("cm_n64_target0992", "Consistency distillation, 64-step grid, EMA target 0.992"),
                 ("cm_n64_target099_cosine", "Consistency distillation, 64-step grid, EMA target 0.99, lr decayed"),
                 ("cm_n64_target0992_cosine", "Consistency distillation, 64-step grid, EMA target 0.992, lr decayed"),
                 ("cm_n64_target0992_lr2e-4", "Consistency distillation, 64-step grid, EMA target 0.992, lr 2e-4"),
                 ("cm_n64_target0992_ema995", "Consistency distillation, 64-step grid, EMA target 0.992, sampling EMA 0.995"),
                 ("cm_n64_target0992_l2", "Consistency distillation, 64-step grid, EMA target 0.992, squared L2"),
                 ("cm_n64_target0992_huber02", "Consistency distillation, 64-step grid, EMA target 0.992, Huber c 0.02"),
                 ("cm_n64_target0992_t767", "Consistency distillation, 64-step grid, EMA target 0.992, two steps at "
                  "1023 and 767")]
TEACHER_64 = 2.234  # the unconditional teacher's 64-step digits-FID (benchmarks/step_distill_digits.json)
# progressive distillation's best at each step count within its 6,000-update budget (benchmarks/step_distill_digits.json:
# progressive_annealed_1008 at 4 and 2 steps, progressive_annealed_last_heavy at 1): FID, updates
PROGRESSIVE = {4: (2.961, 4032), 2: (3.778, 5040), 1: (4.870, 6000)}


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of each (configuration, updates, steps)."""
    out = []
    for config in CONFIGS:
        for updates in sorted({r["updates"] for r in rows if r["config"] == config}):
            for k in STEPS:
                rs = [r for r in rows if r["config"] == config and r["updates"] == updates and r["steps"] == k]
                if rs:  # with fid_by_updates, the seeds' FID at each evaluated update count (equal updates)
                    out.append(_entry(config, updates, rs))
    return out


def verdict(summary: list[dict]) -> list[str]:
    longest = {}
    for s in sorted(summary, key=lambda s: s["updates"]):
        longest[(s["config"], s["steps"])] = s
    lines = []

    def against_progressive(k: int, fid: float) -> str:
        """The issue's targets: 1 step within 1.2x of progressive's, 2 and 4 at or below."""
        pf = PROGRESSIVE[k][0]
        bound = 1.2 * pf if k == 1 else pf
        return (f", the target 1.2x of it {bound:.3f}" if k == 1 else "") + ": " + ("meets" if fid <= bound else "misses")

    for k in STEPS:
        s = longest.get(("cm", k))
        if s:
            pf, pu = PROGRESSIVE[k]
            lines.append(f"Consistency distillation, {k} step{'s' * (k > 1)}: digits-FID {s['fid_mean']:.3f} after "
                         f"{s['updates']} updates; progressive distillation {pf} after {pu}"
                         + against_progressive(k, s["fid_mean"]))
    for config, what in EQUAL_UPDATES:  # the comparison: at progressive's own update counts
        for k in STEPS:
            s = longest.get((config, k))
            pf, pu = PROGRESSIVE[k]
            # the last evaluation within progressive's updates (every 200: 4,000 for its 4,032)
            within = [x for x in (s or {}).get("fid_by_updates", []) if x[0] <= pu]
            if s and within and within[-1][0] > pu - 200:
                u, f, sd = within[-1]
                lines.append(f"{what}, {k} step{'s' * (k > 1)} at {u} updates ({s['n']} seed{'s' * (s['n'] > 1)}): "
                             f"digits-FID {readme_tables.mean_std(f, sd)}; progressive distillation {pf} at {pu}"
                             + against_progressive(k, f))
    at = {(s["config"], s["steps"], s["updates"]): s for s in summary}
    for ema, online, what in TARGET_PAIRS:
        for k in STEPS:  # the two targets at the most updates both ran
            common = [u for (c, kk, u) in at if c == ema and kk == k and (online, k, u) in at]
            if common:
                u = max(common)
                a, b = at[(ema, k, u)], at[(online, k, u)]
                lines.append(f"{what}: EMA target 0.95 against the online target at {k} step{'s' * (k > 1)}, {u} "
                             f"updates, {a['n']} seed{'s' * (a['n'] > 1)}: {a['fid_mean']:.3f} against "
                             f"{b['fid_mean']:.3f} (" + ("helps" if a["fid_mean"] < b["fid_mean"] else "does not help")
                             + ")")
    for config, (w, grid, what) in LCM_ROWS.items():
        s = longest.get((config, 4))
        if s:
            f, acc = s["fid_mean"], s.get("class_acc_mean") or 0.0
            t_f, t_acc = cond_teacher_64(w)
            lines.append(f"{what}, class-conditional, {grid}-step grid, 4 steps at guidance {w:g}: digits-FID "
                         f"{readme_tables.mean_std(f, s.get('fid_std'))} ({s['n']} seed{'s' * (s['n'] > 1)}) against 1.5x the teacher's "
                         f"64-step {1.5 * t_f:.3f} (" + ("meets" if f <= 1.5 * t_f else "misses") + f"), class accuracy "
                         f"{100 * acc:.1f}% against the teacher's {100 * t_acc:.1f}% ("
                         + ("within" if t_acc - acc <= 0.01 else "not within") + " 1 point)")
    return lines


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs-dir", default="runs/bench_dmd", help="where the runs go (default %(default)s: "
                    "the teachers of the DMD benchmark are reused)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--updates", type=int, default=None, help="updates per run (default: the experiments' 1000)")
    ap.add_argument("--only", nargs="+", choices=list(CONFIGS), default=None, help="a subset of the configurations")
    ap.add_argument("--out", default=None, help="JSON to write (default benchmarks/consistency_digits.json)")
    args = ap.parse_args(argv)
    out = (ROOT / (args.out or "benchmarks/consistency_digits.json")).resolve()
    command = shlex.join(["python", "scripts/bench_consistency_digits.py", *(sys.argv[1:] if argv is None else argv)])
    run = Runner((ROOT / args.runs_dir).resolve())
    t0 = time.time()
    teacher = run(["experiment=digits_diffusion_teacher"])
    print(f"teacher: {teacher['global_step']} updates" + (" (cached)" if teacher.get("cached") else ""), flush=True)
    configs = args.only or list(CONFIGS)
    if any(CONFIGS[c][0] == "digits_cond_lcm" for c in configs):
        run(["experiment=digits_cond_teacher"])
    old = json.loads(out.read_text()) if out.is_file() else {}
    rows = list(old.get("rows", []))
    for config in configs:
        experiment, extra = CONFIGS[config]
        for seed in args.seeds:
            overrides = [f"experiment={experiment}", *extra, f"seed={seed}", "eval.steps=[1,2,4]"]
            if args.updates:
                overrides.append(f"trainer.max_steps={args.updates}")
            res = run(overrides)
            new = [{"config": config, "seed": seed, "steps": k, "updates": res["global_step"],
                    "fid": res.get(f"fid/{k}step"), "is": res.get(f"is/{k}step"),
                    "class_acc": res.get(f"class_acc/{k}step"), "wall_s": res["wall_s"],
                    "nfe": last_nfe(Path(res["run_dir"])), "fid_by_updates": fid_curve(Path(res["run_dir"]), k)}
                   for k in STEPS]
            done = {(r["config"], r["seed"], r["updates"], r["steps"]) for r in new}
            rows = [x for x in rows if (x["config"], x["seed"], x["updates"], x["steps"]) not in done] + new
            print(f"  {config:18s} seed {seed}  FID " + "  ".join(f"{r['steps']}:{r['fid']:.3f}" for r in new)
                  + f"  updates {res['global_step']}  wall {res['wall_s']:.0f}s" + ("  (cached)" if res.get("cached") else ""),
                  flush=True)
            bench = save_bench(out, "consistency_digits", command, rows, summarise, verdict)
    return report(out, bench, t0)

if __name__ == "__main__":
    main()
