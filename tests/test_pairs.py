"""distill-pairs and load_pairs: DMD's noise-sample pairs of a teacher's ODE sampler.

On a class-conditional digits diffusion run trained through the CLI (smoke size): the pairs' noise
is the one-call draw ``torch.randn((N, 1, 8, 8), generator=torch.Generator().manual_seed(seed))``,
their targets are distill-sample's samples for the same seed, steps and classes, ``class=3`` is
honoured; in-process: a latent text-to-image model's pairs stay latents (not decoded, not clipped),
an unconditional EDM model's pairs carry no conditions; the reader's and the command's errors are
one line naming the key and the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distillkit.errors import DistillError
from conftest import run_cli, run_module

N, STEPS, SEED = 10, 4, 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A class-conditional digits diffusion run (experiment=digits_cond_teacher, debug=smoke)."""
    runs = tmp_path_factory.mktemp("cond_runs")
    r = run_cli("experiment=digits_cond_teacher", "debug=smoke", f"runs_dir={runs}", "callbacks.progress=none",
                "callbacks.ema.decay=0.5")
    assert r.returncode == 0, r.output
    return next((runs / "digits_cond_teacher").iterdir()) / "last.ckpt"


@pytest.fixture(scope="module")
def teacher(ckpt):
    from distillkit.models.loading import load_run_checkpoint

    return load_run_checkpoint(ckpt)


@pytest.fixture(scope="module")
def pairs_file(ckpt, tmp_path_factory):
    """distill-pairs' output for (N, STEPS, SEED, class=3), through its entry point; and what it printed."""
    import contextlib
    import io

    from distillkit.pairs import main

    out = tmp_path_factory.mktemp("pairs") / "sub" / "pairs.safetensors"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main([f"checkpoint={ckpt}", f"num_pairs={N}", f"out={out}", f"steps={STEPS}", f"seed={SEED}", "batch_size=4",
              "class=3"])
    return out, buf.getvalue()


def test_file_layout_metadata_and_printed_line(ckpt, pairs_file):
    from safetensors import safe_open

    from distillkit.pairs import load_pairs

    out, printed = pairs_file
    with safe_open(str(out), framework="pt") as f:
        assert sorted(f.keys()) == ["cond.class_labels", "noise", "target"]
        meta = json.loads(f.metadata()["distillkit_pairs"])
    assert meta == {"checkpoint": str(ckpt.absolute()), "steps": STEPS, "guidance": 1.0, "seed": SEED, "num_pairs": N,
                    "shape": [1, 8, 8], "prediction_type": "v", "sampler": "ddim eta=0", "spacing": "trailing",
                    "use_ema": True}
    p = load_pairs(out)
    assert p.noise.dtype == p.target.dtype == torch.float32 and p.noise.shape == p.target.shape == (N, 1, 8, 8)
    assert len(p) == N and p.shape == (1, 8, 8) and p.meta == meta
    assert p.target.abs().max() <= 1 and len(p.target.unique()) > 10  # pixel images: clipped, not saturated
    assert [x.name for x in out.parent.iterdir()] == ["pairs.safetensors"]  # no temporary file left
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()
    lines = printed.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"distill-pairs: wrote {out} ({N} pairs of 1x8x8 noise")
    assert f"{STEPS} steps, EMA weights" in lines[0]


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_noise_is_the_one_call_draw_from_the_seed(pairs_file):
    from distillkit.pairs import load_pairs

    p = load_pairs(pairs_file[0])
    assert torch.equal(p.noise, torch.randn((N, 1, 8, 8), generator=torch.Generator().manual_seed(SEED)))


def test_targets_are_distill_samples_samples(teacher, ckpt, pairs_file, tmp_path):
    """Same seed, steps and classes: distill-sample's uint8 images are the targets' conversion, and the
    targets are the sampler's output from the pairs' noise."""
    from distillkit.metrics.images import to_uint8_nhwc
    from distillkit.pairs import load_pairs
    from distillkit.sample import main as sample_main

    p = load_pairs(pairs_file[0])
    npz = tmp_path / "s.npz"
    sample_main([f"checkpoint={ckpt}", f"num_samples={N}", f"out={npz}", f"steps={STEPS}", f"seed={SEED}",
                 "batch_size=5", "class=3"])
    assert np.array_equal(np.load(npz)["arr_0"], to_uint8_nhwc(p.target))
    direct = teacher.sample_from_noise(p.noise[:4], STEPS, cond={"class_labels": p.cond["class_labels"][:4]},
                                       guidance=1.0)
    assert torch.equal(direct, p.target[:4])  # the first batch of 4, same inputs


def test_class_labels_honour_class_and_are_drawn_as_distill_sample_draws_them(teacher, pairs_file):
    from distillkit.pairs import generate_pairs, load_pairs
    from distillkit.sample import generate

    p = load_pairs(pairs_file[0])
    assert p.cond["class_labels"].dtype == torch.int64 and p.cond["class_labels"].tolist() == [3] * N
    noise, target, cond = generate_pairs(teacher, 6, STEPS, seed=SEED, classes="0,7")
    assert cond["class_labels"].tolist() == [0, 7, 0, 7, 0, 7]
    _, drawn = generate_pairs(teacher, N, 1, seed=SEED)[1:]
    _, theirs = generate(teacher, N, 1, seed=SEED, return_cond=True)
    assert torch.equal(drawn["class_labels"], theirs["class_labels"]) and len(drawn["class_labels"].unique()) > 1
    with pytest.raises(DistillError, match="class=12: this model has classes 0..9"):
        generate_pairs(teacher, 2, 1, classes="12")


def test_guidance_and_the_runs_eta_do_not_make_the_sampler_stochastic(teacher):
    from distillkit.pairs import generate_pairs

    plain = generate_pairs(teacher, 4, STEPS, seed=0, classes="1")[1]
    eta, teacher.eta = teacher.eta, 0.7  # a run sampled stochastically: the pairs still come from the ODE
    try:
        assert torch.equal(generate_pairs(teacher, 4, STEPS, seed=0, classes="1")[1], plain)
        assert teacher.eta == 0.7
    finally:
        teacher.eta = eta
    assert not torch.allclose(generate_pairs(teacher, 4, STEPS, seed=0, classes="1", guidance=3.0)[1], plain)


def test_batch_and_check_shape(pairs_file):
    from distillkit.pairs import load_pairs

    p = load_pairs(pairs_file[0], key="method.pairs")
    idx = torch.tensor([7, 0, 7])
    noise, target, cond = p.batch(idx)
    assert torch.equal(noise, p.noise[idx]) and torch.equal(target, p.target[idx])
    assert cond.keys() == {"class_labels"} and cond["class_labels"].tolist() == [3, 3, 3]
    p.check_shape((1, 8, 8))
    with pytest.raises(DistillError) as e:
        p.check_shape([3, 32, 32], key="method.pairs")
    msg = str(e.value)
    assert msg.startswith(f"method.pairs={pairs_file[0]}: the pairs hold samples of shape (1, 8, 8)")
    assert "(3, 32, 32)" in msg and "distill-pairs checkpoint=" in msg and len(msg.splitlines()) == 1


# --------------------------------------------------------------------------- models without a run
class ZeroEps(nn.Module):
    """An eps-predictor that always says 0: DDIM then returns x_T / alpha_T, far outside [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return torch.zeros_like(x) + 0 * self.w


class FakeCodec:
    """A latent model's codec: a "VAE" that halves the latents (and keeps their shape)."""

    vae = object()

    def decode(self, z):
        return z / 2


def latent_method():
    from distillkit.methods.diffusion import Diffusion
    from distillkit.models.denoiser import Denoiser

    den = Denoiser(ZeroEps(), prediction_type="eps", codec=FakeCodec())
    return Diffusion(den, schedule_cfg={"name": "cosine", "num_train_timesteps": 1000, "num_steps": 2},
                     input_shape=(4, 2, 2)).eval()


def test_decode_false_keeps_latents_unclipped_and_default_is_unchanged():
    m = latent_method()
    assert m.student.is_latent
    z = torch.randn((3, 4, 2, 2), generator=torch.Generator().manual_seed(0))
    raw = m.sample_from_noise(z, 2, decode=False)
    assert raw.abs().max() > 10  # latents: not clipped
    assert torch.equal(m.sample_from_noise(z, 2), (raw / 2).clamp(-1, 1))  # default: decoded, then clipped
    # pixel models: clipped whether decoded or not
    from distillkit.methods.diffusion import Diffusion

    pix = Diffusion(ZeroEps(), schedule_cfg={"name": "cosine", "num_train_timesteps": 1000}, prediction_type="eps",
                    input_shape=(4, 2, 2)).eval()
    assert torch.equal(pix.sample_from_noise(z, 2, decode=False), pix.sample_from_noise(z, 2))
    assert pix.sample_from_noise(z, 2).abs().max() == 1


def test_latent_pairs_are_in_the_models_space(tmp_path):
    from distillkit.pairs import load_pairs, write_pairs

    m = latent_method()
    out = write_pairs(m, 5, tmp_path / "lat.safetensors", seed=1, batch_size=2)
    p = load_pairs(out)
    assert p.cond == {} and p.meta["shape"] == [4, 2, 2] and p.meta["checkpoint"] is None
    assert torch.equal(p.target, m.sample_from_noise(p.noise, 2, decode=False)) and p.target.abs().max() > 10


def test_text_to_image_pairs_are_latents_with_the_prompt_embeddings(tmp_path):
    from tiny_sd import make_tiny_sd15

    from distillkit.methods.diffusion import Diffusion
    from distillkit.models.stable_diffusion import stable_diffusion
    from distillkit.pairs import load_pairs, write_pairs

    den = stable_diffusion(str(make_tiny_sd15(tmp_path / "sd15")), variant="sd15")
    m = Diffusion(den, schedule_cfg={"name": "none", "num_steps": 2, "spacing": "trailing"},
                  input_shape=den.sample_shape).eval()
    p = load_pairs(write_pairs(m, 3, tmp_path / "t.safetensors", prompts=["a cat", "a dog"], guidance=2.0))
    assert p.noise.shape == p.target.shape == (3, 4, 16, 16)  # latents, not the 32-pixel images
    assert p.cond.keys() == {"encoder_hidden_states"} and p.cond["encoder_hidden_states"].shape == (3, 77, 32)
    h = p.cond["encoder_hidden_states"]
    assert torch.allclose(h[2], h[0], atol=1e-5) and not torch.allclose(h[1], h[0])  # prompts repeated over the pairs
    assert p.meta["prediction_type"] == "eps" and p.meta["guidance"] == 2.0
    direct = m.sample_from_noise(p.noise, 2, cond=p.cond, guidance=2.0, decode=False)
    assert torch.allclose(direct, p.target, atol=1e-5)


def test_unconditional_edm_pairs_have_no_conditions(tmp_path):
    from distillkit.methods.diffusion import Diffusion
    from distillkit.models.unet import DiffusersUNet
    from distillkit.pairs import load_pairs, write_pairs

    torch.manual_seed(0)
    net = DiffusersUNet(sample_size=8, in_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                        norm_num_groups=4, add_attention=False)
    m = Diffusion(net, schedule_cfg={"name": "edm", "num_steps": 3, "solver": "euler"}, input_shape=(1, 8, 8)).eval()
    p = load_pairs(write_pairs(m, 4, tmp_path / "edm.safetensors", seed=2))
    assert p.cond == {} and p.batch(torch.tensor([1]))[2] == {}
    assert p.meta["sampler"] == "euler" and p.meta["spacing"] is None and p.meta["steps"] == 3
    assert torch.equal(p.noise, torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(2)))


# --------------------------------------------------------------------------- errors
def test_missing_pairs_file_names_the_command_that_writes_it(tmp_path):
    from distillkit.pairs import load_pairs

    path = tmp_path / "none.safetensors"
    with pytest.raises(DistillError) as e:
        load_pairs(path, key="method.pairs")
    assert str(e.value) == (f"method.pairs={path}: no such file; write it once with the teacher's ODE sampler: "
                            f"distill-pairs checkpoint=<teacher's last.ckpt> num_pairs=<N> out={path}")


@pytest.mark.parametrize("tensors,message", [
    ({"noise": torch.zeros(2, 3)}, "no 'target' tensor"),
    ({"x": torch.zeros(2, 3)}, "no 'noise' and no 'target' tensor (it holds x)"),
    ({"noise": torch.zeros(2, 3), "target": torch.zeros(2, 4)},
     "'noise' has shape (2, 3) but 'target' has shape (2, 4)"),
    ({"noise": torch.zeros(2, 3), "target": torch.zeros(2, 3), "cond.class_labels": torch.zeros(3)},
     "'cond.class_labels' has shape (3,), not one condition per pair (2)"),
    (None, "cannot read this file as safetensors"),
])
def test_bad_pairs_files_name_the_file_and_the_problem(tmp_path, tensors, message):
    from safetensors.torch import save_file

    from distillkit.pairs import load_pairs

    path = tmp_path / "bad.safetensors"
    if tensors is None:
        path.write_bytes(b"not a safetensors file")
    else:
        save_file(tensors, str(path))
    with pytest.raises(DistillError) as e:
        load_pairs(path, key="method.pairs")
    msg = str(e.value)
    assert msg.startswith(f"method.pairs={path}: ") and message in msg and len(msg.splitlines()) == 1, msg


@pytest.mark.parametrize("args,message", [
    (["num_pairs=4", "out=x.safetensors"], "missing required key checkpoint=..."),
    (["checkpoint=C", "num_pair=4", "out=x.safetensors"], "unknown key 'num_pair'. Did you mean 'num_pairs'?"),
    (["checkpoint=C", "num_pairs=four", "out=x.safetensors"], "num_pairs=four: expected an integer"),
    (["checkpoint=C", "num_pairs=0", "out=x.safetensors"], "num_pairs=0: must be at least 1"),
    (["checkpoint=C", "num_pairs=4", "out=x.npz"], "out=x.npz: the file name must end in .safetensors"),
    (["checkpoint=C", "num_pairs=4", "out=x.safetensors", "steps=2000"], "steps=2000: at most"),
    (["checkpoint=C", "num_pairs=4", "out=x.safetensors", "prompts=a cat"], "not a text-to-image model"),
    (["checkpoint=C", "num_pairs=4", "out=x.safetensors", "class=12"], "class=12: this model has classes 0..9"),
    (["checkpoint=/no/such.ckpt", "num_pairs=4", "out=x.safetensors"], "checkpoint=/no/such.ckpt: no such file"),
])
def test_bad_arguments_give_one_line_errors(ckpt, tmp_path, capsys, args, message):
    from distillkit.pairs import main

    args = [a.replace("=C", f"={ckpt}").replace("=x.", f"={tmp_path}/x.") for a in args]
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("distill-pairs: error: ") and message in err.replace(str(tmp_path) + "/", ""), err
    assert not list(tmp_path.glob("*.safetensors"))


def test_command_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, bad)
    r = run_module("distillkit.pairs", f"checkpoint={bad}", "num_pairs=2", f"out={tmp_path / 'p.safetensors'}",
                   timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("distill-pairs: error: checkpoint=") and "not a distillkit run checkpoint" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
