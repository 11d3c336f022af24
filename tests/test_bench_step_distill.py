"""The step-distillation benchmark's bookkeeping on made-up rows (no training): the resumable
skip, the per-(method, steps) summary, the targets and the DSD-vs-progressive verdict."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import bench_step_distill_digits as b  # noqa: E402
import readme_tables  # noqa: E402


def _r(method, steps, fid, seed=0, checkpoint="last", native=False, nfe=0, updates=0):
    return {"method": method, "seed": seed, "steps": steps, "checkpoint": checkpoint, "native": native,
            "fid": fid, "is": 9.0, "updates": updates, "nfe": nfe, "wall_s": 1.0}


ROWS = [
    _r("teacher", 4, 10.0), _r("teacher", 64, 1.0), _r("teacher", 1, 100.0),
    # progressive: round 4 is its 4-step student (native), the last round its 1-step student
    _r("progressive", 4, 1.2, checkpoint="round_4", native=True, nfe=12000, updates=4000),
    _r("progressive", 4, 1.4, seed=1, checkpoint="round_4", native=True, nfe=12000, updates=4000),
    _r("progressive", 4, 9.0, checkpoint="last", nfe=18000, updates=6000),  # not the 4-step student
    _r("progressive", 1, 1.4, checkpoint="last", native=True, nfe=18000, updates=6000),
    _r("dsdi", 4, 4.0, nfe=9000, updates=3000),
    _r("dsdn", 4, 6.0, nfe=3000, updates=1000),
]


def test_missing_skips_rows_already_there():
    want = [("progressive", 0, 4, "round_4"), ("progressive", 2, 4, "round_4"), ("dsdn", 0, 1, "last")]
    assert b.missing(want, ROWS) == [("progressive", 2, 4, "round_4"), ("dsdn", 0, 1, "last")]
    assert b.missing(want[:1], ROWS) == []


def test_load_rows_resumes_from_json(tmp_path):
    out = tmp_path / "x.json"
    assert b.load_rows(out) == []
    out.write_text('{"name": "x", "rows": [{"method": "teacher", "seed": 0, "steps": 4, "checkpoint": "last"}]}')
    assert b.missing([("teacher", 0, 4, "last"), ("teacher", 0, 8, "last")], b.load_rows(out)) == [("teacher", 0, 8, "last")]


def test_summary_prefers_the_native_checkpoint_and_averages_seeds():
    s = {(x["method"], x["steps"]): x for x in b.table_rows(ROWS)}
    p4 = s[("progressive", 4)]
    assert p4["checkpoint"] == "round_4" and p4["n"] == 2 and abs(p4["fid_mean"] - 1.3) < 1e-9
    assert p4["fid_std"] is not None and p4["nfe"] == 12000
    assert s[("dsdi", 4)]["fid_std"] is None


def test_targets_and_equal_nfe_verdict():
    lines = b.targets(b.table_rows(ROWS))
    text = "\n".join(lines)
    # progressive 4-step 1.3 < 5 and <= 1.5: both met; best DSD (dsdi, 4.0) < 5 but > 1.5: one missed
    assert "progressive at 4 steps: FID 1.300" in text and "MISSED" not in lines[0]
    assert "best DSD (dsdi)" in lines[1] and ": met;" in lines[1] and "MISSED" in lines[1]
    assert "progressive at 1 step" in lines[2] and "MISSED" not in lines[2]
    assert "DSD does NOT beat progressive (higher FID), though it spent fewer" in lines[3]


def test_targets_take_the_best_progressive_and_dsd_variant():
    """The annealed runs count for the targets when their FID is lower (and not otherwise)."""
    rows = ROWS + [_r("progressive_annealed", 1, 1.2, native=True, nfe=18000, updates=6000),
                   _r("progressive_annealed", 4, 1.5, checkpoint="round_4", native=True, nfe=12000, updates=4000),
                   _r("dsdi_annealed", 4, 1.1, checkpoint="level_4", native=True, nfe=12096, updates=4032)]
    lines = b.targets(b.table_rows(rows))
    assert lines[0].startswith("progressive at 4 steps: FID 1.300")
    assert "best DSD (dsdi_annealed)" in lines[1] and "MISSED" not in lines[1]
    assert lines[2].startswith("progressive_annealed at 1 step: FID 1.200")
    assert "4 step(s): dsdi_annealed FID 1.100 at 1.21e+04 nfe vs progressive FID 1.300" in "\n".join(lines)
    assert "spent 0.8% more network evaluations: no win at equal nfe" in "\n".join(lines)  # 12096 vs 12000


def test_longer_progressive_counts_for_the_targets_not_the_equal_nfe_comparison():
    """progressive_annealed_8k spends 8x the nfe: it may meet the 1-step target, but DSD is
    compared with the progressive runs of its own budget."""
    rows = ROWS + [_r("progressive_annealed_8k", 1, 1.1, native=True, nfe=144000, updates=48000),
                   _r("progressive_annealed_8k", 4, 1.0, checkpoint="round_4", native=True, nfe=96000, updates=32000)]
    lines = b.targets(b.table_rows(rows))
    assert lines[0].startswith("progressive_annealed_8k at 4 steps: FID 1.000")
    assert lines[2].startswith("progressive_annealed_8k at 1 step: FID 1.100 after 48,000 updates")
    # and what the benchmark's own budget gives, which the longer run does not hide
    assert lines[3].startswith("progressive at 1 step: FID 1.400 after 6,000 updates")
    assert "4 step(s): dsdi FID 4.000 at 9e+03 nfe vs progressive FID 1.300 at 1.2e+04 nfe" in "\n".join(lines)


def test_dsd_win_only_when_lower_fid_at_no_more_nfe():
    rows = [_r("progressive", 4, 2.0, native=True, nfe=12000), _r("dsdn", 4, 1.0, nfe=3000)]
    assert "DSD beats progressive at equal (or fewer) network evaluations (gap 1.000; one seed, no test)" \
        in b.dsd_vs_progressive(b.table_rows(rows))[0]
    rows[1]["nfe"] = 20000
    assert "no win at equal nfe" in b.dsd_vs_progressive(b.table_rows(rows))[0]


def test_dsd_win_at_equal_nfe_needs_a_progressive_run_of_as_many_nfe():
    """DSDI's levels have 1,008 updates, progressive's rounds 1,000: the 1,008-update progressive
    run makes the comparison exact, and a cheaper progressive run that beats DSD still counts."""
    dsd = [_r("dsdi_annealed", 4, 2.8, seed=s, checkpoint="level_4", native=True, nfe=12096) for s in (0, 1)]
    dsd[1]["fid"] = 3.0
    cheap = [_r("progressive", 4, 3.0, seed=s, checkpoint="round_4", native=True, nfe=12000) for s in (0, 1)]
    exact = [_r("progressive_1008", 4, f, seed=s, checkpoint="round_4", native=True, nfe=12096)
             for s, f in ((0, 3.1), (1, 3.3))]
    line = b.dsd_vs_progressive(b.table_rows(dsd + cheap))[0]
    assert "spent 0.8% more network evaluations: no win at equal nfe" in line
    line = b.dsd_vs_progressive(b.table_rows(dsd + cheap + exact))[0]
    # 2.9 ± 0.141 against 3.2 ± 0.141, two seeds each: a lower mean, but t = 2.1 on 2 df
    assert "vs progressive_1008 FID 3.200 at 1.21e+04 nfe: DSD has the lower mean FID at equal network" in line
    assert "but not significantly (gap 0.300; Welch's t-test p = 0.17, not below 0.05): no clear win" in line
    exact[1]["fid"] = 3.1  # 3.1 ± 0 against 2.9 ± 0.141
    line = b.dsd_vs_progressive(b.table_rows(dsd + cheap + exact))[0]
    assert "DSD has the lower mean FID" in line
    for r, f in zip(exact + dsd, (3.5, 3.6, 2.80, 2.82)):
        r["fid"] = f
    line = b.dsd_vs_progressive(b.table_rows(dsd + cheap + exact))[0]
    assert "DSD beats progressive at equal network evaluations (gap 0.740; Welch's t-test p = 0.036)" in line
    cheap[1]["fid"] = 2.0  # progressive's 1,000-update run now has the lower FID (2.5), with fewer nfe
    line = b.dsd_vs_progressive(b.table_rows(dsd + cheap + exact))[0]
    assert "vs progressive FID 2.500" in line and "higher FID with as many or more network evaluations" in line


def test_formatter_registered_and_renders(tmp_path):
    bench = {"name": "step_distill_digits", "machine": "m", "date": "d", "command": "c", "rows": ROWS}
    md = readme_tables.render("step_distill_digits", bench)
    assert "| progressive (round_4) | 4 | 1.300 ± 0.141 (n=2) |" in md
    assert "DSD does NOT beat progressive" in md and "Machine: m" in md
    png = b.plot_fid_vs_nfe(ROWS, tmp_path / "p.png")
    assert png is not None and png.stat().st_size > 0


def test_merge_keeps_rows_of_both_processes_once():
    disk = [_r("teacher", 4, 10.0), _r("dsdi", 4, 4.0)]
    mine = [_r("teacher", 4, 10.0), _r("progressive", 4, 1.2, checkpoint="round_4")]
    curve = [{"method": "diffusion", "curve": "from_scratch", "seed": 0, "steps": 4, "updates": u, "fid": 1.0}
             for u in (400, 800)]
    merged = b.merge_rows(disk, mine + curve)
    assert [(r["method"], r.get("updates")) for r in merged] == [
        ("teacher", 0), ("dsdi", 0), ("progressive", 0), ("diffusion", 400), ("diffusion", 800)]
    assert b.merge_rows(merged, merged) == merged


def test_plan_reads_rounds_and_first_teacher_steps_from_the_configs():
    """The benchmark's runs: halving methods 64 -> 1 in 6 rounds/levels, DSDN/TSD one level at N=8."""
    plan = {m: b.plan_updates(exp, key, extra) for m, (exp, key, extra) in b.METHODS.items()}
    assert plan["progressive"] == (1000, 6, 64)
    assert plan["dsdi"] == plan["dsd_literal"] == (1008, 6, 64)
    assert plan["dsdn"] == plan["tsd"] == (1008, 1, 8)
    assert plan["progressive_annealed"] == plan["progressive"] and plan["dsdi_annealed"] == plan["dsdi"]
    assert plan["progressive_annealed_last_heavy"] == ([250, 250, 250, 250, 1500, 3500], 6, 64)
    assert b.round_ends(1000, 3) == [1000, 2000, 3000]
    assert b.plan_updates(*b.METHODS["dsdi"][:2], []) == (1008, 3, 64)  # the experiment's own 64 -> 8
    demo = {m: b.plan_updates(b.DEMO[m][0], b.METHODS[m][1], b.DEMO[m][1]) for m in b.DEMO}
    assert demo == {"progressive": (300, 2, 8), "dsdi": (300, 2, 8)}
    ck = b.checkpoints(Path("/r"), "level", 1008, 1, 8)
    assert [(c["checkpoint"], c["native_steps"]) for c in ck] == [("last", 4)]


def test_from_scratch_curves_render_as_a_table():
    curve = [{"method": m, "curve": "from_scratch", "seed": 0, "steps": 4, "updates": u, "fid": f}
             for m, u, f in (("diffusion", 400, 30.0), ("diffusion", 800, 20.0), ("dsd_from_scratch", 800, 15.0))]
    md = readme_tables.from_scratch_table(ROWS + curve)
    assert "| updates | diffusion, 4 steps | dsd_from_scratch, 4 steps |" in md
    assert "| 400 | 30.000 | — |" in md and "| 800 | 20.000 | 15.000 |" in md
    assert readme_tables.from_scratch_table(ROWS) == ""
    seed1 = [dict(r, seed=1, fid=r["fid"] + 2.0) for r in curve]
    md = readme_tables.from_scratch_table(ROWS + curve + seed1)
    assert "From scratch (2 seeds, mean ± std)" in md and "| 800 | 21.000 ± 1.414 | 16.000 ± 1.414 |" in md


def test_anchor_control_share_of_the_gain():
    rows = ROWS + [_r("anchor_only", 4, 8.0, checkpoint="level_4", native=True)]
    line = b.targets(b.table_rows(rows))[-1]
    # teacher 10, DSDI 4, anchor alone 8: the distillation loss gives 4 of the 6 points
    assert line.startswith("the anchor alone") and "accounts for 67% of DSDI's gain" in line


def test_checkpoints_of_rounds_of_unequal_length(tmp_path):
    for r in (4, 5, 6):
        (tmp_path / f"round_{r}.ckpt").touch()
    ck = b.checkpoints(tmp_path, "round", [250, 250, 250, 250, 1500, 3500], 6)
    assert [(c["checkpoint"], c["updates"], c["native_steps"]) for c in ck] == [
        ("round_4", 1000, 4), ("round_5", 2500, 2), ("last", 6000, 1)]


def test_every_process_that_adds_rows_keeps_its_command_in_the_record():
    """Processes with different --methods (or sittings) share the JSON: each one's command line
    joins the record instead of replacing the earlier ones'; one that adds nothing leaves it."""
    first = b.merge_into({}, [_r("teacher", 4, 10.0)], "python bench --seeds 3", "2026-11-26")
    assert (first["command"], first["date"]) == ("python bench --seeds 3", "2026-11-26")
    second = b.merge_into(first, [_r("dsdi", 4, 4.0)], "python bench --methods dsdi", "2026-11-27")
    assert second["command"] == "python bench --seeds 3; python bench --methods dsdi"
    assert second["date"] == "2026-11-26 to 2026-11-27"
    assert len(second["rows"]) == 2
    again = b.merge_into(second, [_r("dsdi", 4, 4.0)], "python bench --methods dsdi --seed 0", "2026-11-28")
    assert {k: again[k] for k in ("command", "date")} == {k: second[k] for k in ("command", "date")}
    # the same command run again on a later day: listed once, the dates extended
    later = b.merge_into(second, [_r("tsd", 4, 5.0)], "python bench --methods dsdi", "2026-11-28")
    assert later["command"] == second["command"] and later["date"] == "2026-11-26 to 2026-11-28"


def test_from_scratch_curves_run_each_seed_with_the_same_overrides(tmp_path):
    """Seed 0 keeps the config's seed (so its runs are the ones already scored); other seeds add
    seed=<s> to every run, and their rows carry that seed. The control is the DSD run with the
    distillation loss off; pairs already scored are skipped."""
    calls = []

    def run(ov):
        calls.append(ov)
        d = tmp_path / str(len(calls))
        d.mkdir()
        (d / "metrics.csv").write_text("step,fid/4step,is/4step,fid/32step\n400,30.0,5.0,20.0\n401,,,\n")
        return {"run_dir": str(d), "wall_s": 1.0}

    rows = b.from_scratch_curves(run, quick=False, seeds=[0, 2], have={(0, "diffusion")})
    assert len(calls) == 5 and not any(o.startswith("seed=") for o in calls[0] + calls[1])
    assert calls[0][0] == "experiment=digits_dsdn" and calls[1] == [*calls[0], "method.distill_weight=0"]
    assert calls[2][-1] == "seed=2" and calls[3][:-1] == calls[0] and calls[4][:-1] == calls[1]
    assert sorted({(r["seed"], r["method"], r["steps"]) for r in rows}) == sorted(
        [(0, m, k) for m in ("dsd_from_scratch", "dsd_no_distill") for k in (4, 32)]
        + [(2, m, k) for m in b.FROM_SCRATCH_CURVES for k in (4, 32)])
