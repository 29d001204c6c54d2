"""Building blocks shared by the UNet, the VAE and the ControlNet.

Parameter names follow diffusers (ResnetBlock2D, Downsample2D, Upsample2D, Attention, TimestepEmbedding) so
that their state dicts load without a key map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) (Vaswani et al. 2017; DDPM's time embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


SMALL_CONV_PIXELS = 256  # conv2d: output pixels (B * H_out * W_out) at or below which the unfold + matmul path runs


def conv2d(layer: nn.Module, x: Tensor) -> Tensor:
    """layer(x) for a convolution layer, computed as unfold + one matmul when its output is small.

    For a few hundred output pixels, torch's default CPU convolution (oneDNN) spends most of its time reordering
    the weight for each call; the same convolution as im2col (F.unfold) and one GEMM with the weight as a
    matrix is up to 1.3x faster there (bench/unet_step.py's "im2col" row: the 8x8 and 4x4 levels of an SD 1.5
    UNet at 256x256). Equal to the convolution up to float rounding (2.7e-6 on an SD 1.5 step). Only plain
    nn.Conv2d layers in float32 on the CPU take this path (not a LoRA or fp8 layer, not circular padding, not
    grouped; bf16 keeps oneDNN, whose rounding its tests pin)."""
    if type(layer) is not nn.Conv2d or x.device.type != "cpu" or x.dtype != torch.float32 or layer.groups != 1 \
            or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return layer(x)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    B, _, H, W = x.shape
    Ho, Wo = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if B * Ho * Wo > SMALL_CONV_PIXELS:
        return layer(x)
    cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (B, C k k, Ho Wo)
    out = layer.weight.view(layer.out_channels, -1) @ cols  # (B, C_out, Ho Wo)
    if layer.bias is not None:
        out = out + layer.bias[:, None]
    return out.view(B, layer.out_channels, Ho, Wo)


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1, self.act, self.linear_2 = nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv, plus the (optional) time embedding, twice, with a residual connection."""

    def __init__(self, in_channels: int, out_channels: int | None = None, temb_channels: int | None = 512,
                 groups: int = 32, eps: float = 1e-6, dropout: float = 0.0, output_scale_factor: float = 1.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = conv2d(self.conv1, F.silu(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = conv2d(self.conv2, self.dropout(F.silu(self.norm2(h))))
        skip = conv2d(self.conv_shortcut, x) if self.conv_shortcut is not None else x
        return (skip + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. padding=0 pads right/bottom only (the VAE's layout); padding=1 is symmetric."""

    def __init__(self, channels: int, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return conv2d(self.conv, x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv; `size` forces an output size (odd latent sizes)."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest upsampling has no bf16 kernel on some torch builds
            x = x.float()
        x = F.interpolate(x, size=size, mode="nearest") if size else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return conv2d(self.conv, x.to(dtype))


class Attention(nn.Module):
    """Multi-head (self- or cross-) attention over token sequences (B, N, C), using torch's
    scaled-dot-product attention.

    slice_size: compute attention for that many (batch x head) slices at a time, to bound memory.
    upcast: compute the attention in float32 even for half-precision inputs (SD 2.x needs it in fp16)."""

    def __init__(self, query_dim: int, cross_attention_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 bias: bool = False, out_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(cross_attention_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])
        self.slice_size: int | None = None
        self.upcast = False

    def _split(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.heads, -1).transpose(1, 2)  # (B, heads, N, d)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(context)), self._split(self.to_v(context))
        dtype = q.dtype
        if self.upcast:
            q, k, v = q.float(), k.float(), v.float()
        if self.slice_size is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            B, H = q.shape[:2]
            q, k, v = (t.flatten(0, 1) for t in (q, k, v))  # (B * heads, N, d)
            out = torch.cat([F.scaled_dot_product_attention(q[i:i + self.slice_size], k[i:i + self.slice_size],
                                                            v[i:i + self.slice_size])
                             for i in range(0, len(q), self.slice_size)]).unflatten(0, (B, H))
        out = out.to(dtype).transpose(1, 2).flatten(2)  # (B, N, heads * d)
        return self.to_out[1](self.to_out[0](out))


def set_attention_slice(model: nn.Module, slice_size: int | None) -> None:
    """Attention slicing for every Attention in `model` (None turns it off)."""
    if slice_size is not None and slice_size < 1:
        raise ValueError(f"slice_size must be >= 1 or None; got {slice_size}")
    for m in model.modules():
        if isinstance(m, Attention):
            m.slice_size = slice_size
