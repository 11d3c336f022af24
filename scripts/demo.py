"""What `make demo` runs: the digits distillation benchmark in its quick form.

Trains the digits teacher, then the student alone, KD, DKD and FitNet for one seed on a
short schedule, all on CPU, into runs/demo, and prints the table (benchmarks/kd_digits_quick.json;
the real benchmark, benchmarks/kd_digits.json, is `make bench`). Runs already in runs/demo
are reused, so a second `make demo` takes seconds.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_kd_digits  # noqa: E402


def main() -> None:
    t0 = time.time()
    bench_kd_digits.main(["--quick", "--runs-dir", "runs/demo", "--out", "benchmarks/kd_digits_quick.json"])
    print(f"\ndemo finished in {time.time() - t0:.0f} s (runs in runs/demo; `make bench` for 3 seeds, full schedule)")


if __name__ == "__main__":
    main()
