"""distill-sample and distill-export on a digits diffusion run trained through the CLI (smoke size).

Same noise in both: distill-sample draws the starting noise of all N samples in one call
``torch.randn((N, 1, 8, 8), generator=torch.Generator().manual_seed(seed))``, which is the draw
``DDIMPipeline(batch_size=N, generator=torch.Generator().manual_seed(seed))`` makes. The run has
T = 1024 training timesteps and the steps below divide it, so diffusers' DDIMScheduler (which
steps to t - T // N) visits exactly our trailing grid.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, run_module

N, STEPS, SEED = 12, 4, 3


def run_cmd(module: str, *args: str):
    return run_module(module, *args, timeout=300)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("diffusion_runs")
    r = run_cli("experiment=digits_diffusion_teacher", "debug=smoke", f"runs_dir={runs}", "callbacks.progress=none",
                "callbacks.ema.decay=0.5")  # an EMA that differs from the student after 6 steps
    assert r.returncode == 0, r.output
    run = next((runs / "digits_diffusion_teacher").iterdir())
    res = json.loads((run / "results.json").read_text())
    assert res["global_step"] == 6 and np.isfinite(res["test/loss"])
    return run / "last.ckpt"


@pytest.fixture(scope="module")
def samples(ckpt, tmp_path_factory) -> Path:
    """distill-sample's output for (N, STEPS, SEED), through the real command line."""
    out = tmp_path_factory.mktemp("samples") / "s" / "samples.npz"
    r = run_cmd("distillkit.sample", f"checkpoint={ckpt}", f"steps={STEPS}", f"num_samples={N}", f"out={out}",
                f"seed={SEED}", "batch_size=5")
    assert r.returncode == 0, r.stderr
    return out


def test_sample_writes_npz_and_png(samples):
    from PIL import Image

    with np.load(samples) as f:
        assert list(f.keys()) == ["arr_0"]
        arr = f["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (N, 8, 8, 1)
    assert len(np.unique(arr)) > 10  # not all saturated: a meaningful comparison below
    png = Image.open(samples.with_suffix(".png"))
    assert png.mode == "L" and min(png.size) >= 32


def test_samples_do_not_depend_on_batch_size(ckpt, samples):
    from distillkit.models.loading import load_run_checkpoint
    from distillkit.metrics.images import to_uint8_nhwc
    from distillkit.sample import generate

    method = load_run_checkpoint(ckpt)
    assert np.array_equal(to_uint8_nhwc(generate(method, N, STEPS, seed=SEED, batch_size=N)), np.load(samples)["arr_0"])


def test_export_loads_in_diffusers_and_matches_distill_sample(ckpt, samples, tmp_path):
    from diffusers import DDIMPipeline, DDIMScheduler
    from safetensors.torch import load_file

    from distillkit.export import export_pipeline
    from distillkit.models.loading import load_run_checkpoint
    from distillkit.sample import generate

    out = tmp_path / "export"
    r = run_cmd("distillkit.export", f"checkpoint={ckpt}", f"out={out}")
    assert r.returncode == 0, r.stderr
    assert (out / "model_index.json").is_file() and (out / "unet" / "config.json").is_file()
    pipe = DDIMPipeline.from_pretrained(out)
    sch = pipe.scheduler
    assert isinstance(sch, DDIMScheduler)
    assert (sch.config.prediction_type, sch.config.timestep_spacing, sch.config.num_train_timesteps,
            sch.config.set_alpha_to_one, sch.config.beta_schedule) == ("v_prediction", "trailing", 1024, True,
                                                                       "squaredcos_cap_v2")
    # EMA weights by default
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    exported = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v, sd[f"ema.module.unet.{k}"]) for k, v in exported.items())
    assert not all(torch.equal(v, sd[f"student.unet.{k}"]) for k, v in exported.items())

    # Same seed, same steps: the pipeline's images are distill-sample's.
    images = pipe(batch_size=N, generator=torch.Generator().manual_seed(SEED), num_inference_steps=STEPS, eta=0.0,
                  output_type="np").images  # float in [0, 1], N x H x W x C
    method = load_run_checkpoint(ckpt)
    ours = generate(method, N, STEPS, seed=SEED, batch_size=5)
    assert np.allclose(images, (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), atol=1e-4)
    diff = np.abs(np.load(samples)["arr_0"].astype(np.int16) - (images * 255).round().astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01

    raw = export_pipeline(method, tmp_path / "raw", use_ema=False)
    exported = load_file(str(raw / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v, sd[f"student.unet.{k}"]) for k, v in exported.items())


@pytest.mark.parametrize("main,args,message", [
    ("sample", ["num_samples=4", "out=x.npz"], "missing required key checkpoint=..."),
    ("sample", ["checkpoint=C", "num_sampels=4", "out=x.npz"], "unknown key 'num_sampels'. Did you mean 'num_samples'?"),
    ("sample", ["checkpoint=C", "num_samples=four", "out=x.npz"], "num_samples=four: expected an integer"),
    ("sample", ["checkpoint=C", "num_samples=4", "out=x.png"], "out=x.png: the file name must end in .npz"),
    ("sample", ["checkpoint=C", "num_samples=4", "out=x.npz", "steps=2000"], "steps=2000: at most"),
    ("sample", ["checkpoint=C", "num_samples=4", "out=x.npz", "spacing=even"], "spacing=even: allowed values"),
    ("sample", ["checkpoint=/no/such.ckpt", "num_samples=4", "out=x.npz"], "checkpoint=/no/such.ckpt: no such file"),
    ("sample", ["checkpoint=/no/runs/digits_diffusion_teacher/default/last.ckpt", "num_samples=4", "out=x.npz"],
     "It is written by `distill experiment=digits_diffusion_teacher`: train that first."),
    ("export", ["checkpoint=C"], "missing required key out=..."),
    ("export", ["checkpoint=C", "out=D", "use_ema=maybe"], "use_ema=maybe: expected true or false"),
    ("export", ["C", "out=D"], "arguments are key=value pairs"),
])
def test_bad_arguments_give_one_line_errors(ckpt, tmp_path, capsys, main, args, message):
    import importlib

    args = [a.replace("=C", f"={ckpt}").replace("=D", f"={tmp_path / 'd'}").replace("=x.", f"={tmp_path}/x.")
            for a in args]
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"distillkit.{main}").main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"distill-{main}: error: ") and message in err.replace(str(tmp_path) + "/", ""), err


@pytest.mark.parametrize("module", ["distillkit.sample", "distillkit.export"])
def test_commands_exit_2_without_traceback(tmp_path, module):
    bad = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, bad)
    extra = ["num_samples=2"] if module == "distillkit.sample" else []
    r = run_cmd(module, f"checkpoint={bad}", f"out={tmp_path / 'e.npz'}", *extra)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "not a distillkit run checkpoint" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# --------------------------------------------------------------------------- exports describe themselves
def _card_code(readme: str) -> str:
    import re

    return re.search(r"```python\n(.*?)```", readme, re.S).group(1)


def test_export_writes_a_model_card_prints_its_steps_and_follows_the_umask(ckpt, tmp_path, monkeypatch):
    """README.md is a Hugging Face model card (front matter, method, teacher, steps, guidance, a snippet
    that runs), the command prints the step count, and every file is written with the user's umask."""
    out = tmp_path / "export"
    old = os.umask(0o022)
    try:
        r = run_cmd("distillkit.export", f"checkpoint={ckpt}", f"out={out}")
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert "sample with 64 steps" in r.stdout and "num_inference_steps=64" in r.stdout, r.stdout
    for p in [out, *out.rglob("*")]:
        mode = p.stat().st_mode & 0o777
        assert mode == (0o755 if p.is_dir() else 0o644), f"{p}: {oct(mode)}"
    readme = (out / "README.md").read_text()
    assert readme.startswith("---\nlibrary_name: diffusers\n") and "\ntags:\n- diffusers\n" in readme
    assert "method=diffusion" in readme and "Teacher**: none" in readme
    assert "**Sample with**: 64 steps, no guidance (unconditional); DDIMScheduler (trailing spacing, eta=0)" in readme
    assert "No FID was measured" in readme
    code = _card_code(readme)
    assert "DDIMPipeline.from_pretrained" in code and "num_inference_steps=64" in code
    monkeypatch.chdir(tmp_path)  # the snippet saves sample.png
    ns: dict = {}
    exec(code, ns)
    assert len(ns["images"]) == 16 and (tmp_path / "sample.png").is_file()


def test_model_card_reports_the_runs_fid(ckpt, tmp_path):
    """With fid/<k>step in the run's results.json (next to last.ckpt), the card gives them per step count."""
    import shutil

    from distillkit.export import export_pipeline
    from distillkit.models.loading import load_run_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(ckpt, run / "last.ckpt")
    (run / "results.json").write_text(json.dumps({"fid/1step": 123.4567, "fid/4step": 45.678, "is/4step": 2.5,
                                                  "feature_net": "digits:abc", "global_step": 6}))
    method = load_run_checkpoint(run / "last.ckpt")
    old = os.umask(0o027)
    try:
        out = export_pipeline(method, tmp_path / "export", source=str(run / "last.ckpt"))
    finally:
        os.umask(old)
    readme = (out / "README.md").read_text()
    assert "No FID" not in readme and "features: digits:abc" in readme
    assert "| 1 | 123.457 |" in readme and "| 4 | 45.678 | 2.500 |" in readme
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mode & 0o777 == 0o640


def test_export_files_written_private_get_the_umasks_mode(tmp_path):
    """safetensors and diffusers write through temporary files (mode 0600): the export opens them to
    what the umask gives, 0644 / 0755 under umask 022."""
    from distillkit.export import apply_umask

    out = tmp_path / "export"
    (out / "unet").mkdir(parents=True)
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"x")
    weights.chmod(0o600)
    (out / "unet").chmod(0o700)
    old = os.umask(0o022)
    try:
        apply_umask(out)
    finally:
        os.umask(old)
    assert weights.stat().st_mode & 0o777 == 0o644
    assert (out / "unet").stat().st_mode & 0o777 == 0o755 and out.stat().st_mode & 0o777 == 0o755
