"""Markdown tables of the docs, generated from ``benchmarks/<name>.json`` (docs/architecture.md,
Benchmarks); the tables are never typed by hand.

    python scripts/readme_tables.py              # every benchmarks/*.json whose markers a page holds
    python scripts/readme_tables.py kd_digits    # one

A table lives between ``<!-- table:<name> -->`` and ``<!-- /table:<name> -->`` in one of the pages:
README.md or any docs/*.md (most of them in docs/benchmarks.md). :func:`table_pages` finds the page
that holds a table's markers; what is between the markers is replaced, and pages without them are
left alone. Relative links in a table (plots under benchmarks/) are written from the repository
root and rebased onto the page's folder. Each benchmark may register its own formatter with
``@formatter("<name>")``; others get :func:`generic_table`. Other scripts call :func:`update_readme`
(the name is historical: it writes whichever page holds the markers) after writing their JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
README = ROOT / "README.md"
DOCS_DIR = ROOT / "docs"

Formatter = Callable[[dict], str]
FORMATTERS: dict[str, Formatter] = {}


def formatter(name: str) -> Callable[[Formatter], Formatter]:
    """Register ``fn(benchmark_dict) -> markdown`` as the table of benchmark ``name``."""

    def register(fn: Formatter) -> Formatter:
        FORMATTERS[name] = fn
        return fn

    return register


def markers(name: str) -> tuple[str, str]:
    return f"<!-- table:{name} -->", f"<!-- /table:{name} -->"


def replace_between_markers(text: str, name: str, table: str) -> Optional[str]:
    """``text`` with what lies between ``name``'s markers replaced by ``table``; None when
    the markers are absent (or out of order)."""
    start, end = markers(name)
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        return None
    return text[: i + len(start)] + "\n" + table.strip("\n") + "\n" + text[j:]


def _num(x: object, digits: int = 1) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and x.is_integer() and digits == 0:
        return str(int(x))
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def mean_std(mean: float, std: Optional[float], digits: int = 3) -> str:
    """``2.753 ± 0.195``; the mean alone when there is no std (a single run)."""
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def pct_mean_std(mean: Optional[float], std: Optional[float], n: int) -> str:
    """``90.42 ± 0.50 (n=3)`` for an accuracy in [0, 1]; no ± for a single run."""
    if mean is None:
        return "—"
    return f"{mean_std(100 * mean, 100 * std if std is not None and n > 1 else None, 2)} (n={n})"


def merge_provenance(old: dict, command: str, date: str) -> dict:
    """The ``command`` and ``date`` of a benchmark JSON that several processes or sittings add rows
    to: ``old``'s commands ("; "-joined) with ``command`` appended unless already there, and the
    dates from ``old``'s first to ``date``. Each writer keeps the record of the earlier ones."""
    commands = [c for c in old.get("command", "").split("; ") if c]
    commands += [command] if command not in commands else []
    first = old.get("date", date).split(" to ")[0]
    return {"command": "; ".join(commands), "date": date if first == date else f"{first} to {date}"}


def provenance(bench: dict) -> str:
    """The line under every table: where and how the numbers were made."""
    return (f"Machine: {bench.get('machine', '?')}; date {bench.get('date', '?')}; "
            f"command: `{bench.get('command', '?')}`.")


def md_table(header: list[str], rows: list[list[str]], align: Optional[list[str]] = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def generic_table(bench: dict) -> str:
    """Any benchmark: its summary (or its rows) with every key as a column."""
    items = bench.get("summary") or bench.get("rows") or []
    keys: list[str] = []
    for it in items:
        keys += [k for k in it if k not in keys]
    body = [[_num(it.get(k), 4) if isinstance(it.get(k), float) else str(it.get(k, "")) for k in keys]
            for it in items]
    return md_table(keys, body) + "\n\n" + provenance(bench)


@formatter("kd_digits")
def kd_digits_table(bench: dict) -> str:
    """method | test acc (%) mean ± std over n seeds | updates | wall s."""
    body = []
    for s in bench["summary"]:
        label = s["method"] + (f" ({s['epochs']} epochs)" if s.get("note") == "convergence check" else "")
        body.append([label, pct_mean_std(s.get("test_acc_mean"), s.get("test_acc_std"), s.get("n", 0)),
                     _num(s.get("updates"), 0), _num(s.get("wall_s_mean"), 1)])
    table = md_table(["method", "test acc % (mean ± std)", "updates", "wall s"], body,
                     ["---", "--:", "--:", "--:"])
    return table + "\n\n" + provenance(bench)


FORMATTERS["kd_digits_quick"] = kd_digits_table


@formatter("teacher_digits")
def teacher_digits_table(bench: dict) -> str:
    """steps | digits-FID | IS | sampling wall s; the floor first."""
    body = []
    for r in bench["rows"]:
        label = "floor (held-out real digits)" if r["method"] == "floor" else f"teacher, {r['steps']} DDIM steps"
        body.append([label, _num(r["fid"], 3), _num(r["is"], 2), _num(r.get("sample_wall_s"), 1)])
    table = md_table(["", f"digits-FID ({bench['rows'][0]['num_samples']} samples)", "IS", "sampling s"], body,
                     ["---", "--:", "--:", "--:"])
    notes = [provenance(bench), f"Feature network: `{bench.get('feature_net')}`."]
    if bench.get("verdict"):
        notes.append(bench["verdict"] + ".")
    return table + "\n\n" + " ".join(notes)


FORMATTERS["teacher_digits_quick"] = teacher_digits_table


@formatter("cond_teacher_digits")
def cond_teacher_digits_table(bench: dict) -> str:
    """steps | guidance | digits-FID | IS | class accuracy | nfe; the floor first."""
    body = []
    for r in bench["rows"]:
        if r["method"] == "floor":
            body.append(["floor (held-out real digits)", "", "", _num(r["fid"], 3), _num(r["is"], 2),
                         f"{100 * r['class_acc']:.1f}%", ""])
        else:
            body.append(["class-conditional teacher", str(r["steps"]), f"{r['guidance']:g}", _num(r["fid"], 3),
                         _num(r["is"], 2), f"{100 * r['class_acc']:.1f}%", str(r["nfe"])])
    table = md_table(["", "DDIM steps", "guidance", f"digits-FID ({bench['rows'][0]['num_samples']} samples)", "IS",
                      "class accuracy", "nfe"], body, ["---", "--:", "--:", "--:", "--:", "--:", "--:"])
    notes = [provenance(bench)]
    if bench.get("verdict"):
        notes.append(bench["verdict"] + ".")
    return table + "\n\n" + " ".join(notes)


FORMATTERS["cond_teacher_digits_quick"] = cond_teacher_digits_table


def few_step_table(bench: dict, labels: dict, updates: str) -> str:
    """configuration | steps | updates | seeds | digits-FID mean ± std | IS | class accuracy | nfe | wall s,
    then the provenance and the verdict (the DMD and consistency benchmarks)."""
    body = []
    for s in bench["summary"]:
        acc = s.get("class_acc_mean")
        body.append([labels.get(s["config"], s["config"]), str(s["steps"]), str(s["updates"]), str(s["n"]),
                     mean_std(s["fid_mean"], s.get("fid_std")), _num(s.get("is_mean"), 2),
                     f"{100 * acc:.1f}%" if acc is not None else "—", _num(s.get("nfe_mean"), 0),
                     _num(s.get("wall_s_mean"), 0)])
    table = md_table(["", "steps", updates, "seeds", "digits-FID (700 samples)", "IS", "class accuracy",
                      "nfe (training)", "wall s"], body, ["---", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "--:"])
    return table + "\n\n" + " ".join([provenance(bench), *(v + "." for v in bench.get("verdict") or [])])


@formatter("dmd_digits")
def dmd_digits_table(bench: dict) -> str:
    return few_step_table(bench, {"dmd_1step": "DMD (regression pairs, no GAN)", "dmd2_1step": "DMD2",
                                  "dmd2_4step_backward": "DMD2, backward simulation",
                                  "dmd2_4step_real": "DMD2, noised real inputs",
                                  "cond_dmd2_1step": "DMD2, class-conditional (real guidance 2)",
                                  "cond_dmd_1step": "DMD, class-conditional (real guidance 2)",
                                  "cond_dmd2_1step_g1": "DMD2, class-conditional, real score unguided",
                                  "cond_dmd_1step_g1": "DMD, class-conditional, real score and pairs unguided",
                                  "cond_dmd2_4step_backward_g1": "DMD2, class-conditional, unguided, backward simulation",
                                  "cond_dmd2_4step_real_g1": "DMD2, class-conditional, unguided, noised real inputs",
                                  "cond_dmd2_1step_g1_gan_critic1": "DMD2, class-conditional, unguided, GAN weights 3e-2 / 1",
                                  "cond_dmd2_4step_backward": "DMD2, class-conditional, backward simulation",
                                  "cond_dmd2_4step_real": "DMD2, class-conditional, noised real inputs",
                                  "dmd2_1step_cosine_lr": "DMD2, cosine lr", "dmd2_1step_ema999": "DMD2, sampling EMA 0.999",
                                  "dmd2_1step_gan1e-2": "DMD2, generator GAN weight 1e-2",
                                  "dmd2_1step_gan3e-2": "DMD2, generator GAN weight 3e-2",
                                  "dmd2_1step_lora": "DMD2, LoRA rank 8 generator and fake score",
                                  "dmd2_1step_batch128": "DMD2, batch 128",
                                  "dmd2_1step_ttur10": "DMD2, 10 critic updates per generator update",
                                  "dmd2_1step_gan_critic1e-1": "DMD2, GAN weights 3e-2 (generator) / 1e-1 (critic)",
                                  "dmd2_1step_gan_critic1": "DMD2, GAN weights 3e-2 (generator) / 1 (critic)"},
                          "generator updates")


FORMATTERS["dmd_digits_demo"] = dmd_digits_table


@formatter("consistency_digits")
def consistency_digits_table(bench: dict) -> str:
    return few_step_table(bench, {"cm": "consistency distillation (EMA target 0.95)",
                                  "cm_online_target": "consistency, online target (iCT)",
                                  "lcm_cond": "LCM, class-conditional, 32-step grid (guidance 2)",
                                  "lcm_cond_g1": "LCM, class-conditional, 32-step grid (guidance 1)",
                                  "lcm_cond_n64": "LCM, class-conditional, 64-step grid (guidance 2)",
                                  "lcm_cond_n64_g1": "LCM, class-conditional, 64-step grid (guidance 1)",
                                  "cm_cosine_lr": "consistency, cosine lr",
                                  "cm_n64": "consistency, 64-step grid", "cm_n128": "consistency, 128-step grid",
                                  "cm_ict_32_512": "consistency, iCT curriculum 32 to 512",
                                  "lcm_cond_n128": "LCM, class-conditional, 128-step grid (guidance 2)",
                                  "cm_target_099": "consistency, EMA target 0.99",
                                  "cm_target_0999": "consistency, EMA target 0.999",
                                  "cm_l2": "consistency, squared L2", "cm_lora": "consistency, LoRA rank 8",
                                  "cm_lora_target099": "consistency, LoRA rank 8, EMA target 0.99",
                                  "cm_n64_target099": "consistency, 64-step grid, EMA target 0.99",
                                  "cm_n64_target0985": "consistency, 64-step grid, EMA target 0.985",
                                  "cm_n64_target0992": "consistency, 64-step grid, EMA target 0.992",
                                  "cm_n64_target0994": "consistency, 64-step grid, EMA target 0.994",
                                  "cm_n96_target099": "consistency, 96-step grid, EMA target 0.99",
                                  "cm_n64_target0992_lr2e-4": "consistency, 64-step grid, EMA target 0.992, lr 2e-4",
                                  "cm_n64_target0992_cosine": "consistency, 64-step grid, EMA target 0.992, lr decayed",
                                  "cm_n64_target099_cosine": "consistency, 64-step grid, EMA target 0.99, lr decayed",
                                  "cm_n64_target0992_ema995": "consistency, 64-step grid, EMA target 0.992, sampling EMA 0.995",
                                  "cm_n64_target0992_l2": "consistency, 64-step grid, EMA target 0.992, squared L2",
                                  "cm_n64_target0992_huber02": "consistency, 64-step grid, EMA target 0.992, Huber c 0.02",
                                  "cm_n64_target0992_t767": "consistency, 64-step grid, EMA target 0.992, 2 steps at 1023 and 767",
                                  "lcm_lora": "LCM-LoRA rank 8, class-conditional, teacher at guidance 2",
                                  "lcm_lora_online_target": "LCM-LoRA, online target, teacher at guidance 2",
                                  "lcm_lora_g1": "LCM-LoRA rank 8, class-conditional, teacher at guidance 1",
                                  "lcm_lora_g1_target099": "LCM-LoRA, EMA target 0.99, teacher at guidance 1",
                                  "lcm_lora_target099": "LCM-LoRA, EMA target 0.99, teacher at guidance 2"},
                        "updates")


@formatter("smoke_cpu")
def smoke_cpu_table(bench: dict) -> str:
    """command | seconds (one process, start to exit) | exit status; the verdict against the target."""
    body = [[f"`{r['command']}`", _num(r["seconds"], 1), str(r["exit"])] for r in bench["rows"]]
    table = md_table(["command", "seconds", "exit"], body, ["---", "--:", "--:"])
    return table + "\n\n" + " ".join(bench.get("verdict", [])) + "\n\n" + provenance(bench)


@formatter("overhead_cpu")
def overhead_cpu_table(bench: dict) -> str:
    """experiment | updates timed | median ms per update (wall clock, inside the run) through distill | in a
    plain loop | the ratio of those medians | the ratio, the median of paired runs' ratios; the verdict."""
    body = [[f"`{r['experiment']}`", f"{r['updates'][0]} to {r['updates'][1]}", _num(r["ms_per_update_distill"], 2),
             _num(r["ms_per_update_plain"], 2), _num(r.get("ratio_of_medians"), 2), _num(r["ratio"], 2) + "x"]
            for r in bench["rows"]]
    table = md_table(["experiment", "updates timed", "ms per update, distill", "ms per update, plain loop",
                      "ratio of the medians", "ratio (median of pairs)"], body, ["---", "--:", "--:", "--:", "--:", "--:"])
    return table + "\n\n" + " ".join(bench.get("verdict", [])) + "\n\n" + provenance(bench)


@formatter("gpu_check_paper_settings")
def gpu_check_table(bench: dict) -> str:
    """experiment | code (the commit measured) | s per update | updates logged | validations | peak MiB | mean utilisation."""
    body = [[f"`{r['experiment']}`", r["call"], _num(r["s_per_update"], 3), str(r["updates_logged"]),
             str(r["validations"]), _num(r["peak_memory_mib"], 0), _num(r["mean_utilisation_pct"], 1)]
            for r in bench["rows"]]
    table = md_table(["experiment", "code", "s per update (median)", "updates", "validations",
                      "peak GPU memory MiB", "mean GPU utilisation %"], body,
                     ["---", "--:", "--:", "--:", "--:", "--:", "--:"])
    return table + "\n\n" + provenance(bench)


@formatter("probe_unet_compile")
def probe_unet_compile_table(bench: dict) -> str:
    """variant | batch | s per update | images per s | first update s | peak MiB."""
    body = [[f"`{r['variant']}`", str(r["batch"]), _num(r["s_per_update"], 4), _num(r["images_per_s"], 0),
             _num(r["first_update_s"], 1), _num(r.get("peak_memory_mib"), 0)] for r in bench["rows"]]
    table = md_table(["variant", "batch", "s per update", "images per s", "first update s (compiles)",
                      "peak GPU memory MiB"], body, ["---", "--:", "--:", "--:", "--:", "--:"])
    return table + "\n\n" + provenance(bench)


@formatter("step_distill_digits")
def step_distill_digits_table(bench: dict) -> str:
    """method | steps | FID (mean ± std) | IS | updates | nfe | wall s; then the targets, met or
    missed, and DSD against progressive at equal nfe (computed from the rows)."""
    from bench_step_distill_digits import table_rows, targets

    summary = table_rows(bench["rows"])
    body = []
    for s in summary:
        fid = f"{mean_std(s['fid_mean'], s['fid_std'])} (n={s['n']})"
        label = s["method"] + (f" ({s['checkpoint']})" if s["checkpoint"] not in ("last", None) else "")
        body.append([label, str(s["steps"]), fid, _num(s["is_mean"], 2), _num(s["updates"], 0),
                     _num(s["nfe"], 0), _num(s["wall_s"], 0)])
    table = md_table(["method", "steps", "digits-FID (mean ± std)", "IS", "updates", "nfe", "wall s"], body,
                     ["---", "--:", "--:", "--:", "--:", "--:", "--:"])
    if bench.get("demo"):  # short runs from 8 steps: the targets are the full benchmark's
        notes = "- short demo runs (8 -> 2 steps, 300 updates per round/level); the targets are checked by the full benchmark"
    else:
        notes = "\n".join(f"- {line}" for line in targets(summary))
    plot = f"\n\n![FID against cumulative network evaluations]({bench['plot']})" if bench.get("plot") else ""
    return table + "\n\n" + notes + plot + from_scratch_table(bench["rows"]) + "\n\n" + provenance(bench)


def from_scratch_table(rows: list[dict]) -> str:
    """The from-scratch comparison: digits-FID at each evaluation of plain denoising training and
    of the same with DSD's self-distillation loss (rows with ``curve == "from_scratch"``)."""
    curve = [r for r in rows if r.get("curve") == "from_scratch"]
    if not curve:
        return ""
    methods = sorted({r["method"] for r in curve})
    cols = [(m, k) for k in sorted({r["steps"] for r in curve}) for m in methods]
    fids: dict[tuple, list[float]] = {}
    for r in curve:
        fids.setdefault((r["method"], r["steps"], r["updates"]), []).append(float(r["fid"]))

    def cell(v: Optional[list[float]]) -> str:
        if not v:
            return _num(None, 3)
        return mean_std(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None)

    n = len({r["seed"] for r in curve})
    seeds = "one seed" if n == 1 else f"{n} seeds, mean ± std"
    body = [[str(u)] + [cell(fids.get((m, k, u))) for m, k in cols] for u in sorted({r["updates"] for r in curve})]
    return (f"\n\nFrom scratch ({seeds}): digits-FID against training updates\n\n"
            + md_table(["updates"] + [f"{m}, {k} steps" for m, k in cols], body, ["--:"] * (len(cols) + 1)))


FORMATTERS["step_distill_digits_quick"] = FORMATTERS["step_distill_digits_demo"] = step_distill_digits_table


def render(name: str, bench: Optional[dict] = None, path: Optional[Path] = None) -> str:
    """The markdown of benchmark ``name`` (read from ``path`` or benchmarks/<name>.json)."""
    if bench is None:
        bench = json.loads(Path(path or BENCH_DIR / f"{name}.json").read_text())
    return FORMATTERS.get(name, generic_table)(bench)


def pages() -> list[Path]:
    """The pages that may hold tables: README.md and every docs/*.md."""
    return [p for p in [README, *sorted(DOCS_DIR.glob("*.md"))] if p.is_file()]


def table_pages(name: str) -> list[Path]:
    """The pages holding ``name``'s opening marker: one, normally (a test keeps it so)."""
    start = markers(name)[0]
    return [p for p in pages() if start in p.read_text()]


_LINK = re.compile(r"(\]\()([^)\s#][^)\s]*)(\))")


def rebase_links(md: str, page: Path) -> str:
    """``md``'s relative links (written from the repository root, e.g. ``benchmarks/x.png``)
    rewritten relative to ``page``'s folder; unchanged for a page at the root or outside the
    repository, and for absolute links (``http...``, ``/...``) and anchors."""
    folder = page.resolve().parent
    if folder == ROOT or ROOT not in folder.parents:
        return md

    def rebase(m: re.Match) -> str:
        target = m.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            return m.group(0)
        return m.group(1) + Path(os.path.relpath(ROOT / target, folder)).as_posix() + m.group(3)

    return _LINK.sub(rebase, md)


def update_readme(name: str, path: Optional[Path] = None, readme: Optional[Path] = None) -> bool:
    """Write benchmark ``name``'s table between its markers in the page that holds them
    (README.md or a docs/*.md page; ``readme`` names one page instead); False (and a note)
    when no page has the markers."""
    texts = {page: page.read_text() for page in ([readme] if readme is not None else table_pages(name))
             if page.is_file()}
    texts = {page: text for page, text in texts.items() if replace_between_markers(text, name, "") is not None}
    if not texts:
        start, end = markers(name)
        where = readme if readme is not None else "README.md or docs/*.md"
        print(f"note: {where} has no {start} ... {end} markers; its table was not written",
              file=sys.stderr)
        return False
    table = render(name, path=path)
    for page, text in texts.items():
        new = replace_between_markers(text, name, rebase_links(table, page))
        if new != text:
            page.write_text(new)
    return True


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("names", nargs="*",
                    help="benchmark names (default: every benchmarks/*.json whose markers a page holds)")
    args = ap.parse_args(argv)
    names = args.names or [p.stem for p in sorted(BENCH_DIR.glob("*.json")) if table_pages(p.stem)]
    for name in names:
        where = ", ".join(str(p.relative_to(ROOT)) for p in table_pages(name))
        if update_readme(name):
            print(f"{where}: table {name} updated")


if __name__ == "__main__":
    main()
