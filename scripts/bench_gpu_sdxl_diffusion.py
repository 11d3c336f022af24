"""GPU benchmark: time and peak memory of one ``method=diffusion`` update of an SDXL-sized UNet at 1024 px.

What one update is: the ``Diffusion`` method's denoising loss (eps prediction, SDXL's scaled_linear
schedule, T = 1000) of a RANDOMLY INITIALISED UNet of SDXL base 1.0's architecture (the config below,
2.567 B parameters; no weights are read or downloaded) on latents of 4 x 128 x 128 (1024 px) with random
text conditioning of SDXL's shapes (prompt embeddings (B, 77, 2048), pooled embedding (B, 1280), original
size 1024 x 1024, crop (0, 0)); forward and backward under bf16 autocast over fp32 master weights (what
Lightning's bf16-mixed precision does on a GPU), then an AdamW step and ``zero_grad(set_to_none=True)``.
Random weights cost the same as trained ones: the time and memory of an update depend on the shapes.

Variants (``--variants``, default all):

    full            the whole UNet trains (fp32 weights, fp32 gradients, AdamW's two fp32 moments)
    lora            a LoRA adapter (Hu et al. 2021; rank 64 on to_q, to_k, to_v, to_out.0 of every
                    attention layer, distillkit's ``add_lora``) trains; the frozen base is held in bf16
                    (as distillkit's LoRA student holds it: ``frozen_dtype``, bf16 on a GPU)
    full_gc, lora_gc  the same with ``unet.enable_gradient_checkpointing()``
    frozen_forward  no update: one no-grad forward of the UNet held in bf16 (a frozen teacher's call)

Each variant is built afresh on the device (seed 0), runs ``--warmup`` updates, then ``--updates``
timed ones (each between two ``torch.cuda.synchronize()``); a row reports the median seconds per
update, the memory of the built network (``weights_gb``), the peak memory of its updates
(``torch.cuda.max_memory_allocated`` from then on: weights, gradients, optimizer state, activations),
the trainable parameters and the batch size. A variant that runs out of memory gives a row with
``"oom": true`` and the next one runs.

On one GPU (a few minutes on an H200; writes benchmarks/gpu_sdxl_diffusion.json, a row at a time):

    python scripts/bench_gpu_sdxl_diffusion.py
    python scripts/bench_gpu_sdxl_diffusion.py --batch-size 4 --variants full_gc lora_gc --out /tmp/b4.json
    python scripts/bench_gpu_sdxl_diffusion.py --count     # parameter counts only (meta device, no GPU)

``--tiny`` runs the same code on the tiny SDXL-style UNet of tests/tiny_sd.py (2 warm-up + 2 timed
updates, LoRA rank 4; about 15 s on a CPU) and needs ``--out``: a check of the script, whose
numbers mean nothing. The real file is written only by the full-size run on CUDA. Needs torch,
diffusers, peft and distillkit.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from diffusers import UNet2DConditionModel  # noqa: E402

from distillkit.diffusion import NoiseSchedule  # noqa: E402
from distillkit.methods.diffusion import Diffusion  # noqa: E402
from distillkit.models.denoiser import Denoiser  # noqa: E402
from distillkit.models.stable_diffusion import DEFAULT_LORA_TARGETS, add_lora  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "gpu_sdxl_diffusion.json"
VARIANTS = ("full", "lora", "full_gc", "lora_gc", "frozen_forward")
LATENT_SCALE = 8  # text_unet_inputs' default without a codec: SDXL's VAE downsamples by 8
TEXT_TOKENS = 77

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the keys that set the architecture)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, upcast_attention=False,
)
SDXL_PARAMS = 2.567e9  # Podell et al. 2023: a 2.6 B-parameter UNet
# tests/tiny_sd.py's make_tiny_sdxl UNet (written out: this script does not import the tests)
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=2,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2], attention_head_dim=[2, 4], cross_attention_dim=64,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)


def machine(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores, torch {torch.__version__}"


def count(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def parameter_counts(unet_cfg: dict, lora_rank: int) -> dict:
    """The UNet's parameters and a LoRA adapter's, built on the meta device (no memory, no GPU)."""
    with torch.device("meta"):
        den = Denoiser(UNet2DConditionModel(**unet_cfg), condition="text")
        total = count(den)
        add_lora(den, lora_rank, lora_rank, list(DEFAULT_LORA_TARGETS))
    return {"unet_params": total, "lora_rank": lora_rank, "lora_params": count(den, trainable=True)}


def random_batch(unet_cfg: dict, batch: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    """Latents x0 and a text condition of the UNet's shapes, as the SDXL pipeline builds them."""
    size = unet_cfg["sample_size"]
    pooled = unet_cfg["projection_class_embeddings_input_dim"] - 6 * unet_cfg["addition_time_embed_dim"]
    px = float(size * LATENT_SCALE)
    x0 = torch.randn(batch, unet_cfg["in_channels"], size, size, device=device)
    cond = {
        "encoder_hidden_states": torch.randn(batch, TEXT_TOKENS, unet_cfg["cross_attention_dim"], device=device),
        "text_embeds": torch.randn(batch, pooled, device=device),
        "original_size": torch.tensor([[px, px]], device=device).expand(batch, 2),
        "crop_top_left": torch.zeros(batch, 2, device=device),
    }
    return x0, cond


def build(variant: str, unet_cfg: dict, device: torch.device, lora_rank: int) -> Diffusion:
    """The Diffusion method around a freshly initialised denoiser, set up as ``variant`` says."""
    frozen_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # frozen_dtype=auto
    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device: seconds, not minutes, for 2.6 B parameters
        unet = UNet2DConditionModel(**unet_cfg)
    if variant.endswith("_gc"):
        unet.enable_gradient_checkpointing()
    den = Denoiser(unet, prediction_type="eps", schedule=NoiseSchedule("scaled_linear", 1000), condition="text")
    if variant.startswith("lora"):
        add_lora(den, lora_rank, lora_rank, list(DEFAULT_LORA_TARGETS))
        # the frozen base in frozen_dtype, the adapter in fp32 (peft gives it the base's dtype)
        for p in den.parameters():
            p.data = p.data.to(torch.float32 if p.requires_grad else frozen_dtype)
    elif variant == "frozen_forward":
        den.to(frozen_dtype).eval().requires_grad_(False)  # as build_teacher holds a frozen teacher
    size = unet_cfg["sample_size"]
    method = Diffusion(den, schedule_cfg={"name": "none"}, input_shape=(unet_cfg["in_channels"], size, size))
    return method.to(device)


def run_variant(variant: str, unet_cfg: dict, args: argparse.Namespace, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=cuda)  # bf16-mixed on a GPU only
    method = build(variant, unet_cfg, device, args.lora_rank)
    den = method.student
    params = [p for p in den.parameters() if p.requires_grad]
    row = {"trainable_params": sum(p.numel() for p in params),
           "gradient_checkpointing": variant.endswith("_gc"),
           "weights_dtype": str(den.dtype).removeprefix("torch.")}  # the UNet's (base) weights
    if cuda:  # the peak counts from here: the build's transients (fp32 -> bf16 casts) are not the update's
        row["weights_gb"] = round(torch.cuda.memory_allocated(device) / 1e9, 3)
        torch.cuda.reset_peak_memory_stats(device)
    x0, cond = random_batch(unet_cfg, args.batch_size, device)

    if variant == "frozen_forward":
        def step() -> None:
            t = torch.randint(0, 1000, (args.batch_size,), device=device)
            with torch.no_grad(), torch.autocast(**amp):
                den(torch.randn_like(x0), t, cond)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4 if variant.startswith("lora") else 1e-5)

        def step() -> None:
            with torch.autocast(**amp):
                loss = method.denoising_loss(method.student, x0, cond=cond).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        # once: every trainable parameter gets a gradient (e.g. through the checkpointed blocks)
        with torch.autocast(**amp):
            method.denoising_loss(method.student, x0, cond=cond).mean().backward()
        missing = sum(p.grad is None for p in params)
        assert missing == 0, f"{variant}: {missing} of {len(params)} trainable tensors got no gradient"
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.updates):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    row["s_per_step"] = round(statistics.median(times), 5)
    row["s_per_step_min"] = round(min(times), 5)
    row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 1e9, 3) if cuda else None
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=None, help="warm-up updates (default 3; --tiny: 2)")
    p.add_argument("--updates", type=int, default=None, help="timed updates (default 10; --tiny: 2)")
    p.add_argument("--lora-rank", type=int, default=None, help="default 64 (--tiny: 4)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--tiny", action="store_true", help="tests/tiny_sd.py's tiny SDXL UNet: a check of the script")
    p.add_argument("--count", action="store_true", help="print the parameter counts (meta device) and stop")
    p.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT.relative_to(ROOT)} (CUDA only)")
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 3)
    args.updates = args.updates if args.updates is not None else (2 if args.tiny else 10)
    args.lora_rank = args.lora_rank or (4 if args.tiny else 64)
    unet_cfg = TINY_UNET if args.tiny else SDXL_UNET

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    out = args.out or DEFAULT_OUT
    if not args.count:
        if device.type != "cuda" and not args.tiny:
            p.error("the SDXL-size benchmark needs a CUDA GPU (on a CPU: --tiny --out PATH checks the script)")
        if out.resolve() == DEFAULT_OUT.resolve() and (args.tiny or device.type != "cuda"):
            p.error(f"{DEFAULT_OUT.relative_to(ROOT)} holds the full-size GPU run: give --out for this one")

    counts = parameter_counts(unet_cfg, args.lora_rank)
    print(f"UNet: {counts['unet_params']:,} parameters; LoRA rank {args.lora_rank} on "
          f"{'/'.join(DEFAULT_LORA_TARGETS)}: {counts['lora_params']:,}", flush=True)
    if not args.tiny:
        assert abs(counts["unet_params"] - SDXL_PARAMS) < 0.01 * SDXL_PARAMS, "not SDXL's UNet"
    if args.count:
        return 0

    resolution = unet_cfg["sample_size"] * LATENT_SCALE
    result = dict(name="gpu_sdxl_diffusion", machine=machine(device), date=time.strftime("%Y-%m-%d"),
                  command=" ".join(["python", "scripts/bench_gpu_sdxl_diffusion.py", *(argv or sys.argv[1:])]),
                  unet="tiny (tests/tiny_sd.py)" if args.tiny else "SDXL base 1.0 architecture, random weights",
                  **counts, warmup=args.warmup, updates=args.updates, rows=[])
    for variant in args.variants:
        row = {"method": "diffusion", "variant": variant, "batch_size": args.batch_size, "resolution": resolution}
        measure_row(row, lambda: run_variant(variant, unet_cfg, args, device), device, result, out)
    return 0


def measure_row(row: dict, run, device: torch.device, result: dict, out: Path) -> None:
    """``row`` updated with ``run()``'s measurements from a fresh peak-memory count (or marked
    ``oom``), appended to ``result["rows"]``, printed, and ``result`` written to ``out``: each row
    lands even if a later one dies."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        row.update(run())
    except torch.cuda.OutOfMemoryError:
        row.update(oom=True, peak_mem_gb=round(torch.cuda.max_memory_allocated(device) / 1e9, 3))
    gc.collect()  # the run's networks, optimizers and (after an OOM) the traceback's tensors
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["rows"].append(row)
    print(json.dumps(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
