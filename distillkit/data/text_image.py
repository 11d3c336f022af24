"""Data for latent text-to-image diffusion models (Stable Diffusion 1.5, SDXL): prompts, and
optionally their images, encoded once by the model's own text encoders and VAE.

The datasets never load a model. Before :meth:`TextImageDataModule.setup` the caller (a method
for latent text-to-image models) attaches a :class:`ConditionEncoder` with
``dm.attach_encoder(encoder)``; setup then encodes every prompt (and image) in batches of
``encode_batch_size`` and stores the result in one safetensors file per dataset in ``cache_dir``
(with a JSON sidecar holding the prompts). The file's name is a sha256 over the encoder's
identity, the preprocessing and the data (file names, sizes, mtimes and the caption text), so a
changed model or changed data is encoded afresh and never read from a stale file; a second setup
with the same key reads the file and does not call the encoder.

Three sources:

* ``dataset=prompts`` (:class:`PromptsDataModule`): a UTF-8 text file, one prompt a line.
* ``dataset=coco_captions`` (:class:`CocoCaptionsDataModule`): COCO's captions JSON
  (``captions_train2014.json``), with the images of ``image_dir`` or, without it, prompts only.
* ``dataset=image_text_folder`` (:class:`ImageTextFolderDataModule`): images with a ``.txt``
  caption each, or a ``metadata.jsonl`` as diffusers' ImageFolder reads it.

Items are dicts of tensors, batched by torch's default collate::

    {"x": latents (C, h, w), "cond": {<encoder outputs>..., "original_size": (2,), "crop_top_left": (2,)}}
    {"cond": {...}}                                  # prompts without images

``original_size`` (h, w of the image as read) and ``crop_top_left`` (top, left of the centre
crop in the resized image) are SDXL's micro-conditioning, computed as diffusers'
``train_text_to_image_sdxl.py`` does with ``--center_crop``; without images they are
(resolution, resolution) and (0, 0). Images are converted to RGB, resized with PIL's bilinear
filter so the shorter side is ``resolution`` (torchvision's ``Resize(resolution)``: the longer
side becomes ``int(resolution * long / short)``), centre-cropped to ``resolution`` squared and
scaled to [-1, 1] before ``encoder.encode_images``. There is no augmentation (the latents are
computed once). Train/val/test splits are a fixed partition by ``split_seed``; the captions of one
image always fall in the same split.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch
from torch.utils.data import Dataset

from distillkit.data.base import DistillDataModule, check_split_fractions, split_indices
from distillkit.errors import DistillError

log = logging.getLogger("distillkit")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CACHE_FORMAT = "distillkit-text-image-cache"
CACHE_VERSION = 1
PathLike = Union[str, os.PathLike]


@runtime_checkable
class ConditionEncoder(Protocol):
    """What a text-image dataset needs from the model: its text encoders and VAE, on any device.

    Every tensor returned is batch-first and on the CPU."""

    #: the VAE's downsampling factor f (for information)
    latent_scale: int

    def identity(self) -> str:
        """A hash naming the model folder (VAE, text encoders, tokenizers) and the dtype: the
        cache is keyed by it."""
        ...

    def encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Embeddings of a batch of prompts, e.g. ``{"encoder_hidden_states": (B, 77, D)}``
        (SDXL adds ``"text_embeds": (B, D2)``)."""
        ...

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, H/f, W/f) of images (B, 3, H, W) in [-1, 1], already scaled (and
        shifted) as the model wants them."""
        ...


def default_cache_dir() -> Path:
    """$DISTILLKIT_CACHE/latents, else $XDG_CACHE_HOME/distillkit/latents, else
    ~/.cache/distillkit/latents (the rule of :func:`distillkit.metrics.fid.default_cache_dir`)."""
    if os.environ.get("DISTILLKIT_CACHE"):
        return Path(os.environ["DISTILLKIT_CACHE"]) / "latents"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "distillkit" / "latents"


# --------------------------------------------------------------------------- images
def resize_center_crop(img: Any, resolution: int) -> tuple[Any, tuple[int, int], tuple[int, int]]:
    """``img`` (a PIL image) resized so its shorter side is ``resolution`` (bilinear) and
    centre-cropped to ``resolution`` squared; with SDXL's ``original_size`` (h, w before the
    resize) and ``crop_top_left`` (top, left of the crop in the resized image)."""
    from PIL import Image

    w, h = img.size
    original_size = (h, w)
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resolution, int(resolution * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = max(0, int(round((new_h - resolution) / 2.0)))
    left = max(0, int(round((new_w - resolution) / 2.0)))
    if (new_w, new_h) != (resolution, resolution):
        img = img.crop((left, top, left + resolution, top + resolution))
    return img, original_size, (top, left)


def load_image(path: PathLike, resolution: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """One image file as uint8 (3, resolution, resolution), its original size and crop corner."""
    from PIL import Image

    with Image.open(path) as img:
        img, original_size, crop = resize_center_crop(img.convert("RGB"), resolution)
        a = np.asarray(img, dtype=np.uint8)
    return a.transpose(2, 0, 1), original_size, crop


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1] (ToTensor then Normalize([0.5], [0.5]))."""
    return (torch.from_numpy(images).float().div_(255.0) - 0.5) / 0.5


def _shown(lines: Sequence[str], n: int = 10) -> str:
    more = f"\n  ... and {len(lines) - n} more" if len(lines) > n else ""
    return "\n  ".join(lines[:n]) + more


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Record:
    """One item before encoding: its prompt, its image (None: prompts only), the file's identity
    (name relative to the data folder, size, mtime in ns) and the group the split keeps together."""

    prompt: str
    image: Optional[Path] = None
    file: Optional[tuple[str, int, int]] = None
    group: Any = None


def _image_record(prompt: str, path: Path, root: Path, group: Any = None) -> Record:
    st = path.stat()
    rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
    return Record(prompt, path, (rel, st.st_size, st.st_mtime_ns), rel if group is None else group)


def _unique(values: Iterable[Any]) -> tuple[list[Any], torch.Tensor]:
    """The distinct values in order of first appearance, and each value's index among them."""
    first: dict[Any, int] = {}
    index = [first.setdefault(v, len(first)) for v in values]
    return list(first), torch.tensor(index, dtype=torch.long)


def _batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


# --------------------------------------------------------------------------- the encoded data
@dataclass
class Encoded:
    """A dataset's encoding: distinct prompts and images, and which of them each item has."""

    prompts: list[str]  # distinct prompts
    prompt_index: torch.Tensor  # (N,) item -> prompt
    cond: dict[str, torch.Tensor]  # encoder outputs, (P, ...) each
    latent_shape: tuple[int, ...]
    latents: Optional[torch.Tensor] = None  # (M, C, h, w) distinct images
    image_index: Optional[torch.Tensor] = None  # (N,) item -> image
    original_size: Optional[torch.Tensor] = None  # (M, 2) long
    crop_top_left: Optional[torch.Tensor] = None  # (M, 2) long

    def tensors(self) -> dict[str, torch.Tensor]:
        t = {f"cond.{k}": v.contiguous() for k, v in self.cond.items()}
        t["prompt_index"] = self.prompt_index
        if self.latents is not None:
            t.update(latents=self.latents.contiguous(), image_index=self.image_index,
                     original_size=self.original_size, crop_top_left=self.crop_top_left)
        return t

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prompts: list[str], latent_shape: Sequence[int]) -> "Encoded":
        cond = {k[len("cond."):]: v for k, v in t.items() if k.startswith("cond.")}
        return cls(prompts, t["prompt_index"], cond, tuple(latent_shape), t.get("latents"), t.get("image_index"),
                   t.get("original_size"), t.get("crop_top_left"))


class TextImageItems(Dataset):
    """Items ``rows`` of an :class:`Encoded` dataset: ``{"x": latents, "cond": {...}}``, or
    ``{"cond": {...}}`` without images. ``prompts[i]`` is item i's prompt."""

    def __init__(self, data: Encoded, rows: torch.Tensor, resolution: int):
        self.data = data
        self.rows = rows
        self.prompts = [data.prompts[int(data.prompt_index[r])] for r in rows]
        self._size = torch.tensor([resolution, resolution], dtype=torch.long)
        self._corner = torch.zeros(2, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        d = self.data
        r = int(self.rows[i])
        p = int(d.prompt_index[r])
        cond = {k: v[p] for k, v in d.cond.items()}
        if d.latents is None:
            cond["original_size"], cond["crop_top_left"] = self._size.clone(), self._corner.clone()
            return {"cond": cond}
        m = int(d.image_index[r])  # type: ignore[index]
        cond["original_size"], cond["crop_top_left"] = d.original_size[m], d.crop_top_left[m]  # type: ignore[index]
        return {"x": d.latents[m], "cond": cond}


# --------------------------------------------------------------------------- the datamodule
class TextImageDataModule(DistillDataModule):
    """Shared by the text-image datasets: subclasses set ``self._items`` (a list of
    :class:`Record`, read and checked in ``__init__``) and ``kind`` (the config option's name)."""

    kind = "text_image"
    num_classes = 0
    data_range = None  # latents, scaled as the model wants them

    def __init__(self, resolution: int = 512, val_fraction: float = 0.05, test_fraction: float = 0.0,
                 cache_dir: Optional[str] = None, encode_batch_size: int = 16, **kwargs: Any):
        super().__init__(**kwargs)
        if resolution < 1:
            raise ValueError(f"dataset.resolution must be positive, got {resolution}")
        if encode_batch_size < 1:
            raise ValueError(f"dataset.encode_batch_size must be positive, got {encode_batch_size}")
        check_split_fractions(val_fraction, test_fraction)
        self.resolution = resolution
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.encode_batch_size = encode_batch_size
        self.encoder: Optional[ConditionEncoder] = None
        self.image_shape = (0, 0, 0)  # the latent shape, known after setup()
        self._items: list[Record] = []
        self.data: Optional[Encoded] = None
        self.cache_file: Optional[Path] = None

    # ------------------------------------------------------------------ what subclasses describe
    @property
    def has_images(self) -> bool:
        return any(r.image is not None for r in self._items)

    def preprocessing(self) -> dict[str, Any]:
        """Everything besides the model and the data that changes what is cached."""
        return {"class": type(self).__name__, "resolution": self.resolution, "resize": "shorter_side_bilinear",
                "crop": "center", "range": "minus_one_one"}

    def _image_source_key(self) -> str:
        return "dataset.data_dir"

    def _image_source(self) -> str:
        return str(getattr(self, "data_dir", ""))

    # ------------------------------------------------------------------ encoder and cache
    def attach_encoder(self, encoder: ConditionEncoder) -> None:
        """The model's text encoders and VAE, used by :meth:`setup` when the cache lacks the data."""
        missing = [a for a in ("identity", "encode_prompts", "encode_images") if not callable(getattr(encoder, a, None))]
        if missing:
            raise TypeError(f"attach_encoder: {type(encoder).__name__} lacks {', '.join(missing)} "
                            "(see distillkit.data.text_image.ConditionEncoder)")
        self.encoder = encoder

    def cache_key(self) -> str:
        """sha256 over the encoder's identity, the preprocessing and the data."""
        assert self.encoder is not None
        h = hashlib.sha256()
        head = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "encoder": str(self.encoder.identity()),
                "preprocessing": self.preprocessing()}
        h.update(json.dumps(head, sort_keys=True).encode())
        for r in self._items:
            h.update(b"\n")
            h.update(json.dumps([r.prompt, list(r.file) if r.file else None], ensure_ascii=False).encode())
        return h.hexdigest()

    def cache_path(self, key: str) -> Path:
        return self.cache_dir / f"{self.kind}-{key[:32]}.safetensors"

    def _load_cache(self, path: Path, key: str) -> Optional[Encoded]:
        side = path.with_suffix(".json")
        if not (path.is_file() and side.is_file()):
            return None
        try:
            from safetensors.torch import load_file

            meta = json.loads(side.read_text(encoding="utf-8"))
            if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION or meta.get("key") != key:
                return None
            data = Encoded.from_tensors(load_file(str(path)), meta["prompts"], meta["latent_shape"])
            if len(data.prompt_index) != len(self._items):
                return None
            return data
        except Exception as e:  # a damaged file: encode again and replace it
            log.warning("dataset=%s: the cache %s cannot be read (%s: %s); encoding again", self.kind, path,
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
            return None

    def _write_cache(self, path: Path, key: str, data: Encoded) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        side = path.with_suffix(".json")
        meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "class": type(self).__name__,
                "encoder": str(self.encoder.identity()) if self.encoder else None,  # type: ignore[union-attr]
                "preprocessing": self.preprocessing(), "num_items": len(self._items),
                "latent_shape": list(data.latent_shape), "prompts": data.prompts}
        # sidecar first, tensors last: the safetensors file's presence means both are complete
        tmp = side.with_name(f".{side.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, side)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            save_file(data.tensors(), str(tmp), metadata={"format": CACHE_FORMAT, "key": key})
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ encoding
    def _progress(self, what: str, done: int, total: int, t0: float, every: int) -> None:
        batch = (done + self.encode_batch_size - 1) // self.encode_batch_size
        batches = (total + self.encode_batch_size - 1) // self.encode_batch_size
        if done == total or batch % every == 0:
            log.info("dataset=%s: encoded %d/%d %s (batch %d/%d, %.0f s)", self.kind, done, total, what,
                     batch, batches, time.time() - t0)

    @staticmethod
    def _fill(out: dict[str, torch.Tensor], got: dict[str, torch.Tensor], start: int, stop: int, n: int, who: str) -> None:
        for k, v in got.items():
            if not isinstance(v, torch.Tensor) or v.ndim == 0 or len(v) != stop - start:
                raise ValueError(f"{who} returned {k!r} of {'shape ' + str(tuple(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__} "
                                 f"for a batch of {stop - start}: expected a batch-first tensor")
            v = v.detach().cpu()
            if k not in out:
                out[k] = torch.empty((n, *v.shape[1:]), dtype=v.dtype)
            out[k][start:stop] = v

    @torch.no_grad()
    def _encode_prompts(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.encoder
        assert enc is not None
        out: dict[str, torch.Tensor] = {}
        t0, every = time.time(), max(1, (len(prompts) // self.encode_batch_size) // 10)
        log.info("dataset=%s: encoding %d prompts in batches of %d (cached in %s)", self.kind, len(prompts),
                 self.encode_batch_size, self.cache_dir)
        for start, stop in _batches(len(prompts), self.encode_batch_size):
            got = enc.encode_prompts(list(prompts[start:stop]))
            if not isinstance(got, dict) or not got:
                raise ValueError(f"encode_prompts returned {type(got).__name__}: expected a dict of tensors")
            self._fill(out, got, start, stop, len(prompts), "encode_prompts")
            self._progress("prompts", stop, len(prompts), t0, every)
        return out

    @torch.no_grad()
    def _encode_images(self, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.encoder
        assert enc is not None
        n = len(paths)
        sizes = torch.zeros(n, 2, dtype=torch.long)
        crops = torch.zeros(n, 2, dtype=torch.long)
        out: dict[str, torch.Tensor] = {}
        unreadable: list[str] = []

        def read(p: Path) -> Union[tuple[np.ndarray, tuple[int, int], tuple[int, int]], str]:
            try:
                return load_image(p, self.resolution)
            except Exception as e:  # PIL's UnidentifiedImageError is an OSError; truncated files, bombs, ...
                return f"{p} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"

        t0, every = time.time(), max(1, (n // self.encode_batch_size) // 10)
        log.info("dataset=%s: encoding %d images at %dx%d in batches of %d (cached in %s)", self.kind, n,
                 self.resolution, self.resolution, self.encode_batch_size, self.cache_dir)
        pool = ThreadPoolExecutor(max_workers=self.num_workers) if self.num_workers > 0 else None
        try:
            for start, stop in _batches(n, self.encode_batch_size):
                batch = list(pool.map(read, paths[start:stop]) if pool else map(read, paths[start:stop]))
                unreadable += [b for b in batch if isinstance(b, str)]
                if unreadable:  # read on, to name every bad file at once, but encode no more
                    continue
                arrays = []
                for j, (a, size, crop) in enumerate(batch):  # type: ignore[misc]
                    arrays.append(a)
                    sizes[start + j] = torch.tensor(size)
                    crops[start + j] = torch.tensor(crop)
                z = enc.encode_images(to_model_range(np.stack(arrays)))
                self._fill(out, {"latents": z}, start, stop, n, "encode_images")
                self._progress("images", stop, n, t0, every)
        finally:
            if pool:
                pool.shutdown()
        if unreadable:
            raise ValueError(f"{self._image_source_key()}={self._image_source()!r}: {len(unreadable)} of {n} image "
                             f"files cannot be read as images:\n  {_shown(unreadable)}\n"
                             "Remove or replace them (or their captions), then run again.")
        return out["latents"], sizes, crops

    @torch.no_grad()
    def _probe_latent_shape(self) -> tuple[int, ...]:
        """The latent shape of a resolution-squared image (prompts only: one encoder call)."""
        assert self.encoder is not None
        z = self.encoder.encode_images(torch.zeros(1, 3, self.resolution, self.resolution))
        return tuple(int(s) for s in z.shape[1:])

    def encode(self) -> Encoded:
        """Encode every item (no cache)."""
        prompts, prompt_index = _unique(r.prompt for r in self._items)
        cond = self._encode_prompts(prompts)
        if not self.has_images:
            return Encoded(prompts, prompt_index, cond, self._probe_latent_shape())
        images, image_index = _unique(r.image for r in self._items)
        latents, sizes, crops = self._encode_images(images)
        return Encoded(prompts, prompt_index, cond, tuple(latents.shape[1:]), latents, image_index, sizes, crops)

    # ------------------------------------------------------------------ lightning
    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        if self.encoder is None:
            raise DistillError(f"dataset={self.kind}: no encoder attached: call dm.attach_encoder(encoder) before "
                               "setup(); the prompts and images are encoded with the model's own text encoders and "
                               "VAE, which a method for latent text-to-image models attaches")
        key = self.cache_key()
        path = self.cache_path(key)
        data = self._load_cache(path, key)
        if data is None:
            data = self.encode()
            self._write_cache(path, key, data)
            log.info("dataset=%s: wrote %s", self.kind, path)
        else:
            log.info("dataset=%s: read the encoded data from %s", self.kind, path)
        self.data, self.cache_file = data, path
        self.image_shape = tuple(data.latent_shape)  # type: ignore[assignment]

        groups, group_index = _unique(r.group for r in self._items)
        tr, va, te = split_indices(len(groups), self.val_fraction, self.test_fraction, self.split_seed)
        splits = []
        for g in (tr, va, te):
            member = torch.zeros(len(groups), dtype=torch.bool)
            member[g] = True
            splits.append(torch.nonzero(member[group_index]).flatten())
        if len(splits[0]) == 0:
            raise ValueError(f"dataset={self.kind} has {len(self._items)} items ({len(groups)} distinct "
                             f"{'images' if self.has_images else 'prompts'}): too few for a training split; add data "
                             "or lower dataset.val_fraction / dataset.test_fraction")
        self.train_set, self.val_set, self.test_set = (TextImageItems(data, s, self.resolution) for s in splits)

    def prompts(self, split: str = "train") -> list[str]:
        """The prompt of each item of ``split`` (train, val or test), in the split's order."""
        ds = {"train": self.train_set, "val": self.val_set, "test": self.test_set}.get(split, False)
        if ds is False:
            raise ValueError(f"split must be train, val or test, got {split!r}")
        if ds is None:
            raise RuntimeError("call setup() first")
        return list(ds.prompts)  # type: ignore[union-attr]


# --------------------------------------------------------------------------- prompts file
def read_prompts(path: str, key: str = "dataset.path") -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped: the prompts file of ``dataset=prompts``,
    ``eval.prompts`` and ``distill-sample prompts=``. Errors name ``key``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{key}={path!r}: no such file: set {key} to a UTF-8 text file with one prompt a line")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{key}={path!r} is not UTF-8 text ({e.reason} at byte {e.start}): save it as "
                         "UTF-8, one prompt a line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{key}={path!r} holds no prompts (empty, or blank lines only): write one prompt a line")
    return prompts


def repeat_to(items: Sequence[Any], n: int) -> list[Any]:
    """The first ``n`` of ``items``, repeated from the start when there are fewer (prompts over samples)."""
    items = list(items)
    return (items * ((n + len(items) - 1) // len(items)))[:n]


class PromptsDataModule(TextImageDataModule):
    """Prompts without images (``dataset=prompts``): for data-free distillation and evaluation."""

    kind = "prompts"

    def __init__(self, path: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.path = path
        self._items = [Record(prompt, group=i) for i, prompt in enumerate(read_prompts(path))]


# --------------------------------------------------------------------------- COCO captions
_COCO = ('expected COCO\'s captions format (captions_train2014.json / captions_val2014.json): '
         '{"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "caption"}, ...]}')


def read_coco_captions(captions_file: str, caption_choice: str = "first",
                       max_items: Optional[int] = None) -> list[tuple[int, str, Optional[str]]]:
    """(image id, caption, image file name or None) of each item: images by id, each image's
    captions by annotation id (file order without ids); the first caption of each image
    (``first``) or all of them (``all``); the first ``max_items`` items (None: all)."""
    p = Path(captions_file).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"dataset.captions_file={captions_file!r}: no such file: set it to COCO's "
                                "annotations/captions_train2014.json or captions_val2014.json")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"dataset.captions_file={captions_file!r} is not JSON ({e}); {_COCO}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"dataset.captions_file={captions_file!r} has no \"annotations\" list: {_COCO}")
    by_image: dict[int, list[tuple[Any, str]]] = {}
    for pos, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise ValueError(f"dataset.captions_file={captions_file!r}: annotation {pos} lacks \"image_id\" or a "
                             f"\"caption\" string: {_COCO}")
        by_image.setdefault(a["image_id"], []).append(((a.get("id", pos), pos), a["caption"].strip()))
    if not by_image:
        raise ValueError(f"dataset.captions_file={captions_file!r} has no annotations: {_COCO}")
    files = {im.get("id"): im.get("file_name") for im in data.get("images", []) if isinstance(im, dict)}
    items: list[tuple[int, str, Optional[str]]] = []
    for image_id in sorted(by_image):
        caps = [c for _, c in sorted(by_image[image_id], key=lambda t: t[0])]
        for c in caps[:1] if caption_choice == "first" else caps:
            items.append((image_id, c, files.get(image_id)))
        if max_items is not None and len(items) >= max_items:
            break
    return items[:max_items] if max_items is not None else items


class CocoCaptionsDataModule(TextImageDataModule):
    """COCO captions (``dataset=coco_captions``): image + caption with ``image_dir``, prompts only
    without it."""

    kind = "coco_captions"

    def __init__(self, captions_file: str, image_dir: Optional[str] = None, caption_choice: str = "first",
                 max_items: Optional[int] = None, **kwargs: Any):
        super().__init__(**kwargs)
        caption_choice = str(getattr(caption_choice, "value", caption_choice))
        if caption_choice not in ("first", "all"):
            raise ValueError(f"dataset.caption_choice must be first (one item per image) or all (one per caption), "
                             f"got {caption_choice!r}")
        if max_items is not None and max_items < 1:
            raise ValueError(f"dataset.max_items must be positive or null (all), got {max_items}")
        self.captions_file = captions_file
        self.image_dir = image_dir
        self.caption_choice = caption_choice
        self.max_items = max_items
        items = read_coco_captions(captions_file, caption_choice, max_items)
        if image_dir is None:
            self._items = [Record(c, group=image_id) for image_id, c, _ in items]
            return
        root = Path(image_dir).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"dataset.image_dir={image_dir!r} does not exist or is not a folder: set it to "
                                    "the folder of COCO's jpgs (e.g. train2014/), or to null for captions only")
        no_entry = sorted({image_id for image_id, _, f in items if not f})
        if no_entry:
            raise ValueError(f"dataset.captions_file={captions_file!r}: {len(no_entry)} captioned images have no "
                             f"\"file_name\" in \"images\" (ids {', '.join(map(str, no_entry[:10]))}"
                             f"{', ...' if len(no_entry) > 10 else ''}); {_COCO}")
        missing = sorted({f for _, _, f in items if not (root / f).is_file()})  # type: ignore[operator]
        if missing:
            raise FileNotFoundError(f"dataset.image_dir={image_dir!r} lacks {len(missing)} of the images "
                                    f"dataset.captions_file names:\n  {_shown(missing)}\nPoint dataset.image_dir at "
                                    "the matching split's folder (train2014/ for captions_train2014.json), or set "
                                    "dataset.max_items to the images present")
        self._items = [_image_record(c, root / f, root, group=image_id) for image_id, c, f in items]  # type: ignore[operator]

    def preprocessing(self) -> dict[str, Any]:
        return {**super().preprocessing(), "caption_choice": self.caption_choice, "max_items": self.max_items}

    def _image_source_key(self) -> str:
        return "dataset.image_dir"

    def _image_source(self) -> str:
        return str(self.image_dir)


# --------------------------------------------------------------------------- image + text folder
_FOLDER = ("expected images (png, jpg, jpeg, webp) each with a caption file of the same stem (cat.png + cat.txt), "
           'or a metadata.jsonl in dataset.data_dir with one line per image: {"file_name": "cat.png", "text": "..."} '
           "(diffusers' ImageFolder layout)")


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS


def read_image_text_folder(data_dir: str, caption_column: str = "text") -> list[tuple[Path, str]]:
    """(image path, caption) pairs of a folder, sorted by path."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset.data_dir={data_dir!r} does not exist or is not a folder: set "
                                f"dataset.data_dir to your image folder; {_FOLDER}")
    meta = root / "metadata.jsonl"
    if meta.is_file():
        pairs: dict[Path, str] = {}
        lines = meta.read_text(encoding="utf-8-sig").splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"dataset.data_dir={data_dir!r}: metadata.jsonl line {n} is not JSON ({e}); {_FOLDER}") from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise ValueError(f"dataset.data_dir={data_dir!r}: metadata.jsonl line {n} has no \"file_name\"; {_FOLDER}")
            if caption_column not in row:
                raise ValueError(f"dataset.caption_column={caption_column!r}: metadata.jsonl line {n} has no such column "
                                 f"(it has {', '.join(sorted(row))}); set dataset.caption_column to the caption's column")
            pairs[root / row["file_name"]] = str(row[caption_column] if row[caption_column] is not None else "").strip()
        if not pairs:
            raise ValueError(f"dataset.data_dir={data_dir!r}: metadata.jsonl lists no images; {_FOLDER}")
        missing = sorted(str(p.relative_to(root)) for p in pairs if not p.is_file())
        if missing:
            raise FileNotFoundError(f"dataset.data_dir={data_dir!r}: metadata.jsonl names {len(missing)} files that "
                                    f"are not there:\n  {_shown(missing)}\nAdd them or remove their lines")
        return sorted(pairs.items())
    images = sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p)
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not images:
        raise FileNotFoundError(f"dataset.data_dir={data_dir!r} holds no images: {_FOLDER}")
    captioned = [(p, p.with_suffix(".txt")) for p in images]
    lacking = [str(p.relative_to(root)) for p, t in captioned if not t.is_file()]
    if len(lacking) == len(images):
        raise ValueError(f"dataset.data_dir={data_dir!r} has {len(images)} images but no captions: {_FOLDER}")
    if lacking:
        raise ValueError(f"dataset.data_dir={data_dir!r}: {len(lacking)} of {len(images)} images have no caption "
                         f"file (<stem>.txt):\n  {_shown(lacking)}\nAdd their captions or remove them")
    out = []
    for p, t in captioned:
        try:
            out.append((p, t.read_text(encoding="utf-8-sig").strip()))
        except UnicodeDecodeError:
            raise ValueError(f"dataset.data_dir={data_dir!r}: the caption {t} is not UTF-8 text; save it as UTF-8") from None
    return out


class ImageTextFolderDataModule(TextImageDataModule):
    """Images with captions (``dataset=image_text_folder``): ``<stem>.txt`` per image or a
    ``metadata.jsonl`` (``caption_column`` names the caption's key)."""

    kind = "image_text_folder"

    def __init__(self, data_dir: str, caption_column: str = "text", **kwargs: Any):
        super().__init__(**kwargs)
        self.data_dir = data_dir
        self.caption_column = caption_column
        root = Path(data_dir).expanduser()
        self._items = [_image_record(c, p, root) for p, c in read_image_text_folder(data_dir, caption_column)]

    def preprocessing(self) -> dict[str, Any]:
        return {**super().preprocessing(), "caption_column": self.caption_column}
