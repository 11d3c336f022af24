"""Probe: what torch.compile and channels-last memory format buy the CIFAR-10 UNet's training update.

One update is what the cifar10 experiments do per batch, without the method around it: the
model=unet network (DDPM's CIFAR-10 layout, 35.7M parameters) on a batch of 128 32x32 images under
bf16 autocast (the CLI's default precision on a GPU), a v-prediction MSE, backward, gradient
clipping at 1 and an Adam step. Each variant builds the network afresh with the same seed, runs
``--warmup`` updates (for a compiled variant the first one compiles; its time is reported as
``first_update_s``) and then times ``--updates`` more on the wall clock, the GPU
synchronised before and after. Writes JSON:

    python scripts/probe_unet_compile.py --out benchmarks/probe_unet_compile.json
    python scripts/probe_unet_compile.py --variants eager compile --updates 50  # a subset

A GPU probe: on a CPU it runs (``--batch 4 --updates 2`` to check the script), but the numbers mean
nothing there.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distillkit.models.unet import DiffusersUNet  # noqa: E402

# conf/model/unet.yaml; the UNet's defaults are the same except these two block lists
UNET = dict(sample_size=32, in_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), dropout=0.1)
VARIANTS = {  # name: (channels_last, torch.compile mode or None)
    "eager": (False, None),
    "channels_last": (True, None),
    "compile": (False, "default"),
    "compile_channels_last": (True, "default"),
}


def run_variant(name: str, batch: int, warmup: int, updates: int, device: torch.device) -> dict:
    channels_last, mode = VARIANTS[name]
    torch.manual_seed(0)
    net = DiffusersUNet(**UNET).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt = torch.optim.Adam(net.parameters(), lr=2e-4)
    step_net = torch.compile(net, mode=mode) if mode else net
    x0 = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=fmt)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def update():
        # a v-prediction update on a fixed cosine-like path; the values do not matter, the work does
        t = torch.randint(0, 1024, (batch,), device=device)
        a = torch.cos(t.float() / 1024 * torch.pi / 2).view(-1, 1, 1, 1)
        s = torch.sin(t.float() / 1024 * torch.pi / 2).view(-1, 1, 1, 1)
        eps = torch.randn_like(x0)
        with torch.autocast(**amp):
            out = step_net(a * x0 + s * eps, t)
        loss = F.mse_loss(out.float(), a * eps - s * x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    update()
    sync()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        update()
    sync()
    t0 = time.perf_counter()
    for _ in range(updates):
        update()
    sync()
    per = (time.perf_counter() - t0) / updates
    row = dict(variant=name, channels_last=channels_last, compile_mode=mode, batch=batch,
               warmup=warmup, updates=updates, first_update_s=round(first, 3), s_per_update=round(per, 5),
               images_per_s=round(batch / per, 1))
    if device.type == "cuda":
        row["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        torch.cuda.reset_peak_memory_stats()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "probe_unet_compile.json")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--updates", type=int, default=100)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    machine = (torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu")
    result = dict(machine=f"{machine}, torch {torch.__version__}", date=time.strftime("%Y-%m-%d"),
                  command=" ".join(sys.argv), rows=[])
    for name in args.variants:
        row = run_variant(name, args.batch, args.warmup, args.updates, device)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")  # each row lands even if a later one dies
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
