"""Sharding a run over devices: ``trainer.strategy=fsdp``.

Fully sharded data parallel (FSDP2, torch's ``fully_shard``, run by Lightning's
``ModelParallelStrategy`` with every device on the data-parallel axis): each device holds 1 / N of
every trained weight, of its gradient and of its optimizer state, gathers a block's weights just
before the block runs and frees them after. The units, from the inside out:

- each of diffusers' ``ResnetBlock2D`` and ``BasicTransformerBlock`` (what DMD2's own FSDP setup
  wraps, ``fsdp_transformer_layer_cls_to_wrap``), so at most a block or two are whole at a time;
- each network the method holds (the student, DMD's fake score, the GAN head, the sampling EMA's
  copy): the rest of its weights (stems, heads, time embeddings: under 1% of an SDXL UNet).

Every unit belongs to one network, so to one role (distillkit.methods.roles): a role's backward
reduces only its own units' gradients, and freezing the other roles while one updates works as
under DDP. The methods call their networks (``net(...)``, ``net.guided``, ``net.bottleneck`` all
run the network's own call), which is where FSDP gathers. Why FSDP2 and not FSDP1: FSDP1 wraps the
LightningModule in a root unit whose forward is the whole training step, and a manual
optimization's backward inside that forward fails (``Expects BACKWARD_PRE or BACKWARD_POST state
but got HandleTrainingState.FORWARD``, seen on an H200 with DMD2); FSDP2 has no root wrapper, its
parameters are ``DTensor`` shards, ``torch.nn.utils.clip_grad_norm_`` on them takes the norm over
all devices, and the sampling EMA, sharded as its network, averages shard by shard.

Checkpoints are whole (``save_distributed_checkpoint=False``: rank 0 writes one ``last.ckpt`` with
the plain keys, which loads without FSDP: distill-sample, export, a resume on one device).

Refused, with one message each: a parameter shared by two networks (a LoRA student's frozen base,
shared by the generator, the fake score, the teacher and the EMA: such runs fit one GPU and
replicate under ``trainer.strategy=ddp``, docs/memory.md) and a model without diffusers blocks
(a classifier: use DDP). The frozen teacher lies outside the module tree and is not sharded: each
device holds it whole, in ``frozen_dtype``.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from distillkit.errors import DistillError


def fsdp_block_classes() -> tuple[type[nn.Module], ...]:
    """The module classes sharded one unit each: diffusers' ResNet and transformer blocks (SD1.5,
    SDXL and the pixel UNets built on diffusers' UNet2DModel)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    return (BasicTransformerBlock, ResnetBlock2D)


def shared_parameters(module: nn.Module) -> list[str]:
    """Names of parameters reachable under more than one name (a LoRA base shared by copies)."""
    seen: dict[int, str] = {}
    shared = []
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            shared.append(name)
        seen.setdefault(id(p), name)
    return shared


def check_shardable(module: nn.Module) -> None:
    shared = shared_parameters(module)
    if shared:
        raise DistillError(f"trainer.strategy=fsdp cannot shard a parameter that two networks share ({shared[0]}: a "
                           "LoRA student's frozen base, shared by the generator, the fake score and the teacher). "
                           "A LoRA run fits one GPU: use trainer.strategy=ddp on several (docs/memory.md)")
    classes = fsdp_block_classes()
    if not any(isinstance(m, classes) for m in module.modules()):
        raise DistillError(f"trainer.strategy=fsdp shards diffusers UNets block by block, and this model has no "
                           f"{' or '.join(sorted(c.__name__ for c in classes))}: use trainer.strategy=ddp")


def networks(module: nn.Module) -> list[nn.Module]:
    """The networks ``module`` (a method) holds, one FSDP unit each: its direct children with
    parameters; of the sampling EMA (torch's AveragedModel) its copy of the network."""
    from torch.optim.swa_utils import AveragedModel

    nets = []
    for child in module.children():
        if isinstance(child, AveragedModel):
            child = child.module
        if any(True for _ in child.parameters()):
            nets.append(child)
    return nets


def shard(module: nn.Module, mesh: Any) -> int:
    """``fully_shard`` ``module``'s blocks, then each of its networks, over ``mesh``; returns the
    number of units. Every parameter ends in a unit (else it would be neither sharded nor reduced)."""
    from torch.distributed.fsdp import fully_shard

    nets = networks(module)
    covered = {id(p) for net in nets for p in net.parameters()}
    left = [n for n, p in module.named_parameters() if id(p) not in covered]
    if left:
        raise RuntimeError(f"trainer.strategy=fsdp: parameters outside every network: {left[:3]}")
    blocks = [m for m in module.modules() if isinstance(m, fsdp_block_classes())]
    for unit in blocks + nets:  # the blocks first: fully_shard leaves a sharded submodule to its own unit
        fully_shard(unit, mesh=mesh)
    return len(blocks) + len(nets)


def fsdp_strategy(module: nn.Module, **kwargs: Any) -> Any:
    """Lightning's ModelParallelStrategy with every device on the data-parallel axis; the method's
    ``configure_model`` shards it (:func:`shard`). Refuses what :func:`check_shardable` refuses."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    check_shardable(module)

    class ShardedDataParallel(ModelParallelStrategy):
        """Every device on the data-parallel axis (Lightning's default puts them on the tensor-parallel one)."""

        def setup_environment(self) -> None:
            self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
            super().setup_environment()

    return ShardedDataParallel(save_distributed_checkpoint=False, **kwargs)


def full_state_dict(net: nn.Module) -> dict:
    """``net``'s state dict with whole tensors: gathered from the devices (a collective: every rank
    calls it; rank 0 gets the tensors, on the CPU) when ``net`` is sharded, else its own."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in net.parameters()):
        return net.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def is_fsdp(trainer: Any) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return trainer is not None and isinstance(trainer.strategy, ModelParallelStrategy)


__all__ = ["check_shardable", "fsdp_block_classes", "fsdp_strategy", "full_state_dict", "is_fsdp", "networks", "shard",
           "shared_parameters"]
