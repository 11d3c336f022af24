"""The digits-FID floor: real held-out digits (val + test, the first 700) scored against the
training digits with the shipped feature network; the best FID a generator can reach at
700 samples, and the IS of real digits. Writes ``benchmarks/digits_floor.json``.

    python scripts/bench_digits_floor.py
"""
from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distillkit.metrics.fid import DIGITS_NUM_SAMPLES, digits_floor  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.time()
    r = digits_floor(DIGITS_NUM_SAMPLES)
    row = {"method": "floor", "steps": 0, "seed": 0, "fid": round(r["fid"], 4), "is": round(r["is"], 4),
           "is_std": round(r["is_std"], 4), "num_samples": r["num_samples"], "feature_net": r["feature_net"],
           "reference": r["reference"], "wall_s": round(time.time() - t0, 3)}
    out = {"name": "digits_floor", "machine": f"{platform.machine()} CPU, torch {torch.__version__}",
           "date": datetime.date.today().isoformat(), "command": "python scripts/bench_digits_floor.py",
           "rows": [row]}
    path = REPO / "benchmarks" / "digits_floor.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
