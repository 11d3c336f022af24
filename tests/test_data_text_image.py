"""Text-image datasets (distillkit.data.text_image) with a fake encoder whose outputs are computed
from its inputs: a prompt's embeddings are filled with len(prompt), an image's latents are its
2x2 mean (so a solid colour stays that colour), and every call is counted."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import default_collate

from distillkit.data.text_image import (CocoCaptionsDataModule, ConditionEncoder, ImageTextFolderDataModule,
                                        PromptsDataModule, default_cache_dir, resize_center_crop, to_model_range)
from distillkit.errors import DistillError


class FakeEncoder:
    latent_scale = 2

    def __init__(self, name: str = "fake-v1"):
        self.name = name
        self.prompt_calls = 0
        self.image_calls = 0
        self.prompts_seen: list[str] = []
        self.images_seen = 0

    def identity(self) -> str:
        return self.name

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        self.prompt_calls += 1
        self.prompts_seen += prompts
        n = torch.tensor([float(len(p)) for p in prompts])
        return {"encoder_hidden_states": n.view(-1, 1, 1).expand(-1, 4, 3).clone(),
                "text_embeds": n.view(-1, 1).expand(-1, 5).clone()}

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        self.image_calls += 1
        self.images_seen += len(x)
        assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 and x.shape[1] == 3
        return F.avg_pool2d(x, 2)


def calls(enc: FakeEncoder) -> int:
    return enc.prompt_calls + enc.image_calls


def colour_of(latents: torch.Tensor) -> list[int]:
    """The RGB colour (0..255) of a solid image from its 2x2-mean latents."""
    return [round((v + 1) * 127.5) for v in latents.mean(dim=(1, 2)).tolist()]


def all_items(ds) -> list[dict]:
    return [ds[i] for i in range(len(ds))]


PROMPTS = ["a red cube", "", "  a cat wearing a hat  ", "x", "a photograph of an astronaut riding a horse",
           "two dogs", "a bowl of fruit on a table", "neon city at night", "ab", "a lighthouse in a storm"]


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")  # one blank line inside, two at the end
    return p


def make_prompts(path: Path, cache: Path, enc: FakeEncoder | None = None, **kw) -> PromptsDataModule:
    dm = PromptsDataModule(str(path), cache_dir=str(cache), **{"resolution": 16, "val_fraction": 0.2, **kw})
    dm.attach_encoder(enc or FakeEncoder())
    dm.setup("fit")
    return dm


# --------------------------------------------------------------------------- prompts
def test_prompts_items_align_and_collate(prompts_file: Path, tmp_path: Path):
    enc = FakeEncoder()
    assert isinstance(enc, ConditionEncoder)
    dm = make_prompts(prompts_file, tmp_path / "cache", enc, batch_size=4)
    expected = [p.strip() for p in PROMPTS if p.strip()]
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (7, 2, 0)
    assert sorted(dm.prompts("train") + dm.prompts("val")) == sorted(expected)
    assert dm.image_shape == (3, 8, 8) and dm.num_classes == 0 and dm.data_range is None
    for split in ("train", "val"):
        ds = getattr(dm, f"{split}_set")
        for item, prompt in zip(all_items(ds), dm.prompts(split)):
            assert set(item) == {"cond"}
            c = item["cond"]
            assert set(c) == {"encoder_hidden_states", "text_embeds", "original_size", "crop_top_left"}
            assert c["encoder_hidden_states"].shape == (4, 3) and (c["encoder_hidden_states"] == len(prompt)).all()
            assert (c["text_embeds"] == len(prompt)).all()
            assert c["original_size"].tolist() == [16, 16] and c["original_size"].dtype == torch.long
            assert c["crop_top_left"].tolist() == [0, 0] and c["crop_top_left"].dtype == torch.long
    batch = default_collate(all_items(dm.val_set))
    assert batch["cond"]["encoder_hidden_states"].shape == (2, 4, 3) and batch["cond"]["original_size"].shape == (2, 2)
    loader = dm.train_dataloader()  # the shared ResumableLoader takes dict items
    batches = list(loader)
    assert len(batches) == len(loader) == 1  # 7 items, batches of 4, the last dropped
    b = batches[0]
    assert set(b) == {"cond"} and b["cond"]["text_embeds"].shape == (4, 5) and b["cond"]["crop_top_left"].shape == (4, 2)
    assert [list(x) for x in b["cond"]["original_size"].tolist()] == [[16, 16]] * 4
    # the same order from a fresh loader (a pure function of seed and epoch)
    again = next(iter(dm.train_dataloader()))
    assert torch.equal(again["cond"]["text_embeds"], b["cond"]["text_embeds"])


def test_prompts_val_may_be_zero_and_split_is_fixed_by_split_seed(prompts_file: Path, tmp_path: Path):
    dm = make_prompts(prompts_file, tmp_path / "cache", val_fraction=0.0)
    assert (len(dm.train_set), len(dm.val_set)) == (9, 0)
    a = make_prompts(prompts_file, tmp_path / "cache", split_seed=3, seed=1)
    b = make_prompts(prompts_file, tmp_path / "cache", split_seed=3, seed=7)
    assert a.prompts("val") == b.prompts("val")
    assert any(make_prompts(prompts_file, tmp_path / "cache", split_seed=s).prompts("val") != a.prompts("val")
               for s in range(4, 10))
    with pytest.raises(ValueError, match="split must be"):
        a.prompts("training")


# --------------------------------------------------------------------------- COCO
COCO_IMAGES = {  # id: (file name, size (w, h), colour)
    42: ("COCO_val2014_000000000042.jpg", (30, 20), (255, 0, 0)),
    7: ("COCO_val2014_000000000007.jpg", (20, 30), (0, 255, 0)),
    13: ("COCO_val2014_000000000013.jpg", (24, 24), (0, 0, 255)),
    99: ("COCO_val2014_000000000099.jpg", (20, 20), (255, 255, 0)),
}
COCO_CAPTIONS = [  # (annotation id, image id, caption), deliberately out of order
    (501, 42, "A red thing. "), (12, 7, "green one first"), (300, 13, "blue, first\n"), (11, 99, "yellow"),
    (5, 42, "red first"), (900, 7, "green two"), (301, 13, "blue second caption"), (13, 7, "green three"),
]


def write_coco(root: Path, images: bool = True) -> tuple[Path, Path]:
    img_dir = root / "val2014"
    img_dir.mkdir(parents=True)
    if images:
        for name, size, colour in COCO_IMAGES.values():
            Image.new("RGB", size, colour).save(img_dir / name, format="PNG")  # lossless, whatever the name
    data = {"info": {}, "images": [{"id": i, "file_name": n, "width": s[0], "height": s[1]}
                                   for i, (n, s, _) in COCO_IMAGES.items()],
            "annotations": [{"id": a, "image_id": i, "caption": c} for a, i, c in COCO_CAPTIONS]}
    f = root / "captions_val2014.json"
    f.write_text(json.dumps(data))
    return f, img_dir


def coco(f: Path, cache: Path, enc: FakeEncoder | None = None, **kw) -> CocoCaptionsDataModule:
    dm = CocoCaptionsDataModule(str(f), cache_dir=str(cache), **{"resolution": 8, "val_fraction": 0.0, **kw})
    dm.attach_encoder(enc or FakeEncoder())
    dm.setup()
    return dm


def test_coco_first_caption_per_image_aligned_with_its_image(tmp_path: Path):
    f, img_dir = write_coco(tmp_path)
    enc = FakeEncoder()
    dm = coco(f, tmp_path / "cache", enc, image_dir=str(img_dir))
    assert dm.image_shape == (3, 4, 4)
    # sorted by image id, the caption with the lowest annotation id, stripped
    assert [r.prompt for r in dm._items] == ["green one first", "blue, first", "red first", "yellow"]
    colour = {c: COCO_IMAGES[i][2] for i, c in [(7, "green one first"), (13, "blue, first"), (42, "red first"),
                                                (99, "yellow")]}
    items = all_items(dm.train_set)
    assert len(items) == 4
    for item, prompt in zip(items, dm.prompts("train")):
        assert item["x"].shape == (3, 4, 4)
        assert colour_of(item["x"]) == list(colour[prompt])
        assert (item["cond"]["encoder_hidden_states"] == len(prompt)).all()
    sizes = {prompt: (item["cond"]["original_size"].tolist(), item["cond"]["crop_top_left"].tolist())
             for item, prompt in zip(items, dm.prompts("train"))}
    # red 30x20 (w x h) -> 12x8, crop left round(2.0) = 2; green 20x30 -> 8x12, top 2; blue square
    assert sizes["red first"] == ([20, 30], [0, 2])
    assert sizes["green one first"] == ([30, 20], [2, 0])
    assert sizes["blue, first"] == ([24, 24], [0, 0])
    batch = default_collate(items)
    assert batch["x"].shape == (4, 3, 4, 4) and batch["cond"]["original_size"].shape == (4, 2)
    assert enc.images_seen == 4 and enc.prompts_seen == ["green one first", "blue, first", "red first", "yellow"]


def test_coco_all_captions_share_one_encoding_and_one_split(tmp_path: Path):
    f, img_dir = write_coco(tmp_path)
    enc = FakeEncoder()
    dm = coco(f, tmp_path / "cache", enc, image_dir=str(img_dir), caption_choice="all", val_fraction=0.25,
              num_workers=2, encode_batch_size=3)  # images read by 2 threads
    assert len(dm.train_set) + len(dm.val_set) == len(COCO_CAPTIONS)
    assert enc.images_seen == 4  # each image encoded once, however many captions it has
    by_image = {i: {c.strip() for _, j, c in COCO_CAPTIONS if j == i} for i in COCO_IMAGES}
    seen_colours = {"train": set(), "val": set()}
    for split in ("train", "val"):
        for item, prompt in zip(all_items(getattr(dm, f"{split}_set")), dm.prompts(split)):
            image_id = next(i for i, caps in by_image.items() if prompt in caps)
            assert colour_of(item["x"]) == list(COCO_IMAGES[image_id][2])
            assert (item["cond"]["text_embeds"] == len(prompt)).all()
            seen_colours[split].add(COCO_IMAGES[image_id][2])
    assert len(dm.val_set) > 0 and not seen_colours["train"] & seen_colours["val"]  # an image's captions stay together
    # the enum value Hydra passes works as its string
    from distillkit.config import CaptionChoice

    assert len(coco(f, tmp_path / "cache", image_dir=str(img_dir), caption_choice=CaptionChoice.all).train_set) == 8


def test_coco_max_items_and_prompts_only(tmp_path: Path):
    f, img_dir = write_coco(tmp_path, images=False)
    enc = FakeEncoder()
    dm = coco(f, tmp_path / "cache", enc, max_items=3, caption_choice="all")
    assert [r.prompt for r in dm._items] == ["green one first", "green three", "green two"]
    assert enc.image_calls == 1 and enc.images_seen == 1  # only the latent-shape probe
    assert dm.image_shape == (3, 4, 4)
    item = dm.train_set[0]
    assert set(item) == {"cond"} and item["cond"]["original_size"].tolist() == [8, 8]
    dm = coco(f, tmp_path / "cache", max_items=2)
    assert [r.prompt for r in dm._items] == ["green one first", "blue, first"]
    # max_items: only the selected images need to be there
    Image.new("RGB", (20, 30), (0, 255, 0)).save(img_dir / COCO_IMAGES[7][0], format="PNG")
    dm = coco(f, tmp_path / "cache", max_items=1, image_dir=str(img_dir))
    assert colour_of(dm.train_set[0]["x"]) == [0, 255, 0]


# --------------------------------------------------------------------------- image + text folder
def test_resize_center_crop_geometry():
    """Shorter side to the resolution (torchvision Resize's int(res * long / short)), centre crop
    with round(), as SDXL's training script computes original_size and crop_top_left."""
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 50, 3), dtype=np.uint8))  # h=20, w=50
    out, size, crop = resize_center_crop(img, 8)
    assert out.size == (8, 8) and size == (20, 50)
    assert crop == (0, 6)  # 50 * 8 / 20 = 20 wide; (20 - 8) / 2 = 6
    ref = img.resize((20, 8), Image.Resampling.BILINEAR).crop((6, 0, 14, 8))
    assert np.array_equal(np.asarray(out), np.asarray(ref))
    tall = Image.new("RGB", (20, 50))  # w=20, h=50 -> 10 x 25: top = round(7.5) = 8
    out, size, crop = resize_center_crop(tall, 10)
    assert out.size == (10, 10) and size == (50, 20) and crop == (8, 0)
    odd = Image.new("RGB", (33, 10))  # -> int(10 * 33 / 10) = 33 wide; left = round(11.5) = 12
    assert resize_center_crop(odd, 10)[2] == (0, 12)
    same = Image.new("RGB", (10, 10))
    assert resize_center_crop(same, 10)[1:] == ((10, 10), (0, 0))


def write_folder(root: Path) -> Path:
    """wide.png: 40x20 red | green | blue thirds-ish (cols 0-9, 10-29, 30-39); tall.jpg; sq.webp; each with a .txt."""
    root.mkdir(parents=True)
    a = np.zeros((20, 40, 3), dtype=np.uint8)
    a[:, :10, 0] = 255
    a[:, 10:30, 1] = 255
    a[:, 30:, 2] = 255
    Image.fromarray(a).save(root / "wide.png")
    Image.new("RGB", (20, 36), (255, 255, 255)).save(root / "tall.JPG", quality=100)
    (root / "sub").mkdir()
    Image.new("RGB", (16, 16), (0, 0, 0)).save(root / "sub" / "sq.webp", lossless=True)
    (root / "wide.txt").write_text("a wide striped banner\n")
    (root / "tall.txt").write_text("white")
    (root / "sub" / "sq.txt").write_text("a black square")
    (root / "notes.md").write_text("not an image")
    return root


def folder_dm(root: Path, cache: Path, enc: FakeEncoder | None = None, **kw) -> ImageTextFolderDataModule:
    dm = ImageTextFolderDataModule(str(root), cache_dir=str(cache), **{"resolution": 10, "val_fraction": 0.0, **kw})
    dm.attach_encoder(enc or FakeEncoder())
    dm.setup()
    return dm


def test_image_text_folder_captions_geometry_and_latents(tmp_path: Path):
    root = write_folder(tmp_path / "imgs")
    dm = folder_dm(root, tmp_path / "cache")
    items = dict(zip(dm.prompts("train"), all_items(dm.train_set)))
    assert set(items) == {"a wide striped banner", "white", "a black square"}
    wide = items["a wide striped banner"]
    # 40x20 -> 20x10, crop columns 5..15 of the resized image = original columns 10..30: green
    assert wide["cond"]["original_size"].tolist() == [20, 40] and wide["cond"]["crop_top_left"].tolist() == [0, 5]
    ref, _, _ = resize_center_crop(Image.open(root / "wide.png").convert("RGB"), 10)
    x_ref = to_model_range(np.asarray(ref).transpose(2, 0, 1)[None].copy())
    torch.testing.assert_close(wide["x"], F.avg_pool2d(x_ref, 2)[0])
    assert wide["x"].shape == (3, 5, 5)
    inner = wide["x"][:, :, 1:4]
    assert (inner[1] == 1).all() and (inner[0] == -1).all() and (inner[2] == -1).all()
    tall = items["white"]  # 20x36 -> 10x18, top round(4.0) = 4
    assert tall["cond"]["original_size"].tolist() == [36, 20] and tall["cond"]["crop_top_left"].tolist() == [4, 0]
    assert tall["x"].min() > 0.95
    sq = items["a black square"]
    assert sq["cond"]["original_size"].tolist() == [16, 16] and (sq["x"] == -1).all()
    for prompt, item in items.items():
        assert (item["cond"]["encoder_hidden_states"] == len(prompt)).all()


def test_image_text_folder_metadata_jsonl(tmp_path: Path):
    root = tmp_path / "imgs"
    (root / "train").mkdir(parents=True)
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        Image.new("RGB", (12, 12), colour).save(root / "train" / f"{i}.png")
    Image.new("RGB", (12, 12)).save(root / "unlisted.png")  # not in the metadata: not an item
    rows = [{"file_name": "train/1.png", "caption": "blue", "text": "ignored"},
            {"file_name": "train/0.png", "caption": "red"}, {"file_name": "train/2.png", "caption": "green!"}]
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    dm = folder_dm(root, tmp_path / "cache", caption_column="caption")
    assert dm.prompts("train") and len(dm.train_set) == 3
    want = {"red": [255, 0, 0], "blue": [0, 0, 255], "green!": [0, 255, 0]}
    for item, prompt in zip(all_items(dm.train_set), dm.prompts("train")):
        assert colour_of(item["x"]) == want[prompt] and (item["cond"]["text_embeds"] == len(prompt)).all()
    with pytest.raises(ValueError) as e:
        ImageTextFolderDataModule(str(root), caption_column="prompt")
    assert "dataset.caption_column='prompt'" in str(e.value) and "caption, file_name" in str(e.value)
    # the default column, "text", is missing from line 2
    with pytest.raises(ValueError, match="dataset.caption_column='text': metadata.jsonl line 2"):
        ImageTextFolderDataModule(str(root))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(FileNotFoundError, match="metadata.jsonl names 1 files that are not there:\n  gone.png"):
        ImageTextFolderDataModule(str(root))


# --------------------------------------------------------------------------- the cache
def test_cache_written_once_and_reused(prompts_file: Path, tmp_path: Path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="distillkit")
    cache = tmp_path / "cache"
    root = write_folder(tmp_path / "imgs")
    first = FakeEncoder()
    a = folder_dm(root, cache, first, encode_batch_size=2)
    assert "dataset=image_text_folder: encoded 3/3 images (batch 2/2" in caplog.text
    assert first.prompt_calls == 2 and first.image_calls == 2  # 3 prompts, 3 images in batches of 2
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and files[0].startswith("image_text_folder-") and {Path(f).suffix for f in files} == {".json", ".safetensors"}
    side = json.loads((cache / files[0]).read_text())
    assert sorted(side["prompts"]) == ["a black square", "a wide striped banner", "white"]
    second = FakeEncoder()
    b = folder_dm(root, cache, second, encode_batch_size=2)
    assert calls(second) == 0 and b.cache_file == a.cache_file
    assert b.prompts("train") == a.prompts("train") and b.image_shape == a.image_shape
    for x, y in zip(all_items(a.train_set), all_items(b.train_set)):
        assert torch.equal(x["x"], y["x"]) and all(torch.equal(x["cond"][k], y["cond"][k]) for k in x["cond"])
    assert sorted(p.name for p in cache.iterdir()) == files  # nothing new, no temp files left
    # prompts only: the same
    p1, p2 = FakeEncoder(), FakeEncoder()
    make_prompts(prompts_file, cache, p1)
    make_prompts(prompts_file, cache, p2)
    assert calls(p1) == 2 and calls(p2) == 0  # prompts (10 < 16: one batch) and the shape probe


def test_changed_model_or_data_encodes_again(tmp_path: Path):
    cache = tmp_path / "cache"
    root = write_folder(tmp_path / "imgs")
    folder_dm(root, cache)

    def encodes(**kw) -> bool:
        enc = FakeEncoder(kw.pop("name", "fake-v1"))
        folder_dm(root, cache, enc, **kw)
        return calls(enc) > 0

    assert not encodes()
    assert encodes(name="fake-v1-fp16")  # another model or dtype
    assert encodes(resolution=12)  # other preprocessing
    (root / "tall.txt").write_text("white, rewritten")  # a caption
    assert encodes()
    assert not encodes()
    Image.new("RGB", (20, 36), (200, 200, 200)).save(root / "tall.JPG", quality=90)  # an image
    assert encodes()
    st = (root / "sub" / "sq.webp").stat()  # same bytes, new mtime
    os.utime(root / "sub" / "sq.webp", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert encodes()
    Image.new("RGB", (16, 16)).save(root / "new.png")
    (root / "new.txt").write_text("new")
    assert encodes()
    # one file per encoding: the first and six changes
    assert len({p.name for p in cache.glob("*.safetensors")}) == 7


def test_damaged_cache_is_replaced(prompts_file: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    a = make_prompts(prompts_file, cache)
    a.cache_file.write_bytes(b"garbage")
    enc = FakeEncoder()
    b = make_prompts(prompts_file, cache, enc)
    assert calls(enc) > 0 and b.prompts("train") == a.prompts("train")
    again = FakeEncoder()
    make_prompts(prompts_file, cache, again)
    assert calls(again) == 0


def test_default_cache_dir(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "dk"))
    assert default_cache_dir() == tmp_path / "dk" / "latents"
    monkeypatch.delenv("DISTILLKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "distillkit" / "latents"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "distillkit" / "latents"
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path / "dk"))
    p = tmp_path / "p.txt"
    p.write_text("one\ntwo\nthree\n")
    dm = PromptsDataModule(str(p), val_fraction=0.0)
    dm.attach_encoder(FakeEncoder())
    dm.setup()
    assert dm.cache_file.parent == tmp_path / "dk" / "latents" and dm.cache_file.is_file()


# --------------------------------------------------------------------------- errors
def test_errors_name_the_config_key(tmp_path: Path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"dataset.path='.*nope.txt': no such file"):
        PromptsDataModule(str(missing))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(ValueError, match=r"dataset.path=.*holds no prompts.*one prompt a line"):
        PromptsDataModule(str(blank))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="dataset.path=.*not UTF-8"):
        PromptsDataModule(str(latin))

    with pytest.raises(FileNotFoundError, match="dataset.captions_file=.*no such file"):
        CocoCaptionsDataModule(str(missing))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match='dataset.captions_file=.*no "annotations" list.*captions_train2014'):
        CocoCaptionsDataModule(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="dataset.captions_file=.*is not JSON"):
        CocoCaptionsDataModule(str(bad))
    bad.write_text(json.dumps({"annotations": [{"image_id": 1}]}))
    with pytest.raises(ValueError, match='annotation 0 lacks "image_id" or a "caption"'):
        CocoCaptionsDataModule(str(bad))
    f, img_dir = write_coco(tmp_path / "coco", images=False)
    with pytest.raises(FileNotFoundError, match="dataset.image_dir=.*does not exist"):
        CocoCaptionsDataModule(str(f), image_dir=str(tmp_path / "nodir"))
    with pytest.raises(FileNotFoundError, match="(?s)dataset.image_dir=.*lacks 4 of the images.*COCO_val2014_000000000007.jpg"):
        CocoCaptionsDataModule(str(f), image_dir=str(img_dir))
    with pytest.raises(ValueError, match="dataset.caption_choice"):
        CocoCaptionsDataModule(str(f), caption_choice="random")
    no_images = tmp_path / "noimg.json"
    no_images.write_text(json.dumps({"annotations": [{"image_id": 3, "caption": "c"}]}))
    assert len(CocoCaptionsDataModule(str(no_images))._items) == 1  # prompts only: "images" not needed
    with pytest.raises(ValueError, match='dataset.captions_file=.*have no "file_name"'):
        CocoCaptionsDataModule(str(no_images), image_dir=str(img_dir))

    with pytest.raises(FileNotFoundError, match="dataset.data_dir=.*does not exist"):
        ImageTextFolderDataModule(str(tmp_path / "nodir"))
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="dataset.data_dir=.*holds no images"):
        ImageTextFolderDataModule(str(folder))
    for i in range(3):
        Image.new("RGB", (4, 4)).save(folder / f"{i}.png")
    with pytest.raises(ValueError, match=r"(?s)dataset.data_dir=.* has 3 images but no captions.*metadata.jsonl"):
        ImageTextFolderDataModule(str(folder))
    (folder / "0.txt").write_text("zero")
    with pytest.raises(ValueError, match=r"2 of 3 images have no caption file \(<stem>.txt\):\n  1.png\n  2.png"):
        ImageTextFolderDataModule(str(folder))

    with pytest.raises(ValueError, match="dataset.val_fraction"):
        PromptsDataModule(str(tmp_path / "latin.txt"), val_fraction=0.5, test_fraction=0.5)


def test_unreadable_images_are_named(tmp_path: Path):
    root = write_folder(tmp_path / "imgs")
    (root / "broken.png").write_bytes(b"not an image")
    (root / "broken.txt").write_text("broken")
    (root / "empty.jpg").write_bytes(b"")
    (root / "empty.txt").write_text("empty")
    dm = ImageTextFolderDataModule(str(root), resolution=8, cache_dir=str(tmp_path / "cache"), encode_batch_size=2)
    dm.attach_encoder(FakeEncoder())
    with pytest.raises(ValueError) as e:
        dm.setup()
    msg = str(e.value)
    assert "dataset.data_dir=" in msg and "2 of 5 image files cannot be read" in msg
    assert "broken.png" in msg and "empty.jpg" in msg and "wide.png" not in msg
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.safetensors"))

    f, img_dir = write_coco(tmp_path / "coco")
    (img_dir / COCO_IMAGES[13][0]).write_bytes(b"\xff\xd8 truncated")
    dm = CocoCaptionsDataModule(str(f), image_dir=str(img_dir), resolution=8, cache_dir=str(tmp_path / "cache"))
    dm.attach_encoder(FakeEncoder())
    with pytest.raises(ValueError, match=r"(?s)dataset.image_dir=.*1 of 4 image files cannot be read.*000000000013"):
        dm.setup()


def test_setup_without_encoder(prompts_file: Path, tmp_path: Path):
    dm = PromptsDataModule(str(prompts_file), cache_dir=str(tmp_path))
    with pytest.raises(DistillError, match=r"dataset=prompts: no encoder attached: call dm.attach_encoder\(encoder\)"):
        dm.setup()
    class TextOnly:  # no VAE
        def identity(self) -> str:
            return "x"

        def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
            return {}

    with pytest.raises(TypeError, match="TextOnly lacks encode_images"):
        dm.attach_encoder(TextOnly())  # type: ignore[arg-type]


def test_too_few_items_for_a_training_split(tmp_path: Path):
    p = tmp_path / "one.txt"
    p.write_text("only one\n")
    with pytest.raises(ValueError, match="too few for a training split"):
        make_prompts(p, tmp_path / "cache", val_fraction=0.9)


# --------------------------------------------------------------------------- Hydra
def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from distillkit.cli import CONF_DIR, register_resolvers
    from distillkit.config import register_configs

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_options_compose_and_instantiate(prompts_file: Path, tmp_path: Path):
    from hydra.utils import instantiate

    from distillkit.cli import explain_missing, missing_values
    from distillkit.config import out_of_bounds

    f, img_dir = write_coco(tmp_path / "coco")
    folder = write_folder(tmp_path / "imgs")
    cache = f"dataset.cache_dir={tmp_path / 'cache'}"
    cases = [
        ("prompts", [f"dataset.path={prompts_file}"], PromptsDataModule, "dataset.path", False),
        ("coco_captions", [f"dataset.captions_file={f}", f"dataset.image_dir={img_dir}", "dataset.caption_choice=all",
                           "dataset.max_items=6"], CocoCaptionsDataModule, "dataset.captions_file", True),
        ("coco_captions", [f"dataset.captions_file={f}"], CocoCaptionsDataModule, "dataset.captions_file", False),
        ("image_text_folder", [f"dataset.data_dir={folder}"], ImageTextFolderDataModule, "dataset.data_dir", True),
    ]
    for option, overrides, cls, required, images in cases:
        bare = _compose([f"dataset={option}"])
        assert missing_values(bare) == [required]
        hint = explain_missing([required])
        assert required in hint and "e.g." in hint  # a REQUIRED_HINTS entry
        cfg = _compose([f"dataset={option}", *overrides, cache, "dataset.resolution=8", "dataset.val_fraction=0"])
        assert not missing_values(cfg) and not out_of_bounds(cfg)
        assert cfg.dataset.encode_batch_size == 16 and cfg.dataset.batch_size == 16 and cfg.dataset.test_fraction == 0
        dm = instantiate(cfg.dataset, seed=0, _convert_="all")
        assert type(dm) is cls
        dm.attach_encoder(FakeEncoder())
        dm.setup("fit")
        assert dm.image_shape == (3, 4, 4)
        assert ("x" in dm.train_set[0]) == images
    defaults = _compose(["dataset=prompts", "dataset.path=x"]).dataset
    assert (defaults.resolution, defaults.val_fraction, defaults.cache_dir) == (512, 0.05, None)
    with pytest.raises(Exception, match="caption_choice"):
        _compose(["dataset=coco_captions", "dataset.caption_choice=random"])
    with pytest.raises(Exception, match="caption_colum"):
        _compose(["dataset=prompts", "dataset.caption_column=text"])
    assert out_of_bounds(_compose(["dataset=coco_captions", "dataset.max_items=0", "dataset.captions_file=x"])) == [
        "dataset.max_items=0: must be at least 1"]
