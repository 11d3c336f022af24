"""method=dsd (DSDN, DSDI, from scratch) and method=tsd: the target is two DDIM steps of the same
network and the prediction shares the first evaluation (2 forward calls; TSD 3; +1 for the
anchor), the straight-coupling oracle's zero loss, the index sweep, the level schedule and the
trajectory advance, exact resumption, pretrained-folder loading, and smoke runs of every variant
(and of progressive) through the CLI with the digits experiments."""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from distillkit.diffusion import GaussianData, NoiseSchedule, ddim_step_between
from distillkit.errors import DistillError
from distillkit.methods.dsd import DSD, TSD, sweep_index
from test_progressive import SCHEDULE, SMOKE, T, Oracle


class Counting(nn.Module):
    """A small fixed denoiser (an MLP) that records the (x, t) of every call."""

    def __init__(self, seed: int = 0):
        super().__init__()
        from distillkit.models.mlp import MLPDenoiser

        torch.manual_seed(seed)
        self.net = MLPDenoiser(dim=2, hidden=32, depth=2, time_embed_dim=16)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), torch.as_tensor(t).clone()))
        return self.net(x, t)


def dsd(student, **kw) -> DSD:
    kw.setdefault("teacher_steps", 8)
    return DSD(student, schedule_cfg=SCHEDULE, input_shape=(2,), **kw)


def tsd(student, teacher, **kw) -> TSD:
    kw.setdefault("teacher_steps", 8)
    return TSD(student, teacher, schedule_cfg=SCHEDULE, input_shape=(2,), **kw)


def fake_step(monkeypatch, cls) -> dict:
    """Drive ``global_step`` by hand (no Trainer): returns the dict whose "n" it reads."""
    step = {"n": 0}
    monkeypatch.setattr(cls, "global_step", property(lambda self: step["n"]))
    return step


@pytest.mark.parametrize("target", ["online", "ema"])
def test_target_is_two_ddim_steps_of_the_same_network_and_evaluation_1_is_shared(target):
    net = Counting()
    m = dsd(net, target=target)
    sched = m.schedule
    g = sched.grid(8)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    i = torch.tensor([0, 1, 3, 4, 6])
    t, t1, t2 = g[i], g[i + 1], g[i + 2]
    pred, target_, single, nfe = m.prediction_and_target(x, t, t1, t2)
    calls = len(net.calls) + (len(m.target_net.module.calls) if m.target_net is not None else 0)
    assert nfe == 2 and calls == 2                      # one evaluation with gradient, one without
    assert len(net.calls) == (2 if target == "online" else 1)
    ref = Counting()                                    # the same weights, fresh counter
    with torch.no_grad():
        assert torch.allclose(pred, ddim_step_between(ref, x, t, t2, sched, "v"), atol=1e-6)
        s = ddim_step_between(ref, x, t, t1, sched, "v")
        assert torch.allclose(single, s, atol=1e-6)
        assert torch.allclose(target_, ddim_step_between(ref, s, t1, t2, sched, "v"), atol=1e-6)
    assert pred.requires_grad and not target_.requires_grad and not single.requires_grad
    # the second evaluation is at the single step's latent and time
    second = (m.target_net.module.calls if m.target_net is not None else net.calls)[-1]
    assert torch.allclose(second[0], s, atol=1e-6) and torch.equal(second[1], t1)


def _x(n=64, seed=1):
    return GaussianData.random(dim=2, seed=0).sample(n, torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("target", ["online", "ema"])
def test_dsd_oracle_loss_is_zero_and_not_when_perturbed(target, monkeypatch):
    data, sched = GaussianData.random(dim=2, seed=0), NoiseSchedule("cosine", T)
    step = fake_step(monkeypatch, DSD)
    net = Oracle(data, sched)
    m = dsd(net, target=target, latents="data")
    for k in range(7):  # every pair of the 8-step grid
        step["n"] = k
        m.sync_round()
        assert m.training_step(_x(), k).item() < 1e-9
    calls = net.calls + (m.target_net.module.calls if m.target_net is not None else 0)
    assert calls == 14 and m.nfe == 14
    with torch.no_grad():
        net.bias.fill_(0.3)
    step["n"] = 3
    loss = m.training_step(_x(), 3)
    assert loss.item() > 1e-5  # against < 1e-9 for the oracle
    loss.backward()
    assert net.bias.grad.abs() > 0


def test_dsd_anchor_costs_one_more_evaluation(monkeypatch):
    data, sched = GaussianData.random(dim=2, seed=0), NoiseSchedule("cosine", T)
    fake_step(monkeypatch, DSD)
    net = Oracle(data, sched)
    m = dsd(net, target="online", denoise_weight=0.5)
    m.sync_round()
    m.training_step(_x(), 0)
    assert net.calls == 3 and m.nfe == 3


def test_tsd_oracle_loss_is_zero_and_not_when_perturbed(monkeypatch):
    data, sched = GaussianData.random(dim=2, seed=0), NoiseSchedule("cosine", T)
    step = fake_step(monkeypatch, TSD)
    teacher, student = Oracle(data, sched, "eps"), Oracle(data, sched, "v", bias=0.05)
    m = tsd(student, teacher, teacher_prediction_type="eps", init_from_teacher=False)
    m.sync_round()
    bad = m.training_step(_x(), 0)
    assert bad.item() > 1e-5 and (teacher.calls, student.calls, m.nfe) == (2, 1, 3)
    with torch.no_grad():
        student.bias.fill_(0.0)
    for k in range(1, 7):
        step["n"] = k
        assert m.training_step(_x(), k).item() < 1e-6  # eps teacher: float32 round-off at high noise
    assert (teacher.calls, student.calls) == (14, 7)


@pytest.mark.parametrize("method", ["progressive", "dsd", "tsd"])
def test_clip_sample_reaches_every_no_grad_step(monkeypatch, method):
    """schedule.clip_sample: the teacher's / target's DDIM steps and the detached single step clamp
    x0 (an eps-network's x0 is wild at the top of the grid); the prediction, with gradient, not."""
    import distillkit.methods.dsd as dsd_module
    import distillkit.methods.step_distill as sd_module
    from distillkit.methods.progressive import Progressive

    seen = []
    for mod, name in ((sd_module, "ddim_step_between"), (dsd_module, "ddim_step_between"),
                      (sd_module, "ddim_step_from_pred")):
        orig = getattr(mod, name)

        def spy(*a, _orig=orig, **k):
            seen.append((k.get("clip"), torch.is_grad_enabled() and a[0].requires_grad))
            return _orig(*a, **k)

        monkeypatch.setattr(mod, name, spy)
    cfg = {**SCHEDULE, "clip_sample": True, "clip_sample_range": 0.9}
    kw = dict(schedule_cfg=cfg, input_shape=(2,), teacher_steps=8)
    m = {"progressive": lambda: Progressive(Counting(), Counting(1), final_steps=4, **kw),
         "dsd": lambda: DSD(Counting(), **kw),
         "tsd": lambda: TSD(Counting(), Counting(1), **kw)}[method]()
    fake_step(monkeypatch, type(m))
    m.sync_round()
    m.training_step(_x(), 0)
    no_grad = [clip for clip, grad in seen if not grad]
    assert no_grad and set(no_grad) == {0.9}, seen
    assert all(clip is None for clip, grad in seen if grad)   # the prediction keeps its gradient


def test_tsd_refuses_no_teacher_and_dsd_refuses_one():
    with pytest.raises(DistillError, match="needs a teacher"):
        tsd(Counting(), None)
    with pytest.raises(DistillError, match="teacher=self"):
        DSD(Counting(), Counting(), schedule_cfg=SCHEDULE, input_shape=(2,))
    with pytest.raises(DistillError, match="convert_updates is progressive's"):
        tsd(Counting(), Counting(1), convert_updates=2)
    with pytest.raises(DistillError, match="final_steps"):
        dsd(Counting(), variant="dsdn", final_steps=2)
    for key, bad in (("variant", "dsdx"), ("target", "teacher"), ("latents", "images")):
        with pytest.raises(DistillError, match=f"method.{key}"):
            dsd(Counting(), **{key: bad})


def test_dsdn_sweep_gives_every_pair_the_same_number_of_updates():
    N = 64
    counts = Counter(sweep_index(k, N) for k in range(16 * (N - 1)))
    assert sorted(counts) == list(range(N - 1)) and set(counts.values()) == {16}
    assert [sweep_index(k, 8) for k in range(9)] == [0, 1, 2, 3, 4, 5, 6, 0, 1]


def test_dsdn_warns_when_the_sweep_cannot_be_even(caplog):
    from omegaconf import OmegaConf

    from distillkit.methods.dsd import SweepDistillation

    conf = Path(__file__).resolve().parents[1] / "conf/method"
    defaults = [SweepDistillation.__init__.__kwdefaults__["updates_per_level"],
                *(OmegaConf.load(conf / f"{m}.yaml").updates_per_level for m in ("dsd", "tsd"))]
    assert all(d % 63 == 0 for d in defaults), defaults   # even at the default N = 64
    with caplog.at_level("WARNING", logger="distillkit"):
        dsd(Counting(), teacher_steps=8, updates_per_level=14)
        assert "not a multiple" not in caplog.text
        dsd(Counting(), teacher_steps=8, updates_per_level=10)
    assert "updates_per_level=10 is not a multiple of the 7 pairs" in caplog.text and "7 or 14" in caplog.text


def test_dsdi_levels_halve_n_and_sweep_each_level(monkeypatch):
    step = fake_step(monkeypatch, DSD)
    m = dsd(Counting(), variant="dsdi", teacher_steps=8, final_steps=2, updates_per_level=21)
    assert m.round_steps == [8, 4] and m.num_steps == 2 and m.total_updates == 42
    seen = []
    for k in range(42):
        step["n"] = k
        m.sync_round()
        seen.append((m.round, m.teacher_steps_now, m.current_index()))
    assert seen[:21] == [(1, 8, i % 7) for i in range(21)]
    assert seen[21:] == [(2, 4, i % 3) for i in range(21)]
    sched = NoiseSchedule("cosine", T)
    # the level-2 single step g4[i] -> g4[i+1] is the level-1 double step g8[2i] -> g8[2i+2]
    assert torch.equal(sched.grid(4), sched.grid(8)[::2])
    assert dsd(Counting(), variant="dsdi", teacher_steps=64).round_steps == [64, 32, 16]  # default: 64 -> 8 steps


def test_dsdi_levels_of_unequal_length_each_sweep_from_their_start(monkeypatch):
    step = fake_step(monkeypatch, DSD)
    m = dsd(Counting(), variant="dsdi", teacher_steps=8, final_steps=2, updates_per_level=[14, 5])
    assert m.total_updates == 19
    seen = []
    for k in range(19):
        step["n"] = k
        m.sync_round()
        seen.append((m.round, m.current_index()))
    assert seen == [(1, i % 7) for i in range(14)] + [(2, i % 3) for i in range(5)]


def test_trajectories_start_from_noise_and_advance_by_the_single_step(monkeypatch):
    """latents=noise: update k trains pair k mod 7 at t = g[k mod 7]; its input is the previous
    update's single step (no extra evaluation) and fresh noise when the sweep restarts."""
    step = fake_step(monkeypatch, DSD)
    net = Counting()
    m = dsd(net, target="online", latent_batch_size=6)
    g = m.schedule.grid(8)
    inputs = []
    for k in range(10):
        step["n"] = k
        m.sync_round()
        n_before = len(net.calls)
        m.training_step(torch.zeros(3, 2), k)
        assert len(net.calls) - n_before == 2
        inputs.append(net.calls[n_before])
    for k, (x, t) in enumerate(inputs):
        assert x.shape == (6, 2) and torch.equal(t, g[k % 7].expand(6))
        if k % 7:
            with torch.no_grad():
                expect = ddim_step_between(net.net, inputs[k - 1][0], g[k % 7 - 1], g[k % 7], m.schedule, "v")
            assert torch.allclose(x, expect, atol=1e-6)
    assert not torch.allclose(inputs[7][0], inputs[0][0])   # a fresh batch of noise
    assert m.nfe == 20


def test_latents_survive_a_checkpoint(monkeypatch):
    step = fake_step(monkeypatch, DSD)
    m = dsd(Counting(), target="online")
    m.sync_round()
    m.training_step(torch.zeros(4, 2), 0)
    ckpt = {"distillkit": {}}
    m.on_save_checkpoint(ckpt)
    fresh = dsd(Counting(), target="online")
    fresh.on_load_checkpoint(ckpt)
    assert fresh._latent_index == 1 and torch.equal(fresh._latents, m._latents)
    step["n"] = 1
    fresh.sync_round()
    assert fresh.round == 1 and fresh.current_index() == 1


def test_from_scratch_adds_self_distillation_from_distill_start(monkeypatch):
    step = fake_step(monkeypatch, DSD)
    net = Counting()
    m = dsd(net, from_scratch=True, distill_start=5, distill_weight=0.5, target="online", updates_per_level=50)
    m.sync_round()
    assert m.loss_weights() == (0.0, 1.0)
    m.training_step(torch.randn(4, 2), 0)
    assert len(net.calls) == 1                          # denoising loss only
    step["n"] = 5
    assert m.loss_weights() == (0.5, 1.0) and m.current_index() == 0   # the sweep starts at distill_start
    m.training_step(torch.randn(4, 2), 5)
    assert len(net.calls) == 4 and m.nfe == 4           # + 2 for self-distillation


def test_target_ema_is_updated_and_separate_from_the_sampling_ema():
    net = Counting()
    m = dsd(net, target="ema", target_decay=0.5, ema_cfg={"enabled": True, "decay": 0.9})
    assert m.target_net is not None and m.ema is not None and m.target_net is not m.ema
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    m.update_ema()  # first update copies, as torch's AveragedModel does
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    m.update_ema()
    w, tw, ew = (next(iter(n.parameters())) for n in (net, m.target_net.module, m.ema.module))
    assert torch.allclose(tw, w - 0.5) and torch.allclose(ew, w - 0.9)
    assert any(k.startswith("target_net.") for k in m.state_dict())   # checkpointed


# --------------------------------------------------------------------------- pretrained folders
def test_pretrained_unet_folder(tmp_path):
    from diffusers import UNet2DModel

    from distillkit.models.loading import build_model
    from distillkit.models.pretrained import pretrained_unet

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    unet.save_pretrained(tmp_path / "pipe" / "unet")
    net = build_model({"_target_": "distillkit.models.pretrained.pretrained_unet",
                       "pretrained": str(tmp_path / "pipe"), "checkpoint": None})
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(net(x, torch.tensor([3, 500])), unet(x, torch.tensor([3, 500])).sample, atol=1e-6)
    with pytest.raises(DistillError, match="model.pretrained"):
        pretrained_unet(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------- through the CLI
def _metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("nfe_per_update")]


@pytest.fixture(scope="module")
def fake_digits_teacher(tmp_path_factory) -> Path:
    """unet_digits weights (random: smoke runs check the plumbing, not quality)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/model/unet_digits.yaml")
    cfg = {k: v for k, v in OmegaConf.to_container(cfg).items() if k != "defaults"}
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "unet_digits.pt"
    torch.save(instantiate(cfg).state_dict(), path)
    return path


DIGITS_SMOKE = ["trainer.max_epochs=1", "dataset.batch_size=16", "dataset.eval_batch_size=64",
                "trainer.limit_val_batches=1", "trainer.test_after_fit=false", "trainer.log_every_n_steps=1",
                "callbacks.progress=none", "callbacks.checkpoint_every_n_steps=2", "eval=none"]


@pytest.mark.parametrize("experiment,extra,steps,nfe,files", [
    ("digits_dsdn", ["method.teacher_steps=8", "method.updates_per_level=3"], 3, {3.0}, []),
    ("digits_dsd_literal", ["method.teacher_steps=8", "method.updates_per_level=3"], 3, {2.0}, []),
    ("digits_dsdi", ["method.teacher_steps=8", "method.final_steps=2", "method.updates_per_level=2"], 4, {3.0},
     ["level_1.ckpt", "level_2.ckpt"]),
    ("digits_tsd", ["method.variant=dsdi", "method.teacher_steps=4", "method.final_steps=1",
                    "method.updates_per_level=2"], 4, {3.0}, ["level_1.ckpt", "level_2.ckpt"]),
    ("digits_progressive", ["method.teacher_steps=4", "method.updates_per_round=2", "eval=digits",
                            "eval.steps=[2,1]", "eval.num_samples=32", "eval.batch_size=32", "eval.every_n_steps=2"],
     4, {3.0}, ["round_1.ckpt", "round_2.ckpt"]),
    ("digits_dsdn", ["method.from_scratch=true", "method.distill_start=2", "method.teacher_steps=8",
                     "method.updates_per_level=4", "method.target=online", "model.checkpoint=null"], 4, {1.0, 3.0}, []),
])
def test_every_variant_runs_through_the_cli(cli, runs_dir, fake_digits_teacher, experiment, extra, steps, nfe, files):
    ckpt = f"{fake_digits_teacher}"
    weights = [f"teacher.checkpoint={ckpt}"] if experiment in ("digits_tsd", "digits_progressive") else \
        [f"model.checkpoint={ckpt}"]
    r = cli(f"experiment={experiment}", *weights, f"runs_dir={runs_dir}", *DIGITS_SMOKE, *extra, "name=smoke")
    assert r.returncode == 0, r.output
    run = runs_dir / experiment / "smoke"
    rows = _metrics(run)
    assert {float(x["nfe_per_update"]) for x in rows} == nfe
    assert int(float(rows[-1]["step"])) == steps  # the update count, as the progress log's "step N"
    assert float(rows[-1]["nfe"]) == sum(float(x["nfe_per_update"]) for x in rows)
    for f in files:
        assert (run / f).is_file()
    if experiment == "digits_progressive":
        assert (run / "eval.jsonl").is_file()


# DSDI with an EMA target, data-free latents and a checkpoint at step 3 (the resume tests)
DSDI_RESUME = ["dataset=toy2d", "model=mlp2d", "teacher=self", "method=dsd", "method.variant=dsdi",
               "method.teacher_steps=8", "method.final_steps=2", "method.updates_per_level=4",
               "method.denoise_weight=0.5", "schedule=cosine", f"schedule.num_train_timesteps={T}",
               "callbacks.ema.enabled=true", "callbacks.checkpoint_every_n_steps=3", "name=dsd", *SMOKE]


def test_dsd_resumes_exactly(cli, tmp_path):
    """DSDI with an EMA target and data-free latents: stopped mid-level and resumed, it ends with the
    weights (student, sampling EMA, target network) of an uninterrupted run."""
    args = DSDI_RESUME
    assert cli(*args, f"runs_dir={tmp_path / 'a'}", "trainer.max_steps=3").returncode == 0
    r = cli(*args, f"runs_dir={tmp_path / 'a'}", "trainer.max_steps=8")
    assert r.returncode == 0, r.output
    assert cli(*args, f"runs_dir={tmp_path / 'b'}").returncode == 0
    a, b = (torch.load(d / "default/dsd/last.ckpt", weights_only=True) for d in (tmp_path / "a", tmp_path / "b"))
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("target_net.") for k in a["state_dict"])
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


@pytest.mark.ddp
def test_dsd_resumes_exactly_under_ddp(cli, tmp_path):
    """Two gloo ranks, each following its own data-free trajectories with its own RNG: stopped
    mid-level and resumed, the run ends with the weights of an uninterrupted one (every rank's
    latents and RNG states are in the checkpoint, not copies of rank 0's)."""
    args = [*DSDI_RESUME, "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
    first = cli(*args, f"runs_dir={tmp_path / 'a'}", "trainer.max_steps=3", timeout=900)
    assert first.returncode == 0, first.output
    saved = torch.load(tmp_path / "a/default/dsd/last.ckpt", weights_only=True)["distillkit"]
    x0, x1 = saved["latents"]["x_per_rank"]
    assert not torch.equal(x0, x1) and len(saved["rng_per_rank"]) == 2
    r = cli(*args, f"runs_dir={tmp_path / 'a'}", "trainer.max_steps=8", timeout=900)
    assert r.returncode == 0, r.output
    assert cli(*args, f"runs_dir={tmp_path / 'b'}", timeout=900).returncode == 0
    a, b = (torch.load(d / "default/dsd/last.ckpt", weights_only=True) for d in (tmp_path / "a", tmp_path / "b"))
    assert a["global_step"] == b["global_step"] == 8
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_paper_setting_runs_on_a_pretrained_folder(cli, runs_dir, tmp_path):
    """experiment=celebahq_tsd (frozen pretrained eps teacher, student from the same diffusers
    folder, DSDI levels 64 -> 8) on a tiny random UNet folder and a folder of random images."""
    import numpy as np
    from diffusers import UNet2DModel
    from PIL import Image

    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=8).save_pretrained(tmp_path / "ddpm")
    (tmp_path / "images" / "all").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / "all" / f"{i}.png")
    r = cli("experiment=celebahq_tsd", f"teacher.pretrained={tmp_path / 'ddpm'}", f"dataset.data_dir={tmp_path / 'images'}",
            "dataset.image_size=8", "dataset.num_workers=0", "dataset.batch_size=4", "dataset.eval_batch_size=4",
            "method.updates_per_level=1", f"runs_dir={runs_dir}", "name=paper", *DIGITS_SMOKE[3:])
    assert r.returncode == 0, r.output
    run = runs_dir / "celebahq_tsd" / "paper"
    assert [(run / f"level_{k}.ckpt").is_file() for k in (1, 2, 3)] == [True] * 3
    assert {float(x["nfe_per_update"]) for x in _metrics(run)} == {3.0}


def test_config_typos_list_the_allowed_values(cli, runs_dir):
    r = cli("experiment=digits_dsdn", "method.variant=dsdx", f"runs_dir={runs_dir}")
    assert r.returncode == 2 and "dsdn" in r.output and "dsdi" in r.output
