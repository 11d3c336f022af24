"""The benchmark scripts' bookkeeping, without training: table marker replacement in README.md and docs/*.md, the
mean/std summary of benchmark rows."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_kd_digits  # noqa: E402
import readme_tables  # noqa: E402

ROWS = [
    {"method": "teacher", "seed": 0, "test_acc": 0.99, "val_acc": 0.99, "wall_s": 10.0, "updates": 480, "epochs": 30},
    {"method": "student", "seed": 0, "test_acc": 0.90, "val_acc": 0.9, "wall_s": 2.0, "updates": 400, "epochs": 100},
    {"method": "student", "seed": 1, "test_acc": 0.92, "val_acc": 0.9, "wall_s": 4.0, "updates": 400, "epochs": 100},
    {"method": "student", "seed": 2, "test_acc": 0.94, "val_acc": 0.9, "wall_s": 6.0, "updates": 400, "epochs": 100},
    {"method": "kd", "seed": 0, "test_acc": 0.95, "val_acc": 0.9, "wall_s": 5.0, "updates": 400, "epochs": 100},
    {"method": "kd", "seed": 1, "test_acc": 0.97, "val_acc": 0.9, "wall_s": 7.0, "updates": 400, "epochs": 100},
    {"method": "student", "seed": 0, "test_acc": 0.91, "val_acc": 0.9, "wall_s": 4.0, "updates": 800, "epochs": 200,
     "note": "convergence check"},
    {"method": "kd", "source": "Hinton et al. 2015", "test_acc": 0.5},
]


def test_summarise_mean_std_n():
    s = {(e["method"], e["epochs"]): e for e in bench_kd_digits.summarise(ROWS)}
    assert list(s) == [("teacher", 30), ("student", 100), ("kd", 100), ("student", 200)]  # first-seen order
    st = s[("student", 100)]
    assert st["n"] == 3 and st["updates"] == 400
    assert math.isclose(st["test_acc_mean"], 0.92)
    assert math.isclose(st["test_acc_std"], 0.02)  # sample std (n - 1)
    assert math.isclose(st["wall_s_mean"], 4.0)
    kd = s[("kd", 100)]
    assert kd["n"] == 2 and math.isclose(kd["test_acc_mean"], 0.96)  # the paper row is not a run
    assert math.isclose(kd["test_acc_std"], math.sqrt(2) * 0.01)
    assert s[("teacher", 30)]["test_acc_std"] is None  # one run: no std
    assert s[("student", 200)]["note"] == "convergence check"
    json.dumps(bench_kd_digits.summarise(ROWS))  # plain JSON


def test_verdict_compares_against_one_std():
    lines = bench_kd_digits.verdict(bench_kd_digits.summarise(ROWS))
    assert len(lines) == 1 and lines[0].startswith("kd: +4.00 points") and "beats" in lines[0]
    close = [r for r in ROWS if r["method"] == "student"] + [{**ROWS[1], "method": "kd", "test_acc": 0.93}]
    assert "does NOT beat" in bench_kd_digits.verdict(bench_kd_digits.summarise(close))[0]


def test_marker_replacement():
    text = "# title\n\n<!-- table:kd_digits -->\nold table\n<!-- /table:kd_digits -->\n\nafter\n"
    new = readme_tables.replace_between_markers(text, "kd_digits", "| a |\n")
    assert new == "# title\n\n<!-- table:kd_digits -->\n| a |\n<!-- /table:kd_digits -->\n\nafter\n"
    assert readme_tables.replace_between_markers(new, "kd_digits", "| a |") == new  # idempotent
    assert readme_tables.replace_between_markers(text, "other", "x") is None
    assert readme_tables.replace_between_markers("<!-- /table:kd_digits --> <!-- table:kd_digits -->",
                                                 "kd_digits", "x") is None


def _bench() -> dict:
    return {"name": "kd_digits", "machine": "test CPU, 2 cores, torch 0", "date": "2026-01-01",
            "command": "python scripts/bench_kd_digits.py --seeds 3", "rows": ROWS,
            "summary": bench_kd_digits.summarise(ROWS)}


def test_update_readme_writes_table_between_markers(tmp_path, capsys):
    bench = tmp_path / "kd_digits.json"
    bench.write_text(json.dumps(_bench()))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- table:kd_digits -->\n<!-- /table:kd_digits -->\nend\n")
    assert readme_tables.update_readme("kd_digits", path=bench, readme=readme)
    out = readme.read_text()
    assert out.startswith("intro\n<!-- table:kd_digits -->\n| method |") and out.endswith("<!-- /table:kd_digits -->\nend\n")
    assert "| student | 92.00 ± 2.00 (n=3) | 400 | 4.0 |" in out
    assert "| teacher | 99.00 (n=1) | 480 | 10.0 |" in out
    assert "student (200 epochs)" in out
    assert "test CPU, 2 cores" in out and "`python scripts/bench_kd_digits.py --seeds 3`" in out

    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers\n")
    assert not readme_tables.update_readme("kd_digits", path=bench, readme=plain)
    assert plain.read_text() == "no markers\n"
    assert "no <!-- table:kd_digits -->" in capsys.readouterr().err


def test_update_readme_finds_the_page_holding_the_markers_and_rebases_links(tmp_path, monkeypatch, capsys):
    """Without ``readme=``, the table goes to whichever page holds its markers: README.md or a
    docs/*.md page; a plot linked from the repository root is rebased onto the page's folder."""
    root = tmp_path.resolve()
    (root / "docs").mkdir()
    monkeypatch.setattr(readme_tables, "ROOT", root)
    monkeypatch.setattr(readme_tables, "README", root / "README.md")
    monkeypatch.setattr(readme_tables, "DOCS_DIR", root / "docs")
    (root / "README.md").write_text("# front door\n[benchmarks](docs/benchmarks.md)\n")
    page = root / "docs" / "benchmarks.md"
    page.write_text("# Benchmarks\n<!-- table:kd_digits -->\n<!-- /table:kd_digits -->\n")
    (root / "docs" / "other.md").write_text("no markers\n")
    bench = tmp_path / "kd_digits.json"
    bench.write_text(json.dumps(_bench()))
    assert readme_tables.table_pages("kd_digits") == [page]
    assert readme_tables.update_readme("kd_digits", path=bench)
    assert "| student | 92.00 ± 2.00 (n=3) | 400 | 4.0 |" in page.read_text()
    assert (root / "README.md").read_text() == "# front door\n[benchmarks](docs/benchmarks.md)\n"
    assert not readme_tables.update_readme("dmd_digits", path=bench)  # no page has its markers
    assert "README.md or docs/*.md has no <!-- table:dmd_digits -->" in capsys.readouterr().err

    md = "![plot](benchmarks/p.png) [page](docs/x.md#a) [web](https://e.org/a.png) [here](#top)"
    assert readme_tables.rebase_links(md, page) == \
        "![plot](../benchmarks/p.png) [page](x.md#a) [web](https://e.org/a.png) [here](#top)"
    assert readme_tables.rebase_links(md, root / "README.md") == md
    assert readme_tables.rebase_links(md, tmp_path.parent / "elsewhere.md") == md


def test_each_table_has_one_page_and_its_plots_resolve():
    """Every ``<!-- table:NAME -->`` in README.md and docs/*.md appears in exactly one page, closed by
    its end marker, so update_readme writes one place; the links in each page resolve."""
    import re

    seen: dict[str, list[str]] = {}
    for page in readme_tables.pages():
        text = page.read_text()
        for name in re.findall(r"<!-- table:([\w.-]+) -->", text):
            seen.setdefault(name, []).append(page.name)
            assert readme_tables.replace_between_markers(text, name, "x") is not None, (page, name)
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)", text):
            if "://" not in target:
                assert (page.parent / target).exists(), (page.name, target)
    assert {n: p for n, p in seen.items() if len(p) != 1} == {}
    assert seen["step_distill_digits"] == ["benchmarks.md"] and seen["consistency_digits"] == ["benchmarks.md"]


def test_readme_front_door_has_the_two_commands_every_method_and_every_docs_page():
    root = readme_tables.ROOT
    readme = (root / "README.md").read_text()
    first_screen = "\n".join(readme.split("\n")[:30])
    assert "make demo" in first_screen and "make test" in first_screen
    for method in sorted(p.stem for p in (root / "conf" / "method").glob("*.yaml")):
        assert f"| `{method}` |" in readme, method
    for page in sorted((root / "docs").glob("*.md")):
        assert f"](docs/{page.name})" in readme, page.name


def test_other_benchmarks_get_a_generic_or_registered_table():
    bench = {"name": "x", "machine": "m", "date": "d", "command": "c",
             "rows": [{"method": "dsd", "steps": 4, "fid": 1.25}]}
    md = readme_tables.render("some_new_bench", bench)
    assert "| method | steps | fid |" in md and "| dsd | 4 | 1.2500 |" in md

    @readme_tables.formatter("some_new_bench")
    def _fmt(b: dict) -> str:
        return "custom"

    try:
        assert readme_tables.render("some_new_bench", bench) == "custom"
    finally:
        readme_tables.FORMATTERS.pop("some_new_bench")


# the progress lines of distillkit.callbacks.progress, and those of logs written before it said the
# total, rate and time left (the benchmarks' logs)
PROGRESS_LINES = {
    "current": ["training from step 0 to 40 (max_steps=40, max_epochs=-1)",
                "step 10/40 (epoch 0), 10.0 it/s, 3s left, loss=0.5", "step 20/40 (epoch 0), 10.0 it/s, 2s left, loss=0.5",
                "step 30/40 (epoch 0), 3.8 it/s, 3s left, loss=0.5", "step 30/40 (epoch 0), val/loss=1.0",
                "step 40/40 (epoch 0), 4.4 it/s, 0s left, loss=0.5"],
    "old": ["training from step 0 (max_steps=40, max_epochs=-1)", "epoch 0 step 10 loss=0.5 (1.0s)",
            "epoch 0 step 20 loss=0.5 (2.0s)", "epoch 0 step 30 loss=0.5 (8.0s)", "epoch 0 step 30 val/loss=1.0",
            "epoch 0 step 40 loss=0.5 (9.0s)"],
}


@pytest.mark.parametrize("lines", PROGRESS_LINES.values(), ids=PROGRESS_LINES.keys())
def test_gpu_check_summary_rates_skip_round_changes_and_memory_follows_the_window(tmp_path, lines):
    import gpu_check_summary as g

    def line(sec: float, msg: str) -> str:
        return f"[2026-11-27 10:00:{sec:06.3f}][distillkit][INFO] - {msg}".replace(".", ",", 1)

    log = tmp_path / "run.log"
    log.write_text("\n".join([
        line(1.0, lines[0]),
        line(2.0, lines[1]),
        line(3.0, lines[2]),     # 0.1 s per update
        line(3.5, "method=progressive: round 2 of 2, teacher steps 2 -> student steps 1 (update 20)"),
        line(9.0, lines[3]),     # spans the round change: left out
        line(9.1, lines[4]),
        line(10.0, lines[5]),    # 0.1 s per update
        line(11.0, "results: {}"),
    ]) + "\n")
    csv = tmp_path / "gpu.csv"
    csv.write_text("2026/11/27 10:00:00.500, 90000 MiB, 0 %\n"        # before the run: not counted
                   "2026/11/27 10:00:01.500, 9000 MiB, 0 %\n"         # before the first progress line
                   "2026/11/27 10:00:05.000, 7000 MiB, 40 %\n"
                   "2026/11/27 10:00:09.500, 8000 MiB, 60 %\n"
                   "2026/11/27 10:00:30.000, 95000 MiB, 0 %\n")      # after it
    r = g.parse_log(log)
    assert (r["s_per_update"], r["intervals"], r["validations"], r["updates_logged"]) == (0.1, 2, 1, 40)
    (row,) = g.summarise({"cifar10_progressive": log}, g.parse_gpu_csv(csv), call="1")
    # memory from the start of training, utilisation from the first progress line (past compiling)
    assert (row["peak_memory_mib"], row["mean_utilisation_pct"]) == (9000.0, 50.0)
    table = readme_tables.FORMATTERS["gpu_check_paper_settings"]({"machine": "m", "rows": [row]})
    assert "| `cifar10_progressive` | 1 | 0.100 | 40 | 1 | 9000 | 50.0 |" in table
    # two machines of one kind differ, so the file names each call's machine
    rows = [{"call": "a", "machine": "H200 #1"}, {"call": "b", "machine": "H200 #1"}, {"call": "c", "machine": "H200 #2"}]
    assert g.machines(rows) == "a, b: H200 #1; c: H200 #2"
    assert g.machines(rows[:2]) == "H200 #1"


def test_unet_compile_probe_runs_and_writes_a_row_per_variant(tmp_path):
    """The GPU probe's plumbing on the CPU (its timings mean nothing here): the eager variants, a
    batch of 2, one timed update each."""
    import probe_unet_compile

    out = tmp_path / "probe.json"
    assert probe_unet_compile.main(["--out", str(out), "--variants", "eager", "channels_last",
                                    "--batch", "2", "--warmup", "1", "--updates", "1"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["channels_last"], r["compile_mode"]) for r in rows] == [
        ("eager", False, None), ("channels_last", True, None)]
    assert all(r["s_per_update"] > 0 and r["images_per_s"] > 0 and r["batch"] == 2 for r in rows)
    table = readme_tables.render("probe_unet_compile", json.loads(out.read_text()))
    assert table.count("| `eager` | 2 |") == 1 and "Machine: " in table


def test_plain_loop_maths_agree_with_distillkit():
    """The independent plain loop (scripts/plain_progressive_digits.py: DDIM written out from
    diffusers' DDIMScheduler.alphas_cumprod and its trailing timesteps) and distillkit's progressive
    target and sampler grid agree, so comparing the two on one teacher compares the recipes alone."""
    import torch
    from diffusers import DDIMScheduler

    import plain_progressive_digits as plain
    from distillkit.diffusion import NoiseSchedule
    from distillkit.methods.progressive import progressive_target

    T = 1024
    scheduler = DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", set_alpha_to_one=True,
                              timestep_spacing="trailing", prediction_type="v_prediction")
    ours = NoiseSchedule("cosine", T)
    for n in (64, 8, 2):
        assert plain.grid(scheduler, n).tolist() == ours.grid(n).tolist()
    w = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def v_net(z, t):  # any smooth function of (z, t) will do as the teacher
        return torch.tanh(z * w + t.view(-1, 1, 1, 1).float() / T)

    z = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    g = ours.grid(8)
    for i in (0, 2, 6):  # the first, a middle and the last student step (t'' = -1, the clean end)
        t, t1, t2 = (torch.full((4,), int(g[k])) for k in (i, i + 1, i + 2))
        mine = plain.plain_target(v_net, scheduler.alphas_cumprod.float(), z, t, t1, t2)
        theirs = progressive_target(v_net, z, t, t1, t2, ours, "v")
        assert torch.allclose(mine, theirs.float(), atol=1e-4), (i, (mine - theirs).abs().max())
    # a perturbed teacher moves the target: the comparison can fail
    assert not torch.allclose(plain.plain_target(lambda z_, t_: v_net(z_, t_) * 1.01, scheduler.alphas_cumprod.float(),
                                                 z, t, t1, t2), theirs.float(), atol=1e-4)


def test_dmd_benchmark_summarises_per_configuration_and_updates_and_renders_its_table():
    import bench_dmd_digits as b

    rows = [{"config": "dmd2_1step", "seed": s, "steps": 1, "updates": u, "fid": f, "is": 8.0, "class_acc": None,
             "wall_s": 100.0, "nfe": 10 * u, "fid_by_updates": [[200, 9.0 + s], [400, 5.0 + s], [u, f]]}
            for s, u, f in [(0, 600, 6.0), (1, 600, 4.0), (0, 2000, 2.0)]]
    rows.append({"config": "dmd_1step", "seed": 0, "steps": 1, "updates": 2000, "fid": 4.0, "is": 8.0,
                 "class_acc": None, "wall_s": 50.0, "nfe": 2000})
    summary = b.summarise(rows)
    first = next(s for s in summary if s["config"] == "dmd2_1step" and s["updates"] == 600)
    assert first["n"] == 2 and first["fid_mean"] == 5.0 and math.isclose(first["fid_std"], math.sqrt(2))
    assert first["fid_by_updates"][:2] == [[200, 9.5, 0.707], [400, 5.5, 0.707]]
    # progressive's 6,000 updates at 30 ms take 180 s: 450 DMD2 updates at 400 ms, whose last evaluation is at 400
    lines = b.verdict(summary, {"digits_progressive": 30.0, "digits_dmd2": 400.0})  # each configuration's longest runs
    assert "digits-FID 2.000 after 2000 generator updates" in lines[0] and "meets" in lines[0]
    assert "as many as 450 DMD2 updates" in lines[1] and "at 400 updates: 5.000 (1 seed)" in lines[1]
    assert lines[1].endswith("best one-step 4.87: not below")
    assert b.verdict(summary, {"digits_progressive": 30.0, "digits_dmd2": 40.0})[1].endswith(": below")  # 4,500: 2.0
    assert "112000 progressive updates" in lines[2] and lines[2].endswith("best one-step 3.274: below")  # 2.0
    assert "= 2.00x DMD2's" in lines[3] and "misses" in lines[3]
    table = readme_tables.render("dmd_digits", {"summary": summary, "verdict": lines, "rows": rows})
    assert "| DMD2 | 1 | 600 | 2 | 5.000 ± 1.414 |" in table


def test_dmd_benchmark_puts_each_class_conditional_row_beside_the_teacher_at_its_guidance(tmp_path, monkeypatch):
    import bench_dmd_digits as b

    teacher = [{"method": "teacher", "steps": 64, "guidance": 1.0, "fid": 0.8688, "class_acc": 0.9914},
               {"method": "teacher", "steps": 64, "guidance": 2.0, "fid": 3.1717, "class_acc": 0.9986},
               {"method": "teacher", "steps": 4, "guidance": 1.0, "fid": 2.758, "class_acc": 1.0}]
    monkeypatch.setattr(b, "COND_TEACHER", tmp_path / "cond_teacher_digits.json")
    b.COND_TEACHER.write_text(json.dumps({"rows": teacher}))
    rows = [{"config": c, "seed": 0, "steps": 1, "updates": 400, "fid": f, "is": 9.0, "class_acc": 0.99,
             "wall_s": 1.0, "nfe": 1} for c, f in [("cond_dmd2_1step", 6.5), ("cond_dmd2_1step_g1", 2.0),
                                                   ("cond_dmd_1step_g1", 3.2)]]
    lines = b.verdict(b.summarise(rows), {})
    assert "DMD (no GAN) one step (cond_dmd_1step_g1) at 400 updates: 3.200 = 1.60x DMD2's (cond_dmd2_1step_g1) " \
           "(target <= 1.5x): misses" in lines
    guided = next(x for x in lines if x.startswith("cond_dmd2_1step ("))
    unguided = next(x for x in lines if x.startswith("cond_dmd2_1step_g1 ("))
    assert b.COND_GUIDANCE == 2.0 and "real score at guidance 2)" in guided and guided.endswith("guidance 2: 3.172, 99.9%")
    assert "real score at guidance 1)" in unguided and unguided.endswith("guidance 1: 0.869, 99.1%")
    # DMD's unguided configuration regresses onto the unguided teacher's pairs, in a file apart from the guided ones
    assert (b.real_guidance("cond_dmd_1step_g1"), b.pairs_file("cond_dmd_1step_g1")) == (1.0, "digits_cond_pairs_g1.safetensors")
    assert (b.real_guidance("cond_dmd_1step"), b.pairs_file("cond_dmd_1step")) == (2.0, "digits_cond_pairs.safetensors")
    b.COND_TEACHER.write_text(json.dumps({"rows": teacher[1:]}))  # no 64-step row at guidance 1
    assert b.verdict(b.summarise(rows), {})[-1].endswith("guidance 1: not measured")


def test_the_demos_dmd2_line_shows_its_curve_beside_the_teachers_ddim(tmp_path):
    import bench_dmd_digits as b

    rows = [{"config": "dmd2_1step", "seed": 0, "steps": 1, "updates": 600, "fid": 6.1, "is": 8.0, "class_acc": None,
             "wall_s": 1.0, "nfe": 1, "fid_by_updates": [[200, 43.5], [400, 10.6], [600, 6.1]]}]
    teacher = tmp_path / "teacher_digits_quick.json"
    line, = b.demo_verdict(b.summarise(rows), teacher)  # the teacher not scored yet: the curve alone
    assert line == "DMD2 one-step generator, digits-FID after 600 generator updates: 6.100 (43.500 at 200, 10.600 at 400, 6.100 at 600)"
    teacher.write_text(json.dumps({"rows": [{"method": "floor", "fid": 1.19}, {"method": "teacher", "steps": 1, "fid": 150.2},
                                            {"method": "teacher", "steps": 64, "fid": 2.234}]}))
    assert b.demo_verdict(b.summarise(rows), teacher)[0].endswith("; its teacher's DDIM: 150.200 at 1 step, 2.234 at 64")
    assert b.demo_verdict([], teacher) == []


def test_a_cached_run_of_another_configuration_is_told_apart():
    from bench_kd_digits import config_drift

    saved = {"method": {"num_timesteps": 32, "w_max": 2.0, "gone": 1}, "seed": 0}
    now = {"method": {"num_timesteps": 64, "w_max": 2.0, "new_key": 3}, "seed": 0}
    # the recipe's changed default differs; keys only one side has (a schema grown since) do not
    assert config_drift(saved, now) == ["method.num_timesteps"]
    assert config_drift(saved, {"method": {"num_timesteps": 32, "w_max": 2.0}, "seed": 0}) == []
    assert config_drift({"seed": 0}, {"seed": 1}) == ["seed"]


def test_overhead_ratio_is_the_median_of_paired_runs():
    """A slow spell that hits both runs of one pair moves that pair's times, not its ratio: the
    verdict reads the median of the pairs' ratios, and the ratio of the two medians is kept beside it."""
    import bench_overhead

    ms = {"distill": [11.0, 8.8, 9.9, 13.2, 11.0], "plain": [10.0, 8.0, 9.0, 12.0, 8.0]}
    row = bench_overhead.overhead_row("digits_kd", (40, 400), 5, 1, ms)
    assert row["pair_ratios"] == [1.1, 1.1, 1.1, 1.1, 1.375] and row["ratio"] == 1.1
    assert row["ms_per_update_distill"] == 11.0 and row["ms_per_update_plain"] == 9.0 and row["ratio_of_medians"] == 1.222
    table = readme_tables.render("overhead_cpu", {"rows": [row], "verdict": ["v"], "machine": "m", "date": "d", "command": "c"})
    assert "| `digits_kd` | 40 to 400 | 11.00 | 9.00 | 1.22 | 1.10x |" in table


def test_guidance_probe_measures_class_width_and_refuses_a_missing_run_and_an_uneven_sample_count(tmp_path):
    import torch

    import probe_cond_guidance_digits as probe

    # two classes at (0, 0) +- 1 and (3, 4) +- 2 along the first axis, the rest empty
    f = torch.tensor([[-1.0, 0], [1, 0], [1, 4], [5, 4]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    f = torch.cat([f, torch.zeros(16, 2, dtype=torch.float64)])
    labels = torch.cat([labels, torch.arange(2, 10).repeat_interleave(2)])
    means, widths = probe.class_stats(f, labels)
    assert means[0].tolist() == [0, 0] and means[1].tolist() == [3, 4]
    assert widths[:2] == [1.0, 4.0] and widths[2:] == [0.0] * 8
    with pytest.raises(SystemExit) as e:
        probe.load(tmp_path, probe.TEACHER)
    assert "no such file" in str(e.value) and "bench_dmd_digits.py" in str(e.value)
    with pytest.raises(SystemExit) as e:
        probe.main(["--samples", "15", "--out", str(tmp_path / "x.json")])
    assert "multiple of 10" in str(e.value)
