"""The ``schedule`` config group -> a schedule object from :func:`make_schedule`.

    schedule=linear | cosine | scaled_linear   -> NoiseSchedule (VP, T = num_train_timesteps)
    schedule=edm                               -> KarrasSchedule (Karras et al. 2022)
    schedule=none                              -> no schedule (classifier distillation)

The sampling settings of the group (``num_steps``, ``spacing``, ``eta``, EDM's ``solver``) are
read by whoever samples; this module only builds the noise levels.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

from distillkit.diffusion.schedules import KarrasSchedule, NoiseSchedule, make_schedule
from distillkit.errors import DistillError

VP_NAMES = ("linear", "cosine", "scaled_linear")
SCHEDULE_NAMES = VP_NAMES + ("edm",)
EDM_KEYS = ("sigma_min", "sigma_max", "rho", "sigma_data", "p_mean", "p_std")


def plain(v: Any) -> Any:
    """An Enum member (as Hydra passes enum-typed config fields) -> its value."""
    return getattr(v, "value", v)


def schedule_from_config(cfg: Optional[Mapping]) -> Optional[Union[NoiseSchedule, KarrasSchedule]]:
    """Build the schedule of a ``schedule`` group node (a plain dict); None for ``schedule=none``."""
    if not cfg:
        return None
    name = plain(cfg.get("name", "none"))
    if name == "none":
        return None
    if name == "edm":
        return make_schedule("edm", **{k: float(cfg[k]) for k in EDM_KEYS if cfg.get(k) is not None})
    if name in VP_NAMES:
        kw = {k: cfg[k] for k in ("beta_start", "beta_end") if cfg.get(k) is not None}
        return make_schedule(name, num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
                             rescale_betas_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)), **kw)
    raise DistillError(f"schedule.name={name!r}: allowed values are {', '.join(SCHEDULE_NAMES)} "
                       "(or schedule=none for classifier distillation)")
