"""Building blocks shared by the diffusion transformers (DiT, SD3's MMDiT, FLUX, video).

Parameter names follow diffusers (PatchEmbed, AdaLayerNormZero, AdaLayerNormContinuous, FeedForward, RMSNorm)
so that state dicts load without a key map. The math is the DiT paper's (Peebles & Xie 2023): patchify, fixed
2-D sin-cos positions, and adaptive LayerNorm whose shift, scale and gate come from the conditioning vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(M,) positions -> (M, dim) [sin | cos] features at frequencies 10000^(-2k/dim), in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = torch.outer(pos.reshape(-1).double(), omega)  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, height: int, width: int, base_size: int, interpolation_scale: float = 1.0) -> Tensor:
    """Fixed 2-D positions for a (height, width) grid of patches -> (height * width, dim) float32, row-major.

    Coordinates are scaled so that every grid spans `base_size` units (diffusers' get_2d_sincos_pos_embed,
    whose first half encodes the column and the second the row)."""
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for 2-D sin-cos positions; got {dim}")
    rows = torch.arange(height, dtype=torch.float32) / (height / base_size) / interpolation_scale
    cols = torch.arange(width, dtype=torch.float32) / (width / base_size) / interpolation_scale
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")  # (height, width) each
    return torch.cat([sincos_1d(dim // 2, grid_cols), sincos_1d(dim // 2, grid_rows)], dim=1).float()


class PatchEmbed(nn.Module):
    """Conv patchify (kernel = stride = patch) -> (B, N, dim) tokens, plus fixed sin-cos positions.

    Without `pos_embed_max_size` (DiT) the positions are computed for the input's grid (non-persistent);
    with it (SD3) a max x max table is a persistent buffer `pos_embed`, center-cropped to the input's grid."""

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, dim: int,
                 pos_embed_max_size: int | None = None, interpolation_scale: float = 1.0):
        super().__init__()
        self.patch_size, self.dim, self.max_size = patch_size, dim, pos_embed_max_size
        self.base_size, self.interpolation_scale = sample_size // patch_size, interpolation_scale
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)
        if pos_embed_max_size:
            table = sincos_2d(dim, pos_embed_max_size, pos_embed_max_size, self.base_size, interpolation_scale)
            self.register_buffer("pos_embed", table[None], persistent=True)  # (1, max^2, dim)

    def positions(self, height: int, width: int) -> Tensor:
        """(1, height * width, dim) positions for a grid of patches."""
        if not self.max_size:
            return sincos_2d(self.dim, height, width, self.base_size, self.interpolation_scale)[None]
        if height > self.max_size or width > self.max_size:
            raise ValueError(f"height and width must be at most pos_embed_max_size x patch_size = "
                             f"{self.max_size * self.patch_size} latent pixels; got {height * self.patch_size}x"
                             f"{width * self.patch_size}")
        top, left = (self.max_size - height) // 2, (self.max_size - width) // 2
        table = self.pos_embed.reshape(1, self.max_size, self.max_size, -1)
        return table[:, top:top + height, left:left + width].reshape(1, height * width, -1)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, dim)
        return (tokens + self.positions(h, w).to(tokens.device, tokens.dtype)).to(tokens.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, with (B, dim) modulation broadcast over the tokens of (B, N, dim)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaNorm(nn.Module):
    """LayerNorm without affine parameters plus `chunks` modulation vectors linear(SiLU(c)) from the
    conditioning c (diffusers' AdaLayerNormZero: 6 chunks; AdaLayerNormZeroSingle: 3; SD35AdaLayerNormZeroX:
    9; AdaLayerNormContinuous: 2). Returns (LayerNorm(x), chunks); the caller knows their order."""

    def __init__(self, dim: int, chunks: int, cond_dim: int | None = None, eps: float = 1e-6):
        super().__init__()
        self.chunks = chunks
        self.silu = nn.SiLU()
        self.linear = nn.Linear(cond_dim or dim, chunks * dim)
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        mod = self.linear(self.silu(cond).to(x.dtype))  # (B, chunks * dim)
        return self.norm(x), mod.chunk(self.chunks, dim=1)


class GELU(nn.Module):
    """Linear then GELU, tanh-approximated by default (diffusers' GELU(approximate="tanh"), key `proj`);
    approximate="none" is the exact erf form (diffusers' activation_fn="gelu")."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "tanh"):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """The transformer MLP: GELU (tanh by default) up-projection, then down (keys net.0.proj, net.2, as diffusers)."""

    def __init__(self, dim: int, mult: float = 4, dim_out: int | None = None, inner_dim: int | None = None,
                 approximate: str = "tanh"):
        super().__init__()
        inner = inner_dim or int(dim * mult)
        self.net = nn.ModuleList([GELU(dim, inner, approximate), nn.Dropout(0.0), nn.Linear(inner, dim_out or dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (Zhang & Sennrich 2019), the mean square taken in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return x * self.weight


def heads(x: Tensor, n: int) -> Tensor:
    """(B, N, n * d) -> (B, n, N, d)."""
    return x.unflatten(-1, (n, -1)).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, n, N, d) -> (B, N, n * d)."""
    return x.transpose(1, 2).flatten(2)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention over (B, heads, N, d) tensors -> (B, N, heads * d)."""
    return merge_heads(F.scaled_dot_product_attention(q, k, v).to(q.dtype))
