"""Black Forest Labs' single-file FLUX.1 checkpoints (the `flux` reference code's names) <-> diffusers'
FluxTransformer2DModel state dicts, plus the ComfyUI-packed files that add text encoders and a VAE.

BFL fuses what diffusers keeps apart: q, k, v in one `qkv` Linear per stream of a double block, and q, k, v
and the MLP's up-projection in one `linear1` per single block; the final adaLN stores (shift, scale) where
diffusers' AdaLayerNormContinuous wants (scale, shift). Every size is read from the tensors' shapes (diffusers'
own converter hard-codes FLUX.1's width 3072), so tiny test models convert too, and every key must be
accounted for.
"""

from __future__ import annotations

import torch

from ..models.flux import FluxConfig
from .safetensors_io import FormatError, _plural, _shortlist

PREFIX = "model.diffusion_model."  # the transformer's prefix in LDM-style and some ComfyUI files
DETECT = "double_blocks.0.img_attn.norm.key_norm.scale"  # present in every FLUX.1 file (diffusers' test)
NOT_FLUX1 = ("single_stream_modulation.lin.weight",  # FLUX.2
             "distilled_guidance_layer.in_proj.bias",  # Chroma: FLUX.1-shaped blocks, no per-block modulation
             "early_stream_modulations.image.lin.weight")  # later BFL models
COMPONENT_PREFIXES = {  # ComfyUI-packed extras; the prefix is stripped
    "text_encoder": ("text_encoders.clip_l.transformer.",),  # CLIP-L, transformers' CLIPTextModel names
    "text_encoder_2": ("text_encoders.t5xxl.transformer.",),  # T5-XXL encoder, T5EncoderModel names
    "vae": ("vae.", "first_stage_model."),  # raw LDM autoencoder names (single_file.vae_module_map)
}
ROPE_AXES = (16, 56, 56)  # FLUX.1's rotary split of its 128-wide heads (not in the weights)
MLP_RATIO = 4  # FLUX.1's MLP width / model width; diffusers' blocks cannot express another

_LINEAR = ("weight", "bias")
_EMBEDDERS = {"time_in": "timestep_embedder", "vector_in": "text_embedder", "guidance_in": "guidance_embedder"}
_DOUBLE = {  # diffusers module (in transformer_blocks.i) -> BFL module (in double_blocks.i), Linears
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",  # both (shift, scale, gate) x 2
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                 "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}


# ---------------------------------------------------------------- detection

def _strip(state_dict: dict) -> dict:
    return {k.removeprefix(PREFIX): v for k, v in state_dict.items()}


def is_flux_checkpoint(state_dict: dict) -> bool:
    """A FLUX.1 transformer in BFL names (with or without `model.diffusion_model.`), not FLUX.2 or Chroma."""
    keys = set(state_dict)
    has = lambda key: key in keys or PREFIX + key in keys  # noqa: E731
    return has(DETECT) and not any(has(k) for k in NOT_FLUX1)


def flux_variant(state_dict: dict) -> str:
    """The release a BFL transformer's shapes match: "schnell" (no guidance embedder), else "fill" or "depth"
    (extra conditioning channels on img_in) or "dev".

    diffusers tells Fill and Depth by img_in's absolute width (384, 128 inputs); here by its ratio to the
    output (6x: latents + masked-image latents + packed mask; 2x: latents + depth latents), the same on the
    released models and meaningful for tiny ones."""
    sd = _strip(state_dict)
    if DETECT not in sd:
        raise FormatError(f"not a FLUX.1 checkpoint: no {DETECT} (optionally {PREFIX}-prefixed)")
    if "guidance_in.in_layer.bias" not in sd:
        return "schnell"
    ratio = _need(sd, "img_in.weight").shape[1] / _need(sd, "final_layer.linear.weight").shape[0]
    return {6: "fill", 2: "depth"}.get(ratio, "dev")


def _need(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise FormatError(f"FLUX checkpoint: missing {key}, needed to infer the model's layout")
    return sd[key]


def _indices(keys, prefix: str) -> list[int]:
    heads = (k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix))
    return sorted({int(h) for h in heads if h.isdigit()})


def _count(keys, prefix: str) -> int:
    found = _indices(keys, prefix)
    if found != list(range(len(found))):
        raise FormatError(f"FLUX checkpoint: {prefix}* block numbers are not 0..n-1: {_shortlist(found)}")
    return len(found)


def infer_flux_config(state_dict: dict, *, axes_dims_rope: list[int] | tuple[int, ...] | None = None) -> dict:
    """A diffusers FluxTransformer2DModel config dict from a BFL transformer's shapes.

    The head width is the length of the qk-norm scale, the model width img_in's output; heads = width / head
    width. The rotary split cannot be read from weights: FLUX.1's (16, 56, 56) is used for 128-wide heads,
    any other head width needs `axes_dims_rope=`."""
    sd = _strip(state_dict)
    if DETECT not in sd:
        raise FormatError(f"not a FLUX.1 checkpoint: no {DETECT} (optionally {PREFIX}-prefixed)")
    head_dim = sd[DETECT].shape[0]
    width, in_channels = _need(sd, "img_in.weight").shape
    out_channels = _need(sd, "final_layer.linear.weight").shape[0]
    if width % head_dim:
        raise FormatError(f"FLUX checkpoint: width {width} (img_in) is not a multiple of the head width "
                          f"{head_dim} ({DETECT})")
    mlp = _need(sd, "double_blocks.0.img_mlp.0.weight").shape[0]
    if mlp != MLP_RATIO * width:
        raise FormatError(f"FLUX checkpoint: MLP width {mlp} is not {MLP_RATIO} x the model width {width}")
    if axes_dims_rope is None:
        if head_dim != sum(ROPE_AXES):
            raise ValueError(f"axes_dims_rope is needed: the head width is {head_dim}, not FLUX.1's "
                             f"{sum(ROPE_AXES)}, and the rotary split is not stored in the weights; pass "
                             f"axes_dims_rope=[...] (even integers summing to {head_dim})")
        axes_dims_rope = ROPE_AXES
    return FluxConfig(
        patch_size=1, in_channels=in_channels, out_channels=None if out_channels == in_channels else out_channels,
        num_layers=_count(sd, "double_blocks."), num_single_layers=_count(sd, "single_blocks."),
        attention_head_dim=head_dim, num_attention_heads=width // head_dim,
        joint_attention_dim=_need(sd, "txt_in.weight").shape[1],
        pooled_projection_dim=_need(sd, "vector_in.in_layer.weight").shape[1],
        guidance_embeds="guidance_in.in_layer.weight" in sd, axes_dims_rope=tuple(axes_dims_rope)).to_dict()


# ---------------------------------------------------------------- the key layout

def _rules(num_layers: int, num_single_layers: int, guidance: bool) -> list[tuple[str, tuple[str, ...], str]]:
    """(BFL key, diffusers keys, how) for every tensor; how: "copy", "cat" (fused along dim 0) or "swap"
    (halves exchanged)."""
    rules = []

    def linear(bfl: str, diffusers: str, how: str = "copy") -> None:
        rules.extend((f"{bfl}.{p}", (f"{diffusers}.{p}",), how) for p in _LINEAR)

    for bfl, name in _EMBEDDERS.items():
        if bfl != "guidance_in" or guidance:
            linear(f"{bfl}.in_layer", f"time_text_embed.{name}.linear_1")
            linear(f"{bfl}.out_layer", f"time_text_embed.{name}.linear_2")
    linear("txt_in", "context_embedder")
    linear("img_in", "x_embedder")
    for i in range(num_layers):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for ours, theirs in _DOUBLE.items():
            linear(b + theirs, d + ours)
        rules.extend((f"{b}{theirs}.scale", (f"{d}{ours}.weight",), "copy") for ours, theirs in _DOUBLE_NORMS.items())
        for stream, parts in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            rules.extend((f"{b}{stream}_attn.qkv.{p}", tuple(f"{d}attn.{q}.{p}" for q in parts), "cat")
                         for p in _LINEAR)
    for i in range(num_single_layers):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        linear(b + "modulation.lin", d + "norm.linear")
        linear(b + "linear2", d + "proj_out")
        rules.extend((f"{b}{theirs}.scale", (f"{d}{ours}.weight",), "copy") for ours, theirs in _SINGLE_NORMS.items())
        rules.extend((f"{b}linear1.{p}", tuple(f"{d}{q}.{p}" for q in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                        "proj_mlp")), "cat") for p in _LINEAR)
    linear("final_layer.linear", "proj_out")
    linear("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")
    return rules


def _swap(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def _check_keys(given, expected, label: str) -> None:
    missing, unknown = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unknown:
        parts = [f"{_plural(len(missing), 'missing key')}: {_shortlist(missing)}"] if missing else []
        parts += [f"{_plural(len(unknown), 'unexpected key')}: {_shortlist(unknown)}"] if unknown else []
        raise FormatError(f"{label}: " + "; ".join(parts))


def flux_transformer_to_diffusers(state_dict: dict, config: dict | FluxConfig) -> dict:
    """BFL transformer (keys with or without `model.diffusion_model.`) -> diffusers FluxTransformer2DModel
    names, for the diffusers `config` (e.g. from infer_flux_config). Fused tensors are split into views."""
    c = config if isinstance(config, FluxConfig) else FluxConfig.from_dict(config)
    sd = _strip(state_dict)
    rules = _rules(c.num_layers, c.num_single_layers, c.guidance_embeds)
    _check_keys(sd, [bfl for bfl, _, _ in rules], "FLUX checkpoint (BFL names) for the given config")
    inner = c.inner_dim
    out = {}
    for bfl, names, how in rules:
        x = sd[bfl]
        if how == "swap":
            x = (_swap(x),)
        elif how == "cat":  # qkv: three equal parts; linear1: q, k, v (model width each), then the MLP
            sizes = [inner] * 3 + [x.shape[0] - 3 * inner] * (len(names) - 3)
            if sum(sizes) != x.shape[0] or min(sizes) < 1:
                raise FormatError(f"FLUX checkpoint: {bfl} has {x.shape[0]} rows; the config's width {inner} "
                                  f"needs {len(names)} parts {sizes}")
            x = x.split(sizes, dim=0)
        else:
            x = (x,)
        out.update(zip(names, x))
    return out


def flux_transformer_to_original(diffusers_state_dict: dict) -> dict:
    """diffusers FluxTransformer2DModel state dict -> BFL names (no prefix), the inverse of
    flux_transformer_to_diffusers; the layout is read from the keys."""
    sd = diffusers_state_dict
    rules = _rules(_count(sd, "transformer_blocks."), _count(sd, "single_transformer_blocks."),
                   "time_text_embed.guidance_embedder.linear_1.weight" in sd)
    _check_keys(sd, [n for _, names, _ in rules for n in names], "FluxTransformer2DModel state dict")
    out = {}
    for bfl, names, how in rules:
        parts = [sd[n] for n in names]
        out[bfl] = _swap(parts[0]) if how == "swap" else torch.cat(parts, dim=0) if how == "cat" else parts[0]
    return out


# ---------------------------------------------------------------- whole files

def split_flux_checkpoint(state_dict: dict) -> dict[str, dict]:
    """A FLUX single file -> {"transformer", "text_encoder", "text_encoder_2", "vae"} (those present), each with
    its prefix stripped: the transformer in BFL names (convert with flux_transformer_to_diffusers), CLIP-L and
    T5-XXL in transformers' names, the VAE in raw LDM names. Keys of no known component are refused."""
    out = {}
    for key, value in state_dict.items():
        for name, prefixes in COMPONENT_PREFIXES.items():
            prefix = next((p for p in prefixes if key.startswith(p)), None)
            if prefix is not None:
                out.setdefault(name, {})[key[len(prefix):]] = value
                break
        else:
            out.setdefault("transformer", {})[key.removeprefix(PREFIX)] = value
    transformer = out.get("transformer", {})
    if DETECT not in transformer:
        raise FormatError(f"not a FLUX.1 checkpoint: no {DETECT} (optionally {PREFIX}-prefixed)")
    if not is_flux_checkpoint(transformer):
        raise FormatError("FLUX checkpoint: this is a FLUX.2 / Chroma-style file, not FLUX.1")
    layout = _rules(_count(transformer, "double_blocks."), _count(transformer, "single_blocks."),
                    "guidance_in.in_layer.weight" in transformer)
    unknown = sorted(set(transformer) - {bfl for bfl, _, _ in layout})
    if unknown:
        raise FormatError(f"FLUX checkpoint: {_plural(len(unknown), 'key')} of no known component: "
                          f"{_shortlist(unknown)}")
    return out
