"""Digits FID / IS: the shipped feature network, torchmetrics on top of it, the real
statistics cache, the floor, the evaluation callback and ``distill-eval``."""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distillkit.errors import DistillError
from distillkit.metrics import features as F
from distillkit.metrics.fid import DIGITS_NUM_SAMPLES, SampleScorer, digits_floor, heldout_images
from distillkit.metrics.images import from_uint8_nhwc, split_images, to_uint8_nhwc


@pytest.fixture(scope="module")
def dm():
    from distillkit.data.digits import DigitsDataModule

    d = DigitsDataModule()
    d.setup("fit")
    return d


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fid_stats")


@pytest.fixture(scope="module")
def scorer():
    return SampleScorer("digits")


@pytest.fixture(scope="module")
def train_stats(dm, scorer, cache):
    return scorer.reference(split_images(dm, "train"), "digits", "train", cache)


# --------------------------------------------------------------------------- feature net
def test_feature_net_file_matches_sidecar():
    side = F.digits_sidecar()
    data = F.DIGITS_WEIGHTS.read_bytes()
    assert hashlib.sha256(data).hexdigest() == side["sha256"], "weights changed without rerunning the script"
    assert F.feature_net_hash("digits") == side["sha256"][: F.HASH_LEN]
    assert F.feature_net_id() == f"digits:{side['sha256'][:12]}"
    assert len(data) < 5_000_000 and side["width"] == 32 and side["test_acc"] >= 0.97
    assert "make_digits_feature_net.py" in side["command"]


def test_feature_net_interface(dm):
    net = F.load_feature_net("digits")
    assert not net.training and not net.train().training  # never leaves eval mode
    x, y = dm.test_set.tensors
    with torch.no_grad():
        feats, logits = net(x), net.classifier()(x)
    assert feats.shape == (len(x), net.num_features) == (len(x), 128)
    assert logits.shape == (len(x), 10) and net.classifier().num_features == 10
    assert (logits.argmax(1) == y).float().mean() > 0.97  # the sidecar's test accuracy
    with pytest.raises(ValueError, match="float images"):
        net(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(N, 1, 8, 8\)"):
        net(torch.zeros(2, 3, 8, 8))
    with pytest.raises(DistillError, match="allowed values are digits, inception"):
        F.load_feature_net("incep")


def test_inception_needs_local_weights_and_the_extra(tmp_path):
    with pytest.raises(DistillError, match=r"eval\.inception_weights=PATH"):
        F.load_feature_net("inception")
    with pytest.raises(DistillError, match="no such file"):
        F.load_feature_net("inception", tmp_path / "missing.pth")
    fake = tmp_path / "w.pth"
    fake.write_bytes(b"not weights")
    assert len(F.feature_net_hash("inception", fake)) == 12
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(DistillError, match=r"distillkit\[inception\]"):
            F.load_feature_net("inception", fake)


def test_inception_features():
    pytest.importorskip("torch_fidelity", reason="the inception extra (torch-fidelity, torchvision) is not installed")
    weights = os.environ.get("DISTILLKIT_INCEPTION_WEIGHTS")
    if not weights:
        pytest.skip("set DISTILLKIT_INCEPTION_WEIGHTS to torch-fidelity's Inception-v3 weights file")
    net = F.load_feature_net("inception", weights)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert net(x).shape == (2, 2048) and net.classifier()(x).shape == (2, 1008)


# --------------------------------------------------------------------------- FID / IS
def test_fid_is_zero_on_itself_and_grows_with_distance(dm, scorer, train_stats):
    train = split_images(dm, "train")
    assert abs(scorer.score(train, train_stats)["fid"]) < 1e-2
    g = torch.Generator().manual_seed(0)
    held = heldout_images(dm, DIGITS_NUM_SAMPLES)
    fids = [scorer.score((held + s * torch.randn(held.shape, generator=g)).clamp(-1, 1), train_stats)["fid"]
            for s in (0.0, 0.2, 0.5)]
    assert fids[0] < fids[1] < fids[2], fids
    x, y = dm.val_set.tensors[0], dm.val_set.tensors[1]
    ones = torch.cat([dm.train_set.tensors[0][dm.train_set.tensors[1] == 1], x[y == 1]])
    assert scorer.score(ones, train_stats)["fid"] > 10 * fids[0]


def test_inception_score_real_digits_high_constant_images_one(dm, scorer, train_stats):
    held = heldout_images(dm, DIGITS_NUM_SAMPLES)
    r = scorer.score(held, train_stats)
    assert r["is"] > 8.0 and r["feature_net"] == F.feature_net_id()
    assert scorer.score(held, train_stats, seed=0)["is"] == r["is"]  # fixed split seed
    const = scorer.score(torch.full((200, 1, 8, 8), -1.0), train_stats)
    assert abs(const["is"] - 1.0) < 1e-4


def test_real_statistics_cached_once(dm, tmp_path, monkeypatch):
    calls = []
    forward = F.DigitsFeatureNet.forward
    monkeypatch.setattr(F.DigitsFeatureNet, "forward", lambda self, x: calls.append(len(x)) or forward(self, x))
    s = SampleScorer("digits", batch_size=512)
    train = split_images(dm, "train")
    a = s.reference(train, "digits", "train", tmp_path)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1 and sum(calls) == len(train)
    assert files[0].name.startswith(f"digits-train-n{len(train)}-{s.net_hash}-")
    b = s.reference(train, "digits", "train", tmp_path)
    assert sum(calls) == len(train), "the second call must read the cache"
    assert all(torch.equal(a[k], b[k]) for k in a) and int(a["num_samples"]) == len(train)
    s.reference(train[:500], "digits", "train", tmp_path)  # other images: their own entry
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_floor(cache):
    r = digits_floor(cache_dir=cache)
    assert r["num_samples"] == DIGITS_NUM_SAMPLES == 700
    assert math.isfinite(r["fid"]) and 0.0 < r["fid"] < 3.0 and r["is"] > 8.0
    assert r["feature_net"] == F.feature_net_id() and r["reference"] == "digits/train n=1078"


def test_uint8_round_trip(dm):
    x = heldout_images(dm, 10)
    a = to_uint8_nhwc(x)
    assert a.dtype == np.uint8 and a.shape == (10, 8, 8, 1)
    assert (from_uint8_nhwc(a) - x).abs().max() <= 1 / 127.5 + 1e-6


# --------------------------------------------------------------------------- the callback
def _fake_method(images: torch.Tensor):
    """A fake generative method: ``sample`` draws held-out real digits (plus noise at one
    step), so its FID must sit at the floor."""
    import lightning as L

    class FakeGenerator(L.LightningModule):
        image_shape = (1, 8, 8)

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)
            self.images = images

        def training_step(self, batch, batch_idx):
            return self.lin(torch.ones(1, 1)).sum() * 0

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

        def sample(self, n, num_steps, generator=None):
            assert not self.training
            x = self.images[torch.randperm(len(self.images), generator=generator)[:n]]
            if num_steps == 1:
                x = (x + 0.3 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)
            return x

    return FakeGenerator()


def test_sample_evaluation_callback_logs_fid_is_and_grids(dm, tmp_path, cache):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from distillkit.callbacks.evaluation import SampleEvaluation
    from distillkit.data.digits import DigitsDataModule

    floor = digits_floor(cache_dir=cache)["fid"]
    method = _fake_method(torch.cat([dm.val_set.tensors[0], dm.test_set.tensors[0]]))
    cb = SampleEvaluation(every_n_steps=2, steps=[1, 2], num_samples=700, cache_dir=str(cache), batch_size=700)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=CSVLogger(tmp_path, name="", version=""),
                        callbacks=[cb], default_root_dir=str(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(method, datamodule=DigitsDataModule(batch_size=64))
    # at step 2 (every_n_steps) and at the end (step 3)
    assert [(r["step"], r["sampling_steps"]) for r in cb.history] == [(2, 1), (2, 2), (3, 1), (3, 2)]
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert abs(m["fid/2step"] - floor) < 0.5 * floor, (m, floor)  # real digits: at the floor
    assert m["fid/1step"] > 2 * m["fid/2step"] and m["is/2step"] > 8
    # the same noise at every evaluation
    assert cb.history[0]["fid"] == cb.history[2]["fid"] and cb.history[1]["is"] == cb.history[3]["is"]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"fid/1step", "fid/2step", "is/1step", "is/2step"} <= set(header)
    for s in (2, 3):
        for k in (1, 2):
            assert (tmp_path / "samples" / f"step{s}_{k}step.png").is_file()
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["feature_net"] == F.feature_net_id() and rows[0]["num_samples"] == 700
    assert cb.state_dict() == {} and method.training  # train mode restored
    rng = torch.get_rng_state()
    cb.evaluate(trainer, method)
    assert torch.equal(rng, torch.get_rng_state()), "evaluation must not touch the training RNG"


def test_sample_evaluation_needs_a_sampler():
    import lightning as L

    from distillkit.callbacks.evaluation import SampleEvaluation

    with pytest.raises(DistillError, match="generative method"):
        SampleEvaluation().setup(L.Trainer(logger=False), L.LightningModule(), "fit")
    with pytest.raises(DistillError, match="eval.steps"):
        SampleEvaluation(steps=[0])
    points = L.LightningModule()
    points.sample, points.image_shape = (lambda n, k, generator=None: torch.zeros(n, 2)), (2,)
    with pytest.raises(DistillError, match="scores 1x8x8 digits"):  # e.g. toy2d with eval=digits
        SampleEvaluation().setup(L.Trainer(logger=False), points, "fit")


def test_cli_eval_refuses_classifier_methods(cli, runs_dir):
    r = cli("eval=digits", f"runs_dir={runs_dir}", "debug=smoke", "callbacks.progress=none")
    assert r.returncode == 2 and "needs a generative method" in r.output and "eval=none" in r.output, r.output
    assert "Traceback" not in r.output


# --------------------------------------------------------------------------- distill-eval
def test_distill_eval_on_real_digits(dm, tmp_path, cache, capsys):
    from distillkit.evaluate import main

    npz = tmp_path / "real.npz"
    np.savez(npz, to_uint8_nhwc(heldout_images(dm, DIGITS_NUM_SAMPLES)))
    out = tmp_path / "res.json"
    main([f"samples={npz}", "dataset=digits", f"cache_dir={cache}", f"out={out}"])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    floor = digits_floor(cache_dir=cache)["fid"]
    assert abs(res["fid"] - floor) < 0.05 and res["num_samples"] == 700  # only uint8 rounding differs
    assert res["feature_net"] in printed and f"fid {res['fid']:.4f}" in printed


@pytest.mark.parametrize("make,arg,message", [
    (None, "samples={d}/none.npz", "no such file"),
    (lambda p: np.savez(p, x=np.zeros((4, 8, 8, 1), np.uint8)), "samples={p}", "no array 'arr_0'"),
    (lambda p: np.savez(p, np.zeros((4, 8, 8), np.uint8)), "samples={p}", "expected N x H x W x C"),
    (lambda p: np.savez(p, np.zeros((4, 8, 8, 1), np.float32)), "samples={p}", "expected uint8"),
    (lambda p: np.savez(p, np.zeros((4, 32, 32, 3), np.uint8)), "samples={p}", "dataset=digits has 8 x 8 x 1"),
    (lambda p: np.savez(p, np.zeros((4, 8, 8, 1), np.uint8)), "sample={p}", "Did you mean 'samples'"),
])
def test_distill_eval_bad_input(tmp_path, capsys, make, arg, message):
    from distillkit.evaluate import main

    p = tmp_path / "s.npz"
    if make:
        make(p)
    with pytest.raises(SystemExit) as e:
        main([arg.format(d=tmp_path, p=p), f"cache_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.startswith("distill-eval: error: ") and err.count("\n") == 1


def test_distill_eval_console_script(tmp_path):
    exe = Path(sys.executable).parent / "distill-eval"
    if not exe.is_file():
        pytest.skip("distill-eval is not installed in this environment (pip install -e .)")
    p = subprocess.run([str(exe), f"samples={tmp_path}/missing.npz"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "samples=" in p.stderr and "Traceback" not in p.stderr


# --------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, port: int, x: torch.Tensor, stats: dict, q) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        share = x.tensor_split(world)[rank]
        r = SampleScorer("digits").score(share, stats if rank == 0 else None, seed=0)
        q.put((rank, r))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_fid_is_under_ddp_match_one_process(dm, scorer, train_stats):
    """Each rank scores its share, the real state is on rank 0 only: the synced numbers
    are those of one process scoring everything."""
    import socket

    import torch.multiprocessing as mp

    x = heldout_images(dm, 300)
    want = scorer.score(x, train_stats, seed=0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, x, train_stats, q)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for r in (0, 1):
        assert got[r]["num_samples"] == 300
        assert got[r]["fid"] == pytest.approx(want["fid"], rel=1e-4)
        assert got[r]["is"] == pytest.approx(want["is"], rel=1e-5)
