"""fastgen.diffusion: noise schedules, prediction conversions, samplers and consistency-model helpers.

Small pure functions over tensors, checked against the diffusers schedulers (DDIM, LCM, FlowMatchEuler).
"""

from fastgen.diffusion.consistency import (
    consistency_output,
    consistency_scalings,
    flow_skip_grid,
    flux_mu,
    pipeline_flow_sigmas,
    lcm_timesteps,
    multistep_consistency_sample,
    randn_like_diffusers,
)
from fastgen.diffusion.predictions import (
    PREDICTION_TYPES,
    append_dims,
    convert,
    expand_like,
    from_x0_eps,
    to_eps,
    to_x0,
    to_x0_eps,
)
from fastgen.diffusion.schedule import (
    BETA_SCHEDULES,
    NoiseSchedule,
    betas_from_config,
    static_shift,
    time_shift_exponential,
)
from fastgen.diffusion.solvers import (
    TIMESTEP_SPACINGS,
    ddim_sde_step,
    ddim_step,
    ddim_timesteps,
    euler_flow_step,
    flow_sigmas,
    sample_ddim,
    sample_flow_euler,
    sde_teacher_move,
    skip_grid,
    substep_grid,
)

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "TIMESTEP_SPACINGS",
    "NoiseSchedule",
    "append_dims",
    "betas_from_config",
    "consistency_output",
    "consistency_scalings",
    "flow_skip_grid",
    "flux_mu",
    "pipeline_flow_sigmas",
    "convert",
    "ddim_sde_step",
    "ddim_step",
    "ddim_timesteps",
    "euler_flow_step",
    "expand_like",
    "flow_sigmas",
    "from_x0_eps",
    "lcm_timesteps",
    "multistep_consistency_sample",
    "randn_like_diffusers",
    "sample_ddim",
    "sample_flow_euler",
    "sde_teacher_move",
    "skip_grid",
    "static_shift",
    "substep_grid",
    "time_shift_exponential",
    "to_eps",
    "to_x0",
    "to_x0_eps",
]
