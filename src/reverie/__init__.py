"""reverie: diffusion models built for real."""

from . import denoisers, guidance, samplers, schedules
from .denoisers import DiscreteDenoiser, FlowDenoiser
from .guidance import CFGDenoiser
from .pipeline import GenerationResult, Pipeline
from .samplers import SAMPLERS, resolve
from .schedules import DiscreteSchedule

__version__ = "0.1.0"
__all__ = ["CFGDenoiser", "DiscreteDenoiser", "DiscreteSchedule", "FlowDenoiser", "GenerationResult", "Pipeline", "SAMPLERS", "denoisers",
           "guidance", "resolve", "samplers", "schedules"]
