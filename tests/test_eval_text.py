"""Evaluation of text-to-image models, offline with tiny random models.

- The CLIP score (distillkit.metrics.clip_score, torchmetrics' CLIPScore fed from a local folder)
  equals 100 * mean cos(image_embeds, text_embeds) computed by hand with the folder's CLIPModel and
  processor; it lies in [0, 100], changes with the prompt, and a missing folder names eval.clip_weights.
- The evaluation callback on a tiny SD1.5 `Diffusion` method samples from prompts (eval.prompts, or
  the datamodule's validation prompts), encodes them with the student, resizes to eval.resolution,
  and logs fid / is (the real torchmetrics FID / IS on a stub feature network: Inception needs its
  weights file and torch-fidelity, which are not here) against a folder of real images, and
  clip_score; the same numbers at every evaluation.
- distill-eval scores a samples file against its prompts (CLIP score alone: feature_net=none).
- eval=coco composes through Hydra with the real conf/.

What is NOT tested here: Inception FID of text-to-image samples (no weights file, no torch-fidelity)
and any number of docs/coco_evaluation.md (no GPU, no SD weights, no COCO).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_sd import (TINY_RESOLUTION, make_tiny_sd15, make_tokenizer, write_image_text_folder,  # noqa: E402
                     write_tokenizer_files)

from distillkit.errors import DistillError  # noqa: E402
from distillkit.metrics.features import FeatureNet  # noqa: E402

CLIP_SIZE = 32  # the tiny CLIP's image size


def make_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A tiny random transformers CLIPModel folder (image 32, patch 8, width 32) with its processor
    (CLIPImageProcessor config + the tiny CLIP tokenizer of tiny_sd.py), written offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = make_tokenizer()
    text = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=CLIP_SIZE, patch_size=8)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE},
                                         crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(path)
    write_tokenizer_files(path)  # vocab.json + merges.txt, as tiny_sd.py writes them
    return Path(path)


class StubNet(FeatureNet):
    """A stand-in for Inception (torchmetrics' FID / IS run on it unchanged): 4 random features of
    the 4x4-pooled image, 5 class logits."""

    num_features = 4
    num_classes = 5

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Parameter(torch.randn(48, 4, generator=g), requires_grad=False)
        self.head = nn.Parameter(torch.randn(4, 5, generator=g), requires_grad=False)

    def forward(self, x):
        assert x.dtype != torch.uint8 and x.shape[1] == 3 and x.min() >= -1 and x.max() <= 1
        return torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1) @ self.proj

    def logits(self, x):
        return self(x) @ self.head


class StubScorer:
    """What SampleEvaluation reads of a SampleScorer."""

    feature_net_name = "stub"
    net_hash = "stub00000000"
    net_id = "stub:stub00000000"
    batch_size = 4
    is_splits = 2

    def __init__(self):
        self.net = StubNet()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny_eval")
    images = write_image_text_folder(root / "images")  # non-square, as COCO's: centre-cropped and resized
    prompts = root / "prompts.txt"
    prompts.write_text("a cat\n\na red dog\nthe house of the king\n")
    return {"root": root, "images": images, "prompts": prompts, "clip": make_tiny_clip(root / "clip"),
            "sd15": make_tiny_sd15(root / "sd15")}


# --------------------------------------------------------------------------- CLIP score
def _by_hand(folder: Path, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, float]:
    """Per-pair cosines from CLIPModel.forward (its normalised image_embeds / text_embeds), and
    max(100 * mean, 0)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from distillkit.metrics.images import to_uint8

    model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    pixels = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)(
        images=[im for im in to_uint8(images)], return_tensors="pt")["pixel_values"]
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    ids = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pixels)
    cos = (out.image_embeds * out.text_embeds).sum(-1)
    return cos, max(100 * float(cos.mean()), 0.0)


def test_clip_score_is_the_formula_by_hand(tiny):
    from distillkit.metrics.clip_score import ClipScorer

    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 40, 40, generator=g) * 2 - 1
    prompts = ["a cat", "a red dog", "the house of the king", "x" * 400]  # the last: longer than 77 tokens
    scorer = ClipScorer(tiny["clip"])
    cos, expected = _by_hand(tiny["clip"], images, prompts)
    got = scorer.score(images, prompts, batch_size=3)  # two batches: torchmetrics sums the states
    assert got == pytest.approx(expected, abs=1e-3)
    assert 0.0 <= got <= 100.0 and (cos.abs() <= 1 + 1e-5).all()
    # a changed prompt changes the score; the prefix is the same as writing it into the prompts
    other = scorer.score(images, ["a cat", "a red dog", "the house of the king", "the king"])
    assert abs(other - got) > 1e-3
    prefixed = ClipScorer(tiny["clip"], prefix="A photo of ").score(images, prompts)
    assert prefixed == pytest.approx(_by_hand(tiny["clip"], images, ["A photo of " + p for p in prompts])[1], abs=1e-3)
    assert scorer.net_id.startswith("clip:clip:") and len(scorer.net_id.rsplit(":", 1)[1]) == 12


def test_clip_weights_missing_is_one_error_naming_the_key(tiny, tmp_path):
    from distillkit.metrics.clip_score import ClipScorer

    with pytest.raises(DistillError, match="eval.clip_weights is not set"):
        ClipScorer(None)
    with pytest.raises(DistillError, match=r"eval.clip_weights=.*nowhere: no such folder"):
        ClipScorer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DistillError, match="eval.clip_weights=.*no config.json"):
        ClipScorer(tmp_path / "empty")


# --------------------------------------------------------------------------- the callback
def _method(folder: Path):
    from distillkit.methods.diffusion import Diffusion
    from distillkit.models.stable_diffusion import stable_diffusion

    den = stable_diffusion(str(folder), variant="sd15", frozen_dtype="float32")
    return Diffusion(den, schedule_cfg={"name": "none", "num_steps": 4, "spacing": "trailing"},
                     input_shape=den.sample_shape, cond_dropout=0.0,
                     optim_cfg={"optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.0}})


def _trainer(tmp_path: Path, callbacks: list, **kw):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(accelerator="cpu", logger=CSVLogger(tmp_path, name="", version=""), callbacks=callbacks,
                     default_root_dir=str(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False, limit_val_batches=0,
                     num_sanity_val_steps=0, log_every_n_steps=1, **kw)


def test_callback_on_a_tiny_sd15_run_logs_fid_is_and_clip_score(tiny, tmp_path):
    """A real fit of a tiny SD1.5 `Diffusion` method on images with captions: the evaluation at the
    end samples the datamodule's validation prompts and scores them against the image folder."""
    from distillkit.callbacks.evaluation import SampleEvaluation
    from distillkit.data.text_image import ImageTextFolderDataModule

    method = _method(tiny["sd15"])
    dm = ImageTextFolderDataModule(data_dir=str(tiny["images"]), resolution=TINY_RESOLUTION, batch_size=2,
                                   val_fraction=0.25, cache_dir=str(tmp_path / "latents"))
    dm.attach_encoder(method.student.codec)
    dm.setup("fit")
    cb = SampleEvaluation(every_n_steps=0, steps=[1, 2], num_samples=6, batch_size=4, grid_size=4,
                          scorer=StubScorer(), reference_images=str(tiny["images"]), clip_weights=str(tiny["clip"]),
                          cache_dir=str(tmp_path / "fid"), guidance=2.0)
    trainer = _trainer(tmp_path, [cb], max_steps=1)
    trainer.fit(method, datamodule=dm)
    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for k in (1, 2):
        assert np.isfinite(m[f"fid/{k}step"]) and m[f"fid/{k}step"] >= 0 and m[f"is/{k}step"] >= 1 - 1e-4
        assert 0 <= m[f"clip_score/{k}step"] <= 100
        assert (tmp_path / "samples" / f"step1_{k}step.png").is_file()
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [r["sampling_steps"] for r in rows] == [1, 2]
    r = rows[0]
    assert r["prompts"] == "dataset:val" and r["resolution"] == [TINY_RESOLUTION] * 2 and r["num_samples"] == 6
    assert r["feature_net"] == StubScorer.net_id and r["clip_model"].startswith("clip:") and r["guidance"] == 2.0
    assert "n=8" in r["reference"]  # every image of the folder
    assert len(list((tmp_path / "fid").glob(f"images-{TINY_RESOLUTION}x{TINY_RESOLUTION}-n8-stub*.pt"))) == 1
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"fid/1step", "is/2step", "clip_score/1step", "clip_score/2step"} <= set(header)
    assert cb._prompts == (dm.prompts("val") * 6)[:6]


def test_callback_prompts_file_resolution_and_same_numbers(tiny, tmp_path):
    """eval.prompts: the file's prompts, repeated to num_samples, reach encode_prompts in order; the
    images are resized to eval.resolution; two evaluations give the same numbers, and the RNG of
    training is left alone."""
    from types import SimpleNamespace

    from distillkit.callbacks.evaluation import SampleEvaluation

    method = _method(tiny["sd15"]).eval()
    seen: list[str] = []
    encode = method.student.encode_prompts

    def spy(prompts):
        seen.extend(prompts)
        return encode(prompts)

    method.student.encode_prompts = spy
    cb = SampleEvaluation(every_n_steps=0, steps=[1], num_samples=5, batch_size=2, grid_size=5,
                          prompts=str(tiny["prompts"]), resolution=16, scorer=StubScorer(),
                          reference_images=str(tiny["images"]), num_reference=6, clip_weights=str(tiny["clip"]),
                          cache_dir=str(tmp_path / "fid"))
    trainer = SimpleNamespace(global_step=3, global_rank=0, world_size=1, is_global_zero=True, datamodule=None,
                              loggers=[], callback_metrics={}, default_root_dir=str(tmp_path))
    cb.setup(trainer, method, "fit")
    rng = torch.get_rng_state()
    first = cb.evaluate(trainer, method)
    assert torch.equal(rng, torch.get_rng_state())
    assert seen == ["a cat", "a red dog", "the house of the king", "a cat", "a red dog"]
    assert cb.history[0]["resolution"] == [16, 16] and cb.history[0]["prompts"] == str(tiny["prompts"])
    assert list((tmp_path / "fid").glob("images-16x16-n6-*.pt"))  # the reference at the same size
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "samples" / "step3_1step.png"))
    assert grid.shape[0] == 2 * (16 * 4 + 2) + 2  # 5 tiles of 16 px (shown x4): 3 per row, 2 rows, pad 2
    again = cb.evaluate(trainer, method)
    assert again == first and set(first) == {"fid/1step", "is/1step", "clip_score/1step"}
    # other prompts: another CLIP score (the samples follow the prompts)
    other = tiny["root"] / "other.txt"
    other.write_text("zzz qqq\n")
    cb2 = SampleEvaluation(every_n_steps=0, steps=[1], num_samples=5, batch_size=2, feature_net="none",
                           prompts=str(other), resolution=16, clip_weights=str(tiny["clip"]))
    cb2.setup(trainer, method, "fit")
    assert abs(cb2.evaluate(trainer, method)["clip_score/1step"] - first["clip_score/1step"]) > 1e-4


def test_clip_score_of_a_text_run_through_the_cli(tiny, tmp_path, cli):
    """The eval.* keys reach the callback through the CLI: a 1-step SD1.5 run with the CLIP score
    alone (eval.feature_net=none) writes clip_score to eval.jsonl and results.json."""
    r = cli("method=diffusion", "model=sd15", f"model.pretrained={tiny['sd15']}", "dataset=image_text_folder",
            f"dataset.data_dir={tiny['images']}", f"dataset.resolution={TINY_RESOLUTION}", "dataset.batch_size=4",
            f"dataset.cache_dir={tmp_path / 'latents'}", "dataset.val_fraction=0", "trainer.max_steps=1",
            "trainer.max_epochs=-1", "trainer.test_after_fit=false", "callbacks.progress=none", f"runs_dir={tmp_path}",
            "eval=digits", "eval.feature_net=none", f"eval.clip_weights={tiny['clip']}", f"eval.prompts={tiny['prompts']}",
            "eval.num_samples=4", "eval.batch_size=4", "eval.steps=[1]", "eval.every_n_steps=0", "eval.resolution=16")
    assert r.returncode == 0, r.output
    run = next((tmp_path / "default").iterdir())
    res = json.loads((run / "results.json").read_text())
    assert 0 <= res["clip_score/1step"] <= 100 and "fid/1step" not in res
    row = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert row["resolution"] == [16, 16] and row["prompts"] == str(tiny["prompts"]) and row["num_samples"] == 4


def test_callback_refuses_what_it_cannot_score(tiny, tmp_path):
    from types import SimpleNamespace

    import lightning as L

    from distillkit.callbacks.evaluation import SampleEvaluation

    method = _method(tiny["sd15"])
    trainer = SimpleNamespace(datamodule=None)
    with pytest.raises(DistillError, match="eval.feature_net=digits scores 1x8x8 digits; a text-to-image"):
        SampleEvaluation(prompts=str(tiny["prompts"])).setup(trainer, method, "fit")
    with pytest.raises(DistillError, match="eval.reference_images=DIR"):
        SampleEvaluation(prompts=str(tiny["prompts"]), scorer=StubScorer()).setup(trainer, method, "fit")
    with pytest.raises(DistillError, match="eval.prompts=FILE"):  # no prompts file and no datamodule of prompts
        SampleEvaluation(feature_net="none", clip_weights=str(tiny["clip"])).setup(trainer, method, "fit")
    with pytest.raises(DistillError, match=r"eval.prompts=.*nowhere.txt: no such file"):
        SampleEvaluation(feature_net="none", prompts=str(tmp_path / "nowhere.txt"))
    with pytest.raises(DistillError, match=r"eval.reference_images=.*: no such folder"):
        SampleEvaluation(prompts=str(tiny["prompts"]), scorer=StubScorer(),
                         reference_images=str(tmp_path / "none")).setup(trainer, method, "fit")
    # the text options on a digits model
    points = L.LightningModule()
    points.sample, points.image_shape = (lambda n, k, generator=None: torch.zeros(n, 1, 8, 8)), (1, 8, 8)
    with pytest.raises(DistillError, match="for text-to-image models"):
        SampleEvaluation(prompts=str(tiny["prompts"])).setup(L.Trainer(logger=False), points, "fit")


def test_coco_captions_json_gives_first_captions_in_id_order(tmp_path):
    from distillkit.callbacks.evaluation import read_eval_prompts, repeat_to

    data = {"images": [{"id": 9, "file_name": "b.jpg"}, {"id": 2, "file_name": "a.jpg"}],
            "annotations": [{"id": 5, "image_id": 9, "caption": "nine second "}, {"id": 1, "image_id": 9,
                            "caption": "nine first"}, {"id": 7, "image_id": 2, "caption": "two"}]}
    p = tmp_path / "captions_val2014.json"
    p.write_text(json.dumps(data))
    assert read_eval_prompts(str(p)) == ["two", "nine first"]
    assert repeat_to(["a", "b"], 5) == ["a", "b", "a", "b", "a"] and repeat_to(["a", "b", "c"], 2) == ["a", "b"]


def test_center_crop_resize_is_dmd2s(tmp_path):
    from PIL import Image

    from distillkit.callbacks.evaluation import center_crop_resize, resize_uint8

    a = np.zeros((40, 48, 3), dtype=np.uint8)
    a[:, 4:44] = 255  # the centre 40x40 square of a 40x48 image is white
    out = center_crop_resize(Image.fromarray(a), (20, 20))
    assert out.size == (20, 20) and np.asarray(out).min() == 255
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    assert resize_uint8(x, (32, 32)) is x and resize_uint8(x, None) is x
    y = resize_uint8(x, (16, 16))
    assert y.dtype == torch.uint8 and y.shape == (2, 3, 16, 16)
    expect = np.asarray(Image.fromarray(x[1].permute(1, 2, 0).numpy()).resize((16, 16), Image.Resampling.LANCZOS))
    assert np.array_equal(y[1].permute(1, 2, 0).numpy(), expect)


# --------------------------------------------------------------------------- distill-eval
def test_distill_eval_clip_score_of_a_samples_file(tiny, tmp_path, capsys):
    from distillkit.evaluate import evaluate
    from distillkit.metrics.clip_score import ClipScorer
    from distillkit.metrics.images import from_uint8_nhwc

    a = np.random.default_rng(1).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=a)
    res = evaluate([f"samples={tmp_path / 's.npz'}", "feature_net=none", f"clip_weights={tiny['clip']}",
                    f"prompts={tiny['prompts']}", f"out={tmp_path / 'r.json'}", "batch_size=2"])
    prompts = ["a cat", "a red dog", "the house of the king", "a cat", "a red dog"]  # repeated over the samples
    assert res["clip_score"] == pytest.approx(ClipScorer(tiny["clip"]).score(from_uint8_nhwc(a), prompts), abs=1e-4)
    assert "fid" not in res and json.loads((tmp_path / "r.json").read_text())["clip_score"] == res["clip_score"]
    assert "clip_score" in capsys.readouterr().out
    with pytest.raises(DistillError, match="needs prompts=FILE"):
        evaluate([f"samples={tmp_path / 's.npz'}", "feature_net=none", f"clip_weights={tiny['clip']}"])
    with pytest.raises(DistillError, match="reference_images=DIR is needed"):
        evaluate([f"samples={tmp_path / 's.npz'}", f"prompts={tiny['prompts']}", f"clip_weights={tiny['clip']}"])
    with pytest.raises(DistillError, match=r"^clip_weights=.*no such folder"):
        evaluate([f"samples={tmp_path / 's.npz'}", "feature_net=none", f"clip_weights={tmp_path / 'x'}",
                  f"prompts={tiny['prompts']}"])


# --------------------------------------------------------------------------- the config
def test_eval_coco_composes_with_the_real_conf():
    from hydra import compose, initialize_config_dir

    from distillkit.cli import CONF_DIR, missing_values, register_resolvers
    from distillkit.config import out_of_bounds, register_configs

    from distillkit.callbacks.evaluation import SampleEvaluation

    register_configs()
    register_resolvers()
    base = ["method=diffusion", "model=sd15", "model.pretrained=/models/sd15", "dataset=coco_captions",
            "dataset.captions_file=/data/coco/annotations/captions_train2014.json", "eval=coco"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=base)
        assert cfg.eval.protocol == "coco" and not missing_values(cfg)
        # the protocol's files are checked when the callback is built, before any training
        with pytest.raises(DistillError, match="eval=coco .* needs eval.prompts, eval.reference_images, "
                                               "eval.inception_weights"):
            SampleEvaluation.from_config(cfg.eval)
        cfg = compose(config_name="config", overrides=base + [
            "eval.inception_weights=/m/pt_inception-2015-12-05-6726825d.pth", "eval.reference_images=/data/coco/val2014",
            "eval.prompts=/data/coco/annotations/captions_val2014.json", "eval.clip_weights=/m/clip-vit-g-14"])
        assert not missing_values(cfg) and not out_of_bounds(cfg)
        e = cfg.eval
        assert e.enabled and e.feature_net == "inception" and e.num_samples == 30000 and e.resolution == 256
        assert e.num_reference is None and list(e.steps) == [1] and e.guidance == 1.0
        assert e.clip_prefix == "A photo depicts "
        sdxl = compose(config_name="config", overrides=base + ["eval.num_samples=10000", "eval.resolution=512",
                                                               "eval.num_reference=10000", "eval.steps=[4]"])
        assert sdxl.eval.num_samples == 10000 and sdxl.eval.resolution == 512 and sdxl.eval.num_reference == 10000
        bad = compose(config_name="config", overrides=base + ["eval.resolution=0"])
        assert any(b.startswith("eval.resolution=0") for b in out_of_bounds(bad))
        digits = compose(config_name="config", overrides=["eval=digits"])  # the new keys default to off
        assert digits.eval.prompts is None and digits.eval.clip_weights is None and digits.eval.resolution is None
