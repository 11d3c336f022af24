"""Periodic FID / IS of generated samples during training, sampled with the EMA weights when
EMA is on (docs/architecture.md, A run).

Every ``every_n_steps`` optimizer steps and at the end of training, for each step count k
in ``steps``: ``num_samples`` images from ``pl_module.sample(n, k, generator=g)`` (the
method samples with its evaluation network: the EMA of the student when EMA is on), FID and
IS against the training split's cached real statistics (:mod:`distillkit.metrics.fid`),
logged as ``fid/{k}step`` and ``is/{k}step`` to every logger, appended to
``<run dir>/eval.jsonl`` with the feature network's hash, and a PNG grid
``<run dir>/samples/step{global_step}_{k}step.png`` (also to TensorBoard / W&B when on).

Conditional models sample with ``guidance`` (diffusers' convention, 1: none). A class-conditional
model draws its classes uniformly (from the same seed, after the noise), and the feature network's
classifier scores whether each sample shows the class asked for: ``class_acc/{k}step``, a fraction.

Every evaluation draws the same noise (``seed``; ranks get their own offset), so numbers are
comparable across evaluations, and the global RNG streams of training are left untouched.
Under DDP each rank samples its share of ``num_samples`` and torchmetrics sums the states.
Metric objects are made per evaluation; nothing of this callback goes into checkpoints.

Text-to-image models (``pl_module.student.condition == "text"``: SD1.5, SDXL) sample from prompts:

- prompts: ``prompts`` (``eval.prompts``), a UTF-8 file with one prompt a line, or COCO's captions
  JSON (``captions_val2014.json``: the first caption of each image, images in id order, as
  ``dataset=coco_captions`` with ``caption_choice=first`` reads it); null: the datamodule's
  validation prompts (``dm.prompts("val")``, else ``"train"``). The first ``num_samples`` of them,
  repeated when there are fewer; encoded by ``pl_module.student.encode_prompts``, sampled with
  ``guidance``. Each evaluation and step count uses the same prompts and the same noise.
- images: the decoded samples, converted to uint8 as the pipelines do, then, when ``resolution``
  (``eval.resolution``) is set, centre-cropped to a square and resized to it with PIL's Lanczos
  filter (DMD2's COCO protocol, after GigaGAN: ``CenterCropLongEdge`` + Lanczos; None: scored as
  generated). FID / IS / CLIP score all see these images.
- FID / IS: against real images read from files, ``reference_images`` (``eval.reference_images``,
  a folder of png / jpg / jpeg / webp, searched recursively and sorted by path; the first
  ``num_reference`` of them, None: all), each centre-cropped to a square and resized with Lanczos
  to the evaluation resolution (``resolution``, else the generated images' size). The text-image
  datasets store VAE latents, not pixels, and decoding those would score the VAE's reconstructions,
  not real images: the reference is always read from image files. Its FID state is cached as the
  other real statistics are (:mod:`distillkit.metrics.fid`), keyed by the files' names, sizes and
  mtimes, the resolution and the feature network. ``feature_net=none`` skips FID / IS (for the
  CLIP score alone, e.g. where torch-fidelity is not installed).
- CLIP score: with ``clip_weights`` (``eval.clip_weights``, a local transformers CLIPModel folder),
  ``clip_score/{k}step`` of each image against its prompt (:mod:`distillkit.metrics.clip_score`),
  ``clip_prefix`` put before every prompt.

The rows of ``eval.jsonl`` then also hold ``clip_score``, ``clip_model``, ``resolution`` and
``prompts`` (where they came from).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from distillkit.cycles import cycle_lengths, ends_cycle
from distillkit.data.text_image import repeat_to
from distillkit.errors import DistillError
from distillkit.metrics.fid import DIGITS_NUM_SAMPLES, SampleScorer
from distillkit.metrics.images import image_grid, save_png, split_images, to_uint8

log = logging.getLogger("distillkit")


def has_sampler(module: Any) -> bool:
    return callable(getattr(module, "sample", None))


# --------------------------------------------------------------------------- text-to-image helpers
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# protocols whose settings are checked up front (eval.protocol)
PROTOCOLS = ("coco",)
# how reference and generated images are brought to the evaluation resolution (part of the cache key)
RESIZE = "center_crop_long_edge+lanczos"


def is_text_model(module: Any) -> bool:
    """A method whose student is a text-to-image denoiser (SD1.5, SDXL)."""
    return getattr(getattr(module, "student", None), "condition", None) == "text"


def read_eval_prompts(path: str, key: str = "eval.prompts") -> list[str]:
    """The prompts of ``path``: COCO's captions JSON (``.json``: the first caption of each image,
    images in id order) or a UTF-8 text file, one prompt a line (blank lines skipped)."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise DistillError(f"{key}={path}: no such file (a UTF-8 text file with one prompt a line, or COCO's "
                           "captions JSON, e.g. annotations/captions_val2014.json)")
    if p.suffix.lower() == ".json":
        from distillkit.data.text_image import read_coco_captions

        try:
            prompts = [c for _, c, _ in read_coco_captions(str(p), "first")]
        except (FileNotFoundError, ValueError) as e:
            raise DistillError(f"{key}={path}: {str(e).replace('dataset.captions_file', key)}") from None
    else:
        from distillkit.data.text_image import read_prompts

        try:
            prompts = read_prompts(str(p), key)
        except ValueError as e:
            raise DistillError(str(e)) from None
    if not prompts:
        raise DistillError(f"{key}={path} holds no prompts")
    return prompts


def center_crop_resize(img: Any, size: tuple[int, int]) -> Any:
    """A PIL image centre-cropped to a square (the shorter side; BigGAN's / GigaGAN's
    ``CenterCropLongEdge``) and resized to ``size`` (h, w) with the Lanczos filter, as DMD2's COCO
    evaluation prepares generated and real images."""
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    if (w, h) != (s, s):
        left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))  # torchvision's center_crop
        img = img.crop((left, top, left + s, top + s))
    if (s, s) != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return img


def resize_uint8(x: torch.Tensor, size: Optional[tuple[int, int]]) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> (N, C, size) through :func:`center_crop_resize` (on the CPU,
    returned on x's device); unchanged when ``size`` is None or already theirs."""
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    import numpy as np
    from PIL import Image

    a = x.detach().cpu().permute(0, 2, 3, 1).numpy()
    out = [np.asarray(center_crop_resize(Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im), size))
           for im in a]
    t = torch.from_numpy(np.stack(out))
    t = t.unsqueeze(-1) if t.ndim == 3 else t
    return t.permute(0, 3, 1, 2).contiguous().to(x.device)


def list_images(folder: str, key: str = "eval.reference_images") -> list[Path]:
    """The image files under ``folder`` (recursively, hidden ones skipped), sorted by path."""
    root = Path(str(folder)).expanduser()
    if not root.is_dir():
        raise DistillError(f"{key}={folder}: no such folder (the real images FID compares with, e.g. COCO's val2014/)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DistillError(f"{key}={folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def load_reference_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """One image file as uint8 (3, h, w): RGB, :func:`center_crop_resize` to ``size``."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        a = np.asarray(center_crop_resize(img.convert("RGB"), size), dtype=np.uint8)
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


@torch.no_grad()
def folder_statistics(scorer: SampleScorer, folder: str, size: tuple[int, int], num_reference: Optional[int] = None,
                      cache_dir: Optional[str] = None, device: Any = "cpu", workers: int = 8,
                      key: str = "eval.reference_images") -> dict[str, torch.Tensor]:
    """The FID real-side state of the image files of ``folder`` (the first ``num_reference``, None:
    all), each :func:`center_crop_resize`-d to ``size``: read in batches (never all in memory), and
    cached as :func:`distillkit.metrics.fid.real_statistics` caches, under a key of the files' names,
    sizes and mtimes, the size and the resize."""
    from distillkit.metrics.fid import _batches, fid_metric, real_stats_path, save_real_state

    files = list_images(folder, key)
    if num_reference is not None:
        if num_reference < 2:
            raise DistillError(f"eval.num_reference={num_reference}: FID needs at least 2 real images")
        files = files[:num_reference]
    root = Path(str(folder)).expanduser()
    h = hashlib.sha256(f"{RESIZE}:{size[0]}x{size[1]}".encode())
    for f in files:
        st = f.stat()
        h.update(f"\n{f.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}".encode())
    path = real_stats_path(cache_dir, root.name or "images", f"{size[0]}x{size[1]}", len(files), scorer.net_hash,
                           h.hexdigest()[:8])
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    log.info("eval: FID reference: %d images of %s at %dx%d (cached in %s)", len(files), folder, size[0], size[1],
             path.parent)
    fid = fid_metric(scorer.net).to(device)

    def read(p: Path) -> Any:
        try:
            return load_reference_image(p, size)
        except Exception as e:  # PIL's UnidentifiedImageError is an OSError; truncated files, ...
            return f"{p} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"

    bad: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, os.cpu_count() or 1))) as pool:
        for chunk in _batches(files, scorer.batch_size):  # type: ignore[arg-type]
            got = list(pool.map(read, chunk))
            bad += [g for g in got if isinstance(g, str)]
            if bad:
                continue
            x = torch.stack(got).to(device).float() / 127.5 - 1.0
            with torch.autocast(device_type=torch.device(device).type, enabled=False):
                fid.update(x, real=True)
    if bad:
        raise DistillError(f"{key}={folder}: {len(bad)} files cannot be read as images: {'; '.join(bad[:5])}"
                           f"{' ...' if len(bad) > 5 else ''}")
    return save_real_state(fid, path)


class NoScorer:
    """``feature_net=none``: no FID / IS (text-to-image models: the CLIP score alone)."""

    feature_net_name = "none"
    net_id = "none"
    net = None


class SampleEvaluation(Callback):
    def __init__(self, every_n_steps: int | list[int] = 1000, steps: Iterable[int] = (1, 2, 4),
                 num_samples: int = DIGITS_NUM_SAMPLES, feature_net: str = "digits",
                 inception_weights: Optional[str] = None, cache_dir: Optional[str] = None,
                 batch_size: int = 256, seed: int = 0, dataset_name: Optional[str] = None,
                 sample_dir: Optional[str] = None, grid_size: int = 64, real_images: Optional[torch.Tensor] = None,
                 guidance: float = 1.0, prompts: Optional[str] = None, clip_weights: Optional[str] = None,
                 clip_prefix: str = "", resolution: Optional[int] = None, reference_images: Optional[str] = None,
                 num_reference: Optional[int] = None, protocol: Optional[str] = None, scorer: Optional[Any] = None):
        # an int, or a list of lengths: at the end of each round of unequal rounds (distillkit.cycles)
        self.every_n_steps = cycle_lengths(every_n_steps, "eval.every_n_steps")
        self.steps = [int(k) for k in steps]
        if not self.steps or min(self.steps) < 1:
            raise DistillError(f"eval.steps={self.steps}: give one or more sampling step counts >= 1, e.g. [1, 2, 4]")
        if int(num_samples) < 2:
            raise DistillError(f"eval.num_samples={num_samples}: FID needs at least 2 samples")
        self.num_samples = int(num_samples)
        self.batch_size = max(1, int(batch_size))
        self.seed = int(seed)
        self.cache_dir = cache_dir
        self.dataset_name = dataset_name
        self.sample_dir = Path(sample_dir) if sample_dir else None
        self.grid_size = int(grid_size)
        self.real_images = real_images
        self.guidance = float(guidance)
        # text-to-image models (see the module docstring)
        self.protocol = str(protocol) if protocol else None
        if self.protocol not in (None, *PROTOCOLS):
            raise DistillError(f"eval.protocol={protocol}: allowed values are {', '.join(PROTOCOLS)} or null")
        if self.protocol == "coco":
            missing = [k for k, v in (("eval.prompts", prompts), ("eval.reference_images", reference_images),
                                      ("eval.inception_weights", inception_weights)) if not v]
            if missing:
                raise DistillError("eval=coco (DMD2's COCO-2014 protocol, docs/coco_evaluation.md) needs "
                                   f"{', '.join(missing)}: e.g. eval.prompts=annotations/captions_val2014.json "
                                   "eval.reference_images=val2014 eval.inception_weights=pt_inception-2015-12-05.pth")
        self.prompts_file = str(prompts) if prompts else None
        self.resolution = int(resolution) if resolution is not None else None
        if self.resolution is not None and self.resolution < 1:
            raise DistillError(f"eval.resolution={resolution}: must be at least 1 (or null: as generated)")
        self.reference_images = str(reference_images) if reference_images else None
        self.num_reference = int(num_reference) if num_reference is not None else None
        # Reads (and so checks) the prompts file now, before any training.
        self._prompt_source = self.prompts_file
        self._prompts: Optional[list[str]] = (self._repeated(read_eval_prompts(self.prompts_file), self.prompts_file)
                                              if self.prompts_file else None)
        # Loads (and so checks) the feature network and the CLIP model now, before any training.
        if scorer is not None:
            self.scorer = scorer
        elif feature_net in (None, "none"):
            self.scorer = NoScorer()
        else:
            self.scorer = SampleScorer(feature_net, inception_weights, batch_size=self.batch_size)
        self.clip = None
        if clip_weights:
            from distillkit.metrics.clip_score import ClipScorer

            self.clip = ClipScorer(clip_weights, prefix=clip_prefix)
        self._real_stats: Optional[dict[str, torch.Tensor]] = None
        self._last_step = -1
        self.history: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, cfg: Any, **kw: Any) -> "SampleEvaluation":
        """From the ``eval`` config group (see ``distillkit.config.EvalConfig``)."""
        return cls(every_n_steps=cfg.every_n_steps, steps=list(cfg.steps), num_samples=cfg.num_samples,
                   feature_net=cfg.feature_net, inception_weights=cfg.inception_weights, cache_dir=cfg.cache_dir,
                   batch_size=cfg.batch_size, seed=cfg.seed, guidance=cfg.get("guidance", 1.0),
                   prompts=cfg.get("prompts"), clip_weights=cfg.get("clip_weights"),
                   clip_prefix=cfg.get("clip_prefix") or "", resolution=cfg.get("resolution"),
                   reference_images=cfg.get("reference_images"), num_reference=cfg.get("num_reference"),
                   protocol=cfg.get("protocol"), **kw)

    # ------------------------------------------------------------------ no checkpoint state
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if not has_sampler(pl_module):
            raise DistillError(f"eval needs a generative method with a sample() method; {type(pl_module).__name__} "
                               "has none: use eval=none")
        shape = tuple(int(s) for s in getattr(pl_module, "image_shape", ()))
        net = self.scorer.feature_net_name
        if is_text_model(pl_module):
            self._setup_text(trainer, pl_module)
            return
        if net == "none":
            raise DistillError("eval.feature_net=none (no FID / IS) is for text-to-image models, which have the CLIP "
                               "score; this model is not one: use eval.feature_net=digits or inception, or eval=none")
        if self.clip is not None or self._prompts is not None:
            raise DistillError("eval.clip_weights and eval.prompts are for text-to-image models (model=sd15, "
                               "model=sdxl); this model is not one: set them to null")
        if net == "digits" and shape != (1, 8, 8):
            raise DistillError(f"eval.feature_net=digits scores 1x8x8 digits; this run samples shape {shape}: "
                               "use eval=none (or eval.feature_net=inception for natural images)")
        if net == "inception" and (len(shape) != 3 or shape[0] not in (1, 3)):
            raise DistillError(f"eval.feature_net=inception scores images (C, H, W) with C 1 or 3; "
                               f"this run samples shape {shape}: use eval=none")

    def on_fit_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if trainer.is_global_zero:
            self._reference(trainer, pl_module)

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        # A resumed run may start at a step it has evaluated already: a finished run extended, or one
        # stopped between a generator update and the rest of its critic updates. Multi-role methods
        # end batches at that step again (their step counts generator updates), so the evaluation
        # would repeat; eval.jsonl, written by the earlier session, says whether it ran. (Here, not in
        # on_fit_start: Lightning restores the step between the two.)
        done = trainer.is_global_zero and trainer.global_step > 0 and self._evaluated(trainer, trainer.global_step)
        if trainer.strategy.broadcast(done, src=0):  # every rank decides alike: evaluation is collective
            self._last_step = trainer.global_step

    def _evaluated(self, trainer: "L.Trainer", step: int) -> bool:
        """Whether eval.jsonl holds this step's rows for every one of ``eval.steps``."""
        from distillkit.report import read_jsonl

        rows = read_jsonl(self._run_dir(trainer) / "eval.jsonl")
        return set(self.steps) <= {r.get("sampling_steps") for r in rows if r.get("step") == step}

    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if ends_cycle(step, self.every_n_steps) and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def _setup_text(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        """Checks for a text-to-image model, before any training: the feature network, the reference
        folder and the prompts."""
        net = self.scorer.feature_net_name
        if net == "digits":
            raise DistillError("eval.feature_net=digits scores 1x8x8 digits; a text-to-image model samples RGB images: "
                               "use eval.feature_net=inception (with eval.inception_weights and "
                               "eval.reference_images), or eval.feature_net=none for the CLIP score alone")
        if net != "none" and self.reference_images is None:
            raise DistillError(f"eval.feature_net={net} on a text-to-image model needs real images to compare with: "
                               "set eval.reference_images=DIR (a folder of image files, e.g. COCO's val2014/; the "
                               "text-image datasets hold VAE latents, not images), or eval.feature_net=none for the "
                               "CLIP score alone")
        if net != "none":
            list_images(self.reference_images)  # type: ignore[arg-type]
        if net == "none" and self.clip is None:
            raise DistillError("eval.feature_net=none and no eval.clip_weights: nothing to score; set "
                               "eval.clip_weights=DIR (a local CLIPModel folder) or a feature network, or use "
                               "eval=none")
        self._text_prompts(trainer)

    def _text_prompts(self, trainer: "L.Trainer") -> list[str]:
        """``num_samples`` prompts: ``eval.prompts``, else the datamodule's validation (else training) prompts."""
        if self._prompts is None:
            dm = getattr(trainer, "datamodule", None)
            if dm is None or not callable(getattr(dm, "prompts", None)):
                raise DistillError("eval of a text-to-image model samples from prompts: set eval.prompts=FILE (one "
                                   "prompt a line, or COCO's captions JSON), or use a dataset of prompts")
            prompts, split = [], "val"
            for split in ("val", "train"):
                try:
                    prompts = dm.prompts(split)
                except RuntimeError:  # not set up yet
                    dm.setup("fit")
                    prompts = dm.prompts(split)
                if prompts:
                    break
            if not prompts:
                raise DistillError("eval: the datamodule has no prompts: set eval.prompts=FILE")
            self._prompt_source = f"dataset:{split}"
            self._prompts = self._repeated(prompts, f"the datamodule's {split} split")
        return self._prompts

    def _repeated(self, prompts: list[str], source: str) -> list[str]:
        if len(prompts) < self.num_samples:
            log.warning("eval: %d prompts in %s, repeated to eval.num_samples=%d", len(prompts), source,
                        self.num_samples)
        return repeat_to(prompts, self.num_samples)

    def _image_size(self, pl_module: "L.LightningModule") -> tuple[int, int]:
        """The (h, w) scored: ``resolution``, else the decoded samples' size."""
        if self.resolution:
            return self.resolution, self.resolution
        shape = tuple(int(s) for s in pl_module.image_shape)
        student = pl_module.student
        f = int(student.codec.latent_scale) if getattr(student, "is_latent", False) else 1
        return shape[-2] * f, shape[-1] * f

    # ------------------------------------------------------------------ work
    def _reference(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> dict[str, torch.Tensor]:
        if self._real_stats is None and is_text_model(pl_module):
            if self.scorer.feature_net_name == "none":
                return None  # type: ignore[return-value]
            if self.reference_images is None:
                self._setup_text(trainer, pl_module)  # raises, naming eval.reference_images
            self._real_stats = folder_statistics(self.scorer, self.reference_images,  # type: ignore[arg-type]
                                                 self._image_size(pl_module), self.num_reference, self.cache_dir,
                                                 device=pl_module.device)
        if self._real_stats is None:
            dm = trainer.datamodule
            if self.real_images is not None:
                images = self.real_images
            elif dm is not None:
                images = split_images(dm, "train")
            else:
                raise DistillError("eval needs the training split's images: fit with a datamodule")
            name = self.dataset_name or (type(dm).__name__.removesuffix("DataModule").lower() if dm is not None
                                         else "images")
            self._real_stats = self.scorer.reference(images, name, "train", self.cache_dir, device=pl_module.device)
        return self._real_stats

    def _run_dir(self, trainer: "L.Trainer") -> Path:
        return Path(trainer.default_root_dir)

    @torch.no_grad()
    def evaluate(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> dict[str, float]:
        """Sample, score and log once; every rank must call it (DDP syncs the metrics)."""
        t0 = time.time()
        step = trainer.global_step
        self._last_step = step
        rank, world = trainer.global_rank, max(1, trainer.world_size)
        n_local = self.num_samples // world + int(rank < self.num_samples % world)
        stats = self._reference(trainer, pl_module) if trainer.is_global_zero else None
        device = pl_module.device
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        metrics: dict[str, float] = {}
        grids: dict[int, Any] = {}
        rows = []
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        text = is_text_model(pl_module)
        try:
            with torch.random.fork_rng(devices=cuda):
                for k in self.steps:
                    # The same noise at every evaluation and for every step count.
                    g = torch.Generator(device=device).manual_seed(self.seed + 1_000_003 * rank)
                    if text:
                        res, x = self._text_scores(trainer, pl_module, k, g, stats, n_local)
                        for name in ("fid", "is", "clip_score"):
                            if name in res:
                                metrics[f"{name}/{k}step"] = res[name]
                        rows.append({"step": step, "sampling_steps": k, **res})
                        if trainer.is_global_zero and self.grid_size > 0 and len(x):
                            grids[k] = image_grid(x[: self.grid_size], pad=2, scale=max(1, min(4, 64 // x.shape[-1])))
                        continue
                    chunks, labels = [], []
                    for i in range(0, n_local, self.batch_size):
                        x, cond = self._sample(pl_module, min(self.batch_size, n_local - i), k, g)
                        chunks.append(x.float())
                        if "class_labels" in cond:
                            labels.append(cond["class_labels"])
                    x = torch.cat(chunks) if chunks else torch.empty(0, *pl_module.image_shape, device=device)
                    res = self.scorer.score(x, stats, seed=self.seed, device=device)
                    if labels:
                        res["class_acc"] = self.scorer.class_accuracy(x, torch.cat(labels), device=device)
                        metrics[f"class_acc/{k}step"] = res["class_acc"]
                    if getattr(getattr(pl_module, "student", None), "is_conditional", False):
                        res["guidance"] = self.guidance
                    metrics[f"fid/{k}step"] = res["fid"]
                    metrics[f"is/{k}step"] = res["is"]
                    rows.append({"step": step, "sampling_steps": k, **res})
                    if trainer.is_global_zero and self.grid_size > 0:
                        grids[k] = image_grid(x[: self.grid_size], pad=2, scale=max(1, min(4, 64 // x.shape[-1])))
        finally:
            for m, mode in modes.items():
                m.training = mode
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        self.history.extend(rows)
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)  # rank-zero-only in Lightning's loggers
        if trainer.is_global_zero:
            self._write(trainer, rows, grids, step)
            log.info("eval step %d: %s (%s, %d samples, %.1fs)", step,
                     " ".join(f"{k}={v:.4g}" for k, v in metrics.items()), self.scorer.net_id, self.num_samples,
                     time.time() - t0)
        return metrics

    def _text_scores(self, trainer: "L.Trainer", pl_module: "L.LightningModule", k: int, g: torch.Generator,
                     stats: Optional[dict[str, torch.Tensor]], n_local: int) -> tuple[dict[str, Any], torch.Tensor]:
        """A text-to-image model's samples in ``k`` steps for this rank's share of the prompts, scored
        batch by batch (30k images are never held at once): FID / IS and the CLIP score; with the
        first ``grid_size`` images (CPU) for the grid."""
        from distillkit.metrics.fid import _world_sum, fid_metric, is_metric

        device = pl_module.device
        rank, world = trainer.global_rank, max(1, trainer.world_size)
        prompts = self._text_prompts(trainer)
        start = rank * (self.num_samples // world) + min(rank, self.num_samples % world)
        mine = prompts[start:start + n_local]
        size = self._image_size(pl_module)
        scoring = self.scorer.feature_net_name != "none"
        if scoring:
            fid = fid_metric(self.scorer.net).to(device)
            isc = is_metric(self.scorer.net, self.scorer.is_splits).to(device)
            if stats is not None:
                fid.real_features_sum = stats["features_sum"].to(device, torch.float64)
                fid.real_features_cov_sum = stats["features_cov_sum"].to(device, torch.float64)
                fid.real_features_num_samples = stats["num_samples"].to(device, torch.long)
        clip = self.clip.metric(device) if self.clip is not None else None
        kept: list[torch.Tensor] = []
        n_kept = 0
        for i in range(0, n_local, self.batch_size):
            batch = mine[i:i + self.batch_size]
            cond = pl_module.student.encode_prompts(batch)
            x = pl_module.sample(len(batch), k, generator=g, cond=cond, guidance=self.guidance)
            u8 = resize_uint8(to_uint8(x), size)
            xf = u8.float() / 127.5 - 1.0
            if scoring:
                with torch.autocast(device_type=device.type, enabled=False):
                    fid.update(xf, real=False)
                    isc.update(xf)
            if clip is not None:
                self.clip.update(clip, u8, batch)  # type: ignore[union-attr]
            if n_kept < self.grid_size:
                kept.append(xf[: self.grid_size - n_kept].cpu())
                n_kept += len(kept[-1])
        res: dict[str, Any] = {}
        if scoring:
            res["fid"] = float(fid.compute())
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                is_mean, is_std = isc.compute()
            res.update({"is": float(is_mean), "is_std": float(is_std), "feature_net": self.scorer.net_id,
                        "reference": f"{self.reference_images} n={int(stats['num_samples']) if stats else None}"})
        if clip is not None:
            res["clip_score"] = float(clip.compute())
            res["clip_model"] = self.clip.net_id  # type: ignore[union-attr]
            self.clip.model.to("cpu")  # type: ignore[union-attr]  # GPU memory back to training
        res.update({"num_samples": _world_sum(n_local, device), "guidance": self.guidance,
                    "resolution": list(size), "prompts": self._prompt_source})
        x = torch.cat(kept) if kept else torch.empty(0, 3, *size)
        return res, x

    def _sample(self, pl_module: "L.LightningModule", n: int, k: int, g: torch.Generator):
        """``n`` samples in ``k`` steps and their conditions ({} for unconditional models)."""
        if getattr(getattr(pl_module, "student", None), "is_conditional", False):
            return pl_module.sample(n, k, generator=g, guidance=self.guidance, return_cond=True)
        return pl_module.sample(n, k, generator=g), {}

    def _write(self, trainer: "L.Trainer", rows: list[dict], grids: dict[int, Any], step: int) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

        from distillkit.runs import json_safe

        run_dir = self._run_dir(trainer)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "eval.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps(json_safe(r), allow_nan=False) + "\n")  # a NaN FID as null: strict JSON
        sample_dir = self.sample_dir or run_dir / "samples"
        for k, grid in grids.items():
            save_png(grid, sample_dir / f"step{step}_{k}step.png")
            for lg in trainer.loggers:
                if isinstance(lg, TensorBoardLogger):
                    lg.experiment.add_image(f"samples/{k}step", grid, step, dataformats="HWC")
                elif isinstance(lg, WandbLogger):
                    lg.log_image(key=f"samples/{k}step", images=[grid], step=step)
