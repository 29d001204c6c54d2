"""Stability AI's single-file SD3 / SD3.5 checkpoints (the `sd3-ref` / ComfyUI MMDiT names) <-> diffusers'
SD3Transformer2DModel state dicts, plus the other components such files bundle (VAE, CLIP-L, CLIP-G, T5-XXL).

Stability fuses q, k, v into one `qkv` Linear per stream (and per attn2), and its continuous adaLN (the final
layer and the last block's text norm) stores (shift, scale) where diffusers' AdaLayerNormContinuous wants
(scale, shift). Every size is read from the tensors' shapes, so tiny test models convert too, and every key
must be accounted for.
"""

from __future__ import annotations

import math

import torch

from ..models.mmdit import MMDiTConfig
from .flux_single_file import _check_keys, _swap
from .safetensors_io import FormatError, _shortlist

PREFIX = "model.diffusion_model."  # the transformer's prefix in Stability's files (optional)
DETECT = "joint_blocks.0.context_block.adaLN_modulation.1.bias"  # diffusers' SD3 detection key
COMPONENT_PREFIXES = {  # the other components of a bundled file; the prefix is stripped
    "vae": "first_stage_model.",  # raw LDM autoencoder names (single_file.vae_module_map)
    "text_encoder": "text_encoders.clip_l.transformer.",  # CLIP-L, transformers' CLIPTextModel names
    "text_encoder_2": "text_encoders.clip_g.transformer.",  # OpenCLIP bigG, transformers' names
    "text_encoder_3": "text_encoders.t5xxl.transformer.",  # T5-XXL encoder, T5EncoderModel names
}
HEAD_WIDTH = 64  # every released SD3/3.5 (heads = width / 64 = num_layers); not stored without qk-norm
SAMPLE_SIZE = 128  # every release: 1024 px / 8; not stored in the weights
MLP_RATIO = 4  # diffusers' blocks cannot express another

_LINEAR = ("weight", "bias")


# ---------------------------------------------------------------- detection and layout

def _strip(state_dict: dict) -> dict:
    return {k.removeprefix(PREFIX): v for k, v in state_dict.items()}


def is_sd3_checkpoint(state_dict: dict) -> bool:
    """An SD3 / SD3.5 MMDiT in Stability's names, with or without `model.diffusion_model.`."""
    return DETECT in state_dict or PREFIX + DETECT in state_dict


def _indices(keys, prefix: str) -> list[int]:
    found = (k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix))
    return sorted({int(i) for i in found if i.isdigit()})


def _count(keys, prefix: str) -> int:
    found = _indices(keys, prefix)
    if not found or found != list(range(len(found))):
        raise FormatError(f"SD3 checkpoint: {prefix}* block numbers are not 0..n-1: {_shortlist(found)}")
    return len(found)


def _layout(sd: dict) -> tuple[int, tuple[int, ...], bool]:
    """(num_layers, dual_attention_layers, qk_norm) of a transformer in Stability's names."""
    n = _count(sd, "joint_blocks.")
    dual = tuple(i for i in range(n) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd)
    return n, dual, any(".attn.ln_q." in k for k in sd)


def _need(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise FormatError(f"SD3 checkpoint: missing {key}, needed to infer the model's layout")
    return sd[key]


def infer_mmdit_config(state_dict: dict, *, attention_head_dim: int | None = None,
                       sample_size: int = SAMPLE_SIZE) -> dict:
    """A diffusers SD3Transformer2DModel config dict from a Stability transformer's shapes.

    The head width is the length of the qk-norm scale (SD3.5); without qk-norm (SD3) it is not stored and
    `attention_head_dim` (default 64, that of every release, whose head count then equals num_layers as in
    diffusers' conversion script) must divide the width. sample_size sets only the pipeline's default size
    (the position table itself is stored)."""
    sd = _strip(state_dict)
    if DETECT not in sd:
        raise FormatError(f"not an SD3 checkpoint: no {DETECT} (optionally {PREFIX}-prefixed)")
    num_layers, dual, qk_norm = _layout(sd)
    width, in_channels, patch, patch_w = _need(sd, "x_embedder.proj.weight").shape
    if patch != patch_w:
        raise FormatError(f"SD3 checkpoint: x_embedder.proj has a {patch}x{patch_w} kernel; patches are square")
    if qk_norm:
        stored = _need(sd, "joint_blocks.0.x_block.attn.ln_q.weight").shape[0]
        if attention_head_dim not in (None, stored):
            raise ValueError(f"attention_head_dim={attention_head_dim} contradicts the checkpoint's qk-norm "
                             f"width {stored}")
        attention_head_dim = stored
    head_dim = attention_head_dim or HEAD_WIDTH
    if width % head_dim:
        raise ValueError(f"attention_head_dim must divide the model width {width}; got {head_dim} (the head width "
                         f"is not stored without qk-norm: pass attention_head_dim=...)")
    table = _need(sd, "pos_embed").shape[1]
    side = math.isqrt(table)
    if side * side != table:
        raise FormatError(f"SD3 checkpoint: pos_embed has {table} positions, not a square table")
    mlp = _need(sd, "joint_blocks.0.x_block.mlp.fc1.weight").shape[0]
    if mlp != MLP_RATIO * width:
        raise FormatError(f"SD3 checkpoint: MLP width {mlp} is not {MLP_RATIO} x the model width {width}")
    caption, joint = _need(sd, "context_embedder.weight").shape
    return MMDiTConfig(
        sample_size=sample_size, patch_size=patch, in_channels=in_channels, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=width // head_dim, joint_attention_dim=joint,
        caption_projection_dim=caption, pooled_projection_dim=_need(sd, "y_embedder.mlp.0.weight").shape[1],
        out_channels=_need(sd, "final_layer.linear.weight").shape[0] // (patch * patch), pos_embed_max_size=side,
        dual_attention_layers=dual, qk_norm="rms_norm" if qk_norm else None).to_dict()


# ---------------------------------------------------------------- the key layout

def _rules(num_layers: int, dual: tuple[int, ...], qk_norm: bool) -> list[tuple[str, tuple[str, ...], str]]:
    """(Stability key, diffusers keys, how) for every tensor; how: "copy", "qkv" (three equal parts along
    dim 0) or "swap" ((shift, scale) halves -> (scale, shift))."""
    rules = [("pos_embed", ("pos_embed.pos_embed",), "copy")]

    def linear(ours: str, theirs: str, how: str = "copy") -> None:
        rules.extend((f"{ours}.{p}", (f"{theirs}.{p}",), how) for p in _LINEAR)

    def attn(ours: str, theirs: str, q: str, k: str, v: str, norm_q: str, norm_k: str) -> None:
        rules.extend((f"{ours}.qkv.{p}", tuple(f"{theirs}.{name}.{p}" for name in (q, k, v)), "qkv")
                     for p in _LINEAR)
        if qk_norm:
            rules.extend([(f"{ours}.ln_q.weight", (f"{theirs}.{norm_q}.weight",), "copy"),
                          (f"{ours}.ln_k.weight", (f"{theirs}.{norm_k}.weight",), "copy")])

    linear("x_embedder.proj", "pos_embed.proj")
    linear("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    linear("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    linear("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    linear("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    linear("context_embedder", "context_embedder")
    for i in range(num_layers):
        x, c, d = f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block.", f"transformer_blocks.{i}."
        last = i == num_layers - 1
        attn(x + "attn", d + "attn", "to_q", "to_k", "to_v", "norm_q", "norm_k")
        attn(c + "attn", d + "attn", "add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")
        linear(x + "attn.proj", d + "attn.to_out.0")
        if i in dual:
            attn(x + "attn2", d + "attn2", "to_q", "to_k", "to_v", "norm_q", "norm_k")
            linear(x + "attn2.proj", d + "attn2.to_out.0")
        linear(x + "adaLN_modulation.1", d + "norm1.linear")
        linear(c + "adaLN_modulation.1", d + "norm1_context.linear", "swap" if last else "copy")
        linear(x + "mlp.fc1", d + "ff.net.0.proj")
        linear(x + "mlp.fc2", d + "ff.net.2")
        if not last:  # the last block only reads the text: no output projection, no MLP
            linear(c + "attn.proj", d + "attn.to_add_out")
            linear(c + "mlp.fc1", d + "ff_context.net.0.proj")
            linear(c + "mlp.fc2", d + "ff_context.net.2")
    linear("final_layer.linear", "proj_out")
    linear("final_layer.adaLN_modulation.1", "norm_out.linear", "swap")
    return rules


def sd3_transformer_to_diffusers(state_dict: dict) -> dict:
    """Stability transformer (keys with or without `model.diffusion_model.`) -> diffusers SD3Transformer2DModel
    names; the layout is read from the keys. Fused tensors are split into views."""
    sd = _strip(state_dict)
    if DETECT not in sd:
        raise FormatError(f"not an SD3 checkpoint: no {DETECT} (optionally {PREFIX}-prefixed)")
    rules = _rules(*_layout(sd))
    _check_keys(sd, [ours for ours, _, _ in rules], "SD3 checkpoint (Stability names)")
    out = {}
    for ours, names, how in rules:
        x = sd[ours]
        if how == "qkv" and x.shape[0] % 3:
            raise FormatError(f"SD3 checkpoint: {ours} has {x.shape[0]} rows, not three equal parts q, k, v")
        out.update(zip(names, (_swap(x),) if how == "swap" else x.chunk(3) if how == "qkv" else (x,)))
    return out


def sd3_transformer_to_original(diffusers_state_dict: dict) -> dict:
    """diffusers SD3Transformer2DModel state dict -> Stability names (no prefix), the exact inverse of
    sd3_transformer_to_diffusers; the layout is read from the keys."""
    sd = diffusers_state_dict
    n = _count(sd, "transformer_blocks.")
    dual = tuple(i for i in range(n) if f"transformer_blocks.{i}.attn2.to_q.weight" in sd)
    rules = _rules(n, dual, "transformer_blocks.0.attn.norm_q.weight" in sd)
    _check_keys(sd, [name for _, names, _ in rules for name in names], "SD3Transformer2DModel state dict")
    out = {}
    for ours, names, how in rules:
        parts = [sd[name] for name in names]
        out[ours] = _swap(parts[0]) if how == "swap" else torch.cat(parts) if how == "qkv" else parts[0]
    return out


# ---------------------------------------------------------------- whole files

def split_sd3_checkpoint(state_dict: dict) -> dict[str, dict]:
    """A Stability SD3 / SD3.5 single file -> {"transformer", "vae", "text_encoder", "text_encoder_2",
    "text_encoder_3"} (those present), each with its prefix stripped: the transformer in Stability's names
    (convert with sd3_transformer_to_diffusers), the VAE in raw LDM names, the text encoders in transformers'
    names. Keys of no known component are refused."""
    out = {}
    for key, value in state_dict.items():
        name = next((n for n, p in COMPONENT_PREFIXES.items() if key.startswith(p)), "transformer")
        prefix = PREFIX if name == "transformer" else COMPONENT_PREFIXES[name]
        out.setdefault(name, {})[key.removeprefix(prefix)] = value
    transformer = out.get("transformer", {})
    if DETECT not in transformer:
        raise FormatError(f"not an SD3 checkpoint: no {DETECT} (optionally {PREFIX}-prefixed)")
    unknown = sorted(set(transformer) - {ours for ours, _, _ in _rules(*_layout(transformer))})
    if unknown:
        raise FormatError(f"SD3 checkpoint: keys of no known component: {_shortlist(unknown)}")
    return out
