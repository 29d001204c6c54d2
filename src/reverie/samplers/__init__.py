"""Samplers (stateless, one signature) and the resolver for the names other tools use."""

from .names import SamplerChoice, resolve, valid_names
from .solvers import SAMPLERS, BrownianNoise, StepInfo, check_sigmas, register

__all__ = ["SAMPLERS", "SamplerChoice", "StepInfo", "BrownianNoise", "check_sigmas", "register", "resolve",
           "valid_names"]
