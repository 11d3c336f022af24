"""What `make demo` runs: the digits benchmarks in their quick form, all on CPU, into runs/demo.

1. Classifier distillation: the digits teacher, then the student alone, KD, DKD and FitNet for
   one seed on a short schedule (benchmarks/kd_digits_quick.json; the real benchmark is
   `make bench`).
2. Diffusion: the digits diffusion teacher (about 4 minutes), then its digits-FID/IS at 1, 4,
   16 and 64 DDIM steps against the real-data floor (benchmarks/teacher_digits_quick.json).
3. Step distillation: progressive distillation and DSDI (EMA target, denoising anchor) of that
   teacher from 8 DDIM steps to 2, 300 updates per round/level (lr 1e-3 annealed over each),
   scored at 4 and 2 steps next to the teacher's plain DDIM
   (benchmarks/step_distill_digits_demo.json; the full benchmark is
   scripts/bench_step_distill_digits.py).
4. DMD2: the same teacher distilled into a one-step generator with a trained critic and a GAN
   head, 600 generator updates (about 3 minutes), its digits-FID every 200 updates next to the
   teacher's DDIM at 1 and 64 steps (benchmarks/dmd_digits_demo.json; the full benchmark is
   scripts/bench_dmd_digits.py).

Runs already in runs/demo are reused, so a second `make demo` takes seconds.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dmd_digits  # noqa: E402
import bench_kd_digits  # noqa: E402
import bench_step_distill_digits  # noqa: E402
import bench_teacher_digits  # noqa: E402


def main() -> None:
    t0 = time.time()
    bench_kd_digits.main(["--quick", "--runs-dir", "runs/demo", "--out", "benchmarks/kd_digits_quick.json"])
    print()
    bench_teacher_digits.main(["--quick", "--runs-dir", "runs/demo"])
    print()
    bench_step_distill_digits.main(["--demo", "--runs-dir", "runs/demo"])
    print()
    bench_dmd_digits.main(["--demo", "--runs-dir", "runs/demo"])
    print(f"\ndemo finished in {time.time() - t0:.0f} s (runs in runs/demo; `make bench` for 3 seeds, full schedule)")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("\ndemo interrupted; its runs are kept in runs/demo (the one stopped wrote its last.ckpt): "
                 "`make demo` again continues from them")
