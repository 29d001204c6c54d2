"""reverie: diffusion models built for real."""

from . import denoisers, guidance, samplers, schedules
from .denoisers import DiscreteDenoiser, FlowDenoiser
from .guidance import CFGDenoiser
from .samplers import SAMPLERS, resolve
from .schedules import DiscreteSchedule

__version__ = "0.1.0"
__all__ = ["CFGDenoiser", "DiscreteDenoiser", "DiscreteSchedule", "FlowDenoiser", "SAMPLERS", "denoisers",
           "guidance", "resolve", "samplers", "schedules"]
