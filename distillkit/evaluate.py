"""``distill-eval``: FID / IS of a file of samples against a dataset's training split.

    distill-eval samples=samples.npz dataset=digits
    distill-eval samples=samples.npz dataset=digits num_samples=700 out=fid.json
    distill-eval samples=s.npz dataset=cifar10 dataset.data_dir=/data/cifar-10-batches-py \\
        inception_weights=/models/pt_inception-2015-12-05-6726825d.pth

Samples are exchanged as ``.npz`` with key ``arr_0``: uint8, N x H x W x C (the ADM / EDM
evaluation convention; ``distill-sample`` writes it). Arguments (key=value):

  samples            the .npz file (required)
  dataset            a dataset option (default digits); dataset.<key>=value passes options on
  split              the reference split (default train)
  num_samples        score the first this many samples (default: all). FID depends on the
                     count: digits-FID is reported at 700, the size of the floor's set
  feature_net        digits | inception (default: digits for dataset=digits, else inception)
  inception_weights  local Inception-v3 weights for feature_net=inception
  cache_dir          real-statistics cache (default ~/.cache/distillkit/fid_stats)
  batch_size         feature-extraction batch (default 256)
  seed               seed of IS's random split (default 0)
  out                also write the result as JSON here

Text-to-image samples (``distill-sample prompts=...`` writes sample i with prompt i, the prompts
repeated over the samples) are scored against real images from files and their prompts:

    distill-eval samples=s.npz reference_images=/data/coco/val2014 resolution=256 \
        inception_weights=/models/pt_inception-2015-12-05-6726825d.pth \
        prompts=/data/coco/annotations/captions_val2014.json clip_weights=/models/clip-vit-large-patch14

  reference_images   a folder of image files: the FID reference instead of a dataset's split
                     (each centre-cropped and resized with Lanczos to the evaluation resolution)
  num_reference      the first this many reference images, sorted by path (default: all)
  resolution         centre-crop and resize the samples (and the reference) to this (default:
                     the samples' size)
  prompts            the samples' prompts: a file with one a line, or COCO's captions JSON (the
                     first caption of each image, in id order), repeated over the samples
  clip_weights       a local transformers CLIPModel folder: adds clip_score (needs prompts)
  clip_prefix        put before every prompt for the CLIP score (DMD2: "A photo depicts ")
  feature_net=none   no FID / IS (the CLIP score alone)

See distillkit.callbacks.evaluation and docs/coco_evaluation.md.

Errors print one line naming the argument and exit with status 2.
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from distillkit.errors import DistillError

KEYS = ("samples", "dataset", "split", "num_samples", "feature_net", "inception_weights", "cache_dir",
        "batch_size", "seed", "out", "reference_images", "num_reference", "resolution", "prompts", "clip_weights",
        "clip_prefix")
# the arguments of text-to-image evaluation (real images from files, CLIP score)
TEXT_KEYS = ("reference_images", "num_reference", "resolution", "prompts", "clip_weights", "clip_prefix")


def fail(message: str) -> None:
    print(f"distill-eval: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    args: dict[str, str] = {}
    dataset_overrides: list[str] = []
    for a in argv:
        if "=" not in a:
            raise DistillError(f"arguments are key=value, got {a!r} (see distill-eval --help)")
        k, v = a.split("=", 1)
        if k.startswith("dataset."):
            dataset_overrides.append(a)
        elif k in KEYS:
            args[k] = v
        else:
            import difflib

            close = difflib.get_close_matches(k, KEYS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise DistillError(f"unknown argument '{k}'.{hint} Allowed: {', '.join(KEYS)}, dataset.<key>")
    if "samples" not in args:
        raise DistillError("samples=FILE.npz is required (uint8 N x H x W x C under key arr_0)")
    return args, dataset_overrides


def _int(args: dict[str, str], key: str, default: Optional[int]) -> Optional[int]:
    if key not in args:
        return default
    try:
        return int(args[key])
    except ValueError:
        raise DistillError(f"{key}={args[key]!r}: expected an integer") from None


def load_samples(path: str) -> Any:
    """The uint8 N x H x W x C array of a samples .npz (checked)."""
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise DistillError(f"samples={path}: no such file")
    try:
        with np.load(p, allow_pickle=False) as f:
            if "arr_0" not in f.files:
                raise DistillError(f"samples={path}: no array 'arr_0' (found: {', '.join(f.files) or 'none'}); "
                                   "samples are uint8 N x H x W x C under key arr_0")
            a = f["arr_0"]
    except DistillError:
        raise
    except Exception as e:
        reason = str(e).split(". ")[0]
        raise DistillError(f"samples={path}: not a readable .npz file ({type(e).__name__}: {reason})") from None
    if a.dtype != np.uint8:
        raise DistillError(f"samples={path}: arr_0 has dtype {a.dtype}; expected uint8 (0..255)")
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise DistillError(f"samples={path}: arr_0 has shape {tuple(a.shape)}; expected N x H x W x C with C 1 or 3")
    if a.shape[0] < 2:
        raise DistillError(f"samples={path}: FID needs at least 2 samples, the file has {a.shape[0]}")
    return a


def load_datamodule(dataset: str, overrides: list[str]) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf.errors import MissingMandatoryValue

    from distillkit.compose import explain_compose_error, register_resolvers
    from distillkit.config import register_configs
    from distillkit.paths import CONF_DIR

    register_configs()
    register_resolvers()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="distill_eval"):
        try:
            cfg = compose(config_name="config", overrides=[f"dataset={dataset}", *overrides])
        except Exception as e:
            if "Could not find 'dataset/" in str(e):
                options = sorted(p.stem for p in (Path(CONF_DIR) / "dataset").glob("*.yaml"))
                raise DistillError(f"dataset={dataset}: allowed values are {', '.join(options)}") from None
            raise DistillError(explain_compose_error(e, [f"dataset={dataset}", *overrides]).replace("\n", " ")) from None
    try:
        dm = instantiate(cfg.dataset, _convert_="all")
        dm.prepare_data()
        dm.setup("fit")
    except MissingMandatoryValue as e:
        raise DistillError(f"dataset={dataset} needs {e.full_key}=...") from None
    except (FileNotFoundError, ValueError) as e:
        raise DistillError(f"dataset={dataset}: {e}") from None
    return dm


def evaluate(argv: list[str]) -> dict[str, Any]:
    args, overrides = parse_args(argv)
    dataset = args.get("dataset", "digits")
    split = args.get("split", "train")
    a = load_samples(args["samples"])
    n = _int(args, "num_samples", None)
    if n is not None:
        if n < 2 or n > len(a):
            raise DistillError(f"num_samples={n}: the file has {len(a)} samples (at least 2 are needed)")
        a = a[:n]

    if any(k in args for k in TEXT_KEYS) or args.get("feature_net") == "none":
        return evaluate_files(args, overrides, a)

    import torch

    from distillkit.metrics.fid import DIGITS_NUM_SAMPLES, SampleScorer
    from distillkit.metrics.images import from_uint8_nhwc, split_images

    dm = load_datamodule(dataset, overrides)
    c, h, w = (int(v) for v in dm.image_shape)
    if tuple(a.shape[1:]) != (h, w, c):
        raise DistillError(f"samples={args['samples']}: arr_0 has images of {a.shape[1]} x {a.shape[2]} x {a.shape[3]} "
                           f"(H x W x C); dataset={dataset} has {h} x {w} x {c}")
    feature_net = args.get("feature_net", "digits" if dataset == "digits" else "inception")
    try:
        scorer = SampleScorer(feature_net, args.get("inception_weights"),
                              batch_size=_int(args, "batch_size", 256) or 256)
    except DistillError as e:  # its messages name the eval.* config keys; here they are arguments
        raise DistillError(str(e).replace("eval.", "")) from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        real = split_images(dm, split)
    except ValueError as e:
        raise DistillError(f"split={split}: {e}") from None
    stats = scorer.reference(real, dataset, split, args.get("cache_dir"), device=device)
    res = scorer.score(from_uint8_nhwc(a), stats, seed=_int(args, "seed", 0) or 0, device=device)
    res = {"samples": str(args["samples"]), "dataset": dataset, "split": split, "reference_size": len(real), **res}
    print(f"{args['samples']}: {res['num_samples']} samples vs {dataset}/{split} ({len(real)} images), "
          f"feature net {res['feature_net']}")
    print(f"fid {res['fid']:.4f}  is {res['is']:.4f} +- {res['is_std']:.4f}")
    if feature_net == "digits" and res["num_samples"] != DIGITS_NUM_SAMPLES:
        print(f"note: digits-FID is reported at {DIGITS_NUM_SAMPLES} samples (the floor's count); "
              f"FID at {res['num_samples']} samples is not comparable to it")
    if args.get("out"):
        out = Path(args["out"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
    return res


def _rekey(e: DistillError) -> DistillError:
    """Messages of the shared code name the eval.* config keys; here they are arguments."""
    return DistillError(str(e).replace("eval.", ""))


def evaluate_files(args: dict[str, str], overrides: list[str], a: Any) -> dict[str, Any]:
    """Text-to-image samples: FID / IS against ``reference_images``, CLIP score against ``prompts``,
    batch by batch (see the module docstring)."""
    import torch

    from distillkit.callbacks.evaluation import folder_statistics, read_eval_prompts, resize_uint8
    from distillkit.data.text_image import repeat_to
    from distillkit.metrics.fid import _batches, fid_metric, is_metric

    if "dataset" in args or overrides:
        raise DistillError("give either dataset= (FID against a dataset's split) or reference_images= (against image "
                           "files), not both")
    feature_net = args.get("feature_net", "inception")
    if feature_net != "none" and "reference_images" not in args:
        raise DistillError("reference_images=DIR is needed for FID with prompts / clip_weights / resolution (or "
                           "feature_net=none for the CLIP score alone)")
    if "clip_weights" in args and "prompts" not in args:
        raise DistillError("clip_weights=... needs prompts=FILE (the samples' prompts, in the samples' order)")
    if feature_net == "none" and "clip_weights" not in args:
        raise DistillError("feature_net=none and no clip_weights: nothing to score")
    resolution = _int(args, "resolution", None)
    if resolution is not None and resolution < 1:
        raise DistillError(f"resolution={resolution}: must be at least 1")
    size = (resolution, resolution) if resolution else (int(a.shape[1]), int(a.shape[2]))
    batch_size = _int(args, "batch_size", 256) or 256
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prompts = None
    if "prompts" in args:
        try:
            prompts = repeat_to(read_eval_prompts(args["prompts"], key="prompts"), len(a))
        except DistillError as e:
            raise _rekey(e) from None
    res: dict[str, Any] = {"samples": str(args["samples"])}
    scorer = clip = None
    try:
        if feature_net != "none":
            from distillkit.metrics.fid import SampleScorer

            scorer = SampleScorer(feature_net, args.get("inception_weights"), batch_size=batch_size)
            stats = folder_statistics(scorer, args["reference_images"], size, _int(args, "num_reference", None),
                                      args.get("cache_dir"), device=device, key="reference_images")
            fid = fid_metric(scorer.net).to(device)
            isc = is_metric(scorer.net, scorer.is_splits).to(device)
            fid.real_features_sum = stats["features_sum"].to(device, torch.float64)
            fid.real_features_cov_sum = stats["features_cov_sum"].to(device, torch.float64)
            fid.real_features_num_samples = stats["num_samples"].to(device, torch.long)
            res.update(reference_images=args["reference_images"], reference_size=int(stats["num_samples"]))
        if "clip_weights" in args:
            from distillkit.metrics.clip_score import ClipScorer

            clip = ClipScorer(args["clip_weights"], prefix=args.get("clip_prefix", ""), key="clip_weights")
            clip_metric = clip.metric(device)
    except DistillError as e:
        raise _rekey(e) from None
    for i, chunk in enumerate(_batches(a, batch_size)):
        u8 = resize_uint8(torch.from_numpy(chunk).permute(0, 3, 1, 2).contiguous(), size).to(device)
        if scorer is not None:
            xf = u8.float() / 127.5 - 1.0
            fid.update(xf, real=False)
            isc.update(xf)
        if clip is not None:
            start = i * batch_size
            clip.update(clip_metric, u8, prompts[start:start + len(u8)])  # type: ignore[index]
    if scorer is not None:
        res["fid"] = float(fid.compute())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_int(args, "seed", 0) or 0)
            is_mean, is_std = isc.compute()
        res.update({"is": float(is_mean), "is_std": float(is_std), "feature_net": scorer.net_id})
    if clip is not None:
        res.update(clip_score=float(clip_metric.compute()), clip_model=clip.net_id, prompts=args["prompts"],
                   clip_prefix=clip.prefix)
    res.update(num_samples=len(a), resolution=list(size))
    print(f"{args['samples']}: {len(a)} samples at {size[0]}x{size[1]}"
          + (f" vs {args['reference_images']} ({res['reference_size']} images), feature net {res['feature_net']}"
             if scorer is not None else ""))
    if scorer is not None:
        print(f"fid {res['fid']:.4f}  is {res['is']:.4f} +- {res['is_std']:.4f}")
    if clip is not None:
        print(f"clip_score {res['clip_score']:.4f} ({res['clip_model']})")
    if args.get("out"):
        out = Path(args["out"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2) + "\n")
    return res


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        return
    warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
    try:
        evaluate(argv)
    except DistillError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
