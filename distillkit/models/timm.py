"""Any `timm <https://github.com/huggingface/pytorch-image-models>`_ classifier as a model.

``timm`` is an optional extra (``pip install "distillkit[timm]"``) and is imported only when a
:class:`TimmClassifier` is built. Nothing is downloaded: the network is created with
``pretrained=False`` and pretrained weights, when wanted, come from a local file given as
``model.pretrained_path`` (a ``.safetensors`` file, or a PyTorch checkpoint read with
``torch.load(weights_only=True)``). When the file's classifier head was trained for another
number of classes, the head is dropped and left at its fresh initialisation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["TimmClassifier", "TIMM_MISSING_MESSAGE"]

TIMM_MISSING_MESSAGE = (
    'model=timm needs the optional extra: pip install "distillkit[timm]" (timm also needs torchvision)'
)


def _import_timm():
    try:
        import timm
    except ImportError as err:  # also raised when sys.modules["timm"] is None
        raise ImportError(TIMM_MISSING_MESSAGE) from err
    return timm


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a local weights file: safetensors by extension, else a weights-only torch checkpoint."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        # Common training-checkpoint wrappers (timm / RepDistiller / Lightning style).
        for key in ("state_dict_ema", "state_dict", "model"):
            if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise ValueError(f"model.pretrained_path={path!r} does not hold a state dict (got {type(state).__name__})")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _head_prefixes(model: nn.Module) -> list[str]:
    """Module paths of the classifier head: timm's ``pretrained_cfg['classifier']``, else the
    module returned by ``get_classifier()``, else the last ``nn.Linear``."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else None
    if names:
        return [names] if isinstance(names, str) else list(names)
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        head = get_classifier()
        for name, module in model.named_modules():
            if module is head and name:
                return [name]
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def _is_head_key(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


class TimmClassifier(nn.Module):
    """A ``timm.create_model(model_name)`` network with ``num_classes`` outputs.

    Args:
        model_name: any name ``timm.list_models()`` knows, e.g. ``"resnet18"``.
        num_classes: size of the classifier head.
        in_channels: input image channels (``in_chans`` in timm).
        pretrained_path: optional local weights file; the classifier head is dropped when its
            shape differs from this model's. Any other mismatch is an error.

    ``forward(x)`` returns logits. The timm network is ``self.model``, so feature hooks use
    module paths such as ``model.layer4``.
    """

    def __init__(
        self,
        model_name: str,
        num_classes: int = 100,
        in_channels: int = 3,
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__()
        timm = _import_timm()
        self.model_name = model_name
        self.num_classes = num_classes
        self.model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        self.dropped_head_keys: list[str] = []
        if pretrained_path is not None:
            self.load_pretrained(str(pretrained_path))

    def load_pretrained(self, path: str) -> None:
        """Load weights from a local file into ``self.model`` (see the class docstring)."""
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"model.pretrained_path={path!r} does not exist; give a local .safetensors or .pt file "
                "(nothing is downloaded)"
            )
        state = _read_state_dict(path)
        own = self.model.state_dict()
        heads = _head_prefixes(self.model)

        dropped, bad = [], []
        for key, value in list(state.items()):
            if key in own and tuple(own[key].shape) != tuple(value.shape):
                if _is_head_key(key, heads):
                    dropped.append(key)
                    del state[key]
                else:
                    bad.append(f"{key}: file {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        if bad:
            raise ValueError(
                f"model.pretrained_path={path!r} does not fit {self.model_name!r}: " + "; ".join(bad[:5])
            )
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        # Only the classifier head may be absent from the file (dropped, or exported headless).
        missing = [k for k in missing if not _is_head_key(k, heads)]
        if missing or unexpected:
            raise ValueError(
                f"model.pretrained_path={path!r} does not match {self.model_name!r}: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {list(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        self.dropped_head_keys = dropped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
