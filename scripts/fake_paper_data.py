"""Stand-ins of the real shapes for the GPU check of the paper-setting experiments
(scripts/gpu_check_paper_settings.sh): a CIFAR-10 folder in the official pickle layout
(random pixels), a randomly initialised UNet with google/ddpm-celebahq-256's architecture saved
as a diffusers folder (113.7M parameters), and a folder of random 256x256 PNGs. Throughput and
memory depend only on the shapes, so these measure what the real files would cost.

    python scripts/fake_paper_data.py OUT [--cifar-per-batch 2560] [--images 512]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_data_cifar import write_cifar10  # noqa: E402  (the tests' writer of the real file format)


def celebahq_unet():
    """google/ddpm-celebahq-256's config.json as a UNet2DModel (random weights)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        norm_num_groups=32, attention_head_dim=None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--cifar-per-batch", type=int, default=2560, help="images per data_batch_<k> file (5 files)")
    ap.add_argument("--images", type=int, default=512, help="256x256 PNGs in OUT/images/all")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_cifar10(args.out, per_batch=args.cifar_per_batch, n_test=512)
    torch.manual_seed(0)
    net = celebahq_unet()
    print(f"ddpm-celebahq-256 architecture: {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters")
    net.save_pretrained(args.out / "ddpm-celebahq-256")
    from PIL import Image

    (args.out / "images" / "all").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(args.images):
        Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(args.out / "images" / "all" / f"{i}.png")


if __name__ == "__main__":
    main()
