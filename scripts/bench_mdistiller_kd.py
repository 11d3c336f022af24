"""KD's update through `distill` against mdistiller's own training step, CIFAR-shaped, on the CPU.

    python scripts/bench_mdistiller_kd.py --mdistiller PATH   # PATH: a checkout of megvii-research/mdistiller

The setting of mdistiller's CIFAR-100 KD table: resnet32x4 teacher, resnet8x4 student, batch 64,
SGD (lr 0.05, momentum 0.9, weight decay 5e-4), T = 4, CE weight 0.1, KD weight 0.9, fp32, one
thread each. Random weights and random CIFAR-shaped images: the time of an update depends on the
shapes only.

- distill: `distill experiment=cifar100_kd` on a CIFAR-100 folder of random images written in the
  official python-pickle layout (40 batches an epoch, so the timed updates lie inside the first
  epoch: no validation or epoch end in them), `trainer.cpu_threads=1`, one loader worker (on the
  other core, as mdistiller's loader workers run beside its step), everything else as the
  experiment sets it. The ms per update is read inside the run: metrics.csv's `wall_s` between
  two logged update counts.
- mdistiller: its own `resnet32x4` / `resnet8x4` (mdistiller/models/cifar/resnet.py), its `KD`
  distiller (mdistiller/distillers/KD.py) and its `BaseTrainer.train_iter` as written, less the
  `.cuda()` copies: zero_grad, the distiller's forward (student, no-grad teacher, losses), the
  summed loss's backward, the SGD step, then its top-1/top-5 `accuracy` and the loss read back
  to the host for its meters. Batches are ready tensors (its loader workers' time is not in its
  step either). Timed the same way, by the clock around the updates.

Runs alternate (distill, mdistiller, repeated); the medians are taken. Writes
benchmarks/mdistiller_kd_cpu.json (issue 29, item 9: target at most 1.05x).
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from test_data_cifar import write_cifar100  # noqa: E402  (the tests' writer of the real file format)

TARGET = 1.05
BATCH = 64


def distill_ms(runs: Path, data: Path, teacher: Path, n1: int, n2: int, name: str) -> float:
    from bench_overhead import distill_ms as overhead_distill_ms

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return overhead_distill_ms("cifar100_kd", str(runs), n1, n2, name, env, f"dataset.data_dir={data}",
                               f"teacher.checkpoint={teacher}", "dataset.num_workers=1", "trainer.cpu_threads=1",
                               f"trainer.log_every_n_steps={n1}", "trainer.test_after_fit=false")


def load_mdistiller(path: Path) -> types.SimpleNamespace:
    """mdistiller's resnet module, KD distiller and accuracy, loaded from their files (its package
    __init__ imports every distiller and its trainer's dependencies, which this does not need)."""
    def load(name: str, file: Path, package: str | None = None):
        spec = importlib.util.spec_from_file_location(name, file, submodule_search_locations=None)
        mod = importlib.util.module_from_spec(spec)
        if package:
            mod.__package__ = package
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        return mod

    src = path / "mdistiller"
    if not (src / "distillers" / "KD.py").is_file():
        raise SystemExit(f"--mdistiller {path}: no mdistiller/distillers/KD.py there (a checkout of megvii-research/mdistiller?)")
    pkg = types.ModuleType("mdl_distillers")
    pkg.__path__ = [str(src / "distillers")]
    sys.modules["mdl_distillers"] = pkg
    load("mdl_distillers._base", src / "distillers" / "_base.py", "mdl_distillers")
    kd = load("mdl_distillers.KD", src / "distillers" / "KD.py", "mdl_distillers")
    resnet = load("mdl_resnet", src / "models" / "cifar" / "resnet.py")
    utils_src = (src / "engine" / "utils.py").read_text()
    start = utils_src.index("def accuracy(")
    end = utils_src.index("\ndef ", start + 1)
    ns: dict = {}
    exec("import torch\n" + utils_src[start:end], ns)  # its accuracy() alone: utils.py imports its loggers
    return types.SimpleNamespace(KD=kd.KD, resnet=resnet, accuracy=ns["accuracy"])


def mdistiller_ms(md: types.SimpleNamespace, n1: int, n2: int) -> float:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = types.SimpleNamespace(KD=types.SimpleNamespace(TEMPERATURE=4.0, LOSS=types.SimpleNamespace(CE_WEIGHT=0.1, KD_WEIGHT=0.9)))
    distiller = md.KD(md.resnet.resnet8x4(num_classes=100), md.resnet.resnet32x4(num_classes=100), cfg)
    distiller.train()
    optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    batches = [(torch.randn(BATCH, 3, 32, 32), torch.randint(0, 100, (BATCH,))) for _ in range(4)]
    t = {}
    for i in range(n2 + 1):
        if i in (n1, n2):
            t[i] = time.perf_counter()
        if i == n2:
            break
        image, target = batches[i % len(batches)]
        optimizer.zero_grad()  # BaseTrainer.train_iter, less the .cuda() copies
        preds, losses_dict = distiller(image=image.float(), target=target, epoch=1)
        loss = sum([loss_.mean() for loss_ in losses_dict.values()])
        loss.backward()
        optimizer.step()
        acc1, acc5 = md.accuracy(preds, target, topk=(1, 5))
        loss.cpu().detach().numpy().mean(), float(acc1[0]), float(acc5[0])  # its meters read these
    return 1000 * (t[n2] - t[n1]) / (n2 - n1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mdistiller", type=Path, required=True, help="a checkout of megvii-research/mdistiller")
    ap.add_argument("--updates", type=int, nargs=2, default=[5, 15], metavar=("N1", "N2"),
                    help="time the updates between these two counts (default 5 15)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--commit", default=None, help="the mdistiller commit (default: git's, when PATH is a checkout)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "mdistiller_kd_cpu.json")
    args = ap.parse_args(argv)
    n1, n2 = args.updates
    if n2 % n1:
        raise SystemExit("--updates: N2 must be a multiple of N1 (both are logged every N1 updates)")
    md = load_mdistiller(args.mdistiller.resolve())
    import torch

    from distillkit.models.cifar_resnet import resnet32x4

    commit = subprocess.run(["git", "-C", str(args.mdistiller), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or args.commit
    ms: dict[str, list[float]] = {"distill": [], "mdistiller": []}
    with tempfile.TemporaryDirectory(prefix="bench-mdistiller-") as tmp:
        tmp = Path(tmp)
        data = write_cifar100(tmp, n_train=BATCH * 40, n_test=BATCH)  # 40 batches an epoch
        teacher = tmp / "resnet32x4.pt"
        torch.save(resnet32x4(num_classes=100).state_dict(), teacher)
        for rep in range(args.repeats):
            ms["distill"].append(distill_ms(tmp / "runs", data, teacher, n1, n2, f"r{rep}"))
            ms["mdistiller"].append(mdistiller_ms(md, n1, n2))
            print(f"repeat {rep}: distill {ms['distill'][-1]:.0f} ms, mdistiller {ms['mdistiller'][-1]:.0f} ms", flush=True)
    med = {k: statistics.median(v) for k, v in ms.items()}
    ratio = med["distill"] / med["mdistiller"]
    from bench_kd_digits import machine

    result = {"name": "mdistiller_kd_cpu", "machine": machine(), "date": dt.date.today().isoformat(),
              "command": "python scripts/bench_mdistiller_kd.py --mdistiller PATH" + (
                  f" --updates {n1} {n2}" if (n1, n2) != (5, 15) else "") + (
                  f" --repeats {args.repeats}" if args.repeats != 2 else ""),
              "mdistiller_commit": commit, "setting": "resnet32x4 -> resnet8x4, batch 64, SGD 0.05/0.9/5e-4, T 4, "
              "CE 0.1, KD 0.9, fp32, one thread", "updates": [n1, n2],
              "ms_per_update_distill": round(med["distill"], 1), "ms_per_update_mdistiller": round(med["mdistiller"], 1),
              "ratio": round(ratio, 3), "runs_ms_distill": [round(v, 1) for v in ms["distill"]],
              "runs_ms_mdistiller": [round(v, 1) for v in ms["mdistiller"]],
              "verdict": f"{ratio:.3f}x mdistiller's step: {'meets' if ratio <= TARGET else 'misses'} the target "
                         f"(at most {TARGET:.2f}x)"}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(result["verdict"])


if __name__ == "__main__":
    main()
