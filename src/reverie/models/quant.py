"""fp8 weight storage with per-layer upcasting ("layerwise casting", as diffusers' enable_layerwise_casting).

FLUX.1's transformer is 24 GB in bf16 and 12 GB as the float8_e4m3fn files people download. Here the weights of
the Linear and Conv layers stay fp8 in memory; each such layer casts its own weight to the compute dtype just
for its call (a transient copy, one layer at a time), so no compute-dtype copy of the model ever exists. fp8 is
a storage format only: the matmuls run in the compute dtype (E4M3: 4 exponent bits, 3 mantissa bits, largest
value 448, no infinities; E5M2: 5 and 2. Micikevicius et al. 2022, "FP8 Formats for Deep Learning").

Which tensors are fp8: the weights of nn.Linear and nn.Conv1d/2d/3d layers, except those whose module name
matches a `skip` pattern. Everything else (biases, norm weights, embedding tables, buffers such as SD3's
pos_embed) is held in the compute dtype: a few percent of the bytes. diffusers skips by name only, with
DEFAULT_SKIP_MODULES_PATTERN = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$"); its "norm"
also catches every adaLN modulation Linear (norm1.linear, norm1_context.linear, norm.linear: 27% of FLUX.1's
parameters), which then stay bf16. Here norms are skipped by type (they are not Linear) and the modulation
Linears are fp8, as they are in ComfyUI's fp8 FLUX files; pass skip=DEFAULT_SKIP + ("norm",) for diffusers'
choice.

Scales: plain fp8 files (ComfyUI's flux1-dev-fp8) hold raw casts w.to(float8), and that is what is read and
written here. "Scaled fp8" files (ComfyUI's *_fp8_scaled: weight = fp8 * a per-tensor float32 scale_weight, or
weight_scale in its newer format) are refused with an error naming the key: applying the scales would need a
state-dict entry the diffusers-named modules do not have, so such a model could not be saved back or loaded
strictly like any other.

Caveat: `module.to(dtype)` casts every floating tensor, fp8 ones included, so it undoes the storage; move a
stored module with `module.to(device)`, or change its compute dtype with `to_keeping_fp8`.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..formats.safetensors_io import FormatError, _shortlist, load_state_dict_strict

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEFAULT_SKIP = ("pos_embed", "patch_embed", "^proj_in$", "^proj_out$")  # regexes over module names: stay as is
SCALE_KEYS = ("scale_weight", "scale_input", "weight_scale", "input_scale", "scaled_fp8")  # ComfyUI scaled fp8


def is_fp8_state_dict(state_dict: dict) -> bool:
    """True if any tensor of the state dict is stored in an fp8 dtype."""
    return any(isinstance(v, Tensor) and v.dtype in FP8_DTYPES for v in state_dict.values())


# ---------------------------------------------------------------- layers that upcast their weight per call

class Fp8Linear(nn.Linear):
    """nn.Linear whose weight is stored in fp8 and cast to compute_dtype for each call (bias: compute_dtype)."""

    compute_dtype: torch.dtype = torch.bfloat16  # set per layer by store_fp8

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(self.compute_dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, storage={self.weight.dtype}, compute={self.compute_dtype}"


class _Fp8Conv:
    """The conv counterpart of Fp8Linear (mixed into nn.Conv1d/2d/3d, whose _conv_forward takes the weight)."""

    compute_dtype: torch.dtype = torch.bfloat16

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight.to(self.compute_dtype), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, storage={self.weight.dtype}, compute={self.compute_dtype}"


class Fp8Conv1d(_Fp8Conv, nn.Conv1d):
    pass


class Fp8Conv2d(_Fp8Conv, nn.Conv2d):
    pass


class Fp8Conv3d(_Fp8Conv, nn.Conv3d):
    pass


UPCASTING = {nn.Linear: Fp8Linear, nn.Conv1d: Fp8Conv1d, nn.Conv2d: Fp8Conv2d, nn.Conv3d: Fp8Conv3d}
PLAIN = {fp8: plain for plain, fp8 in UPCASTING.items()}


def fp8_layers(module: nn.Module, skip: Sequence[str] = DEFAULT_SKIP) -> dict[str, nn.Module]:
    """{name: layer} of the layers whose weight may be stored in fp8: exactly nn.Linear / nn.Conv1d-3d (or their
    Fp8 versions; a subclass with its own forward is left alone), named by no `skip` regex (re.search)."""
    kinds = (*UPCASTING, *PLAIN)
    return {name: layer for name, layer in module.named_modules()
            if type(layer) in kinds and not any(re.search(pattern, name) for pattern in skip)}


def _weight_key(layer_name: str) -> str:
    return f"{layer_name}.weight" if layer_name else "weight"


# ---------------------------------------------------------------- making and loading fp8 state dicts

def quantize_fp8(module: nn.Module, *, dtype: torch.dtype = torch.float8_e4m3fn,
                 skip: Sequence[str] = DEFAULT_SKIP) -> dict[str, Tensor]:
    """The module's state dict with the weight of every fp8 layer (see fp8_layers) cast to `dtype`, a plain
    round-to-nearest cast without scale (as ComfyUI's fp8 files); every other tensor as it is.

    A weight beyond the fp8 range (E4M3: +-448) is refused: torch's cast would clip it without a word."""
    if dtype not in FP8_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, FP8_DTYPES))}; got {dtype}")
    weights = {_weight_key(name) for name in fp8_layers(module, skip)}
    limit = torch.finfo(dtype).max
    out = {}
    for key, value in module.state_dict().items():
        if key in weights and value.dtype not in FP8_DTYPES:
            peak = value.abs().max().item()
            if not peak <= limit:  # NaN too
                raise ValueError(f"{key}: max |weight| = {peak:g} is beyond {dtype}'s range +-{limit:g}; a plain "
                                 f"(unscaled) fp8 cast would clip it")
            value = value.to(dtype)
        out[key] = value
    return out


def refuse_scaled_fp8(state_dict: dict) -> None:
    """Raise FormatError if the state dict is a scaled-fp8 checkpoint (per-tensor scales next to the weights)."""
    scaled = [key for key in state_dict if key.rsplit(".", 1)[-1] in SCALE_KEYS]
    if scaled:
        raise FormatError(f"{scaled[0]}: this is a scaled-fp8 checkpoint (ComfyUI's *_fp8_scaled: each weight is "
                          f"fp8 times a per-tensor scale; scale keys: {_shortlist(scaled, 3)}). reverie reads plain "
                          f"fp8 casts only (as ComfyUI's flux1-dev-fp8) or bf16 / fp32 files; use one of those")


class _Shapes:
    """A module's state dict as meta tensors: load_state_dict_strict checks every key, shape and dtype kind
    against it, and its copy onto meta tensors writes nothing."""

    def __init__(self, module: nn.Module):
        self._own = {key: value.to("meta") for key, value in module.state_dict().items()}

    def state_dict(self) -> dict[str, Tensor]:
        return self._own


def store_fp8(module: nn.Module, state_dict: dict[str, Tensor] | None = None, *,
              compute_dtype: torch.dtype = torch.bfloat16, skip: Sequence[str] = DEFAULT_SKIP,
              device: torch.device | str | None = None, name: str = "model") -> nn.Module:
    """Load `state_dict` strictly into `module` keeping its fp8 tensors fp8, and make those layers upcast per call.

    The weight of each fp8 layer (see fp8_layers) that the state dict holds in fp8 is kept as given (no copy
    when `device` is None or already its device) and the layer becomes an Fp8Linear / Fp8Conv*d computing in
    `compute_dtype`; every other floating tensor is cast to compute_dtype (including fp8 weights of skipped
    layers: upcast once, here). The module may live on the meta device (built without allocating), so no
    fp32 or compute-dtype copy of the fp8 weights is ever made. With state_dict None, the module's own weights
    are quantized first (quantize_fp8, E4M3). Keys, shapes and dtype kinds are all checked before anything
    changes (reverie's strict load). Returns the module, in place."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {', '.join(map(str, COMPUTE_DTYPES))}; got {compute_dtype}")
    if state_dict is None:
        state_dict = quantize_fp8(module, skip=skip)
    refuse_scaled_fp8(state_dict)
    load_state_dict_strict(_Shapes(module), state_dict, name=name)
    layers = fp8_layers(module, skip)
    keep = {_weight_key(n) for n in layers if state_dict[_weight_key(n)].dtype in FP8_DTYPES}

    def stored(key: str, value: Tensor) -> Tensor:
        dtype = value.dtype if key in keep or not value.is_floating_point() else compute_dtype
        return value.to(device=device or value.device, dtype=dtype)

    persistent = module.state_dict().keys()
    stray = [key for key, buffer in module.named_buffers() if key not in persistent and buffer.is_meta]
    if stray:
        raise ValueError(f"cannot store {name} in fp8: non-persistent buffers {_shortlist(stray)} are on the meta "
                         f"device and no state dict fills them; build the module on a real device")
    module.load_state_dict({key: stored(key, state_dict[key]) for key in persistent}, strict=True, assign=True)
    for key, buffer in list(module.named_buffers()):
        if key not in persistent:  # e.g. position ids: same device and dtype rule as the rest
            owner, _, leaf = key.rpartition(".")
            module.get_submodule(owner).register_buffer(leaf, stored(key, buffer), persistent=False)
    for layer_name, layer in layers.items():
        if _weight_key(layer_name) in keep:
            layer.weight.requires_grad_(False)  # an fp8 weight cannot be trained in place
            layer.__class__ = UPCASTING.get(type(layer), type(layer))
            layer.compute_dtype = compute_dtype
        else:  # stored again from a file without fp8 for it: a plain layer once more
            layer.__class__ = PLAIN.get(type(layer), type(layer))
    return module


def to_keeping_fp8(module: nn.Module, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """module.to(device, dtype) for a module that may hold fp8 weights: those stay fp8 (and move to `device`),
    every other floating tensor is cast to `dtype`, and the fp8 layers then compute in `dtype`. On a module
    without fp8 weights it does what module.to does. Returns the module, in place."""
    if dtype is not None and dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, COMPUTE_DTYPES))}; got {dtype}")

    def cast(t: Tensor) -> Tensor:
        keep = not t.is_floating_point() or t.dtype in FP8_DTYPES
        return t.to(device=device or t.device, dtype=t.dtype if keep or dtype is None else dtype)

    module._apply(cast)  # what module.to applies to every parameter and buffer, in place
    if dtype is not None:
        for layer in module.modules():
            if isinstance(layer, (Fp8Linear, _Fp8Conv)):
                layer.compute_dtype = dtype
    return module


def parameter_bytes(module: nn.Module) -> dict[torch.dtype, int]:
    """Bytes held by the module's parameters and buffers, per dtype."""
    out: dict[torch.dtype, int] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        out[tensor.dtype] = out.get(tensor.dtype, 0) + tensor.numel() * tensor.element_size()
    return out
