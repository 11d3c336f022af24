"""Train the digits feature network: the "Inception" of digits-FID / digits-IS.

A width-32 :class:`~distillkit.models.cnn.DigitsCNN` trained with cross-entropy on the
digits training split (the default split, ``split_seed=0``), deterministically on CPU
(fixed seed, one thread, deterministic kernels). Its penultimate activations (128-d) are
the FID features, its 10-class logits the IS classifier.

    python scripts/make_digits_feature_net.py            # writes the shipped weights

Writes ``distillkit/metrics/weights/digits_cnn.safetensors`` and a JSON sidecar next to it
(sha256, width, test accuracy, the command). Every FID/IS result records the sha256 prefix,
so numbers made with different feature networks are never compared by mistake.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distillkit.data.digits import DigitsDataModule  # noqa: E402
from distillkit.models.cnn import DigitsCNN  # noqa: E402

OUT = REPO / "distillkit" / "metrics" / "weights" / "digits_cnn.safetensors"


def shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (background -1 fills in), so the features do
    not hinge on exact pixel positions."""
    dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=g))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    if dy:
        x[:, :, (0 if dy > 0 else -1), :] = -1.0
    if dx:
        x[:, :, :, (0 if dx > 0 else -1)] = -1.0
    return x


@torch.no_grad()
def accuracy(net: DigitsCNN, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    return float((net(x).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)

    dm = DigitsDataModule()
    dm.setup("fit")
    xtr, ytr = dm.train_set.tensors
    xva, yva = dm.val_set.tensors
    xte, yte = dm.test_set.tensors

    net = DigitsCNN(args.width)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    bs = 64
    steps = args.epochs * ((len(xtr) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    t0 = time.time()
    for epoch in range(args.epochs):
        net.train()
        perm = torch.randperm(len(xtr), generator=g)
        for i in range(0, len(xtr), bs):
            idx = perm[i : i + bs]
            loss = F.cross_entropy(net(shift(xtr[idx].clone(), g)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f} val_acc {accuracy(net, xva, yva):.4f}", flush=True)
    net.eval()
    val_acc, test_acc = accuracy(net, xva, yva), accuracy(net, xte, yte)
    print(f"val_acc {val_acc:.4f} test_acc {test_acc:.4f} ({time.time() - t0:.1f}s)")

    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    # No safetensors metadata: its key order is not stable, and the file's bytes must be
    # (the sha256 names the feature network); width etc. live in the sidecar.
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(args.out))
    sha = hashlib.sha256(args.out.read_bytes()).hexdigest()
    sidecar = {
        "file": args.out.name, "sha256": sha, "arch": "distillkit.models.cnn.DigitsCNN",
        "width": args.width, "num_classes": 10, "feature_dim": 4 * args.width,
        "input": "float32 (N, 1, 8, 8) in [-1, 1]",
        "train_split": "digits train (split_seed=0, val_fraction=0.15, test_fraction=0.25)",
        "n_train": len(xtr), "val_acc": round(val_acc, 4), "test_acc": round(test_acc, 4),
        "epochs": args.epochs, "seed": args.seed, "torch": torch.__version__,
        "command": "python scripts/make_digits_feature_net.py"
        + "".join(f" {a}" for a in sys.argv[1:]),
    }
    args.out.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    print(f"wrote {args.out} sha256 {sha[:12]} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
