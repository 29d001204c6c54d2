"""FLUX.1's rectified-flow transformer (Black Forest Labs 2024, "FLUX.1"; the MMDiT of Esser et al. 2024,
"Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", with rotary positions, Su et al. 2021,
and parallel attention + MLP single-stream blocks, Dehghani et al. 2023, "Scaling Vision Transformers to 22B").

Config keys and parameter names are those of diffusers' FluxTransformer2DModel, so a diffusers config.json
builds the same network and its state dict loads with `load_state_dict(..., strict=True)`, no key map.

The network sees packed latents: 2x2 patches of the (B, C, h, w) VAE latent flattened into (B, h/2 * w/2, 4C)
tokens (`pack_latents`), with one position id [0, row, col] per token (`image_ids`) and zero ids for the text.
Text comes first in the joint sequence [txt, img], for attention and for the rotary ids alike.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import AdaNorm, FeedForward, attention, heads, modulate
from .layers import TimestepEmbedding, timestep_embedding
from .step_cache import BlockCached, run_blocks
from .unet import config_kwargs

ROPE_THETA = 10000.0  # rotary base of every FLUX.1 release
TIME_CHANNELS = 256  # width of the sinusoidal timestep / guidance features (flip_sin_to_cos, shift 0)
MLP_RATIO = 4.0  # feed-forward width / model width, in both kinds of block


@dataclass(frozen=True)
class FluxConfig:
    """diffusers' FluxTransformer2DModel config (same names, same defaults: FLUX.1 schnell's shape)."""

    patch_size: int = 1  # only sizes proj_out (p * p * out_channels per token); FLUX.1 packs 2x2 outside the model
    in_channels: int = 64  # features per packed token: 4 * 16 latent channels (Fill: 384, Depth: 128)
    out_channels: int | None = None  # velocity features per token; None: in_channels
    num_layers: int = 19  # double-stream (separate text / image weights) blocks
    num_single_layers: int = 38  # single-stream (shared weights, parallel attention + MLP) blocks
    attention_head_dim: int = 128  # width of one head; the model is num_attention_heads * this wide
    num_attention_heads: int = 24  # heads per attention (24 * 128 = 3072 wide)
    joint_attention_dim: int = 4096  # width of the text tokens (T5-XXL)
    pooled_projection_dim: int = 768  # width of the pooled text vector (CLIP-L pooler output)
    guidance_embeds: bool = False  # embed a distilled guidance scale (dev: True, schnell: False)
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)  # rotary width per id column; even, summing to the head dim

    def __post_init__(self):
        if isinstance(self.axes_dims_rope, list):  # JSON lists -> tuples, so configs compare and hash as values
            object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        for name in ("patch_size", "in_channels", "attention_head_dim", "num_attention_heads",
                     "joint_attention_dim", "pooled_projection_dim"):
            _check_int(name, getattr(self, name), 1)
        for name in ("num_layers", "num_single_layers"):
            _check_int(name, getattr(self, name), 0)
        if self.out_channels is not None:
            _check_int("out_channels", self.out_channels, 1)
        if not isinstance(self.guidance_embeds, bool):
            raise ValueError(f"guidance_embeds must be True or False; got {self.guidance_embeds!r}")
        axes = self.axes_dims_rope
        if not isinstance(axes, tuple) or not axes or any(isinstance(d, bool) or not isinstance(d, int)
                                                          or d < 2 or d % 2 for d in axes):
            raise ValueError(f"axes_dims_rope must be a non-empty list of even integers >= 2; got {axes!r}")
        if sum(axes) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope must sum to attention_head_dim={self.attention_head_dim}; got "
                             f"{list(axes)} (sum {sum(axes)})")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FluxConfig":
        """From a diffusers FluxTransformer2DModel config.json dict; keys starting with "_" are ignored and an
        unknown key must be None or False."""
        return cls(**config_kwargs(cls, d, "FLUX transformer", {}, ()))

    def to_dict(self) -> dict[str, Any]:
        """A diffusers FluxTransformer2DModel config dict."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"_class_name": "FluxTransformer2DModel", **d, "axes_dims_rope": list(self.axes_dims_rope)}


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")


# ---------------------------------------------------------------- packing and position ids

def _check_even(h: int, w: int) -> None:
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even (2x2 patches); got h={h}, w={w}")


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, h, w) latents -> (B, h/2 * w/2, 4C) tokens: 2x2 patches, row-major over the patch grid, feature
    index c * 4 + dy * 2 + dx (diffusers' FluxPipeline._pack_latents)."""
    B, C, h, w = x.shape
    _check_even(h, w)
    x = x.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, h/2 * w/2, 4C) tokens -> (B, C, h, w) latents, the inverse of `pack_latents`."""
    _check_even(h, w)
    B, N, F4 = tokens.shape
    if N != (h // 2) * (w // 2) or F4 % 4:
        raise ValueError(f"tokens must be (B, h/2 * w/2 = {(h // 2) * (w // 2)}, 4C) for h={h}, w={w}; "
                         f"got {tuple(tokens.shape)}")
    x = tokens.reshape(B, h // 2, w // 2, F4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(B, F4 // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Position ids [0, row, col] of the packed tokens of an (h, w) latent -> (h/2 * w/2, 3), row-major."""
    _check_even(h, w)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)  # (h/2, w/2, 3)
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def text_ids(length: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Position ids of `length` text tokens: all zero, (length, 3) (FLUX gives text no position)."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


# ---------------------------------------------------------------- rotary positions

def rope(ids: Tensor, axes_dims: tuple[int, ...], theta: float = ROPE_THETA) -> tuple[Tensor, Tensor]:
    """(S, n_axes) positions -> cos, sin, each (S, sum(axes_dims)) float32 (diffusers' FluxPosEmbed).

    Id column i drives axes_dims[i] channels at frequencies theta^(-2k / d_i), computed in float64 (float32
    on MPS, which has no float64); each angle fills an adjacent channel pair (2k, 2k + 1)."""
    dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    pos = ids.float().to(dtype)
    cos, sin = [], []
    for i, d in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=dtype, device=ids.device) / d)  # (d/2,)
        angles = torch.outer(pos[:, i], freqs)  # (S, d/2)
        cos.append(angles.cos().repeat_interleave(2, dim=1).float())
        sin.append(angles.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, dim=-1), torch.cat(sin, dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each channel pair (x[2k], x[2k+1]) of (B, heads, S, d) by its angle, in float32."""
    real, imag = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, heads, S, d/2) each
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)  # (B, heads, S, d)
    return (x.float() * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------- blocks

def _qk_norm(head_dim: int) -> nn.RMSNorm:
    # torch's RMSNorm, as diffusers' FluxAttention: it applies the weight before casting back to bf16 / fp16
    # (blocks.RMSNorm, diffusers' own class for SD3, casts first: one half-precision ulp apart)
    return nn.RMSNorm(head_dim, eps=1e-6)


class FluxAttention(nn.Module):
    """Attention with RMSNorm on queries and keys (Dehghani et al. 2023) and rotary positions.

    joint=True (double blocks): the text has its own projections (add_*_proj, norm_added_*, to_add_out) and
    attends jointly with the image as [txt, img]. pre_only=True (single blocks): no output projection."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, joint: bool = False, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.norm_q, self.norm_k = _qk_norm(head_dim), _qk_norm(head_dim)
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        if not pre_only:
            self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        if joint:
            self.norm_added_q, self.norm_added_k = _qk_norm(head_dim), _qk_norm(head_dim)
            self.add_q_proj, self.add_k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.add_v_proj, self.to_add_out = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def _qkv(self, x: Tensor, q, k, v, norm_q, norm_k) -> tuple[Tensor, Tensor, Tensor]:
        n = self.num_heads
        return norm_q(heads(q(x), n)), norm_k(heads(k(x), n)), heads(v(x), n)  # (B, heads, S, d) each

    def forward(self, x: Tensor, pe: tuple[Tensor, Tensor], context: Tensor | None = None):
        """x (B, N, dim) -> (B, N, dim); with context (B, L, dim) -> (image out, text out)."""
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if context is not None:
            cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                   self.norm_added_q, self.norm_added_k)
            q, k, v = torch.cat([cq, q], dim=2), torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        out = attention(apply_rope(q, *pe), apply_rope(k, *pe), v)  # (B, S, dim)
        if context is None:
            return out
        txt, img = (part.contiguous() for part in out.split([context.shape[1], x.shape[1]], dim=1))
        return self.to_out[1](self.to_out[0](img)), self.to_add_out(txt)  # contiguous: as diffusers, to the bit


def _clip_fp16(x: Tensor) -> Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


class FluxTransformerBlock(nn.Module):
    """Double-stream MMDiT block: per-stream adaLN-Zero and MLPs, one joint attention over [txt, img]."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.norm1, self.norm1_context = AdaNorm(dim, 6), AdaNorm(dim, 6)
        self.attn = FluxAttention(dim, num_heads, head_dim, joint=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, MLP_RATIO)
        self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff_context = FeedForward(dim, MLP_RATIO)

    def forward(self, img: Tensor, txt: Tensor, temb: Tensor, pe) -> tuple[Tensor, Tensor]:
        # adaLN-Zero chunks: (shift, scale, gate) for attention, then for the MLP
        img_n, (shift, scale, gate, shift_mlp, scale_mlp, gate_mlp) = self.norm1(img, temb)
        txt_n, (c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp) = self.norm1_context(txt, temb)
        img_attn, txt_attn = self.attn(modulate(img_n, shift, scale), pe, modulate(txt_n, c_shift, c_scale))
        img = img + gate[:, None] * img_attn  # (B, N, dim)
        img = img + gate_mlp[:, None] * self.ff(modulate(self.norm2(img), shift_mlp, scale_mlp))
        txt = txt + c_gate[:, None] * txt_attn  # (B, L, dim)
        txt = txt + c_gate_mlp[:, None] * self.ff_context(modulate(self.norm2_context(txt), c_shift_mlp,
                                                                   c_scale_mlp))
        return img, _clip_fp16(txt)  # diffusers clips only the text stream here


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block over [txt, img]: attention and MLP in parallel from one adaLN (shift, scale, gate),
    their outputs concatenated into one projection (proj_out)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int):
        super().__init__()
        mlp = int(dim * MLP_RATIO)
        self.norm = AdaNorm(dim, 3)
        self.proj_mlp = nn.Linear(dim, mlp)
        self.attn = FluxAttention(dim, num_heads, head_dim, pre_only=True)
        self.proj_out = nn.Linear(dim + mlp, dim)

    def forward(self, x: Tensor, temb: Tensor, pe) -> Tensor:
        h, (shift, scale, gate) = self.norm(x, temb)
        h = modulate(h, shift, scale)  # (B, S, dim)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")  # (B, S, 4 dim)
        return _clip_fp16(x + gate[:, None] * self.proj_out(torch.cat([self.attn(h, pe), mlp], dim=2)))


class TimeTextEmbedding(nn.Module):
    """temb = MLP(sinusoid(t)) [+ MLP(sinusoid(guidance))] + MLP(pooled text) (diffusers'
    CombinedTimestep[Guidance]TextProjEmbeddings; its text MLP, Linear-SiLU-Linear, is a TimestepEmbedding)."""

    def __init__(self, dim: int, pooled_dim: int, guidance: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_CHANNELS, dim)
        self.guidance_embedder = TimestepEmbedding(TIME_CHANNELS, dim) if guidance else None
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)

    def forward(self, t: Tensor, guidance: Tensor | None, pooled: Tensor) -> Tensor:
        emb = self.timestep_embedder(timestep_embedding(t, TIME_CHANNELS).to(pooled.dtype))  # (B, dim)
        if self.guidance_embedder is not None:
            emb = emb + self.guidance_embedder(timestep_embedding(guidance, TIME_CHANNELS).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


# ---------------------------------------------------------------- the network

class Flux(BlockCached, nn.Module):
    """FLUX.1 transformer: packed latent tokens, flow time in [0, 1] and text -> velocity tokens."""

    def __init__(self, config: FluxConfig | None = None):
        super().__init__()
        c = self.config = config or FluxConfig()
        dim, n, d = c.inner_dim, c.num_attention_heads, c.attention_head_dim
        self.time_text_embed = TimeTextEmbedding(dim, c.pooled_projection_dim, c.guidance_embeds)
        self.context_embedder = nn.Linear(c.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(c.in_channels, dim)
        self.transformer_blocks = nn.ModuleList([FluxTransformerBlock(dim, n, d) for _ in range(c.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([FluxSingleTransformerBlock(dim, n, d)
                                                        for _ in range(c.num_single_layers)])
        self.norm_out = AdaNorm(dim, 2)  # AdaLayerNormContinuous: chunks (scale, shift)
        self.proj_out = nn.Linear(dim, c.patch_size ** 2 * (c.out_channels or c.in_channels))

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> "Flux":
        """Build from a diffusers config.json dict (see FluxConfig.from_dict)."""
        return cls(FluxConfig.from_dict(d))

    def to_config(self) -> dict[str, Any]:
        """A config dict that diffusers' FluxTransformer2DModel.from_config accepts."""
        return self.config.to_dict()

    def forward(self, x: Tensor, t: Tensor | float, encoder_hidden_states: Tensor, pooled_projections: Tensor,
                img_ids: Tensor, txt_ids: Tensor, guidance: Tensor | float | None = None) -> Tensor:
        """x (B, N, in_channels) packed latent tokens, t (B,) or a number: flow time in [0, 1] (sigma),
        encoder_hidden_states (B, L, joint_attention_dim), pooled_projections (B, pooled_projection_dim),
        img_ids (N, 3) and txt_ids (L, 3) float position ids, guidance (B,) or a number, required exactly when
        guidance_embeds -> velocity (B, N, patch_size^2 * out_channels).

        t and guidance are cast to the hidden dtype and multiplied by 1000, as diffusers' model does (its
        pipeline passes t / 1000). diffusers fails with a TypeError when guidance is missing for a
        guidance-embedding model or given to one without; here both are ValueErrors."""
        c = self.config
        B, N = self._check(x, encoder_hidden_states, pooled_projections, img_ids, txt_ids)
        if c.guidance_embeds and guidance is None:
            raise ValueError("guidance is required: this model embeds a guidance scale (guidance_embeds=True)")
        if not c.guidance_embeds and guidance is not None:
            raise ValueError("guidance must be None: this model has no guidance embedder (guidance_embeds=False)")
        img = self.x_embedder(x)  # (B, N, dim)
        t = _per_row("t", t, B, img) * 1000
        g = None if guidance is None else _per_row("guidance", guidance, B, img) * 1000
        temb = self.time_text_embed(t, g, pooled_projections)  # (B, dim)
        txt = self.context_embedder(encoder_hidden_states)  # (B, L, dim)
        cos, sin = rope(torch.cat([txt_ids, img_ids]), c.axes_dims_rope)  # (L + N, head_dim) each
        pe = cos.to(img.device), sin.to(img.device)
        def first(state):
            return self.transformer_blocks[0](*state, temb, pe) if len(self.transformer_blocks) else state

        def rest(state):
            img, txt = state
            for block in self.transformer_blocks[1:]:
                img, txt = block(img, txt, temb, pe)
            h = torch.cat([txt, img], dim=1)  # (B, L + N, dim)
            for block in self.single_transformer_blocks:
                h = block(h, temb, pe)
            return h[:, txt.shape[1]:], h[:, :txt.shape[1]]

        img, _ = run_blocks(self.block_cache, first, rest, (img, txt), x)
        h, (scale, shift) = self.norm_out(img, temb)
        return self.proj_out(modulate(h, shift, scale))  # (B, N, p^2 * out_channels)

    def _check(self, x, context, pooled, img_ids, txt_ids) -> tuple[int, int]:
        c, axes = self.config, len(self.config.axes_dims_rope)
        if x.ndim != 3 or x.shape[-1] != c.in_channels:
            raise ValueError(f"x must be (B, N, in_channels={c.in_channels}); got {tuple(x.shape)}")
        B, N = x.shape[:2]
        if context.ndim != 3 or context.shape[0] != B or context.shape[-1] != c.joint_attention_dim:
            raise ValueError(f"encoder_hidden_states must be (B={B}, L, joint_attention_dim="
                             f"{c.joint_attention_dim}); got {tuple(context.shape)}")
        if tuple(pooled.shape) != (B, c.pooled_projection_dim):
            raise ValueError(f"pooled_projections must be (B={B}, pooled_projection_dim="
                             f"{c.pooled_projection_dim}); got {tuple(pooled.shape)}")
        for name, ids, length in (("img_ids", img_ids, N), ("txt_ids", txt_ids, context.shape[1])):
            if tuple(ids.shape) != (length, axes):
                raise ValueError(f"{name} must be ({length}, {axes}): one id per token, one column per "
                                 f"axes_dims_rope entry; got {tuple(ids.shape)}")
        return B, N


def _per_row(name: str, value, batch: int, like: Tensor) -> Tensor:
    """A number, 0-d, (1,) or (B,) tensor -> (B,) in like's dtype and device (the dtype cast precedes * 1000)."""
    v = torch.as_tensor(value, device=like.device)
    v = v[None] if v.ndim == 0 else v
    if v.ndim != 1 or len(v) not in (1, batch):
        raise ValueError(f"{name} must be a number or a (B,) tensor with B={batch}; got shape {tuple(v.shape)}")
    return v.to(like.dtype).expand(batch)
