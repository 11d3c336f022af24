"""The model boundary (distillkit.models.denoiser): one guidance convention, conditions as dicts, the
null class, label dropout, shared frozen parts, and checkpoint keys that did not move; and the
class-conditional digits path through the CLI."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from distillkit.diffusion import NoiseSchedule, ddim_sample, guided
from distillkit.errors import DistillError
from distillkit.models.denoiser import Denoiser, as_denoiser
from distillkit.models.unet import DiffusersUNet


def class_unet(num_classes=3):
    torch.manual_seed(0)
    return DiffusersUNet(sample_size=8, in_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                         norm_num_groups=4, add_attention=False, num_classes=num_classes)


def test_guidance_convention_scalar_and_per_sample():
    u, c = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    assert torch.equal(guided(u, c, 1.0), c) and torch.equal(guided(u, c, 0.0), u)
    assert torch.allclose(guided(u, c, 7.5), u + 7.5 * (c - u), atol=1e-5)
    w = torch.tensor([1.0, 2.0, 4.0, 0.0])  # LCM draws w per sample
    out = guided(u, c, w)
    for i in range(4):
        assert torch.allclose(out[i], u[i] + w[i] * (c[i] - u[i]), atol=1e-6)


def test_class_conditional_denoiser_guides_with_the_null_class():
    den = as_denoiser(class_unet(), NoiseSchedule("cosine", 1024), "v").eval()
    assert den.condition == "class" and den.num_classes == 3
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([100, 900])
    cond = {"class_labels": torch.tensor([0, 2])}
    with torch.no_grad():
        c = den(x, t, cond)
        u = den(x, t, {"class_labels": torch.tensor([3, 3])})  # the last embedding: no class
        assert not torch.allclose(c, u)
        assert torch.allclose(den.guided(x, t, cond, 3.0), u + 3.0 * (c - u), atol=1e-5)
        assert torch.equal(den.guided(x, t, cond, 1.0), c)
        per_sample = den.guided(x, t, cond, torch.tensor([1.0, 3.0]))
        assert torch.allclose(per_sample[0], c[0], atol=1e-6) and torch.allclose(per_sample[1], (u + 3 * (c - u))[1], atol=1e-5)
    # samplers take the denoiser's closure
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ddim_sample(den.model_fn(cond, 2.0), z, den.schedule, 4, pred_type="v")
        b = ddim_sample(den.model_fn({"class_labels": torch.tensor([1, 1])}, 2.0), z, den.schedule, 4, pred_type="v")
    assert a.shape == z.shape and not torch.allclose(a, b)


def test_conditions_from_batches_draws_and_dropout():
    den = as_denoiser(class_unet(), NoiseSchedule("cosine", 1024), "v")
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    x0, cond = den.split_batch((x, y))
    assert x0 is x and torch.equal(cond["class_labels"], y)
    plain = as_denoiser(DiffusersUNet(sample_size=8, in_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                                      norm_num_groups=4, add_attention=False), NoiseSchedule("cosine", 1024), "v")
    assert plain.split_batch((x, y)) == (x, {})  # labels are not a condition of an unconditional model
    g = torch.Generator().manual_seed(0)
    dropped = den.drop_condition({"class_labels": torch.zeros(1000, dtype=torch.long)}, 0.1, g)["class_labels"]
    assert 60 < int((dropped == 3).sum()) < 140 and set(dropped.tolist()) == {0, 3}
    assert torch.equal(den.draw_condition(5, classes=[2])["class_labels"], torch.full((5,), 2))
    assert torch.equal(den.draw_condition(5, classes=[0, 1])["class_labels"], torch.tensor([0, 1, 0, 1, 0]))
    drawn = den.draw_condition(200, torch.Generator().manual_seed(0))["class_labels"]
    assert set(drawn.tolist()) == {0, 1, 2}
    with pytest.raises(DistillError, match="classes 0..2"):
        den.draw_condition(2, classes=[3])


def test_keys_unchanged_and_copies_share_the_frozen_parts():
    """A pixel denoiser's state dict is the DiffusersUNet wrapper's (unet.*): runs written before the
    boundary load as they are; deep copies (EMA, targets, round teachers) share schedule and codec."""
    net = DiffusersUNet(sample_size=8, in_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                        norm_num_groups=4, add_attention=False)
    den = as_denoiser(net, NoiseSchedule("cosine", 1024), "v")
    assert list(den.state_dict()) == list(net.state_dict())
    den.codec = object.__new__(type("Codec", (), {"__deepcopy__": lambda self, memo: self, "to": lambda self, d: self}))
    twin = copy.deepcopy(den)
    assert twin.schedule is den.schedule and twin.codec is den.codec and twin.unet is not den.unet
    assert isinstance(twin, Denoiser) and twin.prediction_type == "v"


def test_class_conditional_digits_through_the_cli(cli, runs_dir, tmp_path):
    r = cli("experiment=digits_cond_teacher", f"runs_dir={runs_dir}", "trainer.max_steps=30", "eval=digits",
            "eval.every_n_steps=0", "eval.steps=[2]", "eval.num_samples=50", "eval.guidance=2",
            "trainer.test_after_fit=false", "callbacks.progress=none")
    assert r.returncode == 0, r.output
    run = next((runs_dir / "digits_cond_teacher").iterdir())
    res = json.loads((run / "results.json").read_text())
    assert 0 <= res["class_acc/2step"] <= 1 and "fid/2step" in res
    row = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert row["guidance"] == 2.0 and "class_acc" in row
    from distillkit.sample import main as sample_main

    out = tmp_path / "threes.npz"
    sample_main([f"checkpoint={run / 'last.ckpt'}", "num_samples=6", "steps=4", "class=3", "guidance=2",
                 f"out={out}", "device=cpu"])
    import numpy as np

    assert np.load(out)["arr_0"].shape == (6, 8, 8, 1)
    with pytest.raises(SystemExit):
        sample_main([f"checkpoint={run / 'last.ckpt'}", "num_samples=2", "class=12", f"out={out}"])


def test_save_and_from_pretrained_round_trip(tmp_path):
    den = as_denoiser(class_unet(), NoiseSchedule("cosine", 1024), "v").eval()
    den.save_pretrained(tmp_path / "den")
    back = Denoiser.from_pretrained(tmp_path / "den").eval()
    assert (back.condition, back.num_classes, back.prediction_type) == ("class", 3, "v")
    assert torch.allclose(back.schedule.alphas_cumprod, den.schedule.alphas_cumprod)
    x, t, cond = torch.randn(2, 1, 8, 8), torch.tensor([5, 700]), {"class_labels": torch.tensor([1, 2])}
    with torch.no_grad():
        assert torch.equal(back.guided(x, t, cond, 2.0), den.guided(x, t, cond, 2.0))
    with pytest.raises(DistillError, match="no unet/config.json"):
        Denoiser.from_pretrained(tmp_path)


def test_a_bare_networks_state_dict_loads_into_its_denoiser():
    """Checkpoints of students that were not diffusers UNets (toy2d's MLP) held the network's keys
    without "unet.": they load, and resume, into the denoiser around that network."""
    from distillkit.methods.ema import EMA
    from distillkit.models.mlp import MLPDenoiser

    torch.manual_seed(0)
    old = MLPDenoiser(hidden=16, depth=1)
    den = as_denoiser(MLPDenoiser(hidden=16, depth=1), NoiseSchedule("cosine", 1024), "v")
    holder = torch.nn.Module()
    holder.student, holder.ema = den, EMA(den, 0.9)
    legacy = {f"student.{k}": v for k, v in old.state_dict().items()}
    legacy.update({f"ema.module.{k}": v for k, v in old.state_dict().items()}, **{"ema.n_averaged": torch.tensor(3)})
    holder.load_state_dict(legacy, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(den.unet.state_dict().values(), old.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(holder.ema.module.unet.state_dict().values(), old.state_dict().values()))
