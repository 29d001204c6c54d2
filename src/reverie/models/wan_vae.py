"""Wan 2.1's causal 3-D VAE (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models",
arXiv 2503.20314, sec. 3.1): video (B, 3, 1 + 4k, H, W) in [-1, 1] <-> latents (B, z_dim, 1 + k, H / 8, W / 8).

Every 3-D convolution is causal in time (padded only on the past side), so the first frame is encoded alone, as
an image, and a video is streamed in chunks: the encoder sees frame 0, then 4 frames at a time, the decoder one
latent frame at a time. Each causal conv carries the last CACHE_T frames of its input from one chunk to the next
(the feature cache, a dict passed down the call; no module state), and temporal down/up-sampling is skipped on
the first chunk, so 1 + 4k frames give 1 + k latent frames and back. The norm is an L2 normalisation over
channels times sqrt(C) and a learned scale (not torch's RMSNorm); the mid blocks attend within each frame.

WanVAE.enable_tiling adds diffusers' spatial tiling: overlapping tiles of H x W, each streamed through time with
its own feature cache, cross-faded across the overlap. It bounds what one frame's activations cost; what grows
with frame count is the video itself (bench/video_frames.py measures both).

Config keys and parameter names are those of diffusers' AutoencoderKLWan (2.1 layout; Wan 2.2's residual 48-channel
VAE, `is_residual` / `patch_size`, is not implemented), so a diffusers state dict loads strictly, no key map.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .flux import _check_int
from .unet import config_kwargs
from .vae import DiagonalGaussian, _blend

CACHE_T = 2  # frames of history a causal conv with a 3-frame kernel needs
CHUNK = 4  # frames the encoder takes at a time after the first (fixed by the architecture's 4x time compression)

WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclass(frozen=True)
class WanVAEConfig:
    """diffusers' AutoencoderKLWan config (same names, same defaults: Wan 2.1's VAE)."""

    base_dim: int = 96  # encoder width of the first level; level i is base_dim * dim_mult[i] wide
    decoder_base_dim: int | None = None  # the decoder's base width; None: base_dim
    z_dim: int = 16  # latent channels
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)  # width multipliers per level; each level but the last halves H, W
    num_res_blocks: int = 2  # residual blocks per encoder level (the decoder has one more)
    attn_scales: tuple[float, ...] = ()  # only (): Wan 2.1 has no attention outside the mid blocks
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # per downsampling level: halve time too (sic)
    dropout: float = 0.0  # dropout in the residual blocks
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN  # per-channel mean of the latents (z_dim values)
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD  # per-channel std: the DiT sees (z - mean) / std
    is_residual: bool = False  # only False (Wan 2.2's residual down/up blocks are not implemented)
    in_channels: int = 3  # video channels in
    out_channels: int = 3  # video channels out
    patch_size: int | None = None  # only None (Wan 2.2's pixel unshuffle is not implemented)
    scale_factor_temporal: int | None = 4  # time compression; must equal 2 ** sum(temperal_downsample)
    scale_factor_spatial: int | None = 8  # space compression; must equal 2 ** (len(dim_mult) - 1)

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            if isinstance(getattr(self, name), list):  # JSON lists -> tuples, so configs compare as values
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            _check_int(name, getattr(self, name), 1)
        if self.decoder_base_dim is not None:
            _check_int("decoder_base_dim", self.decoder_base_dim, 1)
        mult = self.dim_mult
        if not isinstance(mult, tuple) or not mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1
                                                          for m in mult):
            raise ValueError(f"dim_mult must be a non-empty list of integers >= 1; got {mult!r}")
        down = self.temperal_downsample
        if not isinstance(down, tuple) or len(down) != len(mult) - 1 or any(not isinstance(d, bool) for d in down) \
                or sum(down) > 2:
            raise ValueError(f"temperal_downsample must be {len(mult) - 1} booleans (one per downsampling level of "
                             f"dim_mult), at most 2 True (the encoder's {CHUNK}-frame chunks); got {down!r}")
        if self.attn_scales != ():
            raise ValueError(f"attn_scales must be [] (Wan 2.1's VAE attends only in its mid blocks); got "
                             f"{list(self.attn_scales)}")
        if self.is_residual is not False or self.patch_size is not None:
            raise ValueError(f"is_residual must be False and patch_size None (Wan 2.2's VAE is not implemented); got "
                             f"is_residual={self.is_residual!r}, patch_size={self.patch_size!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1); got {self.dropout!r}")
        for name in ("latents_mean", "latents_std"):
            values = getattr(self, name)
            if not isinstance(values, tuple) or len(values) != self.z_dim or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
                raise ValueError(f"{name} must be z_dim={self.z_dim} numbers; got {values!r}")
        if any(not s > 0 for s in self.latents_std):
            raise ValueError(f"latents_std must be > 0; got {list(self.latents_std)}")
        for name, derived in (("scale_factor_temporal", self.temporal_compression),
                              ("scale_factor_spatial", self.spatial_compression)):
            if getattr(self, name) not in (None, derived):
                raise ValueError(f"{name} must be None or {derived} (what dim_mult and temperal_downsample give); "
                                 f"got {getattr(self, name)!r}")

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WanVAEConfig":
        """From a diffusers AutoencoderKLWan config.json dict; keys starting with "_" are ignored and an unknown
        key must be None or False."""
        return cls(**config_kwargs(cls, d, "Wan VAE", {}, ()))

    def to_dict(self) -> dict[str, Any]:
        """A diffusers AutoencoderKLWan config dict."""
        d = {f.name: list(v) if isinstance(v, tuple) else v
             for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}
        return {"_class_name": "AutoencoderKLWan", **d}


# ---------------------------------------------------------------- layers

class CausalConv3d(nn.Conv3d):
    """Conv3d padded by 2p frames on the past side only (p = the time padding asked for) and symmetrically in
    space. With a feature cache, the previous chunk's last frames stand in for the zero frames, and this chunk's
    last CACHE_T input frames are stored for the next."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.time_pad, self.space_pad = 2 * pt, (pw, pw, ph, ph)

    def forward(self, x: Tensor, cache: dict | None = None) -> Tensor:
        past = 0
        if cache is not None and self.time_pad:
            previous = cache.get(self)
            if previous is not None:
                x = torch.cat([previous, x], dim=2)
                past = previous.shape[2]
            cache[self] = x[:, :, -CACHE_T:].clone()  # (B, C, <= CACHE_T, H, W)
        return super().forward(F.pad(x, (*self.space_pad, self.time_pad - past, 0)))


class RMSNorm(nn.Module):
    """x / ||x||_2 over channels * sqrt(C) * gamma (diffusers' WanRMS_norm; F.normalize, eps 1e-12), in float32
    for half-precision inputs. `images`: (B, C, H, W) inputs, else (B, C, T, H, W)."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * (2 if images else 3)))

    def forward(self, x: Tensor) -> Tensor:
        half = x.dtype in (torch.float16, torch.bfloat16)
        return F.normalize(x.float() if half else x, dim=1).to(x.dtype) * self.scale * self.gamma


def _per_frame(fn, x: Tensor) -> Tensor:
    """Apply a 2-D map to every frame: (B, C, T, H, W) -> (B, C', T, H', W')."""
    B, _, T = x.shape[:3]
    y = fn(x.transpose(1, 2).flatten(0, 1))  # (B * T, C', H', W')
    return y.unflatten(0, (B, T)).transpose(1, 2)


class ResidualBlock(nn.Module):
    """RMS -> SiLU -> causal conv3 -> RMS -> SiLU -> dropout -> causal conv3, plus a 1x1x1 shortcut when the
    width changes."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = RMSNorm(in_dim), CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2, self.conv2 = RMSNorm(out_dim), CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: dict) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))), cache)
        return h + self.conv_shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H * W positions of each frame, with a residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv, self.proj = nn.Conv2d(dim, 3 * dim, 1), nn.Conv2d(dim, dim, 1)

    def _attend(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(n, 1, 3 * c, h * w).transpose(2, 3).contiguous()  # (n, 1, hw, 3c)
        out = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))  # (n, 1, hw, c)
        return self.proj(out.squeeze(1).transpose(1, 2).reshape(n, c, h, w))

    def forward(self, x: Tensor) -> Tensor:
        return x + _per_frame(self._attend, x)


class MidBlock(nn.Module):
    """Residual block, per-frame attention, residual block."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])

    def forward(self, x: Tensor, cache: dict) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x, cache)), cache)


class Upsample2x(nn.Module):
    """Nearest-exact 2x spatial upsampling, computed in float32 (diffusers' WanUpsample)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """Halve (down*) or double (up*) H and W per frame; the 3d modes also halve / double time with a causal
    (3, 1, 1) conv that is skipped on the first chunk, so the first frame keeps its own latent frame.
    Spatial down: zero-pad right and bottom, stride-2 3x3 conv. Spatial up: nearest-exact, 3x3 conv to dim / 2."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":  # 2 output frames per input frame, as 2 * dim channels
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":  # stride 2 over [previous chunk's last frame, this chunk]
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: Tensor, cache: dict) -> Tensor:
        if self.mode == "upsample3d":
            if self in cache:
                B, C, T, H, W = x.shape
                x = self.time_conv(x, cache).reshape(B, 2, C, T, H, W)
                x = torch.stack([x[:, 0], x[:, 1]], dim=3).reshape(B, C, 2 * T, H, W)  # frames t0, t0', t1, ...
            cache[self] = None  # seen: from the second chunk on, double the frames
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            previous, cache[self] = cache.get(self), x[:, :, -1:].clone()
            if previous is not None:
                x = self.time_conv(torch.cat([previous, x], dim=2))
        return x


# ---------------------------------------------------------------- encoder and decoder

class Encoder(nn.Module):
    """conv_in, per level num_res_blocks residual blocks (+ a Resample but on the last), mid block, RMS, SiLU,
    conv_out to 2 * z_dim moments. down_blocks is one flat list, as diffusers' WanEncoder3d."""

    def __init__(self, c: WanVAEConfig):
        super().__init__()
        dims = [c.base_dim * m for m in (1, *c.dim_mult)]
        self.conv_in = CausalConv3d(c.in_channels, dims[0], 3, padding=1)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for j in range(c.num_res_blocks):
                layers.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim, c.dropout))
            if i < len(c.dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if c.temperal_downsample[i] else "downsample2d"))
        self.down_blocks = nn.ModuleList(layers)
        self.mid_block = MidBlock(dims[-1], c.dropout)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * c.z_dim, 3, padding=1)

    def forward(self, x: Tensor, cache: dict) -> Tensor:
        x = self.conv_in(x, cache)
        for layer in self.down_blocks:
            x = layer(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class UpBlock(nn.Module):
    """num_res_blocks + 1 residual blocks, then (but on the last level) a Resample that halves the width."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, mode: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(in_dim if j == 0 else out_dim, out_dim, dropout)
                                      for j in range(num_res_blocks + 1)])
        self.upsamplers = nn.ModuleList([Resample(out_dim, mode)]) if mode else None

    def forward(self, x: Tensor, cache: dict) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        return self.upsamplers[0](x, cache) if self.upsamplers is not None else x


class Decoder(nn.Module):
    """conv_in from z_dim, mid block, up blocks (time doubled where the encoder halved it, mirrored), RMS, SiLU,
    conv_out. Each level after the first starts at half width: the previous upsampler's conv halved it."""

    def __init__(self, c: WanVAEConfig):
        super().__init__()
        base, n = c.decoder_base_dim or c.base_dim, len(c.dim_mult)
        dims = [base * m for m in (c.dim_mult[-1], *c.dim_mult[::-1])]
        temporal_up = c.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(c.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], c.dropout)
        self.up_blocks = nn.ModuleList([
            UpBlock(in_dim // 2 if i > 0 else in_dim, out_dim, c.num_res_blocks, c.dropout,
                    None if i == n - 1 else "upsample3d" if temporal_up[i] else "upsample2d")
            for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], c.out_channels, 3, padding=1)

    def forward(self, z: Tensor, cache: dict) -> Tensor:
        x = self.mid_block(self.conv_in(z, cache), cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


# ---------------------------------------------------------------- spatial tiles

def _tiled(fn, x: Tensor, tile: tuple[int, int], stride: tuple[int, int], out_tile: tuple[int, int],
           out_stride: tuple[int, int]) -> Tensor:
    """fn over overlapping (H, W) tiles of x (B, C, T, H, W), one starting at every multiple of `stride` (edge
    tiles cut short), each tile mapped to out_tile = tile times fn's spatial scale. Each output tile gets its upper,
    then its left neighbour cross-faded into its first out_tile - out_stride rows / columns (in place and in raster
    order, so a neighbour is already blended) and keeps its first out_stride (diffusers' AutoencoderKLWan
    tiled_encode / tiled_decode)."""
    (th, tw), (sh, sw) = tile, stride
    rows = [[fn(x[:, :, :, i:i + th, j:j + tw]) for j in range(0, x.shape[4], sw)] for i in range(0, x.shape[3], sh)]
    (blend_h, blend_w), (keep_h, keep_w) = (t - s for t, s in zip(out_tile, out_stride)), out_stride
    out_rows = []
    for i, row in enumerate(rows):
        for j, y in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], y, blend_h, dim=3)
            if j > 0:
                _blend(row[j - 1], y, blend_w, dim=4)
        out_rows.append(torch.cat([y[:, :, :, :keep_h, :keep_w] for y in row], dim=4))
    return torch.cat(out_rows, dim=3)


# ---------------------------------------------------------------- the autoencoder

class WanVAE(nn.Module):
    """Encoder -> quant_conv -> DiagonalGaussian; post_quant_conv -> Decoder -> clamp to [-1, 1]."""

    def __init__(self, config: WanVAEConfig | None = None):
        super().__init__()
        c = self.config = config or WanVAEConfig()
        self.encoder = Encoder(c)
        self.quant_conv = CausalConv3d(2 * c.z_dim, 2 * c.z_dim, 1)
        self.post_quant_conv = CausalConv3d(c.z_dim, c.z_dim, 1)
        self.decoder = Decoder(c)
        self.use_tiling = False
        self.tile_sample_min_height = self.tile_sample_min_width = 256  # pixels; diffusers' defaults
        self.tile_sample_stride_height = self.tile_sample_stride_width = 192

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> "WanVAE":
        """Build from a diffusers AutoencoderKLWan config.json dict (see WanVAEConfig.from_dict)."""
        return cls(WanVAEConfig.from_dict(d))

    def to_config(self) -> dict[str, Any]:
        """A config dict that diffusers' AutoencoderKLWan.from_config accepts."""
        return self.config.to_dict()

    # --- memory: spatial tiling -----------------------------------------------------------------------------

    def enable_tiling(self, tile_sample_min_height: int | None = None, tile_sample_min_width: int | None = None,
                      tile_sample_stride_height: int | None = None,
                      tile_sample_stride_width: int | None = None) -> None:
        """Encode / decode videos taller than tile_sample_min_height or wider than tile_sample_min_width pixels as
        tiles of that size placed every tile_sample_stride_* pixels, each streamed through time with its own feature
        cache, the overlap (tile - stride, / spatial compression in latents) cross-faded linearly, as diffusers'
        AutoencoderKLWan does; None keeps the current value (at first diffusers' 256 and 192). The output differs
        from the untiled one: a tile sees only its own context.

        Tiling bounds the activations of one frame by one tile. Time needs no tiling: decode already streams one
        latent frame at a time (encode 4 frames) through a cache of CACHE_T frames per conv, so with or without
        tiles memory grows with frame count only through the output video (tiled: plus the tiles' outputs, held
        until they are blended, about (tile / stride)^2 times the video)."""
        s = self.config.spatial_compression
        sizes = {"tile_sample_min_height": tile_sample_min_height, "tile_sample_min_width": tile_sample_min_width,
                 "tile_sample_stride_height": tile_sample_stride_height,
                 "tile_sample_stride_width": tile_sample_stride_width}
        sizes = {name: getattr(self, name) if v is None else v for name, v in sizes.items()}
        for name, v in sizes.items():
            # multiples of s, or tiles are placed at one stride in pixels and cut at another in latents
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v % s:
                raise ValueError(f"{name} must be a positive multiple of the spatial compression {s}; got {v!r}")
        for axis in ("height", "width"):
            tile, stride = sizes[f"tile_sample_min_{axis}"], sizes[f"tile_sample_stride_{axis}"]
            if stride > tile:
                raise ValueError(f"tile_sample_stride_{axis} must be at most tile_sample_min_{axis}={tile} (tiles "
                                 f"must overlap or touch); got {stride}")
        for name, v in sizes.items():
            setattr(self, name, v)
        self.use_tiling = True

    def disable_tiling(self) -> None:
        self.use_tiling = False

    def _tile_pixels(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(tile, stride) in pixels, each (height, width)."""
        return ((self.tile_sample_min_height, self.tile_sample_min_width),
                (self.tile_sample_stride_height, self.tile_sample_stride_width))

    # --- encode / decode ------------------------------------------------------------------------------------

    def _moments(self, x: Tensor) -> Tensor:
        """Video -> quant_conv moments (B, 2 z_dim, T', h, w): frame 0 alone, then 4 at a time, one cache."""
        cache = {}
        chunks = [x[:, :, :1]] + [x[:, :, i:i + CHUNK] for i in range(1, x.shape[2], CHUNK)]
        return self.quant_conv(torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2))

    def _frames(self, z: Tensor) -> Tensor:
        """Latents -> unclamped video, one latent frame at a time through one cache, post_quant_conv too (as
        diffusers' tiled_decode; its untiled decode convolves all frames at once, which rounds differently)."""
        cache = {}
        return torch.cat([self.decoder(self.post_quant_conv(frame), cache) for frame in z.split(1, dim=2)], dim=2)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """(B, in_channels, 1 + 4k, H, W) video in [-1, 1], H and W multiples of the spatial compression ->
        q(z | x) over (B, z_dim, 1 + 4k / temporal_compression, H / s, W / s): frame 0 alone, then 4 at a time,
        through one feature cache (diffusers silently drops frames past the last full chunk; reverie raises);
        with tiling on and x larger than a tile, tile by tile."""
        c, s = self.config, self.config.spatial_compression
        if x.ndim != 5 or x.shape[1] != c.in_channels or (x.shape[2] - 1) % CHUNK or x.shape[3] % s or x.shape[4] % s:
            raise ValueError(f"x must be (B, in_channels={c.in_channels}, 1 + {CHUNK}k frames, H, W) with H and W "
                             f"multiples of {s}; got {tuple(x.shape)}")
        (th, tw), (sh, sw) = self._tile_pixels()
        if self.use_tiling and (x.shape[3] > th or x.shape[4] > tw):
            moments = _tiled(self._moments, x, (th, tw), (sh, sw), (th // s, tw // s), (sh // s, sw // s))
            return DiagonalGaussian(moments)
        return DiagonalGaussian(self._moments(x))  # mean, logvar (clamped to [-30, 20]): (B, z_dim, T', h, w)

    def decode(self, z: Tensor) -> Tensor:
        """(B, z_dim, T', h, w) latents (unnormalised) -> (B, out_channels, 1 + (T' - 1) * temporal_compression,
        h * s, w * s) video clamped to [-1, 1], one latent frame at a time through one feature cache; with tiling
        on and z larger than a tile (tile_sample_min_* / s latents), tile by tile, clamped after blending."""
        c, s = self.config, self.config.spatial_compression
        if z.ndim != 5 or z.shape[1] != c.z_dim:
            raise ValueError(f"z must be (B, z_dim={c.z_dim}, T, h, w); got {tuple(z.shape)}")
        (th, tw), (sh, sw) = self._tile_pixels()
        if self.use_tiling and (z.shape[3] > th // s or z.shape[4] > tw // s):
            frames = _tiled(self._frames, z, (th // s, tw // s), (sh // s, sw // s), (th, tw), (sh, sw))
        else:
            frames = self._frames(z)
        return frames.clamp(-1.0, 1.0)

    def forward(self, x: Tensor, sample_posterior: bool = False, generator=None) -> Tensor:
        """Reconstruction of x through the posterior's mode (or a sample of it)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode())

    # --- the diffusion model's latents: per-channel normalisation (replaces a single scaling_factor) ------------

    def _stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        c = self.config
        shape = (1, c.z_dim, 1, 1, 1)
        mean = torch.tensor(c.latents_mean, device=z.device, dtype=z.dtype).view(shape)
        inv_std = 1.0 / torch.tensor(c.latents_std, device=z.device, dtype=z.dtype).view(shape)
        return mean, inv_std

    def normalize_latents(self, z: Tensor) -> Tensor:
        """(z - latents_mean) / latents_std, computed as diffusers' Wan pipelines do ((z - mean) * (1 / std))."""
        mean, inv_std = self._stats(z)
        return (z - mean) * inv_std

    def denormalize_latents(self, z: Tensor) -> Tensor:
        """z * latents_std + latents_mean, computed as diffusers' Wan pipelines do (z / (1 / std) + mean)."""
        mean, inv_std = self._stats(z)
        return z / inv_std + mean
