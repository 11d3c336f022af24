"""distill-report and the sweep's closing table, on a small sweep made through the real CLI: the
digits teacher on two seeds (one group, n=2) and a digits diffusion teacher with in-training
evaluation (n=1: FID curves and sample grids). Also the metrics.csv step (the update count)."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from conftest import run_cli_all, run_module

from distillkit import report

SMOKE = ["debug=smoke", "callbacks.progress=none"]
SWEEP = ["-m", "experiment=digits_teacher", "seed=0,1", *SMOKE]
DIFFUSION = ["experiment=digits_diffusion_teacher", *SMOKE, "eval=digits", "eval.every_n_steps=3",
             "eval.num_samples=64", "eval.batch_size=64", "eval.steps=[1,2]"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    runs = tmp_path_factory.mktemp("report") / "runs"
    results = run_cli_all({"sweep": [*SWEEP, f"runs_dir={runs}"], "diffusion": [*DIFFUSION, f"runs_dir={runs}"]})
    return {"runs": runs, "sweep": results["sweep"]}


def run_dirs(folder: Path) -> list[Path]:
    """The run dirs in a sweep's folder (which also holds Hydra's multirun.yaml)."""
    return sorted(d for d in folder.iterdir() if d.is_dir())


def md_rows(md: str) -> dict[str, list[str]]:
    """The markdown table's rows by their first cell."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]
    return {r[0]: r for r in rows[2:]} | {"header": rows[0]}


def test_report_groups_seeds_with_mean_and_std(sweep, tmp_path, capsys):
    out = tmp_path / "rep"
    report.main([str(sweep["runs"]), "-o", str(out)])
    printed = capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert md in printed and "3 runs; wrote" in printed
    rows = md_rows(md)
    head = rows["header"]
    teacher, diffusion = rows["digits_teacher"], rows["digits_diffusion_teacher"]
    assert teacher[1] == "2" and diffusion[1] == "1"
    acc = head.index("test/acc")
    seeds = [json.loads((d / "results.json").read_text())["test/acc"] for d in run_dirs(sweep["runs"] / "digits_teacher")]
    mean, std = report.mean_std(seeds)
    assert teacher[acc] == report.fmt(mean, std) and " ± " in teacher[acc]
    for col in ("fid/1step", "fid/2step", "is/1step", "is/2step"):
        assert re.fullmatch(r"[0-9.]+", diffusion[head.index(col)]), (col, diffusion)  # one run: no ±
        assert teacher[head.index(col)] == "—"
    assert teacher[head.index("updates")] == "6" and teacher[head.index("nfe")] == "6"
    assert " ± " in teacher[head.index("wall_s")]

    with (out / "report.csv").open() as f:
        table = {r["run"]: r for r in csv.DictReader(f)}
    assert table["digits_teacher"]["n"] == "2" and table["digits_teacher"]["seeds"] == "0 1"
    assert float(table["digits_teacher"]["test/acc"]) == pytest.approx(mean)
    assert float(table["digits_teacher"]["test/acc_std"]) == pytest.approx(std)
    assert table["digits_diffusion_teacher"]["fid/1step_std"] == ""
    with (out / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 3


def test_report_files_and_self_contained_page(sweep, tmp_path, capsys):
    out = tmp_path / "rep"
    report.main([str(sweep["runs"]), "--out", str(out)])
    for name in ("report.html", "report.md", "report.csv", "runs.csv", "loss.png", "fid.png"):
        assert (out / name).is_file(), name
    for png in ("loss.png", "fid.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    sources = re.findall(r"src=['\"]([^'\"]*)", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "href=" not in page and "<link" not in page and "<script" not in page  # nothing fetched
    assert page.count("class='grid'") == 2  # the diffusion run's last grids, at 1 and 2 steps
    assert page.count("class='plot'") == 2


def test_a_glob_of_run_dirs(sweep, tmp_path, capsys):
    report.main([str(sweep["runs"] / "digits_teacher" / "*"), "-o", str(tmp_path / "g")])
    rows = md_rows((tmp_path / "g" / "report.md").read_text())
    assert set(rows) == {"header", "digits_teacher"} and rows["digits_teacher"][1] == "2"


def test_bad_paths_are_one_line_and_exit_2(sweep, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad, says in ((tmp_path / "nowhere", "no such file or directory"), (empty, "no run dir found"),
                      (tmp_path / "runs*", "the pattern matches nothing")):
        with pytest.raises(SystemExit) as e:
            report.main([str(sweep["runs"]), str(bad), "-o", str(tmp_path / "x")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"distill-report: error: {bad}: {says}"), err
    assert not (tmp_path / "x").exists()  # nothing written
    # the installed command: no traceback
    p = run_module("distillkit.report", str(tmp_path / "nowhere"), timeout=300)
    assert p.returncode == 2 and p.stderr == f"distill-report: error: {tmp_path / 'nowhere'}: no such file or directory\n"


def test_the_sweep_prints_its_table_at_its_end(sweep):
    out = sweep["sweep"].stdout
    assert "The sweep's 2 runs" in out
    table = out[out.index("The sweep's 2 runs"):]
    rows = md_rows(table)
    assert set(rows) == {"header", "digits_teacher"} and rows["digits_teacher"][1] == "2"  # this sweep's runs only
    assert " ± " in rows["digits_teacher"][rows["header"].index("test/acc")]


def test_sweep_run_dirs_are_the_jobs_dirs(sweep):
    dirs = report.sweep_run_dirs(["experiment=digits_teacher", "seed=0,1", *SMOKE, f"runs_dir={sweep['runs']}"])
    assert sorted(dirs) == run_dirs(sweep["runs"] / "digits_teacher")


def test_metrics_csv_steps_are_the_update_count(sweep):
    """Training rows at the progress log's "step N" (the update count after that update), with the
    run's wall time; the last one at results.json's global_step."""
    (run,) = run_dirs(sweep["runs"] / "digits_diffusion_teacher")
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r.get("train/loss")]
    assert [int(r["step"]) for r in train] == [1, 2, 3, 4, 5, 6]
    assert [float(r["nfe"]) for r in train] == [1, 2, 3, 4, 5, 6]
    walls = [float(r["wall_s"]) for r in train]
    assert walls == sorted(walls) and walls[-1] <= json.loads((run / "results.json").read_text())["wall_s"]
    assert sorted({int(r["step"]) for r in rows if r.get("fid/1step")}) == [3, 6]  # the evaluations' steps


def test_grouping_ignores_seed_and_resume_safe_keys(tmp_path):
    def run(name, **changes):
        config = {"seed": 0, "name": name, "experiment_name": "e", "optim": {"lr": 1e-3},
                  "trainer": {"max_steps": 10, "devices": 1}, **changes}
        return report.Run(path=tmp_path / name, config=config, results={"test/acc": 0.5}, metrics=[], evals=[])

    groups = report.group_runs([
        run("a"), run("b", seed=1, trainer={"max_steps": 20, "devices": 2}),  # resumed longer, on 2 devices
        run("c", optim={"lr": 1e-2}),
    ])
    assert [g.n for g in groups] == [2, 1]
    assert [g.label for g in groups] == ["e: optim.lr=0.001", "e: optim.lr=0.01"]


def test_number_format():
    assert report.fmt(566.15154, 0.11632) == "566.15 ± 0.12"
    assert report.fmt(2.7532, 0.1953) == "2.75 ± 0.20"
    assert report.fmt(6.0) == "6" and report.fmt(6.0, 0.0) == "6"
    assert report.fmt(0.09375) == "0.09375" and report.fmt(None) == "—"
    assert report.mean_std([1.0]) == (1.0, None)


def test_groups_that_differ_past_the_shown_keys_are_labelled_by_their_run_dirs(tmp_path):
    """Five keys differ between the groups; the first four are shown and two groups agree on them:
    those two carry their run dirs' names, the third reads as before."""
    def run(name: str, **cfg) -> report.Run:
        return report.Run(tmp_path / name, {"experiment_name": "x", **cfg}, {}, [], [])

    base = dict(a=1, b=1, c=1, d=1)
    groups = [report.Group([run("r1", **base, e=1)]), report.Group([run("r2", **base, e=2)]),
              report.Group([run("r3", a=2, b=2, c=2, d=2, e=2)])]
    labels = report.group_labels(groups, ignore=[])
    assert labels[0] == "x: a=1, b=1, c=1, d=1, +1 more [r1]"
    assert labels[1] == "x: a=1, b=1, c=1, d=1, +1 more [r2]"
    assert labels[2] == "x: a=2, b=2, c=2, d=2, +1 more"
