"""`debug=smoke` on every experiment this machine can run: the wall time of each command as a user types it.

    python scripts/bench_smoke.py                      # benchmarks/smoke_cpu.json + the table in docs/benchmarks.md
    python scripts/bench_smoke.py --only digits_kd digits_progressive   # a subset (no table update)

`debug=smoke` (conf/debug/smoke.yaml) is the check that a config runs end to end: 6 updates on small
batches, two validation and test batches, and the run's evaluation on 64 samples (at every step count the
experiment evaluates), so every path a full run takes is exercised. The target (issue "A user's first
hour", item 8) is under 20 s for every experiment on the 2-core CPU machine, start-up included: each
time below is one `distill experiment=NAME debug=smoke` process from start to exit, one thread.

The experiments on embedded data run (digits, toy2d; CIFAR, CelebA-HQ, ImageNet and Stable Diffusion
experiments need data or weights from disk and are left out). The teachers run first, as `name=default`,
where the students' configs look for them; the DMD experiments' noise-image pairs are written by distill-pairs
(8 pairs, 4 steps, timed too). Every run starts afresh in a temporary runs dir.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dmd_digits import PAIRS  # noqa: E402  (the DMD experiments' pairs: written from their teacher's run first)
from bench_kd_digits import machine  # noqa: E402

NAME = "smoke_cpu"
TARGET_S = 20.0
TEACHERS = ("digits_teacher", "digits_diffusion_teacher", "digits_cond_teacher")


def experiments() -> list[str]:
    """The experiments on embedded data, teachers first."""
    names = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")
                   if p.stem.startswith(("digits_", "toy2d_")))
    return [n for n in TEACHERS if n in names] + [n for n in names if n not in TEACHERS]


def timed(cmd: list[str], env: dict) -> tuple[float, int, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, p.returncode, p.stdout + p.stderr


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="*", help="these experiments (their teachers are trained too)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / f"{NAME}.json")
    args = ap.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    chosen = experiments() if not args.only else [n for n in experiments() if n in args.only or n in TEACHERS]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as runs:
        for name in chosen:
            extra = ["name=default"] if name in TEACHERS else []
            if name in PAIRS:
                teacher, out = PAIRS[name]
                pairs = [sys.executable, "-m", "distillkit.pairs", f"checkpoint={runs}/{teacher}/default/last.ckpt",
                         "num_pairs=8", "steps=4", f"out={runs}/{out}"]
                seconds, rc, log = timed(pairs, env)
                rows.append({"command": f"distill-pairs num_pairs=8 steps=4 ({name})", "seconds": round(seconds, 1),
                             "exit": rc})
                print(f"{seconds:6.1f} s  distill-pairs for {name} (exit {rc})", flush=True)
            cmd = [sys.executable, "-m", "distillkit.cli", f"experiment={name}", "debug=smoke", f"runs_dir={runs}",
                   "callbacks.progress=none", *extra]
            seconds, rc, log = timed(cmd, env)
            if rc != 0:
                print(log[-3000:], file=sys.stderr)
            rows.append({"command": f"distill experiment={name} debug=smoke", "seconds": round(seconds, 1), "exit": rc})
            print(f"{seconds:6.1f} s  experiment={name} (exit {rc})", flush=True)
    worst = max(r["seconds"] for r in rows)
    bench = {"name": NAME, "machine": machine(), "date": dt.date.today().isoformat(),
             "command": "python scripts/bench_smoke.py" + (" " + shlex.join(sys.argv[1:]) if sys.argv[1:] else ""),
             "target_s": TARGET_S, "rows": rows,
             "verdict": [f"slowest {worst:.1f} s: " + ("every command under" if worst < TARGET_S else "missed")
                         + f" the {TARGET_S:.0f} s target" + ("" if all(r["exit"] == 0 for r in rows)
                                                                else "; some runs FAILED (exit != 0)")]}
    print("\n".join(bench["verdict"]))
    if args.only:
        return
    import readme_tables

    args.out.write_text(json.dumps(bench, indent=1) + "\n")
    print(readme_tables.render(NAME, bench))
    if readme_tables.update_readme(NAME, path=args.out):
        print("benchmark table updated")


if __name__ == "__main__":
    main()
