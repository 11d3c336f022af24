"""CLIP score of generated images against their prompts (Hessel et al. 2021, CLIPScore), from a local
CLIP folder: ``eval.clip_weights=PATH``.

    CLIP score = 100 * cos(E_image, E_text), averaged over the pairs, and at least 0

with ``E`` the projected CLIP embeddings. The numbers are torchmetrics':
``torchmetrics.multimodal.CLIPScore`` (its states, its formula and its sum over DDP ranks) is fed
by this module. Two things of the installed versions decide how:

- torchmetrics (1.9) takes, as ``model_name_or_path``, only hub names containing ``openai``,
  ``jinaai`` or ``zer0int`` (which it loads with ``from_pretrained`` and no ``local_files_only``),
  or a callable returning ``(model, processor)``. A local folder is therefore given through the
  callable: :func:`load_clip` loads ``CLIPModel`` and ``CLIPProcessor`` from the folder with
  ``local_files_only=True`` (nothing is ever downloaded) and the metric gets them from a closure.
- transformers 5 returns a ``BaseModelOutputWithPooling`` from ``CLIPModel.get_image_features`` /
  ``get_text_features`` (transformers 4 returned the tensor), which torchmetrics cannot normalise.
  :class:`ClipEmbedder` wraps the model and returns the projected embeddings (``pooler_output``,
  the same tensors ``CLIPModel.forward`` gives as ``image_embeds`` / ``text_embeds``).

Prompts are tokenized by the folder's tokenizer, truncated to the text model's length (77
tokens: CLIP's end-of-text token is kept, as ``clip.tokenize(truncate=True)`` keeps it);
torchmetrics alone would cut the ids after padding and lose that token for long captions.
Images: float in [-1, 1], (N, 3, H, W), converted to uint8 as the pipelines do (see
:func:`distillkit.metrics.images.to_uint8`), then the folder's ``CLIPImageProcessor`` (resize of
the shorter side, centre crop, CLIP's mean / std; the PIL backend when torchvision is absent).

Note on the clamp: Hessel et al. clamp each pair's cosine at 0 before averaging; torchmetrics
clamps the average. The two agree whenever no pair has a negative cosine, as with real CLIP
models on real images and captions (typical cosines lie between 0.2 and 0.4). Published
text-to-image numbers differ in scale: DMD2's code (Yin et al. 2024b) reports the mean cosine
itself, without the factor 100, with captions prefixed by ``"A photo depicts "`` (``prefix``
here); see docs/coco_evaluation.md.

The folder is a transformers ``CLIPModel`` folder (``config.json``, weights, ``tokenizer``
files and ``preprocessor_config.json`` / ``processor_config.json``), e.g. a download of
``openai/clip-vit-large-patch14`` (ViT-L/14) or ``laion/CLIP-ViT-g-14-laion2B-s12B-b42K``
(ViT-g/14), made once with network access::

    huggingface-cli download openai/clip-vit-large-patch14 --local-dir /models/clip-vit-large-patch14
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from distillkit.errors import DistillError
from distillkit.metrics.images import to_uint8

PathLike = Union[str, os.PathLike]
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


def check_clip_folder(path: Optional[PathLike], key: str = "eval.clip_weights") -> Path:
    """The CLIP folder, checked: a ``config.json``, weights and a tokenizer. Errors name ``key``."""
    if path is None or str(path) == "":
        raise DistillError(f"{key} is not set: the CLIP score needs a local transformers CLIPModel folder, e.g. "
                           f"{key}=/models/clip-vit-large-patch14 (nothing downloads at run time)")
    p = Path(str(path)).expanduser()
    if not p.is_dir():
        raise DistillError(f"{key}={path}: no such folder (a local transformers CLIPModel folder, e.g. a download "
                           "of openai/clip-vit-large-patch14; nothing downloads at run time)")
    if not (p / "config.json").is_file():
        raise DistillError(f"{key}={path}: no config.json (expected a transformers CLIPModel folder)")
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        raise DistillError(f"{key}={path}: holds no weights ({' or '.join(WEIGHT_FILES[:2])})")
    if not ((p / "tokenizer.json").is_file() or (p / "vocab.json").is_file()):
        raise DistillError(f"{key}={path}: holds no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    return p


def clip_folder_hash(folder: PathLike) -> str:
    """12 hex digits over the folder's config and the names, sizes and mtimes of its files: recorded
    with every CLIP score, as the feature network's hash is with every FID."""
    folder = Path(folder)
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            if f.suffix == ".json" and st.st_size < (1 << 20):
                h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _embeds(out: Any) -> torch.Tensor:
    """The projected embeddings of ``get_*_features``: the tensor itself (transformers 4) or the
    output's ``pooler_output`` (transformers 5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    return out[0]


class ClipEmbedder(nn.Module):
    """A ``CLIPModel`` whose ``get_image_features`` / ``get_text_features`` return the projected
    embeddings as tensors (what torchmetrics' CLIPScore expects of a "CLIP compatible model")."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def train(self, mode: bool = True) -> "ClipEmbedder":
        return super().train(False)

    def get_image_features(self, pixel_values: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
        return _embeds(self.model.get_image_features(pixel_values=pixel_values.to(self.model.dtype)))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                          *args: Any, **kw: Any) -> torch.Tensor:
        return _embeds(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class TruncatingProcessor:
    """The folder's ``CLIPProcessor``, with text truncated to the text model's length."""

    def __init__(self, processor: Any, max_length: int):
        self.processor = processor
        self.max_length = int(max_length)

    def __call__(self, *args: Any, **kw: Any) -> Any:
        if kw.get("text") is not None:
            kw.setdefault("truncation", True)
            kw.setdefault("max_length", self.max_length)
        return self.processor(*args, **kw)


def load_clip(path: PathLike, key: str = "eval.clip_weights") -> tuple[ClipEmbedder, TruncatingProcessor]:
    """(model, processor) of a local CLIP folder, in eval mode, loaded with ``local_files_only``."""
    folder = check_clip_folder(path, key)
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
        processor = CLIPProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistillError(f"{key}={path}: not a loadable transformers CLIPModel folder ({first[:300]})") from None
    model.eval().requires_grad_(False)
    max_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))
    return ClipEmbedder(model).eval(), TruncatingProcessor(processor, max_length)


class ClipScorer:
    """CLIP score of images against prompts with the CLIP model of a local folder.

        scorer = ClipScorer("/models/clip-vit-large-patch14")
        metric = scorer.metric(device)          # torchmetrics' CLIPScore, one per evaluation
        scorer.update(metric, images, prompts)  # images float in [-1, 1], (N, 3, H, W)
        float(metric.compute())                 # 100 * mean cosine, at least 0

    ``prefix`` is put before every prompt (DMD2 writes ``"A photo depicts "``).
    """

    def __init__(self, weights: PathLike, prefix: str = "", key: str = "eval.clip_weights"):
        self.folder = check_clip_folder(weights, key)
        self.model, self.processor = load_clip(self.folder, key)
        self.prefix = str(prefix or "")
        self.net_id = f"clip:{self.folder.name}:{clip_folder_hash(self.folder)}"

    def metric(self, device: Union[str, torch.device, None] = None) -> Any:
        """A fresh torchmetrics ``CLIPScore`` on this scorer's model (its states sum over DDP ranks)."""
        from torchmetrics.multimodal import CLIPScore

        model, processor = self.model, self.processor
        m = CLIPScore(model_name_or_path=lambda: (model, processor))
        return m.to(device) if device is not None else m

    def prompts(self, prompts: Sequence[str]) -> list[str]:
        return [self.prefix + str(p) for p in prompts]

    @torch.no_grad()
    def update(self, metric: Any, images: torch.Tensor, prompts: Sequence[str]) -> None:
        """Add the pairs (image i, prompt i); images float in [-1, 1] (or uint8), (N, 3, H, W)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if len(images) == 0:
            return
        x = images if images.dtype == torch.uint8 else to_uint8(images)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        with torch.autocast(device_type=x.device.type, enabled=False):
            metric.update(x, self.prompts(prompts))

    def score(self, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 64,
              device: Union[str, torch.device, None] = None) -> float:
        """The CLIP score of all pairs at once (in batches of ``batch_size``)."""
        device = torch.device(device) if device is not None else images.device
        metric = self.metric(device)
        for i in range(0, len(images), batch_size):
            self.update(metric, images[i:i + batch_size].to(device), list(prompts[i:i + batch_size]))
        return float(metric.compute())


def clip_score(images: torch.Tensor, prompts: Sequence[str], weights: PathLike, prefix: str = "",
               batch_size: int = 64) -> float:
    """:meth:`ClipScorer.score` with the CLIP folder ``weights``."""
    return ClipScorer(weights, prefix).score(images, prompts, batch_size)


__all__ = ["ClipScorer", "clip_score", "load_clip", "check_clip_folder", "clip_folder_hash", "ClipEmbedder"]
