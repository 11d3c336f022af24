"""Summarise a GPU check (scripts/gpu_check_paper_settings.sh) into benchmarks/<name>.json.

Per run log: seconds per update, the median over the intervals between consecutive progress
lines ("step S/T (epoch E), ..." at the log's time stamps; older logs' "epoch E step S ... (elapsed
s)") that no round or level change falls in (the median keeps the stand-in data's short epochs,
each ending with a last.ckpt, from weighing in), the number of validations in the log (a run that validated between most updates has no rate worth reading); and,
from nvidia-smi's log, the peak memory while the run trained and the mean utilisation from its first
progress line on.

    python scripts/gpu_check_summary.py --gpu-csv OUT/gpu.csv --machine "one NVIDIA H200" \
        cifar10_diffusion_teacher=OUT/cifar10_teacher.log celebahq_dsdi=OUT/celebahq_dsdi.log ...
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
from datetime import datetime
from pathlib import Path

import readme_tables

NAME = "gpu_check_paper_settings"
LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[distillkit\]\[INFO\] - (.*)$")
PROGRESS = re.compile(r"^step (\d+)(?:/\d+)? \(epoch \d+\)(?!, val/)")  # distillkit.callbacks.progress
VALIDATION = re.compile(r"^step \d+(?:/\d+)? \(epoch \d+\), val/|^epoch \d+ step \d+ val/")
OLD_PROGRESS = re.compile(r"^epoch \d+ step (\d+) .*\(([\d.]+)s\)$")  # logs before the rate and time left
CHANGE = re.compile(r"^method=\w+: (round|level) \d+ of \d+")


def _log_time(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")


def parse_log(path: Path) -> dict:
    """Seconds per update and the time window of the training, from one run's cli output."""
    points, t_first, t_steady, t_last, changes, validations = [], None, None, None, 0, 0
    for raw in path.read_text().splitlines():
        m = LINE.match(raw)
        if not m:
            continue
        when, msg = _log_time(m.group(1)), m.group(2)
        if msg.startswith("training from step"):
            t_first = when
        if CHANGE.match(msg):
            changes += 1
            continue
        validations += bool(VALIDATION.match(msg))
        p, old = PROGRESS.match(msg), OLD_PROGRESS.match(msg)
        if p or old:
            points.append((int(p.group(1)), when.timestamp(), changes) if p
                          else (int(old.group(1)), float(old.group(2)), changes))
            t_steady, t_last = t_steady or when, when
    rates = [(t1 - t0) / (s1 - s0) for (s0, t0, c0), (s1, t1, c1) in zip(points, points[1:])
             if c0 == c1 and s1 > s0]
    return {"updates_logged": points[-1][0] if points else 0, "validations": validations, "intervals": len(rates),
            "s_per_update": round(statistics.median(rates), 4) if rates else None,
            "window": (t_first, t_last), "steady_from": t_steady}


def parse_gpu_csv(path: Path) -> list[tuple[datetime, float, float]]:
    """(time, MiB used, % utilisation) rows of ``nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu``."""
    rows = []
    for raw in path.read_text().splitlines():
        parts = [p.strip() for p in raw.split(",")]
        if len(parts) == 3:
            rows.append((datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f"),
                         float(parts[1].split()[0]), float(parts[2].split()[0])))
    return rows


def summarise(runs: dict[str, Path], gpu_rows: list, call: str) -> list[dict]:
    rows = []
    for name, log in runs.items():
        r = parse_log(log)
        (t0, t1), ts = r.pop("window"), r.pop("steady_from")
        during = [row for row in gpu_rows if t0 and t1 and t0 <= row[0] <= t1]
        # utilisation from the first progress line on: the first updates (torch.compile's
        # compilation, cuDNN's autotuning) keep the GPU idle for up to a minute and a half
        steady = [row for row in during if row[0] >= ts]
        rows.append({"experiment": name, "call": call, **r,
                     "peak_memory_mib": max((row[1] for row in during), default=None),
                     "mean_utilisation_pct": round(statistics.mean(row[2] for row in steady), 1) if steady else None,
                     "log": log.name})
    return rows


def machines(rows: list[dict]) -> str:
    """The file's machine line: the one machine, or each machine after the calls it ran."""
    calls: dict[str, list[str]] = {}
    for r in rows:
        if r["call"] not in calls.setdefault(r["machine"], []):
            calls[r["machine"]].append(r["call"])
    if len(calls) == 1:
        return next(iter(calls))
    return "; ".join(f"{', '.join(c)}: {m}" for m, c in calls.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="NAME=LOG pairs")
    ap.add_argument("--gpu-csv", type=Path, required=True)
    ap.add_argument("--machine", required=True, help="the GPU and software of this call, as the README reports it")
    ap.add_argument("--out", type=Path, default=readme_tables.BENCH_DIR / f"{NAME}.json",
                    help="default: the README's table reads it; any other path leaves the README alone")
    ap.add_argument("--call", default="1", help="a label of these runs, e.g. the commit measured (rows of other labels are kept)")
    args = ap.parse_args()
    runs = {}
    for pair in args.runs:
        name, sep, log = pair.partition("=")
        if not sep or not Path(log).is_file():
            ap.error(f"{pair!r}: expected NAME=LOG with an existing log file")
        runs[name] = Path(log)
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    # two machines of one kind differ (README), so each row keeps the machine its call ran on
    rows = [{**r, "machine": r.get("machine", old.get("machine"))} for r in old.get("rows", [])
            if r.get("call") != args.call]
    new = summarise(runs, parse_gpu_csv(args.gpu_csv), args.call)
    rows += [{**r, "machine": args.machine} for r in sorted(new, key=lambda r: r["experiment"])]  # calls in order
    command = "python scripts/gpu_check_summary.py " + shlex.join(sys.argv[1:])
    result = {"machine": machines(rows),
              **readme_tables.merge_provenance(old, command, datetime.now().strftime("%Y-%m-%d")),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if args.out.resolve() == (readme_tables.BENCH_DIR / f"{NAME}.json").resolve():  # the README's check
        readme_tables.update_readme(NAME, path=args.out)


if __name__ == "__main__":
    main()
