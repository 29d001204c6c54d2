"""DiT, the class-conditional diffusion transformer (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"): VAE latents cut into patches, a stack of adaLN-Zero transformer blocks conditioned on the
timestep and the class, and a linear decoder back to patches (eps, plus the variance with learned sigma).

Config keys and parameter names are those of diffusers' DiTTransformer2DModel, so a diffusers config.json
builds the same network and its state dict loads with `load_state_dict(..., strict=True)`, no key map. Two
things differ from the original code: each block owns a timestep + label embedder
(`transformer_blocks.i.norm1.emb`; the conversion script copies the one original embedder into every block)
and the final layer reuses block 0's; and the timestep sinusoid divides by half - 1 (diffusers'
downscale_freq_shift=1), not half.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..schedules import _check_choice
from .blocks import AdaNorm, FeedForward, PatchEmbed, modulate
from .layers import Attention, TimestepEmbedding, timestep_embedding
from .step_cache import BlockCached, run_blocks
from .unet import config_kwargs

TIME_CHANNELS = 256  # width of the sinusoidal timestep features (flip_sin_to_cos=True, freq_shift=1)

# Keys of diffusers' Transformer2DModel, which Hub DiT configs (facebook/DiT-XL-2-256) still name: diffusers
# builds a DiTTransformer2DModel from them when norm_type is "ada_norm_zero" (_CLASS_REMAPPING_DICT) and drops
# these. Each must hold the value a DiT implies.
TRANSFORMER2D_KEYS = {
    "cross_attention_dim": None, "num_vector_embeds": None, "use_linear_projection": False,
    "only_cross_attention": False, "double_self_attention": False, "attention_type": "default",
    "caption_channels": None, "interpolation_scale": None, "use_additional_conditions": None,
}
CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")


@dataclass(frozen=True)
class DiTConfig:
    """diffusers' DiTTransformer2DModel config (same names, same defaults: DiT-XL/2's shape)."""

    num_attention_heads: int = 16  # heads per attention (16 * 72 = 1152 wide: XL)
    attention_head_dim: int = 72  # width of one head
    in_channels: int = 4  # latent channels in
    out_channels: int | None = None  # channels out; None: in_channels; 2 * in_channels with learned sigma
    num_layers: int = 28  # transformer blocks (XL: 28)
    dropout: float = 0.0  # dropout on the attention output and inside the MLP (training only)
    norm_num_groups: int = 32  # unused by DiT (diffusers keeps the key)
    attention_bias: bool = True  # biases on to_q, to_k, to_v (to_out always has one)
    sample_size: int = 32  # latent size trained at (256 px / 8); positions span sample_size / patch_size units
    patch_size: int = 2  # side of a square patch: one token per patch_size^2 latent pixels (the "/2" of XL/2)
    activation_fn: str = "gelu-approximate"  # MLP activation: GELU with tanh, the only one
    num_embeds_ada_norm: int | None = 1000  # number of classes; the label table has one more row (null class)
    upcast_attention: bool = False  # compute attention in float32 for half inputs (diffusers' SDPA ignores it)
    norm_type: str = "ada_norm_zero"  # adaLN-Zero conditioning, the only one
    norm_elementwise_affine: bool = False  # learned weight and bias on the MLP's LayerNorm (norm3)
    norm_eps: float = 1e-5  # eps of the MLP's LayerNorm (the adaLN and output norms use 1e-6)

    def __post_init__(self):
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size",
                     "patch_size"):
            _check_int(name, getattr(self, name))
        if self.out_channels is not None:
            _check_int("out_channels", self.out_channels)
        _check_choice("norm_type", self.norm_type, ("ada_norm_zero",))
        _check_choice("activation_fn", self.activation_fn, ("gelu-approximate",))
        if self.num_embeds_ada_norm is None:
            raise ValueError("num_embeds_ada_norm (the number of classes) must be an integer >= 1 with norm_type "
                             "'ada_norm_zero'; got None")
        _check_int("num_embeds_ada_norm", self.num_embeds_ada_norm)
        for name in ("attention_bias", "upcast_attention", "norm_elementwise_affine"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1); got {self.dropout!r}")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be a number > 0; got {self.norm_eps!r}")
        if self.inner_dim % 4:
            raise ValueError(f"num_attention_heads * attention_head_dim must be a multiple of 4 (2-D sin-cos "
                             f"positions); got {self.num_attention_heads} * {self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DiTConfig":
        """From a diffusers DiTTransformer2DModel config.json dict, or a Transformer2DModel one with norm_type
        "ada_norm_zero" (which diffusers loads as a DiT). Keys starting with "_" are ignored; Transformer2DModel's
        own keys must hold the values a DiT implies; an unknown key must be None or False."""
        name = d.get("_class_name", CLASS_NAMES[0])
        _check_choice("_class_name", name, CLASS_NAMES)
        if name == "Transformer2DModel" and d.get("norm_type") != "ada_norm_zero":
            raise ValueError(f"norm_type must be 'ada_norm_zero' for a Transformer2DModel config to be a DiT "
                             f"(diffusers' _CLASS_REMAPPING_DICT); got {d.get('norm_type')!r}")
        return cls(**config_kwargs(cls, d, "DiT", TRANSFORMER2D_KEYS, ()))

    def to_dict(self) -> dict[str, Any]:
        """A diffusers DiTTransformer2DModel config dict."""
        return {"_class_name": CLASS_NAMES[0], **dataclasses.asdict(self)}


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1; got {value!r}")


class LabelEmbedding(nn.Module):
    """Class id -> vector; row num_classes is the null class that classifier-free guidance drops labels to."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class TimestepLabelEmbedding(nn.Module):
    """c = MLP(sinusoid(t)) + table[y], the conditioning vector of DiT's adaLN (diffusers'
    CombinedTimestepLabelEmbeddings)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_CHANNELS, dim)
        self.class_embedder = LabelEmbedding(num_classes, dim)

    def forward(self, t_freq: Tensor, labels: Tensor) -> Tensor:  # t_freq: (B, 256) sinusoid, labels: (B,)
        return self.timestep_embedder(t_freq) + self.class_embedder(labels)  # (B, dim)


class AdaNormZero(AdaNorm):
    """adaLN-Zero with the block's own timestep + label embedder `emb` (diffusers' AdaLayerNormZero with
    num_embeddings): six chunks (shift, scale, gate) for attention, then for the MLP."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__(dim, 6)
        self.emb = TimestepLabelEmbedding(num_classes, dim)


class DiTBlock(nn.Module):
    """adaLN-Zero block (DiT §3.2, Fig. 3): self-attention and MLP, each on a LayerNorm modulated by
    (shift, scale), their outputs scaled by a gate before the residual add."""

    def __init__(self, c: DiTConfig):
        super().__init__()
        dim = c.inner_dim
        self.norm1 = AdaNormZero(dim, c.num_embeds_ada_norm)
        self.attn1 = Attention(dim, None, c.num_attention_heads, c.attention_head_dim, bias=c.attention_bias,
                               dropout=c.dropout)
        self.attn1.upcast = c.upcast_attention
        self.norm3 = nn.LayerNorm(dim, eps=c.norm_eps, elementwise_affine=c.norm_elementwise_affine)
        self.ff = FeedForward(dim)
        self.ff.net[1] = nn.Dropout(c.dropout)  # diffusers' FeedForward: dropout between the two linears

    def forward(self, x: Tensor, t_freq: Tensor, labels: Tensor) -> Tensor:  # x: (B, N, dim)
        h, (shift, scale, gate, shift_mlp, scale_mlp, gate_mlp) = self.norm1(x, self.norm1.emb(t_freq, labels))
        x = x + gate[:, None] * self.attn1(modulate(h, shift, scale))
        return x + gate_mlp[:, None] * self.ff(modulate(self.norm3(x), shift_mlp, scale_mlp))


def unpatchify(tokens: Tensor, h: int, w: int, p: int) -> Tensor:
    """(B, h * w, p * p * C) row-major patch tokens, each (p, q, C)-ordered -> (B, C, h * p, w * p)."""
    B = tokens.shape[0]
    x = tokens.reshape(B, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return x.reshape(B, -1, h * p, w * p)


class DiT(BlockCached, nn.Module):
    """Class-conditional DiT: latents x, timesteps t and class ids y -> eps (and the variance with learned sigma)."""

    def __init__(self, config: DiTConfig | None = None):
        super().__init__()
        c = self.config = config or DiTConfig()
        dim = c.inner_dim
        self.pos_embed = PatchEmbed(c.sample_size, c.patch_size, c.in_channels, dim)
        self.transformer_blocks = nn.ModuleList([DiTBlock(c) for _ in range(c.num_layers)])
        self.norm_out = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)  # final adaLN: chunks (shift, scale)
        self.proj_out_2 = nn.Linear(dim, c.patch_size ** 2 * self.out_channels)

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> "DiT":
        """Build from a diffusers config.json dict (see DiTConfig.from_dict)."""
        return cls(DiTConfig.from_dict(d))

    def to_config(self) -> dict[str, Any]:
        """A config dict that diffusers' DiTTransformer2DModel.from_config accepts."""
        return self.config.to_dict()

    @property
    def out_channels(self) -> int:
        return self.config.out_channels or self.config.in_channels

    @property
    def learned_sigma(self) -> bool:
        """Whether the output is [eps, variance] (2 * in_channels channels; the caller splits it)."""
        return self.out_channels == 2 * self.config.in_channels

    @property
    def num_classes(self) -> int:
        """Number of classes; also the id of the null class (the label table's last row)."""
        return self.config.num_embeds_ada_norm

    def forward(self, x: Tensor, t: Tensor | float, class_labels: Tensor) -> Tensor:
        """x (B, in_channels, H, W) latents with H, W multiples of patch_size, t (B,) or a number (timesteps,
        fractional allowed), class_labels (B,) integer ids in [0, num_classes] (num_classes: the null class)
        -> (B, out_channels, H, W).

        Unlike diffusers' LabelEmbedding in training mode, no labels are dropped here: classifier-free training
        passes the null class itself. diffusers unpatchifies every grid as square (side sqrt of the token count),
        which fails or scrambles a non-square latent; here the grid is (H / patch_size, W / patch_size)."""
        c, p = self.config, self.config.patch_size
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(f"x must be (B, in_channels={c.in_channels}, H, W) with H and W multiples of "
                             f"patch_size={p}; got {tuple(x.shape)}")
        B, h, w = x.shape[0], x.shape[2] // p, x.shape[3] // p
        tokens = self.pos_embed(x)  # (B, h * w, dim)
        t = _per_row("t", t, B, x.device)
        labels = self._labels(class_labels, B, x.device)
        t_freq = timestep_embedding(t, TIME_CHANNELS, flip_sin_to_cos=True, freq_shift=1).to(tokens.dtype)
        def blocks(start: int, stop: int | None):
            def run(tokens):
                for block in self.transformer_blocks[start:stop]:
                    tokens = block(tokens, t_freq, labels)
                return tokens
            return run

        tokens = run_blocks(self.block_cache, blocks(0, 1), blocks(1, None), tokens, x)
        cond = self.transformer_blocks[0].norm1.emb(t_freq, labels)  # the final layer reuses block 0's embedder
        shift, scale = self.proj_out_1(F.silu(cond)).chunk(2, dim=1)
        out = self.proj_out_2(modulate(self.norm_out(tokens), shift, scale))  # (B, h * w, p * p * out_channels)
        return unpatchify(out, h, w, p)

    def _labels(self, class_labels, batch: int, device) -> Tensor:
        y = _per_row("class_labels", class_labels, batch, device)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"class_labels must be integer class ids; got dtype {y.dtype}")
        n = self.num_classes
        if y.numel() and (y.min() < 0 or y.max() > n):
            raise ValueError(f"class_labels must be in [0, {n}] ({n}: the null class); got values from "
                             f"{y.min().item()} to {y.max().item()}")
        return y.long()


def _per_row(name: str, value, batch: int, device) -> Tensor:
    """A number, 0-d, (1,) or (B,) tensor -> (B,) on `device`."""
    v = torch.as_tensor(value, device=device)
    v = v[None] if v.ndim == 0 else v
    if v.ndim != 1 or len(v) not in (1, batch):
        raise ValueError(f"{name} must be a number or a (B,) tensor with B={batch}; got shape {tuple(v.shape)}")
    return v.expand(batch)
