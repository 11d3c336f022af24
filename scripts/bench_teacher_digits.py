"""The digits diffusion teacher: digits-FID and IS against the number of DDIM steps.

    python scripts/bench_teacher_digits.py                 # benchmarks/teacher_digits.json + README table
    python scripts/bench_teacher_digits.py --quick         # steps 1, 4, 16, 64 (make demo)

Trains (or reuses) ``distill experiment=digits_diffusion_teacher`` in --runs-dir, then samples
its EMA network with deterministic DDIM on the trailing grid at each step count, from the
same 700 noise draws, and scores the samples with the shipped digits feature network against
the training digits. The floor row is 700 held-out real digits scored the same way: every
FID here uses the same sample count. Target (issue "Diffusion core"): 64-step FID within 3x
of the floor. Sample grids go to benchmarks/teacher_digits_<k>step.png.

Resumable: the training run is reused when its results.json exists; the sampling is redone
(a few minutes on CPU, dominated by the 256-step row).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kd_digits import Runner, machine  # noqa: E402

STEPS = [1, 2, 4, 8, 16, 32, 64, 256]
QUICK_STEPS = [1, 4, 16, 64]
GRID_STEPS = (1, 4, 64)
TARGET_RATIO = 3.0


def digits_scoring(ckpt: Path):
    """(method of the run, digits datamodule, scorer, the training split's FID statistics, the floor's
    scores): what every digits teacher benchmark scores its samples with (700 samples)."""
    import torch

    from distillkit.data.digits import DigitsDataModule
    from distillkit.metrics.fid import DIGITS_NUM_SAMPLES, SampleScorer, floor_scores
    from distillkit.metrics.images import split_images
    from distillkit.models.loading import load_run_checkpoint

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    method = load_run_checkpoint(ckpt)
    dm = DigitsDataModule()
    dm.setup("fit")
    scorer = SampleScorer("digits")
    stats = scorer.reference(split_images(dm, "train"), "digits", "train")
    return method, dm, scorer, stats, floor_scores(dm, "digits", DIGITS_NUM_SAMPLES, scorer=scorer)


def score_teacher(ckpt: Path, steps: list[int], grid_dir: Optional[Path], seed: int = 0) -> tuple[list[dict], dict]:
    from distillkit.metrics.fid import DIGITS_NUM_SAMPLES
    from distillkit.metrics.images import image_grid, save_png
    from distillkit.sample import generate

    n = DIGITS_NUM_SAMPLES
    method, dm, scorer, stats, floor = digits_scoring(ckpt)
    rows = []
    for k in steps:
        t0 = time.time()
        x = generate(method, n, k, seed=seed, batch_size=n)
        wall = time.time() - t0
        s = scorer.score(x, stats)
        rows.append({"method": "teacher", "steps": k, "seed": seed, "fid": s["fid"], "is": s["is"],
                     "is_std": s["is_std"], "num_samples": s["num_samples"], "nfe": k,
                     "sample_wall_s": round(wall, 2)})
        print(f"  teacher {k:4d} steps  FID {s['fid']:8.3f}  IS {s['is']:.2f}  ({wall:.1f} s)", flush=True)
        if grid_dir is not None and k in GRID_STEPS:
            save_png(image_grid(x[:100], nrow=10, scale=4), grid_dir / f"teacher_digits_{k}step.png")
    floor_row = {"method": "floor", "fid": floor["fid"], "is": floor["is"], "is_std": floor["is_std"],
                 "num_samples": floor["num_samples"], "reference": floor["reference"]}
    return [floor_row, *rows], {"feature_net": scorer.net_id}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs-dir", default="runs/bench_teacher_digits", help="where the run goes (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help=f"steps {QUICK_STEPS} only, no README update")
    ap.add_argument("--out", default=None, help="JSON to write (default benchmarks/teacher_digits[_quick].json)")
    args = ap.parse_args(argv)
    name = "teacher_digits_quick" if args.quick else "teacher_digits"
    out = (ROOT / (args.out or f"benchmarks/{name}.json")).resolve()
    command = shlex.join(["python", "scripts/bench_teacher_digits.py", *(sys.argv[1:] if argv is None else argv)])
    t0 = time.time()
    print(f"{name}: runs in {args.runs_dir}", flush=True)
    res = Runner((ROOT / args.runs_dir).resolve())(["experiment=digits_diffusion_teacher"])
    print(f"  trained: {res['global_step']} updates, {res['wall_s']:.0f} s" + (" (cached)" if res.get("cached") else ""))
    rows, extra = score_teacher(Path(res["run_dir"]) / "last.ckpt", QUICK_STEPS if args.quick else STEPS,
                                None if args.quick else out.parent)
    rows[1:] = [{**r, "updates": res["global_step"], "train_wall_s": res["wall_s"]} for r in rows[1:]]
    floor = rows[0]["fid"]
    by_steps = {r["steps"]: r for r in rows[1:]}
    verdict = None
    if 64 in by_steps:
        ratio = by_steps[64]["fid"] / floor
        verdict = (f"64-step FID {by_steps[64]['fid']:.3f} = {ratio:.2f}x the floor {floor:.3f}: "
                   + ("meets" if ratio <= TARGET_RATIO else "MISSES") + f" the {TARGET_RATIO:g}x target")
    bench = {"name": name, "machine": machine(), "date": dt.date.today().isoformat(), "command": command,
             "feature_net": extra["feature_net"], "rows": rows, "verdict": verdict}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(bench, indent=1) + "\n")
    import readme_tables

    print(f"\nwrote {out} ({time.time() - t0:.0f} s)\n")
    print(readme_tables.render(name, bench))
    if verdict:
        print("\n" + verdict)
    if not args.quick and readme_tables.update_readme(name, path=out):
        print("README.md table updated")
    return bench


if __name__ == "__main__":
    main()
