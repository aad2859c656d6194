"""Sampling math (the scheduler half): sigma schedules, ODE and SDE steps with log-probs."""

from refrl.sampling.schedules import shift_sigmas, sigma_schedule
from refrl.sampling.sde import (
    SDE_KINDS,
    gaussian_log_prob,
    ode_step,
    sde_step,
    x0_from_velocity,
)

__all__ = [
    "SDE_KINDS",
    "gaussian_log_prob",
    "ode_step",
    "sde_step",
    "shift_sigmas",
    "sigma_schedule",
    "x0_from_velocity",
]
