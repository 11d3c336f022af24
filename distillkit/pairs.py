"""``distill-pairs``: noise-sample pairs of a teacher's ODE sampler, for DMD's regression loss.

    distill-pairs checkpoint=runs/digits_diffusion_teacher/default/last.ckpt num_pairs=10000 out=pairs.safetensors
    [steps=S seed=0 batch_size=500 use_ema=true device=auto class=... prompts=... guidance=W]

DMD (Yin et al., CVPR 2024, "One-step Diffusion with Distribution Matching Distillation", Sec. 3.3)
regularises the one-step generator with a regression loss on pairs (z, y) of starting noise z and
the teacher's deterministic ODE sample y from z, computed once ahead of training. This command
writes them: it loads the teacher run exactly as ``distill-sample`` does
(:func:`distillkit.models.loading.load_run_checkpoint`), draws the starting noise of all N pairs in
one call ``torch.randn((N, *shape), generator=torch.Generator().manual_seed(seed))`` and then the
conditions from the same generator (as ``distill-sample``: ``class=3`` or ``class=0,1,2`` repeated
over the pairs, else classes drawn uniformly; ``prompts=FILE`` or ``prompts="a cat|a dog"`` for a
text-to-image model), and runs the run's deterministic sampler in slices of ``batch_size``: DDIM
with eta = 0 on the run's grid (VP schedules; the run's ``schedule.eta`` is overridden to 0), or
EDM's Heun / Euler (``schedule.solver``). ``steps`` defaults to the run's ``schedule.num_steps``,
``guidance`` to its ``eval.guidance``; the EMA weights are used unless ``use_ema=false``. With the
same seed, steps and conditions the targets are ``distill-sample``'s samples before the uint8
conversion.

Pairs live in the MODEL's space: latents for latent (text-to-image) models, neither decoded nor
clipped; pixel images clipped to [-1, 1] as the sampler returns them.

The file (safetensors, written atomically: a temporary file in the same folder, then renamed):

    noise            float32 (N, *shape)   the starting noise z
    target           float32 (N, *shape)   the teacher's ODE sample from z
    cond.<name>      (N, ...)              conditional models only: each tensor of the Denoiser's
                                           condition dict, e.g. cond.class_labels (int64), or
                                           cond.encoder_hidden_states (+ cond.text_embeds for SDXL)

and the string metadata ``distillkit_pairs``, a JSON object: checkpoint (absolute path), steps,
guidance, seed, num_pairs, shape, prediction_type, sampler ("ddim eta=0", or the EDM solver name:
"heun" / "euler"), spacing (VP grids; null for EDM) and use_ema.

Read it with :func:`load_pairs` (a :class:`Pairs`: ``noise``, ``target``, ``cond``, ``meta``;
``Pairs.batch(idx)`` gives the (noise, target, cond) of a batch of indices, ``Pairs.check_shape``
checks it against the student's sample shape). Errors name the config key and the file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from distillkit.errors import DistillError
from distillkit.kvargs import Arg, command_main, parse_bool, parse_kv
from distillkit.sample import default_guidance

PROG = "distill-pairs"
META_KEY = "distillkit_pairs"
COND_PREFIX = "cond."

ARGS = [
    Arg("checkpoint", str, help="the teacher: a diffusion run's last.ckpt, or a round_<r>.ckpt / level_<r>.ckpt"),
    Arg("num_pairs", int, help="number of pairs N"),
    Arg("out", str, help="output file, .safetensors"),
    Arg("steps", int, None, "ODE sampler steps (default: the run's schedule.num_steps)"),
    Arg("seed", int, 0, "seed of the starting noise (and of drawn classes)"),
    Arg("batch_size", int, 500, "pairs per sampler call"),
    Arg("use_ema", parse_bool, True, "sample with the EMA weights (when the run kept an EMA)"),
    Arg("device", str, "auto", "auto (cuda when available), cpu, cuda, cuda:1, ..."),
    Arg("class", str, None, "class-conditional models: a class, or a comma list repeated over the pairs"),
    Arg("prompts", str, None, "text-to-image models: a file (one prompt a line) or prompts separated by |"),
    Arg("guidance", float, None, "classifier-free guidance w, uncond + w (cond - uncond) (default: eval.guidance)"),
]


def _write_hint(path: Any) -> str:
    return (f"write it once with the teacher's ODE sampler: distill-pairs checkpoint=<teacher's last.ckpt> "
            f"num_pairs=<N> out={path}")


# --------------------------------------------------------------------------- reading
@dataclass
class Pairs:
    """Noise-sample pairs of a teacher's ODE sampler (see the module docstring), on the CPU."""

    noise: torch.Tensor
    target: torch.Tensor
    cond: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    path: Optional[str] = None
    key: str = "method.pairs"

    def __len__(self) -> int:
        return int(self.noise.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """The sample shape (without the batch dimension)."""
        return tuple(int(s) for s in self.noise.shape[1:])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(noise, target, cond) of the pairs ``idx`` (a LongTensor of indices, on any device), on the
        CPU; ``cond`` is empty for unconditional models."""
        idx = torch.as_tensor(idx, dtype=torch.long).cpu()
        return self.noise[idx], self.target[idx], {k: v[idx] for k, v in self.cond.items()}

    def check_shape(self, shape: Sequence[int], key: Optional[str] = None) -> None:
        """A DistillError naming ``key`` (default: the key the file was loaded under) and the file when
        the pairs' sample shape is not the model's ``shape``."""
        want = tuple(int(s) for s in shape)
        if self.shape != want:
            src = self.meta.get("checkpoint")
            origin = f" (written from {src})" if src else ""
            raise DistillError(f"{key or self.key}={self.path}: the pairs hold samples of shape {self.shape}{origin}, "
                               f"but the model's samples have shape {want}; write pairs with this model's "
                               f"teacher: distill-pairs checkpoint=<teacher's last.ckpt> num_pairs=<N> "
                               f"out=<new file>")


def load_pairs(path: Union[str, Path], key: str = "method.pairs") -> Pairs:
    """The pairs written by ``distill-pairs`` to ``path``. Errors (DistillError) name ``key`` and the
    file: a missing file (with the command that writes it), a file that is not safetensors, one
    without ``noise`` / ``target`` or whose tensors disagree in shape or count."""
    from safetensors import SafetensorError, safe_open

    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise DistillError(f"{key}={path}: no such file; {_write_hint(path)}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise DistillError(f"{key}={path}: cannot read this file as safetensors ({msg}); {_write_hint(path)}") from None
    missing = [k for k in ("noise", "target") if k not in tensors]
    if missing:
        raise DistillError(f"{key}={path}: no {' and no '.join(repr(m) for m in missing)} tensor (it holds "
                           f"{', '.join(sorted(tensors)) or 'no tensors'}); not a distill-pairs file: "
                           f"{_write_hint(path)}")
    noise, target = tensors.pop("noise"), tensors.pop("target")
    if noise.shape != target.shape:
        raise DistillError(f"{key}={path}: 'noise' has shape {tuple(noise.shape)} but 'target' has shape "
                           f"{tuple(target.shape)}; they must be the same (one target per noise): {_write_hint(path)}")
    if noise.ndim < 2 or noise.shape[0] < 1:
        raise DistillError(f"{key}={path}: 'noise' has shape {tuple(noise.shape)}; expected (N, *sample shape) "
                           f"with N >= 1: {_write_hint(path)}")
    if not (noise.is_floating_point() and target.is_floating_point()):
        raise DistillError(f"{key}={path}: 'noise' and 'target' must be floating point (they are {noise.dtype}, "
                           f"{target.dtype}): {_write_hint(path)}")
    n = int(noise.shape[0])
    cond = {k[len(COND_PREFIX):]: v for k, v in tensors.items() if k.startswith(COND_PREFIX)}
    for name, v in cond.items():
        if v.ndim == 0 or v.shape[0] != n:
            raise DistillError(f"{key}={path}: '{COND_PREFIX}{name}' has shape {tuple(v.shape)}, not one condition "
                               f"per pair ({n}): {_write_hint(path)}")
    meta: dict = {}
    if META_KEY in metadata:
        try:
            meta = json.loads(metadata[META_KEY])
        except json.JSONDecodeError as e:
            raise DistillError(f"{key}={path}: its '{META_KEY}' metadata is not JSON ({e})") from None
        if not isinstance(meta, dict):
            raise DistillError(f"{key}={path}: its '{META_KEY}' metadata is not a JSON object")
    return Pairs(noise, target, cond, meta, str(path), key)


# --------------------------------------------------------------------------- writing
def sampler_name(method) -> str:
    """The deterministic sampler the pairs come from: "ddim eta=0" (VP) or the EDM solver's name."""
    return method.solver if method.is_edm else "ddim eta=0"


def generate_pairs(method, num_pairs: int, steps: Optional[int] = None, seed: int = 0, batch_size: int = 500,
                   use_ema: bool = True, classes: Optional[str] = None, prompts: Optional[list[str]] = None,
                   guidance: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(noise, target, cond) of ``num_pairs`` pairs on the CPU: the noise of all pairs drawn in one
    call from ``seed``, then the conditions (distill-sample's :func:`~distillkit.sample.sampling_condition`),
    then the run's deterministic sampler (DDIM with eta = 0, or EDM's solver) in slices of
    ``batch_size``, its output left in the model's space (``decode=False``)."""
    from distillkit.sample import check_steps, generate

    if num_pairs < 1:
        raise DistillError(f"num_pairs={num_pairs}: must be at least 1")
    if batch_size < 1:
        raise DistillError(f"batch_size={batch_size}: must be at least 1")
    steps = int(steps if steps is not None else method.num_steps)
    check_steps(method, steps)
    guidance = default_guidance(method) if guidance is None else float(guidance)
    eta = method.eta
    method.eta = 0.0  # the ODE sampler, whatever the run's schedule.eta
    try:
        target, cond = generate(method, num_pairs, steps, seed, batch_size, use_ema, classes=classes, prompts=prompts,
                                guidance=guidance, return_cond=True, decode=False)
    finally:
        method.eta = eta
    z = method.draw_noise(num_pairs, torch.Generator().manual_seed(seed)).float().cpu()  # generate's first draw
    return z, target.float(), cond


def save_pairs(path: Union[str, Path], noise: torch.Tensor, target: torch.Tensor,
               cond: Optional[dict[str, torch.Tensor]] = None, meta: Optional[dict] = None) -> Path:
    """Write pairs to ``path`` (see the module docstring for the layout) atomically: a temporary file
    in the same folder, then ``os.replace``."""
    from safetensors.torch import save_file

    out = Path(str(path)).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"noise": noise.detach().float().cpu().contiguous(), "target": target.detach().float().cpu().contiguous()}
    for k, v in (cond or {}).items():
        if isinstance(v, torch.Tensor):
            tensors[COND_PREFIX + k] = v.detach().cpu().contiguous()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta or {})})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates its files 0600; give the usual permissions
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def write_pairs(method, num_pairs: int, out: Union[str, Path], steps: Optional[int] = None, seed: int = 0,
                batch_size: int = 500, use_ema: bool = True, classes: Optional[str] = None,
                prompts: Optional[list[str]] = None, guidance: Optional[float] = None,
                checkpoint: Optional[Union[str, Path]] = None) -> Path:
    """:func:`generate_pairs`, then :func:`save_pairs` with the metadata (``checkpoint``: the teacher
    run's file, recorded as an absolute path)."""
    steps = int(steps if steps is not None else method.num_steps)
    guidance = default_guidance(method) if guidance is None else float(guidance)
    noise, target, cond = generate_pairs(method, num_pairs, steps, seed, batch_size, use_ema, classes, prompts,
                                         guidance)
    meta = {
        "checkpoint": str(Path(checkpoint).expanduser().absolute()) if checkpoint is not None else None,
        "steps": steps,
        "guidance": guidance,
        "seed": int(seed),
        "num_pairs": int(num_pairs),
        "shape": [int(s) for s in noise.shape[1:]],
        "prediction_type": method.prediction_type,
        "sampler": sampler_name(method),
        "spacing": None if method.is_edm else method.spacing,
        "use_ema": bool(use_ema and method.ema is not None),
    }
    return save_pairs(out, noise, target, cond, meta)


def run(argv: Sequence[str]) -> Path:
    args = parse_kv(argv, PROG, ARGS)
    from distillkit.sample import load_for_sampling

    out, method, steps, prompts = load_for_sampling(args, PROG, ".safetensors", "num_pairs")
    write_pairs(method, args.num_pairs, out, steps, args.seed, args.batch_size, args.use_ema, getattr(args, "class"),
                prompts, args.guidance, checkpoint=args.checkpoint)
    shape = "x".join(map(str, method.image_shape))
    print(f"{PROG}: wrote {out} ({args.num_pairs} pairs of {shape} noise -> {sampler_name(method)} target, "
          f"{steps} steps, {'EMA' if args.use_ema and method.ema is not None else 'raw'} weights)")
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    command_main(PROG, run, argv)


if __name__ == "__main__":
    main()
