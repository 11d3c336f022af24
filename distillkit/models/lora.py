"""LoRA adapters on a denoiser's network (Hu et al., "LoRA", ICLR 2022, Eq. 3: W x + (alpha / r) B A x,
B initialised to zero so the adapted network starts as its base).

``model.lora_rank`` freezes the network and trains only an adapter on ``model.lora_target_modules``
(peft; diffusers' ``add_adapter`` where the network has it, as SD's ``UNet2DConditionModel`` does,
peft's ``inject_adapter_in_model`` otherwise, as for the digits ``UNet2DModel``). The methods use
the frozen base twice (docs/memory.md): the teacher of LCM-LoRA and DMD is the same network with
the adapter switched off (:func:`set_adapters`), and EMA copies share the base's tensors.

What a checkpoint keeps depends on where the base comes from. A base loaded from a pretrained
folder (SD1.5 / SDXL) is not written: only the adapter enters the state dict, and the folder gives
the rest back. A base built from a config (digits, whose base is the teacher's checkpoint) is
written with the adapter, so ``distill-sample`` and ``distill-export`` rebuild the network from the
run's checkpoint alone. Exports of pixel networks fuse the adapter (:func:`fused_copy`).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from distillkit.config import LORA_TARGETS as DEFAULT_LORA_TARGETS
from distillkit.errors import DistillError


def has_lora(net: nn.Module) -> bool:
    """Whether ``net`` carries a LoRA adapter (its parameter names say so: peft's ``lora_A`` / ``lora_B``)."""
    return any("lora_" in n for n, _ in net.named_parameters())


def add_lora(den: nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> None:
    """Freeze ``den.unet`` and add a trainable adapter of ``rank`` on ``targets`` (``den.lora`` records
    the settings). With ``den.pretrained`` (the base comes from a folder) only the adapter enters the
    state dict (module docstring)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise DistillError("model.lora_rank needs peft: pip install peft") from None
    targets = list(targets)
    den.unet.requires_grad_(False)
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), init_lora_weights="gaussian", target_modules=targets)
    try:
        if hasattr(den.unet, "add_adapter"):
            den.unet.add_adapter(config)
        else:
            inject_adapter_in_model(config, den.unet)
    except ValueError as e:
        raise DistillError(f"model.lora_target_modules={targets}: {str(e).splitlines()[0]}") from None
    den.lora = {"rank": int(rank), "alpha": float(alpha), "target_modules": targets}
    if getattr(den, "pretrained", None) is None:
        return

    def only_adapter(module, state_dict, prefix, local_metadata):
        for k in [k for k in state_dict if k.startswith(prefix) and "lora_" not in k]:
            del state_dict[k]

    def base_not_missing(module, incompatible):
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if "lora_" in k]

    den._register_state_dict_hook(only_adapter)
    den.register_load_state_dict_post_hook(base_not_missing)


def set_adapters(net: nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer of ``net`` on or off (off: the frozen base alone)."""
    from diffusers.utils.peft_utils import set_adapter_layers

    set_adapter_layers(net, enabled=enabled)


def base_name(name: str) -> str:
    """A LoRA network's parameter name as its base network names it (peft inserts ``base_layer``)."""
    return name.replace(".base_layer.", ".")


@torch.no_grad()
def copy_into_base(dst: nn.Module, src: nn.Module, what: str) -> None:
    """Copy the weights of ``src`` (a network without adapter, e.g. the teacher) into the frozen base
    of LoRA network ``dst``; the adapter is left alone (B = 0: ``dst`` then computes ``src``)."""
    theirs = src.state_dict(keep_vars=True)
    mine = {base_name(n): t for n, t in (*dst.named_parameters(), *dst.named_buffers()) if "lora_" not in n}
    if mine.keys() != theirs.keys():
        diff = sorted(mine.keys() ^ theirs.keys())
        raise DistillError(f"{what}: the networks differ ({len(diff)} weights in one only, e.g. {diff[0]}). The "
                           "student starts as a copy of the teacher: give them the same architecture, or set "
                           "method.init_from_teacher=false")
    for k, t in mine.items():
        if t.shape != theirs[k].shape:
            raise DistillError(f"{what}: {k} is {tuple(t.shape)} in the student and {tuple(theirs[k].shape)} in the "
                               "teacher; give them the same architecture")
        t.copy_(theirs[k])


def fused_copy(unet: nn.Module) -> nn.Module:
    """A copy of ``unet`` with its LoRA adapter merged into the base weights (W + (alpha / r) B A) and
    peft's layers removed: the plain network, which ``save_pretrained`` writes as its base class does."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    net = copy.deepcopy(unet)
    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, module.get_base_layer())
    return net


__all__ = ["add_lora", "set_adapters", "copy_into_base", "fused_copy", "has_lora", "base_name",
           "DEFAULT_LORA_TARGETS"]
