"""GPU probe: seconds per generator update, peak memory and model FLOPs utilisation of DMD2 at SDXL size, 1024 px.

What is timed: distillkit's ``method=dmd2`` (distillkit.methods.dmd.DMD2) trained by a Lightning
Trainer (manual optimization, one optimizer per role, ``bf16-mixed`` on a GPU) with the settings of
conf/paper/dmd2_sdxl.yaml, which experiment=dmd2_sdxl and method=dmd2 model=sdxl train with (read at
run time: one-step generator at t = 399, real guidance 8, 5 critic updates per generator update, GAN
weights 5e-3 / 1e-2, AdamW lr 5e-7, gradient norm clipped to 10, its batch size). The networks are RANDOMLY INITIALISED UNets of SDXL base 1.0's architecture
(scripts/bench_gpu_sdxl_diffusion.py builds them: 2.567 B parameters, nothing read or downloaded):
the generator (the student), the fake score (``method.fake_score``, a copy of the generator) with
the GAN head, and the frozen teacher, held in bf16 as ``build_teacher`` holds it (for a LoRA
generator DMD2 replaces it by the generator's own base with the adapter switched off, as it does
when ``teacher.pretrained`` is ``model.pretrained``: the probe marks both as one folder). The data are
random latents of 4 x 128 x 128 (1024 px; no VAE) and random text conditions of SDXL's shapes; the
unconditional branch of the guided teacher is SDXL's (zero embeddings, ``force_zeros_for_empty_prompt``).

Configurations (``--configs``; default: the three on one GPU):

    lora         model.lora_rank=64 generator (frozen base in bf16); the fake score is its copy with
                 its own adapter over the SAME frozen base tensors (dmd.copy_sharing_frozen), and so
                 is the teacher, with its adapter switched off; gradient checkpointing on
    full         the whole generator and the whole fake score train (fp32 master weights, AdamW);
                 the teacher is a separate bf16 copy; gradient checkpointing on
    lora_nockpt  lora without gradient checkpointing
    fsdp         full, sharded over ``--devices`` GPUs by ``trainer.strategy=fsdp`` (distillkit.parallel:
                 FSDP2, each diffusers block and each network a unit); the teacher stays whole on
                 each GPU. Not in the default list, and run on its own (``--configs fsdp``): Lightning
                 starts one process per device by running this script again. Every process builds
                 the whole networks on its own GPU (25.7 GB in fp32 and bf16) before they are sharded,
                 so the peak counts from the first batch; the memory columns are the largest over
                 the GPUs, the time is rank 0's (the collectives keep the ranks in step), and the
                 FLOPs and MFU are one GPU's (each trains on its own batch of ``--batch-size``)

One generator update is one cycle of ``critic_updates_per_generator_update`` (K = 5) batches: the
first makes the generator's update and a critic update, the other K - 1 a critic update each (the
Trainer's ``max_steps`` counts generator updates; distillkit.methods.roles). ``s_per_update`` is the
median time between the starts of consecutive generator-update batches (``torch.cuda.synchronize``
at each), over ``--updates`` cycles after ``--warmup`` cycles, so it includes the Trainer's own
overhead and the host-to-device copy of each batch.

FLOPs. One more cycle after the timed ones runs under ``torch.utils.flop_counter.FlopCounterMode``: every
matmul, convolution and attention kernel of the cycle, forward and backward, at 2 FLOPs per
multiply-add, as executed (``flops_per_update``). Gradient checkpointing's recomputation (forwards
of modules run inside the backward) is counted apart (``recompute_flops_per_update``); the model
FLOPs are the executed ones less the recomputation (``model_flops_per_update``), and

    mfu = model_flops_per_update / (s_per_update * peak)    hfu: the same with flops_per_update

with ``peak`` the GPU's dense bf16 tensor-core peak (PEAK_BF16_TFLOPS below, from NVIDIA's data
sheets; ``--peak-tflops`` to override; unknown GPU: null). ``unet_forward_flops`` is one teacher
forward at the batch (no guidance), ``forward_equivalents`` = model FLOPs / that.

Memory. ``weights_gb``: memory allocated once the method is built (all networks on the GPU);
``peak_mem_gb``: ``torch.cuda.max_memory_allocated`` from then to the end of the run (weights,
gradients, optimizer states, autocast's bf16 weight copies, activations); ``fits_80gb``: that
peak under 80 GiB (85.9 GB; the CUDA context and the allocator's slack, ``peak_reserved_gb``,
come on top); ``peak_mem_gb_generator_batch`` and ``peak_mem_gb_critic_batch``: the peak within the
batches that make a generator update (and a critic update) and within the critic-only ones. The
FLOP-counted cycle comes last and is left out of all three (``peak_mem_gb_flop_counted_cycle``):
FlopCounterMode defeats gradient checkpointing's savings, and when it counted the FIRST cycle (as
this script did until 2026-12-04) the H200 showed LoRA DMD2 at batch 2 peaking at 97.4 GB in that
cycle and 96.5 GB in every later generator batch, against 10.5 GB in a run that never counted
(docs/memory.md). ``--no-flops`` skips the count. ``--memory-trace`` records the last timed cycle's
allocations and writes what is live at its peak, summed by the code that allocated it
(``memory_trace``). Under fsdp ``weights_gb`` is a process's whole networks before sharding,
``weights_gb_sharded`` what it holds when training starts (its shards and the whole teacher), and
every peak the largest over the processes. A configuration that runs out of memory gives a row with ``"oom": true``. On
an H200 the three configurations at batch 2 with ``--warmup 2 --updates 3`` took 460 s in all
(the FLOP-counted cycles included).

    python scripts/probe_dmd2_sdxl.py          # one GPU; writes benchmarks/gpu_dmd2_sdxl.json a row at a time
    python scripts/probe_dmd2_sdxl.py --configs lora --batch-size 4 --out /tmp/lora_b4.json

``--tiny`` runs the same code on the tiny SDXL-style UNet (scripts/bench_gpu_sdxl_diffusion.py's
TINY_UNET on 8 x 8 latents, LoRA rank 4, batch 1, 1 warm-up + 1 timed generator update: 11 batches
per configuration, seconds on a CPU; attention is not in the FLOP count there, as FlopCounterMode
has no formula for the CPU's attention kernel) and needs ``--out``: a check of the script, whose
numbers mean nothing. Needs torch, diffusers, peft,
lightning and distillkit.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils.flop_counter import FlopCounterMode

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

import bench_gpu_sdxl_diffusion as bench  # noqa: E402  (puts the repository on sys.path, sets HF_HUB_OFFLINE)

from distillkit.methods.dmd import DMD2  # noqa: E402
from distillkit.models.stable_diffusion import TextImageCodec  # noqa: E402

ROOT = bench.ROOT
DEFAULT_OUT = ROOT / "benchmarks" / "gpu_dmd2_sdxl.json"
RECIPE = ROOT / "conf" / "paper" / "dmd2_sdxl.yaml"  # what experiment=dmd2_sdxl and method=dmd2 model=sdxl train with
# configuration -> scripts/bench_gpu_sdxl_diffusion.py's variant of the generator
CONFIGS = {"lora": "lora_gc", "full": "full_gc", "lora_nockpt": "lora", "fsdp": "full_gc"}
ONE_DEVICE = [c for c in CONFIGS if c != "fsdp"]  # the default list: each on one GPU
# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets (which print twice
# these "with sparsity"): H100 SXM and H200 SXM 989.4 (1,979 sparse); H100 NVL 835; H100 PCIe 756;
# A100 312. The first name contained in torch.cuda.get_device_name wins.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.4), ("H100", 989.4), ("A100", 312.0))
GiB80 = 80 * 2 ** 30
TINY_UNET = dict(bench.TINY_UNET, sample_size=8)  # 8 x 8 latents: the check runs in seconds


class ZeroNullCodec(nn.Module):
    """The part of SDXL's codec the guided teacher calls: its unconditional branch, zero prompt and
    pooled embeddings (SDXL's ``force_zeros_for_empty_prompt``), distillkit's own ``null_condition``.
    No VAE: the probe works in latents, and the denoiser is not ``is_latent``."""

    latent_scale = bench.LATENT_SCALE
    force_zeros = True
    null_condition = TextImageCodec.null_condition


class CycleFlops(FlopCounterMode):
    """FlopCounterMode that also counts apart the FLOPs of module forwards run inside a backward:
    the recomputation of gradient checkpointing (``recompute``)."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.recompute = 0
        self._depth = 0
        self._hooks: list = []

    def __enter__(self):
        self.recompute, self._depth = 0, 0

        def in_backward() -> bool:
            return torch._C._current_graph_task_id() != -1

        def pre(module, args):
            self._depth += in_backward()

        def post(module, args, out):  # always_call: also when a forward stops by an exception
            self._depth -= in_backward()

        self._hooks = [register_module_forward_pre_hook(pre), register_module_forward_hook(post, always_call=True)]
        return super().__enter__()

    def __exit__(self, *args):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*args)

    def _count_flops(self, func_packet, out, args, kwargs):
        before = self.flop_counts["Global"][func_packet]
        out = super()._count_flops(func_packet, out, args, kwargs)
        if self._depth > 0:
            self.recompute += self.flop_counts["Global"][func_packet] - before
        return out


def live_at_peak(events: list[dict], baseline: int = 0) -> tuple[int, dict, list[dict]]:
    """Replays a CUDA allocator trace (``torch.cuda.memory._snapshot()["device_traces"][i]``: events
    ``alloc`` / ``free_requested`` / ``free_completed`` with ``addr``, ``size`` and Python ``frames``,
    innermost first): the peak of the bytes allocated during the trace (over ``baseline``, what was
    allocated before it began), the blocks live at that peak by address, and the frames of the
    allocation that reached it."""
    live: dict[int, dict] = {}
    cur = peak = 0
    at = -1
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
            if cur > peak:
                peak, at = cur, i
        elif e["action"] == "free_requested" and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]
    live = {}
    for e in events[:at + 1]:  # again, up to the peak's allocation
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] == "free_requested":
            live.pop(e["addr"], None)
    return baseline + peak, live, (events[at].get("frames", []) if at >= 0 else [])


def frame_key(frames: list[dict], parts: tuple[str, ...]) -> str:
    """``file:line function`` of the innermost frame whose path holds one of ``parts``."""
    for f in frames:
        name = f.get("filename", "")
        for part in parts:
            if part in name:
                return f"{name[name.rindex(part) + 1:].removeprefix('site-packages/')}:{f.get('line')} {f.get('name')}"
    return "(other)"


def memory_summary(events: list[dict], baseline: int, top: int = 25) -> dict:
    """What is live at the traced cycle's peak, summed by where it was allocated: by the innermost
    distillkit frame (which phase of the update) and by the innermost diffusers / peft / torch frame
    (which layer), in GB, largest first."""
    peak, live, frames = live_at_peak(events, baseline)
    out = {"peak_gb": round(peak / 1e9, 3), "baseline_gb": round(baseline / 1e9, 3),
           "live_blocks_at_peak": len(live), "peak_reached_at": [frame_key(frames, (p,)) for p in
                                                                 ("/distillkit/", "/diffusers/", "/peft/")]}
    for name, parts in (("by_distillkit_frame", ("/distillkit/", "/scripts/")),
                        ("by_library_frame", ("/diffusers/", "/peft/", "/site-packages/torch/"))):
        sums: dict[str, int] = {}
        for e in live.values():
            key = frame_key(e.get("frames", []), parts)
            sums[key] = sums.get(key, 0) + e["size"]
        out[name] = {k: round(v / 1e9, 3) for k, v in sorted(sums.items(), key=lambda kv: -kv[1])[:top]}
    return out


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return float(override), "--peak-tflops"
    if device.type != "cuda":
        return None, "no CUDA device"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"NVIDIA data sheet, {key} dense bf16"
    return None, f"{name}: not in PEAK_BF16_TFLOPS"


def recipe(path: Path = RECIPE) -> dict:
    """The method settings, optimizer, gradient clipping and batch size of the SDXL DMD2 experiment."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    opt = cfg["optim"]["optimizer"]
    return {"method": {k: v for k, v in cfg["method"].items() if not k.startswith("_")},
            "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": float(opt["lr"]),
                          "betas": tuple(opt["betas"]), "weight_decay": float(opt["weight_decay"])},
            "gradient_clip_val": cfg["optim"].get("gradient_clip_val"),
            "batch_size": int(cfg["dataset"]["batch_size"])}


SAME_FOLDER = "<random-init SDXL UNet, seed 0>"  # the pretrained folder both denoisers stand for


def build(config: str, unet_cfg: dict, device: torch.device, lora_rank: int, rec: dict):
    """DMD2 around a fresh generator of ``config`` and a frozen teacher (bf16 on a GPU), seed 0 each,
    marked as loaded from one folder in one frozen dtype, as experiment=dmd2_sdxl builds them
    (``teacher.pretrained: ${model.pretrained}``): DMD2 then shares a LoRA generator's base with the teacher."""
    teacher = bench.build("frozen_forward", unet_cfg, device, lora_rank).student
    student = bench.build(CONFIGS[config], unet_cfg, device, lora_rank).student
    for den in (teacher, student):
        den.pretrained = SAME_FOLDER
        den.frozen_dtype = teacher.dtype
        object.__setattr__(den, "codec", ZeroNullCodec())  # shared by copies; the guided teacher's null branch
    clip = rec["gradient_clip_val"]
    size = unet_cfg["sample_size"]
    method = DMD2(student, teacher, schedule_cfg={"name": "none"}, input_shape=(unet_cfg["in_channels"], size, size),
                  optim_cfg={"optimizer": dict(rec["optimizer"]), "scheduler": {"name": "none"}},
                  grad_clip={"generator": clip, "critic": clip}, **rec["method"])
    return method.to(device)


class Probe(L.Callback):
    """Times the cycles (a generator update and its critic updates) and counts the FLOPs of cycle
    ``count_cycle`` (None: no count), the last, so that the counter touches nothing measured."""

    def __init__(self, k: int, sync, count_cycle: int | None = None, trace_cycle: int | None = None) -> None:
        self.k, self.sync = k, sync
        self.count_cycle = count_cycle
        self.starts: list[float] = []
        self.nfe: list[int] = []
        self.counter: CycleFlops | None = CycleFlops() if count_cycle is not None else None
        self.trace_cycle = trace_cycle  # the cycle whose allocations are recorded (memory_summary)
        self.trace: dict | None = None
        self.flops: int | None = None
        self.recompute: int | None = None
        self.peaks: dict[str, int] = {}  # bytes: the peak of generator(-and-critic) batches, critic-only ones
        self.kind = "generator_batch"
        self.train_start_bytes: int | None = None  # allocated when training starts (under FSDP: sharded)

    def on_train_start(self, trainer, pl_module) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            self.train_start_bytes = torch.cuda.memory_allocated()

    def on_train_end(self, trainer, pl_module) -> None:
        """Several devices: each memory figure becomes the largest over them (every rank calls this)."""
        if trainer.world_size < 2:
            return
        keys = ("generator_batch", "critic_batch", "flop_counted_cycle", "train_start")
        mine = {**self.peaks, "train_start": self.train_start_bytes or 0}
        most = trainer.strategy.reduce(torch.tensor([float(mine.get(k, 0)) for k in keys], dtype=torch.float64,
                                                    device=pl_module.device), reduce_op="max")
        got = {k: int(v) for k, v in zip(keys, most.tolist()) if v > 0}
        self.train_start_bytes = got.pop("train_start", None)
        self.peaks = got

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.kind = "critic_batch" if pl_module.updates_of("critic") % self.k else "generator_batch"
        if torch.cuda.is_available() and pl_module.device.type == "cuda":  # each kind of batch's own peak
            torch.cuda.reset_peak_memory_stats()
        if self.kind == "critic_batch":
            return
        self.sync()
        if self.counting():  # the counted cycle ends
            self.counter.__exit__(None, None, None)
            self.flops, self.recompute = self.counter.get_total_flops(), self.counter.recompute
            self.counter = None
        if self.trace_cycle is not None and len(self.starts) == self.trace_cycle + 1:  # the traced cycle ends
            events = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
            torch.cuda.memory._record_memory_history(enabled=None)
            self.trace = memory_summary(events, self.trace_baseline)
        self.starts.append(time.perf_counter())
        self.nfe.append(int(pl_module.nfe))
        if self.counter is not None and len(self.starts) == self.count_cycle + 1:
            self.counter.__enter__()
        if self.trace_cycle is not None and len(self.starts) == self.trace_cycle + 1:  # the traced cycle begins
            self.trace_baseline = torch.cuda.memory_allocated()
            torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=2_000_000)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            # FlopCounterMode defeats checkpointing's savings: the counted cycle's peak is kept apart
            kind = "flop_counted_cycle" if self.counting() else self.kind
            self.peaks[kind] = max(self.peaks.get(kind, 0), torch.cuda.max_memory_allocated())

    def counting(self) -> bool:
        return self.counter is not None and self.counter.mode is not None

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.trace_cycle is not None and torch.cuda.is_available():
            torch.cuda.memory._record_memory_history(enabled=None)
        if self.counting():
            self.counter.__exit__(None, None, None)
        self.counter = None


def local_rank() -> int:
    """This process's number on the node: 0 for the one started by hand, 1.. for those Lightning's
    launcher starts for ``--configs fsdp`` (it sets LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def random_loader(unet_cfg: dict, batch_size: int, batches: int):
    """``batches`` copies of one random batch {"x": latents, "cond": SDXL's text condition} on the host."""
    from torch.utils.data import DataLoader

    torch.manual_seed(1)
    x0, cond = bench.random_batch(unet_cfg, batch_size, torch.device("cpu"))
    return DataLoader([{"x": x0, "cond": cond}] * batches, batch_size=None)


def unet_forward_flops(method, unet_cfg: dict, batch_size: int, device: torch.device) -> int:
    """FLOPs of one teacher forward (no guidance) at the batch size."""
    x0, cond = bench.random_batch(unet_cfg, batch_size, device)
    t = torch.full((batch_size,), 399, device=device)
    amp = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    with CycleFlops() as fc, torch.no_grad(), amp:
        method.teacher(x0, t, cond)
    return fc.get_total_flops()


def run_config(config: str, unet_cfg: dict, args: argparse.Namespace, rec: dict, device: torch.device,
               peak: float | None) -> dict:
    cuda = device.type == "cuda"
    sharded = config == "fsdp"
    if sharded and cuda:  # this process's GPU (Lightning's launcher numbers the processes it starts)
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    method = build(config, unet_cfg, device, args.lora_rank, rec)
    roles = method.role_parameters()
    frozen = {id(p) for p in method.student.parameters() if not p.requires_grad}
    gc.collect()  # a teacher DMD2 replaced by the generator's base
    k = method.critic_updates_per_generator_update
    row = {"generator_params": sum(p.numel() for p in roles["generator"]),
           "critic_params": sum(p.numel() for p in roles["critic"]),
           "gan_head_params": bench.count(method.gan_head) if method.gan_head is not None else 0,
           "gradient_checkpointing": CONFIGS[config].endswith("_gc"),
           "fake_score_shares_frozen_base": bool(frozen) and frozen <= {id(p) for p in method.fake_score.parameters()},
           "teacher_shares_frozen_base": bool(frozen) and frozen <= {id(p) for p in method.teacher.parameters()},
           "weights_dtype": str(method.student.dtype).removeprefix("torch."),
           "teacher_dtype": str(method.teacher.dtype).removeprefix("torch."),
           "critic_updates_per_generator_update": k}
    if sharded:
        row["devices"] = args.devices
    if cuda:
        row["weights_gb"] = round(torch.cuda.memory_allocated(device) / 1e9, 3)
    row["unet_forward_flops"] = unet_forward_flops(method, unet_cfg, args.batch_size, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    timed = args.warmup + args.updates
    cycles = timed + (0 if args.no_flops else 1)  # the counted cycle comes last
    cb = Probe(k, torch.cuda.synchronize if cuda else (lambda: None), count_cycle=None if args.no_flops else timed,
               trace_cycle=timed - 1 if args.memory_trace and cuda else None)
    strategy, devices = "auto", 1
    if sharded:  # a rank that dies stops the others' collectives in minutes, not Lightning's default 30
        from distillkit.parallel import fsdp_strategy

        strategy, devices = fsdp_strategy(method, timeout=datetime.timedelta(minutes=5)), args.devices
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=devices, strategy=strategy,
                        precision="bf16-mixed" if cuda else "32-true", max_steps=cycles + 1, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[cb],
                        use_distributed_sampler=False)  # fsdp: each rank its own batches, all of them
    trainer.fit(method, train_dataloaders=random_loader(unet_cfg, args.batch_size, k * cycles + 1))

    times = [b - a for a, b in zip(cb.starts, cb.starts[1:])][args.warmup:timed]
    s = statistics.median(times)
    model_flops = cb.flops - cb.recompute if cb.flops is not None else None
    fwd = row["unet_forward_flops"]
    row.update(generator_updates=method.updates_of("generator"), critic_updates=method.updates_of("critic"),
               timed_updates=len(times), s_per_update=round(s, 5), s_per_update_min=round(min(times), 5),
               nfe_per_update=cb.nfe[1] - cb.nfe[0], flops_per_update=cb.flops,
               recompute_flops_per_update=cb.recompute, model_flops_per_update=model_flops,
               forward_equivalents=round(model_flops / fwd, 2) if fwd and model_flops else None,
               mfu=round(model_flops / s / (peak * 1e12), 4) if peak and model_flops else None,
               hfu=round(cb.flops / s / (peak * 1e12), 4) if peak and model_flops else None)
    if cb.trace is not None:
        row["memory_trace"] = cb.trace
    if sharded and cb.train_start_bytes is not None:
        row["weights_gb_sharded"] = round(cb.train_start_bytes / 1e9, 3)
    if cuda:
        peak = max(v for k, v in cb.peaks.items() if k != "flop_counted_cycle")
        row["peak_mem_gb"] = round(peak / 1e9, 3)
        row.update({f"peak_mem_gb_{k}": round(v / 1e9, 3) for k, v in cb.peaks.items()})
        row["fits_80gb"] = peak < GiB80
        row["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / 1e9, 3)
    else:
        row["peak_mem_gb"] = None
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=ONE_DEVICE,
                   help=f"default: {' '.join(ONE_DEVICE)}; fsdp runs alone")
    p.add_argument("--devices", type=int, default=None, help="fsdp: the GPUs to shard over, one node (default: all "
                   "visible ones; --tiny on a CPU: 2 processes)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's dataset.batch_size (--tiny: 1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up generator updates, at least 1 (default 2; "
                   "--tiny: 1)")
    p.add_argument("--updates", type=int, default=None, help="timed generator updates (default 5; --tiny: 1)")
    p.add_argument("--lora-rank", type=int, default=None, help="default 64 (--tiny: 4)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: from its name)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-counted cycle (no mfu / hfu)")
    p.add_argument("--memory-trace", action="store_true", help="record the last timed cycle's CUDA allocations and "
                   "write what is live at its peak, by where it was allocated, into the row (memory_trace)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--tiny", action="store_true", help="the tiny SDXL-style UNet: a check of the script")
    p.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT.relative_to(ROOT)} (CUDA only)")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    rec = recipe()
    args.batch_size = args.batch_size or (1 if args.tiny else rec["batch_size"])
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.updates = args.updates if args.updates is not None else (1 if args.tiny else 5)
    args.lora_rank = args.lora_rank or (4 if args.tiny else 64)
    if args.warmup < 1 or args.updates < 1:
        raise SystemExit("probe_dmd2_sdxl: --warmup and --updates must be at least 1 (the first cycles build "
                         "cuDNN's plans and the allocator's pool)")
    unet_cfg = TINY_UNET if args.tiny else bench.SDXL_UNET

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    out = args.out or DEFAULT_OUT
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("probe_dmd2_sdxl: the SDXL-size probe needs a CUDA GPU (none here); "
                         "--tiny --out PATH checks the script on a CPU")
    if "fsdp" in args.configs and len(args.configs) > 1:
        raise SystemExit("probe_dmd2_sdxl: --configs fsdp runs on its own (Lightning runs this script again in each "
                         "device's process): give it in a call of its own")
    visible = torch.cuda.device_count() if device.type == "cuda" else 2
    args.devices = visible if args.devices is None else args.devices
    if args.configs == ["fsdp"] and not 1 <= args.devices <= (visible if device.type == "cuda" else 64):
        most = f"{visible}, the GPUs this node shows" if device.type == "cuda" else "64 processes on the CPU"
        raise SystemExit(f"probe_dmd2_sdxl: --devices {args.devices}: give 1 to {most}")
    if out.resolve() == DEFAULT_OUT.resolve() and (args.tiny or device.type != "cuda"):
        raise SystemExit(f"probe_dmd2_sdxl: {DEFAULT_OUT.relative_to(ROOT)} holds the full-size GPU run: "
                         "give --out for this one")

    threads = torch.get_num_threads()
    if device.type == "cpu":  # the tiny networks: threads only contend (10x slower on 2 busy cores)
        torch.set_num_threads(1)
    try:
        return run_probe(args, unet_cfg, device, out, rec)
    finally:
        torch.set_num_threads(threads)


def run_probe(args: argparse.Namespace, unet_cfg: dict, device: torch.device, out: Path, rec: dict) -> int:
    counts = bench.parameter_counts(unet_cfg, args.lora_rank)
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    resolution = unet_cfg["sample_size"] * bench.LATENT_SCALE
    result = dict(name="gpu_dmd2_sdxl", machine=bench.machine(device), date=time.strftime("%Y-%m-%d"),
                  command=" ".join(["python", "scripts/probe_dmd2_sdxl.py", *args.argv]),
                  unet="tiny (bench_gpu_sdxl_diffusion.TINY_UNET, 8 x 8 latents)" if args.tiny else
                  "SDXL base 1.0 architecture, random weights",
                  recipe=str(RECIPE.relative_to(ROOT)), method=rec["method"],
                  optimizer={k: v for k, v in rec["optimizer"].items() if not k.startswith("_")},
                  gradient_clip_val=rec["gradient_clip_val"], **counts, peak_bf16_tflops=peak,
                  peak_source=peak_source, warmup=args.warmup, updates=args.updates, rows=[])
    for config in args.configs:
        if local_rank() > 0:  # a process Lightning started for fsdp: it trains; the first one writes the row
            run_config(config, unet_cfg, args, rec, device, peak)
            continue
        row = {"method": "dmd2", "config": config, "batch_size": args.batch_size, "resolution": resolution}
        bench.measure_row(row, lambda: run_config(config, unet_cfg, args, rec, device, peak), device, result, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
