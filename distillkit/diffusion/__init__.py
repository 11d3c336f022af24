"""The diffusion core: noise schedules, parameterisations, samplers and Gaussian oracles.

Methods never compute alphas, sigmas or timestep grids themselves: they ask this package.
"""
from distillkit.diffusion.gaussian import GaussianData
from distillkit.diffusion.parameterization import (PRED_TYPES, EDMPrecond, canonical_pred_type, convert,
                                                   edm_precond, to_eps, to_v, to_x0, x0_eps)
from distillkit.diffusion.samplers import (classifier_free, ddim_sample, ddim_step, ddim_step_between,
                                           ddim_step_from_pred, euler_sample, guided, heun_sample, heun_step,
                                           multistep_sample)
from distillkit.diffusion.schedules import SPACINGS, KarrasSchedule, NoiseSchedule, expand_like, make_schedule

__all__ = [
    "NoiseSchedule", "KarrasSchedule", "make_schedule", "expand_like", "SPACINGS",
    "PRED_TYPES", "canonical_pred_type", "x0_eps", "to_x0", "to_eps", "to_v", "convert",
    "edm_precond", "EDMPrecond",
    "guided", "classifier_free", "ddim_step", "ddim_step_from_pred", "ddim_step_between", "ddim_sample",
    "multistep_sample", "euler_sample", "heun_step", "heun_sample",
    "GaussianData",
]
