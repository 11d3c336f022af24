"""Where class-conditional DMD2 generators land against the teacher whose (guided) score they matched.

The class-conditional one-step rows of scripts/bench_dmd_digits.py are far from the teacher's
64-step FID when the real score is guided at 2 (6.6 against 3.2) and close to it unguided (1.5
against 0.9). This probe asks where the guided generators' samples sit: narrower classes than
the teacher's guided samples (the mode seeking of DMD's reverse-KL gradient), or classes as wide
but elsewhere. For each set of ``--samples`` images (classes 0-9 in turn, sample seed 1):

    fid_real          FID against the digits training split (torchmetrics' Fréchet distance on the
                      shipped feature network's features, each set's computed once; at this sample
                      count, not the 700 of the benchmark tables)
    fid_teacher_g1/2  FID against the teacher's 64-step samples at guidance 1 / 2 (the same count,
                      sample seed 0: other noise than the set's, so the teacher's own set at seed 1
                      gives the value of two draws of one distribution)
    spread            per class, the mean squared distance of the features to their class mean,
                      averaged over the classes (the class's width in feature space)
    mean_offset       per class, the distance of the class's feature mean from the real digits'
                      (all 1,797, by label), averaged over the classes
    class_acc         the feature network's class of each sample equals the class asked for

and, for a generator, which of the two makes its FID: ``fid_real_means_as_teacher``, its FID
against the training split with each class's features moved so that their mean is the teacher's
(the 64-step samples at the guidance of the generator's real score; its widths kept), and
``fid_real_widths_as_teacher``, with each class's features scaled about their mean to the
teacher's average width (its means kept). Both from the features' mean and covariance by
torchmetrics' Fréchet distance (``_compute_fid``, what its FID computes).

Sets: real digits (by label); the class-conditional teacher (``experiment=digits_cond_teacher``)
at 64 DDIM steps with guidance 1 and 2; the one-step DMD2 generators of bench_dmd_digits.py's
class-conditional rows (seeds 0, 1, 2), trained against the real score guided at 2
(``cond_dmd2_1step``, the recipe) and at 1 (``cond_dmd2_1step_g1``), as the runs directory holds
them (each row records its updates). It trains nothing: run the benchmark first. The stored JSON
(2,000 updates each, 59 s on 2 cores):

    python scripts/bench_dmd_digits.py --runs-dir runs/bench_dmd_2000 --only cond_dmd2_1step cond_dmd2_1step_g1 \
        --updates 2000 --out benchmarks/dmd_digits_probes.json
    python scripts/probe_cond_guidance_digits.py --runs-dir runs/bench_dmd_2000   # benchmarks/dmd_digits_guidance.json
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kd_digits import machine  # noqa: E402

# (label, run under the runs dir, real-score guidance the run must have been trained with)
GENERATORS = [(f"DMD2 one step, real score guided at {g:g}, seed {s}", f"digits_cond_dmd2/{name}", g)
              for g, names in ((2.0, ["default", "seed=1", "seed=2"]),
                               (1.0, ["method.real_guidance=1.0", "method.real_guidance=1.0,seed=1",
                                      "method.real_guidance=1.0,seed=2"]))
              for s, name in enumerate(names)]
TEACHER = "digits_cond_teacher/default"


def load(runs_dir: Path, run: str, guidance: Optional[float] = None):
    from distillkit.models.loading import load_run_checkpoint

    ckpt = runs_dir / run / "last.ckpt"
    if not ckpt.is_file():
        sys.exit(f"probe_cond_guidance_digits: {ckpt}: no such file; run `python scripts/bench_dmd_digits.py "
                 f"--runs-dir {runs_dir} --only cond_dmd2_1step cond_dmd2_1step_g1` first")
    method = load_run_checkpoint(ckpt)
    trained = float(method.run_config["method"].get("real_guidance", 1.0)) if guidance is not None else None
    if guidance is not None and trained != guidance:
        sys.exit(f"probe_cond_guidance_digits: {ckpt} was trained with method.real_guidance={trained}, not {guidance}")
    return method


def features(net, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net(x[i:i + batch]).double() for i in range(0, len(x), batch)])


def class_stats(f: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Each class's feature mean (10, d) and width (mean squared distance to that mean)."""
    means = torch.stack([f[labels == c].mean(0) for c in range(10)])
    widths = [float(((f[labels == c] - means[c]) ** 2).sum(1).mean()) for c in range(10)]
    return means, widths


def frechet(mu_a: torch.Tensor, cov_a: torch.Tensor, f: torch.Tensor) -> float:
    """torchmetrics' Fréchet distance (what its FID computes) between a Gaussian (mean, covariance)
    and features ``f``."""
    from torchmetrics.image.fid import _compute_fid

    return float(_compute_fid(mu_a, cov_a, f.mean(0), torch.cov(f.T)))


def fid_real(f: torch.Tensor, reference: dict) -> float:
    """The FID of features ``f`` against the real statistics ``reference`` (:meth:`SampleScorer.reference`:
    the feature sum, the sum of outer products and the count), as torchmetrics' FID forms them."""
    n = reference["num_samples"].double()
    mu_r = reference["features_sum"].double() / n
    cov_r = (reference["features_cov_sum"].double() - n * torch.outer(mu_r, mu_r)) / (n - 1)
    return frechet(mu_r, cov_r, f)


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs-dir", default="runs/bench_dmd", help="bench_dmd_digits.py's runs (default %(default)s)")
    ap.add_argument("--samples", type=int, default=2000, help="samples per set, a multiple of 10 (default %(default)s)")
    ap.add_argument("--out", default="benchmarks/dmd_digits_guidance.json")
    args = ap.parse_args(argv)
    if args.samples < 10 or args.samples % 10:
        sys.exit(f"probe_cond_guidance_digits: --samples {args.samples}: give a multiple of 10 (classes 0-9 in turn)")
    from distillkit.data.digits import DigitsDataModule, load_digits_tensors
    from distillkit.metrics.fid import SampleScorer
    from distillkit.metrics.images import split_images
    from distillkit.sample import generate

    t0 = time.time()
    runs_dir = (ROOT / args.runs_dir).resolve()
    scorer = SampleScorer("digits")
    dm = DigitsDataModule()
    dm.setup("fit")
    reference = scorer.reference(split_images(dm, "train"), "digits", "train")
    x_real, y_real = load_digits_tensors()
    real_means, real_widths = class_stats(features(scorer.net, x_real), y_real)
    classes = ",".join(str(c) for c in range(10))
    labels = torch.arange(args.samples) % 10

    sets: dict[str, tuple[torch.Tensor, dict]] = {}
    teacher = load(runs_dir, TEACHER)
    # the teacher's reference samples (sample seed 0): each set's FID to them, by mean and covariance
    against = {}
    for g in (1.0, 2.0):
        f = features(scorer.net, generate(teacher, args.samples, 64, seed=0, classes=classes, guidance=g))
        against[g] = (f.mean(0), torch.cov(f.T))
    for g in (1.0, 2.0):
        x = generate(teacher, args.samples, 64, seed=1, classes=classes, guidance=g)
        sets[f"teacher, 64 DDIM steps, guidance {g:g}"] = (x, {"run": TEACHER, "steps": 64, "guidance": g})
    for label, run, g in GENERATORS:
        method = load(runs_dir, run, g)
        x = generate(method, args.samples, method.num_steps, seed=1, classes=classes, guidance=1.0)
        updates = int(json.loads((runs_dir / run / "results.json").read_text())["global_step"])
        sets[label] = (x, {"run": run, "steps": method.num_steps, "real_guidance": g, "generator_updates": updates})

    rows = [{"set": "real digits (all 1,797, by label)", "spread": round(sum(real_widths) / 10, 3),
             "spread_by_class": [round(w, 2) for w in real_widths], "mean_offset": 0.0}]
    feats = {label: features(scorer.net, x) for label, (x, _) in sets.items()}
    teachers = {g: class_stats(feats[f"teacher, 64 DDIM steps, guidance {g:g}"], labels) for g in (1.0, 2.0)}
    for label, (x, info) in sets.items():
        f = feats[label]
        means, widths = class_stats(f, labels)
        offsets = (means - real_means).norm(dim=1)
        counterfactual = {}
        if "real_guidance" in info:
            t_means, t_widths = teachers[info["real_guidance"]]
            counterfactual = {
                "fid_real_means_as_teacher": round(fid_real(f - means[labels] + t_means[labels], reference), 3),
                "fid_real_widths_as_teacher": round(fid_real(
                    means[labels] + (f - means[labels]) * (sum(t_widths) / sum(widths)) ** 0.5, reference), 3)}
        row = {"set": label, **info, "samples": args.samples,
               "fid_real": round(fid_real(f, reference), 3),
               "fid_teacher_g1": round(frechet(*against[1.0], f), 3),
               "fid_teacher_g2": round(frechet(*against[2.0], f), 3),
               "spread": round(sum(widths) / 10, 3), "spread_by_class": [round(w, 2) for w in widths],
               "mean_offset": round(float(offsets.mean()), 3), "mean_offset_by_class": [round(float(o), 2) for o in offsets],
               "class_acc": round(scorer.class_accuracy(x, labels), 4), **counterfactual}
        rows.append(row)
        print(f"{label:48s} FID real {row['fid_real']:6.3f}  vs teacher g1 {row['fid_teacher_g1']:6.3f}  g2 "
              f"{row['fid_teacher_g2']:6.3f}  spread {row['spread']:6.2f}  mean offset {row['mean_offset']:.2f}  "
              f"class acc {row['class_acc']:.3f}" + ("  FID real with the teacher's class means {:.3f}, widths {:.3f}".format(
                  *counterfactual.values()) if counterfactual else ""), flush=True)
    result = {"name": "dmd_digits_guidance", "machine": machine(), "date": dt.date.today().isoformat(),
              "command": shlex.join(["python", "scripts/probe_cond_guidance_digits.py",
                                     *(sys.argv[1:] if argv is None else argv)]),
              "feature_net": scorer.net_id, "wall_s": round(time.time() - t0, 1), "rows": rows}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return result


if __name__ == "__main__":
    main()
