"""``distill-sample``: samples of a trained diffusion run, as the evaluation suites read them.

    distill-sample checkpoint=runs/digits_diffusion_teacher/default/last.ckpt steps=16 num_samples=10000 out=samples.npz
    [seed=0 batch_size=500 use_ema=true spacing=trailing device=auto]

Writes ``out`` (.npz, key ``arr_0``, uint8, N x H x W x C: the convention of the ADM / EDM
evaluation suites) and a grid of the first samples next to it (``out`` with suffix ``.png``).
2-D point data (dataset=toy2d) are written as float32 N x 2 and drawn as a scatter plot.

The network and its sampler come from the checkpoint alone (:func:`load_run_checkpoint`):
DDIM (VP schedules) or Heun / Euler (EDM), with the EMA weights unless ``use_ema=false``;
``steps`` and ``spacing`` default to the run's ``schedule.num_steps`` / ``schedule.spacing``.
A round/level file of step distillation (``<run dir>/round_<r>.ckpt``, ``level_<r>.ckpt``) is
read the same way: that round's network, sampled by default with the steps it was trained for.

Consistency models and few-step generators sample at times of their own (``method.sampling_timesteps``,
``method.timesteps``); ``timesteps=1023,639`` samples at others, their count the steps.

Conditions (the model boundary, :mod:`distillkit.models.denoiser`): ``class=3`` or ``class=0,1,2``
(repeated over the samples) for a class-conditional model, whose classes are otherwise drawn
uniformly from the seed; ``prompts=FILE`` (one prompt a line) or ``prompts="a cat|a dog"`` for a
text-to-image model (repeated over the samples); ``guidance=W`` in diffusers' convention
(``uncond + W (cond - uncond)``, 1: none; default: the run's ``eval.guidance``).

Noise, so that results are reproducible and comparable with diffusers: the starting noise of all
N samples is drawn first, in one call ``torch.randn((N, *image_shape),
generator=torch.Generator().manual_seed(seed))`` on the CPU, which is the draw diffusers'
pipelines make (``randn_tensor``) for ``batch_size=N`` and that generator; batches are then
slices of it, so the samples do not depend on ``batch_size``. With the folder written by
``distill-export``, ``DDIMPipeline(batch_size=N, generator=torch.Generator().manual_seed(seed),
num_inference_steps=steps, eta=0.0)`` gives the same images (see :mod:`distillkit.export` for
the step counts where the two grids agree). Images are converted to uint8 as diffusers does:
round(255 * clamp(x / 2 + 0.5, 0, 1)).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from distillkit.errors import DistillError
from distillkit.kvargs import Arg, command_main, parse_bool, parse_kv
from distillkit.metrics.images import image_grid, save_png, to_uint8_nhwc

PROG = "distill-sample"
SPACINGS = ("trailing", "leading", "linspace")

ARGS = [
    Arg("checkpoint", str, help="a diffusion run's last.ckpt, or a round_<r>.ckpt / level_<r>.ckpt"),
    Arg("num_samples", int, help="number of samples N"),
    Arg("out", str, help="output file, .npz (a .png grid is written next to it)"),
    Arg("steps", int, None, "sampler steps (default: the run's schedule.num_steps)"),
    Arg("seed", int, 0, "seed of the starting noise"),
    Arg("batch_size", int, 500, "samples per network call"),
    Arg("use_ema", parse_bool, True, "sample with the EMA weights (when the run kept an EMA)"),
    Arg("spacing", str, None, "timestep grid (default: the run's schedule.spacing)", SPACINGS),
    Arg("device", str, "auto", "auto (cuda when available), cpu, cuda, cuda:1, ..."),
    Arg("class", str, None, "class-conditional models: a class, or a comma list repeated over the samples"),
    Arg("prompts", str, None, "text-to-image models: a file (one prompt a line) or prompts separated by |"),
    Arg("guidance", float, None, "classifier-free guidance w, uncond + w (cond - uncond) (default: eval.guidance)"),
    Arg("timesteps", str, None, "consistency models and few-step generators: the sampler's times, descending, "
        "comma-separated (e.g. 1023,639); their count is the steps (default: the run's)"),
]


def scatter_png(points: np.ndarray, size: int = 256, extent: Optional[float] = None) -> np.ndarray:
    """2-D points -> a uint8 (size, size, 1) scatter plot (white background, black points)."""
    ext = extent or float(np.abs(points).max() * 1.1 + 1e-6)
    img = np.full((size, size, 1), 255, dtype=np.uint8)
    ij = np.clip(((points[:, :2] / ext + 1) / 2 * (size - 1)).round().astype(int), 0, size - 1)
    img[size - 1 - ij[:, 1], ij[:, 0]] = 0
    return img


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DistillError(f"device={name}: not a device name (auto, cpu, cuda, cuda:0, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DistillError(f"device={name}: CUDA is not available here; use device=cpu")
    return dev


def check_steps(method, steps: int, key: str = "steps") -> None:
    if steps < 1:
        raise DistillError(f"{key}={steps}: must be at least 1")
    if not method.is_edm and steps > method.schedule.num_train_timesteps:
        raise DistillError(f"{key}={steps}: at most the schedule's num_train_timesteps "
                           f"({method.schedule.num_train_timesteps})")


def read_prompts(text: str) -> list[str]:
    """``prompts=``: a file with one prompt a line (read as ``dataset=prompts`` reads its file), or
    prompts separated by ``|``."""
    from distillkit.data import text_image

    if Path(text).expanduser().is_file():
        try:
            return text_image.read_prompts(text, key="prompts")
        except ValueError as e:
            raise DistillError(str(e)) from None
    prompts = [q.strip() for q in text.split("|") if q.strip()]
    if not prompts:
        raise DistillError(f"prompts={text}: no prompts (a file with one prompt a line, or prompts separated by |)")
    return prompts


def sampling_condition(method, num_samples: int, generator: torch.Generator, classes: Optional[str] = None,
                       prompts: Optional[list[str]] = None) -> dict:
    """The conditions of ``num_samples`` samples, drawn after the noise from the same generator (as
    the evaluation does): given classes or prompts repeated over the samples, else classes drawn
    uniformly. Errors name the argument."""
    den = method.student
    if classes is not None and den.condition != "class":
        raise DistillError(f"class={classes}: this model is not class-conditional")
    if prompts is not None and den.condition != "text":
        raise DistillError("prompts=...: this model is not a text-to-image model")
    if den.condition == "text":
        if prompts is None:
            raise DistillError("this model is a text-to-image model: give prompts=FILE or prompts='a cat|a dog'")
        from distillkit.data.text_image import repeat_to

        return den.encode_prompts(repeat_to(prompts, num_samples))
    if classes is not None:
        try:
            labels = [int(c) for c in str(classes).split(",") if c.strip()]
        except ValueError:
            raise DistillError(f"class={classes}: expected a class index or a comma list of them") from None
        return den.draw_condition(num_samples, classes=labels)
    return den.draw_condition(num_samples, generator)


def generate(method, num_samples: int, steps: int, seed: int = 0, batch_size: int = 500, use_ema: bool = True,
             spacing: Optional[str] = None, classes: Optional[str] = None, prompts: Optional[list[str]] = None,
             guidance: Optional[float] = None, return_cond: bool = False, decode: bool = True):
    """``num_samples`` samples (on CPU): one noise draw from ``seed`` (see the module docstring),
    then the conditions, sampled in slices of ``batch_size``; ``decode=False`` leaves a latent model's
    samples in its latent space (distill-pairs)."""
    from distillkit.models.denoiser import map_cond

    g0 = torch.Generator().manual_seed(seed)
    z = method.draw_noise(num_samples, g0).cpu()
    cond = map_cond(sampling_condition(method, num_samples, g0, classes, prompts), lambda v: v.cpu())
    # Later draws (a stochastic sampler's, a multi-step generator's re-noising) continue the same
    # generator, as a diffusers pipeline draws them after its latents: with one batch, the pipeline
    # given generator=torch.Generator().manual_seed(seed) makes the same draws.
    g = g0
    out = [method.sample_from_noise(z[i:i + batch_size], steps, use_ema=use_ema, spacing=spacing, generator=g,
                                    cond=map_cond(cond, lambda v: v[i:i + batch_size]), guidance=guidance,
                                    decode=decode).cpu()
           for i in range(0, num_samples, batch_size)]
    x = torch.cat(out)
    return (x, cond) if return_cond else x


def default_guidance(method) -> float:
    """The run's ``eval.guidance`` (1: none): the guidance distill-sample and distill-pairs default to."""
    return float(((method.run_config or {}).get("eval") or {}).get("guidance") or 1.0)


def load_for_sampling(args, prog: str, suffix: str, count_key: str):
    """What distill-sample and distill-pairs share before they sample: the checks of ``out``'s suffix,
    the count and the batch size, the run rebuilt from ``checkpoint`` on ``device``, its step count
    (``steps`` or the run's own) and the prompts. Returns (out, method, steps, prompts)."""
    from distillkit.models.loading import load_run_checkpoint

    out = Path(args.out).expanduser()
    if out.suffix != suffix:
        raise DistillError(f"out={args.out}: the file name must end in {suffix}")
    if getattr(args, count_key) < 1:
        raise DistillError(f"{count_key}={getattr(args, count_key)}: must be at least 1")
    if args.batch_size < 1:
        raise DistillError(f"batch_size={args.batch_size}: must be at least 1")
    device = _device(args.device)
    method = load_run_checkpoint(args.checkpoint)
    if not hasattr(method, "sample_from_noise"):
        raise DistillError(f"checkpoint={args.checkpoint}: method={method.method_name} does not generate samples; "
                           f"{prog} needs a diffusion run")
    steps = args.steps if args.steps is not None else method.num_steps
    check_steps(method, steps)
    method.to(device)
    prompts = read_prompts(args.prompts) if args.prompts is not None else None
    return out, method, steps, prompts


def set_sampling_times(method, text: str, steps: Optional[int]) -> int:
    """``timesteps=1023,639``: the times a consistency model (``method.sampling_timesteps``) or a few-step
    generator (``method.timesteps``) samples at, checked as the method checks its own
    (``use_sampling_times``); returns the steps."""
    try:
        times = [float(t) for t in text.split(",")]
    except ValueError:
        raise DistillError(f"timesteps={text}: give numbers separated by commas, e.g. timesteps=1023,639") from None
    if steps is not None and steps != len(times):
        raise DistillError(f"steps={steps} with timesteps={text}: the times set the steps ({len(times)}); give one of them")
    if not hasattr(method, "use_sampling_times"):
        raise DistillError(f"timesteps={text}: for consistency models and few-step generators (method=consistency, "
                           f"lcm, dmd, dmd2); method={method.method_name} samples on its schedule's grid: use steps=")
    try:
        method.use_sampling_times(times)
    except DistillError as e:
        raise DistillError(f"timesteps={text}: {e}") from None
    return len(times)


def run(argv: Sequence[str]) -> Path:
    args = parse_kv(argv, PROG, ARGS)
    out, method, steps, prompts = load_for_sampling(args, PROG, ".npz", "num_samples")
    if args.timesteps is not None:
        steps = set_sampling_times(method, args.timesteps, args.steps)
    guidance = default_guidance(method) if args.guidance is None else args.guidance
    x = generate(method, args.num_samples, steps, args.seed, args.batch_size, args.use_ema, args.spacing,
                 getattr(args, "class"), prompts, guidance)
    out.parent.mkdir(parents=True, exist_ok=True)
    if method.is_image:
        arr = to_uint8_nhwc(x)
        png = image_grid(x[:100], pad=2, scale=max(1, math.ceil(32 / max(x.shape[-2:]))))  # tiles >= 32 px
    else:
        arr = x.float().numpy()
        png = scatter_png(arr)
    tmp = out.with_name(f".{out.stem}.tmp.npz")
    np.savez(tmp, arr_0=arr)
    tmp.replace(out)
    save_png(png, out.with_suffix(".png"))
    print(f"{PROG}: wrote {out} ({arr.dtype} {'x'.join(map(str, arr.shape))}, {steps} steps, "
          f"{'EMA' if args.use_ema and method.ema is not None else 'raw'} weights) and {out.with_suffix('.png')}")
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    command_main(PROG, run, argv)


if __name__ == "__main__":
    main()
