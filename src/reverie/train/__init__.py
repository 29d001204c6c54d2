"""Training: one loop for the VAE and the latent denoiser (+ text encoder), exact resume, DDP, export.

    from reverie.train import load_config, train
    result = train(load_config("configs/shapes_unet.toml", ["--train.steps=100"]))
"""

from .config import (
           Config,
           DataConfig,
           LogConfig,
           ModelConfig,
           OptimConfig,
           TrainConfig,
           load_config,
)
from .loop import NonFiniteLossError, TrainResult, train

__all__ = ["Config", "DataConfig", "LogConfig", "ModelConfig", "NonFiniteLossError", "OptimConfig", "TrainConfig",
           "TrainResult", "load_config", "train"]
