"""GPU check: is an SDXL UNet forward at batch 1, 1024 px, limited by the GPU or by the host?

Builds a randomly initialised UNet of SDXL base 1.0's architecture (scripts/bench_gpu_sdxl_diffusion.py's
SDXL_UNET, 2.57 B parameters) in bf16 on the GPU, times no-grad forwards at batch 1 on 128 x 128
latents (8 after 2 of warm-up, ``torch.cuda.synchronize`` around them), and prints torch.profiler's
table of one forward: its "Self CUDA time total" is the GPU's busy time, to set against the wall
time per forward. Then the same with ``torch.backends.cudnn.benchmark``, with channels-last weights
and inputs, and both. ``tflops`` is 6.761 TFLOP (one forward at batch 1, FlopCounterMode's count in
benchmarks/gpu_dmd2_sdxl.json) over the time. Prints only; the log of a run is kept under
benchmarks/gpu_check_paper_settings/. About 30 s on an H200. Run from the repository root:

    python scripts/profile_sdxl_unet_forward.py 2>&1 | tee sdxl_unet_forward_profile.log
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_gpu_sdxl_diffusion as bench  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

dev = torch.device("cuda")
torch.manual_seed(0)
with torch.device(dev):
    unet = UNet2DConditionModel(**bench.SDXL_UNET).to(torch.bfloat16).eval().requires_grad_(False)
print("attn processor", type(next(iter(unet.attn_processors.values()))).__name__, flush=True)
x0, cond = bench.random_batch(bench.SDXL_UNET, 1, dev)
x0 = x0.bfloat16()
ehs = cond["encoder_hidden_states"].bfloat16()
added = {"text_embeds": cond["text_embeds"].bfloat16(), "time_ids": torch.tensor([[1024., 1024, 0, 0, 1024, 1024]], device=dev).bfloat16()}
t = torch.tensor([399], device=dev)
def fwd(x):
    return unet(x, t, encoder_hidden_states=ehs, added_cond_kwargs=added).sample
def timeit(label, x, n=8):
    with torch.no_grad():
        for _ in range(2): fwd(x)
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(n): fwd(x)
        torch.cuda.synchronize(); s = (time.perf_counter() - t0) / n
    print(json.dumps({"case": label, "s": round(s, 4), "tflops": round(6.761e12 / s / 1e12, 1)}), flush=True)
timeit("default", x0)
with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    fwd(x0); torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60), flush=True)
torch.backends.cudnn.benchmark = True
timeit("cudnn_benchmark", x0)
unet.to(memory_format=torch.channels_last)
timeit("cudnn_benchmark+channels_last", x0.contiguous(memory_format=torch.channels_last))
torch.backends.cudnn.benchmark = False
timeit("channels_last", x0.contiguous(memory_format=torch.channels_last))
with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
    fwd(x0.contiguous(memory_format=torch.channels_last)); torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=60), flush=True)
