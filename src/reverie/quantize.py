"""Cheaper network weights on the CPU (and GPU): fp8 storage with per-layer upcast (reverie.models.quant), and
int8 through torchao (the quant extra: pip install -e ".[quant]").

    fp8           Linear and Conv weights stored as float8_e4m3fn (1 byte), cast to the compute dtype per call
    int8-weight   Linear weights int8 with one scale per output channel (torchao Int8WeightOnlyConfig)
    int8-dynamic  the same weights, and each call's activations quantized to int8 per token, so the matmuls run
                  in int8 (torchao Int8DynamicActivationInt8WeightConfig)

Only the denoising network is quantized (it holds nearly all the weights and all the steps' compute); the text
encoders and the VAE keep their dtype. What each costs and saves here: docs/speed.md (bench/quantize.py).
"""

from __future__ import annotations

import io
import warnings

import torch
from torch import nn

MODES = ("fp8", "int8-weight", "int8-dynamic")


def quantize_network(network: nn.Module, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    """Quantize `network` in place (see MODES); compute_dtype: the pipeline's (fp8 layers upcast to it)."""
    if mode not in MODES:
        raise ValueError(f"quantize must be one of {list(MODES)}; got {mode!r}")
    if mode == "fp8":
        from .models.quant import store_fp8

        return store_fp8(network, compute_dtype=compute_dtype, name="network")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                              quantize_)
    except ImportError:
        raise ValueError(f"quantize {mode}: needs torchao (pip install -e '.[quant]')") from None
    config = Int8WeightOnlyConfig() if mode == "int8-weight" else Int8DynamicActivationInt8WeightConfig()
    quantize_(network, config)
    return network


def weight_bytes(module: nn.Module) -> int:
    """The bytes of a module's state dict as torch.save writes it (quantized tensors included, whatever their
    layout): what the weights take in memory, give or take the container."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.tell()
