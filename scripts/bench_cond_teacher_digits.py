"""The class-conditional digits teacher: digits-FID, IS and class accuracy against DDIM steps and guidance.

    python scripts/bench_cond_teacher_digits.py           # benchmarks/cond_teacher_digits.json + README table
    python scripts/bench_cond_teacher_digits.py --quick   # 1 and 64 steps at guidance 1 and 2, no README update

Trains (or reuses) ``distill experiment=digits_cond_teacher`` in --runs-dir (the digits teacher's UNet
and recipe with a class embedding and label dropout 0.1), then samples its EMA network with
deterministic DDIM on the trailing grid at 1, 4, 16 and 64 steps and classifier-free guidance 1, 2 and
4 (diffusers' convention: uncond + w (cond - uncond), 1 is no guidance), from the same 700 noise draws
and the same 700 classes drawn uniformly after them (``distill-sample``'s draw). Each sample set is
scored with the shipped digits feature network against the training digits (FID, IS) and by its
classifier (``class_acc``: the fraction of samples classified as the class asked for). The floor row
is 700 held-out real digits scored the same way, with the classifier's accuracy on their labels.

Target (issue "Conditional denoisers"): at 64 steps with the best guidance, class accuracy >= 0.98
and digits-FID within 2x the floor. Grids of 10 samples per class go to
benchmarks/cond_teacher_digits_g<w>_<k>step.png.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kd_digits import Runner, machine  # noqa: E402
from bench_teacher_digits import digits_scoring  # noqa: E402

STEPS = [1, 4, 16, 64]
GUIDANCE = [1.0, 2.0, 4.0]
QUICK = ([1, 64], [1.0, 2.0])
TARGET_ACC = 0.98
TARGET_RATIO = 2.0


def score(ckpt: Path, steps: list[int], guidance: list[float], grid_dir: Optional[Path], seed: int = 0) -> list[dict]:
    import torch

    from distillkit.metrics.fid import DIGITS_NUM_SAMPLES, heldout_images
    from distillkit.metrics.images import image_grid, save_png
    from distillkit.sample import generate

    n = DIGITS_NUM_SAMPLES
    method, dm, scorer, stats, floor = digits_scoring(ckpt)
    held_labels = torch.cat([dm.val_set.tensors[1], dm.test_set.tensors[1]])[:n]
    floor_acc = scorer.class_accuracy(heldout_images(dm, n), held_labels)
    rows = [{"method": "floor", "fid": floor["fid"], "is": floor["is"], "is_std": floor["is_std"],
             "class_acc": floor_acc, "num_samples": floor["num_samples"], "reference": floor["reference"]}]
    for w in guidance:
        for k in steps:
            t0 = time.time()
            x, cond = generate(method, n, k, seed=seed, batch_size=n, guidance=w, return_cond=True)
            wall = time.time() - t0
            s = scorer.score(x, stats)
            acc = scorer.class_accuracy(x, cond["class_labels"])
            nfe = k * (1 if w == 1 else 2)  # a guided step evaluates the conditional and the unconditional branch
            rows.append({"method": "teacher", "steps": k, "guidance": w, "seed": seed, "fid": s["fid"], "is": s["is"],
                         "is_std": s["is_std"], "class_acc": acc, "num_samples": s["num_samples"], "nfe": nfe,
                         "sample_wall_s": round(wall, 2)})
            print(f"  guidance {w:g} {k:3d} steps  FID {s['fid']:8.3f}  IS {s['is']:.2f}  class acc {acc:.4f}  "
                  f"({wall:.1f} s)", flush=True)
            if grid_dir is not None and k in (1, 64):
                # 10 of each class, one class per row
                xs, _ = generate(method, 100, k, seed=seed, batch_size=100, guidance=w, return_cond=True,
                                 classes=",".join(str(c) for c in range(10) for _ in range(10)))
                save_png(image_grid(xs, nrow=10, scale=4), grid_dir / f"cond_teacher_digits_g{w:g}_{k}step.png")
    return rows


def verdict(rows: list[dict]) -> Optional[str]:
    floor = rows[0]["fid"]
    at64 = [r for r in rows[1:] if r.get("steps") == 64]
    if not at64:
        return None
    ok = [r for r in at64 if r["class_acc"] >= TARGET_ACC and r["fid"] <= TARGET_RATIO * floor]
    best = min(ok or at64, key=lambda r: (r["class_acc"] < TARGET_ACC, r["fid"]))
    return (f"64 steps, guidance {best['guidance']:g}: class accuracy {best['class_acc']:.4f} (target >= {TARGET_ACC}), "
            f"digits-FID {best['fid']:.3f} = {best['fid'] / floor:.2f}x the floor {floor:.3f} (target <= "
            f"{TARGET_RATIO:g}x): " + ("meets both" if ok else "MISSES"))


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs-dir", default="runs/bench_cond_teacher_digits", help="where the run goes (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help=f"steps {QUICK[0]}, guidance {QUICK[1]}, no README update")
    ap.add_argument("--out", default=None, help="JSON to write (default benchmarks/cond_teacher_digits[_quick].json)")
    ap.add_argument("--override", action="append", default=[], help="extra distill override for the teacher run")
    args = ap.parse_args(argv)
    name = "cond_teacher_digits_quick" if args.quick else "cond_teacher_digits"
    out = (ROOT / (args.out or f"benchmarks/{name}.json")).resolve()
    command = shlex.join(["python", "scripts/bench_cond_teacher_digits.py", *(sys.argv[1:] if argv is None else argv)])
    t0 = time.time()
    print(f"{name}: runs in {args.runs_dir}", flush=True)
    res = Runner((ROOT / args.runs_dir).resolve())(["experiment=digits_cond_teacher", *args.override])
    print(f"  trained: {res['global_step']} updates, {res['wall_s']:.0f} s" + (" (cached)" if res.get("cached") else ""))
    steps, guidance = QUICK if args.quick else (STEPS, GUIDANCE)
    rows = score(Path(res["run_dir"]) / "last.ckpt", steps, guidance, None if args.quick else out.parent)
    rows[1:] = [{**r, "updates": res["global_step"], "train_wall_s": res["wall_s"]} for r in rows[1:]]
    bench = {"name": name, "machine": machine(), "date": dt.date.today().isoformat(), "command": command,
             "rows": rows, "verdict": verdict(rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(bench, indent=1) + "\n")
    import readme_tables

    print(f"\nwrote {out} ({time.time() - t0:.0f} s)\n")
    print(readme_tables.render(name, bench))
    if bench["verdict"]:
        print("\n" + bench["verdict"])
    if not args.quick and readme_tables.update_readme(name, path=out):
        print("README.md table updated")
    return bench


if __name__ == "__main__":
    main()
