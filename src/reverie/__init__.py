"""reverie: diffusion models built for real."""

import logging

# transformers imports torchao whenever it is installed (the quant extra), and torchao's import warns that it cannot
# load its CUDA-only kernels on a machine without them: noise on every command, about nothing reverie uses
logging.getLogger("torchao").setLevel(logging.ERROR)

from . import denoisers, guidance, samplers, schedules  # noqa: E402
from .denoisers import DiscreteDenoiser, FlowDenoiser  # noqa: E402
from .guidance import CFGDenoiser  # noqa: E402
from .pipeline import GenerationResult, Pipeline  # noqa: E402
from .samplers import SAMPLERS, resolve  # noqa: E402
from .schedules import DiscreteSchedule  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CFGDenoiser", "DiscreteDenoiser", "DiscreteSchedule", "FlowDenoiser", "GenerationResult", "Pipeline", "SAMPLERS", "denoisers",
           "guidance", "resolve", "samplers", "schedules"]
