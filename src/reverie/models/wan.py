"""Wan 2.1 / 2.2's video transformer (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative
Models", arXiv 2503.20314): a DiT (Peebles & Xie 2023) over (t, h, w) patches of the causal VAE's latent.

Each block is self-attention with 3-D rotary positions (Su et al. 2021; the head width split into frame, row
and column channels) and RMS-normalised queries and keys, cross-attention to the UMT5 text states, and an MLP.
One shared MLP turns the timestep into 6 modulation vectors (shift, scale, gate for attention and MLP) that each
block offsets by its own learned table; cross-attention is not modulated and has no gate. Image-to-video
checkpoints (2.1 I2V, FLF2V) add CLIP image tokens through extra key/value projections in the cross-attention;
Wan 2.2 TI2V gives every token its own timestep.

Config keys and parameter names are those of diffusers' WanTransformer3DModel, so a diffusers config.json builds
the same network and its state dict loads with `load_state_dict(..., strict=True)`, no key map.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..schedules import _check_choice
from .blocks import FeedForward, attention, heads
from .flux import _check_int, apply_rope, rope
from .layers import TimestepEmbedding, timestep_embedding
from .step_cache import BlockCached, run_blocks
from .unet import config_kwargs

QK_NORMS = ("rms_norm_across_heads",)  # diffusers builds the same qk RMSNorm whatever it says; reverie takes only this
ROPE_THETA = 10000.0


@dataclass(frozen=True)
class WanTransformerConfig:
    """diffusers' WanTransformer3DModel config (same names, same defaults: Wan 2.1 14B's shape)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, rows, columns) of latent per token
    num_attention_heads: int = 40  # heads; the model is num_attention_heads * attention_head_dim wide (1.3B: 12)
    attention_head_dim: int = 128  # width of one head; even (its rotary channels split frames | rows | columns)
    in_channels: int = 16  # latent channels in (I2V: 36 = noise 16 + mask 4 + image latents 16)
    out_channels: int | None = 16  # channels predicted (the flow velocity); None: in_channels
    text_dim: int = 4096  # width of the text states (UMT5-XXL)
    freq_dim: int = 256  # width of the sinusoidal timestep features
    ffn_dim: int = 13824  # MLP width (1.3B: 8960)
    num_layers: int = 40  # blocks (1.3B: 30)
    cross_attn_norm: bool = True  # affine LayerNorm before the cross-attention (False: none)
    qk_norm: str | None = "rms_norm_across_heads"  # in QK_NORMS: RMSNorm over all heads' queries / keys
    eps: float = 1e-6  # eps of the block LayerNorms and the qk RMSNorms
    image_dim: int | None = None  # width of the CLIP image tokens (2.1 I2V: 1280); None: text-only
    added_kv_proj_dim: int | None = None  # image tokens' key/value input width: the model width, with image_dim
    rope_max_seq_len: int = 1024  # longest axis, in tokens, the rotary positions cover
    pos_embed_seq_len: int | None = None  # FLF2V: learned positions over the first + last images' tokens

    def __post_init__(self):
        if isinstance(self.patch_size, list):  # JSON lists -> tuples, so configs compare as values
            object.__setattr__(self, "patch_size", tuple(self.patch_size))
        p = self.patch_size
        if not isinstance(p, tuple) or len(p) != 3 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                                          for v in p):
            raise ValueError(f"patch_size must be 3 integers >= 1 (frames, rows, columns); got {p!r}")
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "text_dim", "freq_dim", "ffn_dim",
                     "rope_max_seq_len"):
            _check_int(name, getattr(self, name), 1)
        _check_int("num_layers", self.num_layers, 0)
        for name in ("out_channels", "image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.attention_head_dim % 2 or self.freq_dim % 2:
            raise ValueError(f"attention_head_dim and freq_dim must be even; got {self.attention_head_dim} and "
                             f"{self.freq_dim}")
        if not isinstance(self.cross_attn_norm, bool):
            raise ValueError(f"cross_attn_norm must be True or False; got {self.cross_attn_norm!r}")
        _check_choice("qk_norm", self.qk_norm, QK_NORMS)
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not self.eps > 0:
            raise ValueError(f"eps must be a number > 0; got {self.eps!r}")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ValueError(f"image_dim and added_kv_proj_dim must be set together (image-to-video) or both None; "
                             f"got image_dim={self.image_dim}, added_kv_proj_dim={self.added_kv_proj_dim}")
        if self.added_kv_proj_dim not in (None, self.inner_dim):
            raise ValueError(f"added_kv_proj_dim must equal num_attention_heads * attention_head_dim = "
                             f"{self.inner_dim} (the image embedder's output width); got {self.added_kv_proj_dim}")
        if self.pos_embed_seq_len is not None and (self.image_dim is None or self.pos_embed_seq_len % 2):
            raise ValueError(f"pos_embed_seq_len must be even (two images' tokens) and needs image_dim; got "
                             f"pos_embed_seq_len={self.pos_embed_seq_len}, image_dim={self.image_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Rotary channels per head for (frames, rows, columns): rows and columns get 2 * (d // 6) each."""
        hw = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * hw, hw, hw

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WanTransformerConfig":
        """From a diffusers WanTransformer3DModel config.json dict; keys starting with "_" are ignored and an
        unknown key must be None or False."""
        return cls(**config_kwargs(cls, d, "Wan transformer", {}, ()))

    def to_dict(self) -> dict[str, Any]:
        """A diffusers WanTransformer3DModel config dict."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"_class_name": "WanTransformer3DModel", **d, "patch_size": list(self.patch_size)}


# Small Wan transformers for reverie's own text-to-video model (reverie.train's video task, reverie.families.spacetime:
# latent channels, text width and the RoPE length are fitted to the run's VAE, text encoder and clips). Spacetime
# patches of (1, 2, 2) latent frames x rows x columns (Brooks et al. 2024, "Video generation models as world
# simulators"): a 16-frame 64x64 clip in the shapes VAE (3x16x16 per frame) is 16 x 8 x 8 = 1024 tokens. "small" is
# 192 wide (4 heads of 48), 4 blocks: about 2.8M parameters.
WAN_PRESETS = {
    "tiny": WanTransformerConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                 text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=16),
    "small": WanTransformerConfig(num_attention_heads=4, attention_head_dim=48, in_channels=4, out_channels=4,
                                  text_dim=192, freq_dim=256, ffn_dim=768, num_layers=4, rope_max_seq_len=16),
    # sized for a 2-core CPU: 4 x 4 latent patches (16 tokens a 64 x 64 frame, 256 a 16-frame clip), 128 wide
    "cpu": WanTransformerConfig(patch_size=(1, 4, 4), num_attention_heads=4, attention_head_dim=32, in_channels=4,
                                out_channels=4, text_dim=128, freq_dim=128, ffn_dim=512, num_layers=4,
                                rope_max_seq_len=16),
}


# ---------------------------------------------------------------- embeddings

class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input's dtype (diffusers' FP32LayerNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class TextProjection(nn.Module):
    """Linear -> GELU-tanh -> Linear on every text state, padding rows included (diffusers'
    PixArtAlphaTextProjection)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(in_dim, dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class ImageEmbedding(nn.Module):
    """CLIP image tokens -> model width: LayerNorm -> exact-GELU MLP -> LayerNorm (diffusers' WanImageEmbedding).
    FLF2V (pos_embed_seq_len): the first and last images' tokens (batch 2B) are set side by side (batch B) and
    given learned positions."""

    def __init__(self, in_dim: int, dim: int, pos_embed_seq_len: int | None):
        super().__init__()
        self.norm1 = FP32LayerNorm(in_dim)
        self.ff = FeedForward(in_dim, inner_dim=in_dim, dim_out=dim, approximate="none")
        self.norm2 = FP32LayerNorm(dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, in_dim)) if pos_embed_seq_len else None

    def forward(self, x: Tensor) -> Tensor:
        if self.pos_embed is not None:
            x = x.reshape(-1, 2 * x.shape[1], x.shape[2]) + self.pos_embed  # (B, 2L, in_dim)
        return self.norm2(self.ff(self.norm1(x)))


class ConditionEmbedder(nn.Module):
    """The timestep, text and image embeddings (diffusers' WanTimeTextImageEmbedding): temb = MLP(sinusoid(t)),
    the blocks' shared modulation time_proj(SiLU(temb)), and the projected text (and image) tokens."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int, image_dim: int | None, pos_embed_seq_len: int | None):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = TimestepEmbedding(freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TextProjection(text_dim, dim)
        self.image_embedder = ImageEmbedding(image_dim, dim, pos_embed_seq_len) if image_dim else None

    def time(self, t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(B, L) timesteps, L = 1 or one per token -> temb (B, L, dim) and modulation (B, L, 6, dim).
        Sinusoid [cos | sin] at frequencies exp(-ln(1e4) i / (freq_dim / 2)), the MLP in its own dtype."""
        features = timestep_embedding(t.flatten(), self.freq_dim).unflatten(0, t.shape)  # (B, L, freq_dim)
        temb = self.time_embedder(features.to(self.time_embedder.linear_1.weight.dtype)).to(dtype)
        return temb, self.time_proj(F.silu(temb)).unflatten(-1, (6, -1))


# ---------------------------------------------------------------- blocks

class WanAttention(nn.Module):
    """Multi-head attention with RMSNorm over the full query / key width (all heads together, before the head
    split), rotary positions on self-attention, and (image-to-video) a second attention over the image tokens
    through add_k_proj / add_v_proj, added to the text attention before the output projection."""

    def __init__(self, dim: int, num_heads: int, eps: float, added_kv_proj_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)
        if added_kv_proj_dim is not None:
            self.add_k_proj, self.add_v_proj = nn.Linear(added_kv_proj_dim, dim), nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: Tensor, context: Tensor | None = None, image: Tensor | None = None,
                pe: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x (B, N, dim) attends to itself (context None, rotary `pe`) or to context (B, L, dim) [+ image]."""
        n, source = self.num_heads, x if context is None else context
        q, k = heads(self.norm_q(self.to_q(x)), n), heads(self.norm_k(self.to_k(source)), n)  # (B, n, N | L, d)
        v = heads(self.to_v(source), n)
        if pe is not None:
            q, k = apply_rope(q, *pe), apply_rope(k, *pe)
        out = attention(q, k, v)  # (B, N, dim)
        if image is not None:
            k_img, v_img = heads(self.norm_added_k(self.add_k_proj(image)), n), heads(self.add_v_proj(image), n)
            out = out + attention(q, k_img, v_img)
        return self.to_out[1](self.to_out[0](out))


class WanTransformerBlock(nn.Module):
    """x += gate * attn1(LN(x) * (1 + scale) + shift); x += attn2(LN2(x), text); x += c_gate * MLP(modulated LN(x)),
    the six vectors = this block's scale_shift_table + the shared time modulation, in float32."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, cross_attn_norm: bool, eps: float,
                 added_kv_proj_dim: int | None):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = WanAttention(dim, num_heads, eps)
        self.attn2 = WanAttention(dim, num_heads, eps, added_kv_proj_dim)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.ffn = FeedForward(dim, inner_dim=ffn_dim)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: Tensor, context: Tensor, image: Tensor | None, modulation: Tensor,
                pe: tuple[Tensor, Tensor]) -> Tensor:
        """x (B, N, dim); modulation (B, 1 or N, 6, dim)."""
        chunks = (self.scale_shift_table[None] + modulation.float()).unbind(2)  # 6 x (B, 1 | N, dim)
        shift, scale, gate, c_shift, c_scale, c_gate = chunks
        h = (self.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        x = (x.float() + self.attn1(h, pe=pe) * gate).type_as(x)
        x = x + self.attn2(self.norm2(x.float()).type_as(x), context, image)
        h = (self.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + self.ffn(h).float() * c_gate).type_as(x)


# ---------------------------------------------------------------- the network

def grid_ids(frames: int, rows: int, columns: int, device=None) -> Tensor:
    """Integer positions (frame, row, column) of a token grid, flattened frame-major -> (F * H * W, 3)."""
    axes = [torch.arange(n, device=device) for n in (frames, rows, columns)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


class WanTransformer(BlockCached, nn.Module):
    """Wan's transformer: video latents (B, C, F, H, W), timesteps and text states -> flow velocity."""

    def __init__(self, config: WanTransformerConfig | None = None):
        super().__init__()
        c = self.config = config or WanTransformerConfig()
        dim = c.inner_dim
        self.out_channels = c.out_channels or c.in_channels
        self.patch_embedding = nn.Conv3d(c.in_channels, dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.condition_embedder = ConditionEmbedder(dim, c.freq_dim, c.text_dim, c.image_dim, c.pos_embed_seq_len)
        self.blocks = nn.ModuleList([
            WanTransformerBlock(dim, c.ffn_dim, c.num_attention_heads, c.cross_attn_norm, c.eps, c.added_kv_proj_dim)
            for _ in range(c.num_layers)])
        self.norm_out = FP32LayerNorm(dim, c.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, self.out_channels * math.prod(c.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> "WanTransformer":
        """Build from a diffusers config.json dict (see WanTransformerConfig.from_dict)."""
        return cls(WanTransformerConfig.from_dict(d))

    def to_config(self) -> dict[str, Any]:
        """A config dict that diffusers' WanTransformer3DModel.from_config accepts."""
        return self.config.to_dict()

    def forward(self, x: Tensor, t: Tensor | float, encoder_hidden_states: Tensor,
                encoder_hidden_states_image: Tensor | None = None) -> Tensor:
        """x (B, in_channels, F, H, W) latents, each size a multiple of its patch size; t: a number, (B,), or
        (B, N) with one timestep per token (N = F H W / prod(patch_size); Wan 2.2 TI2V), as the pipeline passes
        it (sigma * 1000); encoder_hidden_states (B, L, text_dim), zero-padded text states (no mask);
        encoder_hidden_states_image (B, L_img, image_dim) CLIP image tokens (FLF2V: (2B, ...), first then last
        image), only with image_dim -> velocity (B, out_channels, F, H, W)."""
        c = self.config
        B, grid = self._check(x, encoder_hidden_states, encoder_hidden_states_image)
        (pt, ph, pw), (f, h, w) = c.patch_size, grid
        t = self._timesteps(t, B, f * h * w, x.device)  # (B, 1 | N)
        pe = rope(grid_ids(f, h, w, x.device), c.rope_dims, ROPE_THETA)  # cos, sin: (N, head_dim) each
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # (B, N, dim), (f, h, w) row-major
        embed = self.condition_embedder
        temb, modulation = embed.time(t, encoder_hidden_states.dtype)  # (B, 1 | N, dim), (B, 1 | N, 6, dim)
        context = embed.text_embedder(encoder_hidden_states)  # (B, L, dim)
        image = None if encoder_hidden_states_image is None else embed.image_embedder(encoder_hidden_states_image)
        def blocks(start: int, stop: int | None):
            def run(tokens):
                for block in self.blocks[start:stop]:
                    tokens = block(tokens, context, image, modulation, pe)
                return tokens
            return run

        tokens = run_blocks(self.block_cache, blocks(0, 1), blocks(1, None), tokens, x)
        shift, scale = (self.scale_shift_table[None] + temb[:, :, None]).unbind(2)  # (B, 1 | N, dim): from temb
        tokens = (self.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        out = self.proj_out(tokens)  # (B, N, pt * ph * pw * out_channels), channel last in each patch
        out = out.reshape(B, f, h, w, pt, ph, pw, self.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(B, self.out_channels, f * pt, h * ph, w * pw)

    def _check(self, x, context, image) -> tuple[int, tuple[int, int, int]]:
        c = self.config
        if x.ndim != 5 or x.shape[1] != c.in_channels or any(n % p for n, p in zip(x.shape[2:], c.patch_size)):
            raise ValueError(f"x must be (B, in_channels={c.in_channels}, F, H, W) with F, H, W multiples of "
                             f"patch_size={list(c.patch_size)}; got {tuple(x.shape)}")
        B = x.shape[0]
        grid = tuple(n // p for n, p in zip(x.shape[2:], c.patch_size))
        if max(grid) > c.rope_max_seq_len:
            raise ValueError(f"x has {list(grid)} tokens along (frames, rows, columns); each must be at most "
                             f"rope_max_seq_len={c.rope_max_seq_len}")
        if context.ndim != 3 or context.shape[0] != B or context.shape[-1] != c.text_dim:
            raise ValueError(f"encoder_hidden_states must be (B={B}, L, text_dim={c.text_dim}); got "
                             f"{tuple(context.shape)}")
        if (image is None) != (c.image_dim is None):
            raise ValueError(f"encoder_hidden_states_image must be given exactly when the model has image_dim "
                             f"(image_dim={c.image_dim}); got {None if image is None else tuple(image.shape)}")
        if image is not None:
            shape = (2 * B, c.pos_embed_seq_len // 2) if c.pos_embed_seq_len else (B, image.shape[1])  # FLF2V: 2 images
            if image.ndim != 3 or tuple(image.shape) != (*shape, c.image_dim):
                want = f"(2B={2 * B}, pos_embed_seq_len / 2" if c.pos_embed_seq_len else f"(B={B}, L_img"
                raise ValueError(f"encoder_hidden_states_image must be {want}, image_dim={c.image_dim}); got "
                                 f"{tuple(image.shape)}")
        return B, grid

    @staticmethod
    def _timesteps(t, batch: int, tokens: int, device) -> Tensor:
        """A number, (B,) or (B, N) -> (B, 1) or (B, N)."""
        v = torch.as_tensor(t, device=device)
        v = v.reshape(1) if v.ndim == 0 else v
        if v.ndim == 1 and len(v) in (1, batch):
            return v.expand(batch)[:, None]
        if v.ndim == 2 and tuple(v.shape) == (batch, tokens):
            return v
        raise ValueError(f"t must be a number, a (B,) tensor or a (B, N) tensor of per-token timesteps with B={batch}, "
                         f"N={tokens}; got shape {tuple(v.shape)}")
