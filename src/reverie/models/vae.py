"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", sec. 3 and appendix G), in diffusers' AutoencoderKL layout.

Parameter names equal diffusers' so a diffusers state dict loads with strict=True; `from_config` reads a
diffusers config.json and `to_config` writes one. Images are (B, C, H, W) in [-1, 1]; latents are
(B, latent_channels, H / f, W / f) with f = downsample_factor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..denoisers import randn
from .layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
ACT_FNS = ("silu", "swish")  # the shared ResnetBlock2D is SiLU only; "swish" is diffusers' alias
EPS = 1e-6  # GroupNorm eps everywhere in the LDM autoencoder


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4  # one per resolution; only DownEncoderBlock2D
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4  # one per resolution; only UpDecoderBlock2D
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # encoder widths, high -> low resolution
    layers_per_block: int = 2  # resnets per encoder block (the decoder has one more)
    act_fn: str = "silu"  # "silu" (= "swish")
    latent_channels: int = 4  # channels of z
    norm_num_groups: int = 32  # GroupNorm groups; must divide every width
    sample_size: int = 512  # image size it was trained at; the default tile size for tiling
    scaling_factor: float = 0.18215  # latent std: the diffusion model sees (z - shift) * scaling_factor (LDM D.1)
    shift_factor: float | None = None  # latent mean subtracted before scaling (SD3 / Flux VAEs); None = 0
    force_upcast: bool = True  # the VAE overflows in fp16: pipelines should run it in float32
    use_quant_conv: bool = True  # 1x1 conv on the encoder's moments
    use_post_quant_conv: bool = True  # 1x1 conv on z before the decoder
    mid_block_add_attention: bool = True  # single-head self-attention in both mid blocks

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            if not isinstance(getattr(self, name), tuple):  # lists from JSON; frozen, so set via object
                object.__setattr__(self, name, tuple(getattr(self, name)))
        n = len(self.block_out_channels)
        if n < 1 or any(not isinstance(c, int) or c < 1 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels: expected positive ints; got {self.block_out_channels}")
        for name, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            types = getattr(self, name)
            if len(types) != n or any(t not in allowed for t in types):
                raise ValueError(f"{name}: expected {n} entries (one per block_out_channels) from {allowed}; "
                                 f"got {types}")
        if self.act_fn not in ACT_FNS:
            raise ValueError(f"act_fn: expected one of {ACT_FNS}; got {self.act_fn!r}")
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups",
                     "sample_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive int; got {getattr(self, name)!r}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"norm_num_groups: must divide every block_out_channels {self.block_out_channels}; "
                             f"got {self.norm_num_groups}")
        if not self.scaling_factor > 0:
            raise ValueError(f"scaling_factor: expected > 0; got {self.scaling_factor}")


# The small ones are for training from scratch: f4 is f8 without its last block, with LDM's latent widths
# (kl-f8: 4 channels, kl-f4: 3). Their scaling_factor is SD's until measured (1 / std of trained latents).
VAE_PRESETS = {
    "tiny": VAEConfig(block_out_channels=(8, 16), down_block_types=DOWN_BLOCK_TYPES * 2,  # tests: 43,711 params
                      up_block_types=UP_BLOCK_TYPES * 2, layers_per_block=1, norm_num_groups=4, sample_size=32),
    "sd": VAEConfig(),  # SD 1.x / 2.x: 83,653,863 params
    "small-f8": VAEConfig(block_out_channels=(64, 128, 128, 128), layers_per_block=1,  # 4,971,303 params
                          sample_size=256),
    "small-f4": VAEConfig(block_out_channels=(64, 128, 128), down_block_types=DOWN_BLOCK_TYPES * 3,  # 3,785,599
                          up_block_types=UP_BLOCK_TYPES * 3, layers_per_block=1, latent_channels=3,
                          sample_size=256),
}


class DiagonalGaussian:
    """q(z | x) = N(mean, exp(logvar)) from the encoder's (B, 2 * latent_channels, h, w) moments."""

    def __init__(self, moments: Tensor):
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)  # as LDM's DiagonalGaussianDistribution
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None) -> Tensor:
        """mean + std * eps; a generator list draws one per batch item, as diffusers' randn_tensor does."""
        eps = randn(self.mean.shape, generator=generator, device=self.moments.device, dtype=self.moments.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """(B,) KL(self || other), other = N(0, I) if None, summed over (C, h, w)."""
        if other is None:
            return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=(1, 2, 3))
        return 0.5 * torch.sum((self.mean - other.mean) ** 2 / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=(1, 2, 3))


class VAEAttention(Attention):
    """Single-head self-attention over the h * w positions of a feature map, with a GroupNorm in front and
    a residual around it (LDM's AttnBlock; diffusers' Attention with residual_connection=True)."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, dim_head=channels, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, H * W, C)
        h = super().forward(h).transpose(1, 2).reshape(B, C, H, W)
        return x + h


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution (diffusers' UNetMidBlock2D without temb)."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, temb_channels=None, groups=groups, eps=EPS)
                                      for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class ResnetStack(nn.Module):
    """`num_layers` resnets, then an optional 2x down- or upsampler (DownEncoderBlock2D / UpDecoderBlock2D)."""

    def __init__(self, in_ch: int, out_ch: int, num_layers: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_channels=None,
                                                    groups=groups, eps=EPS) for i in range(num_layers)])
        if resample == "down":  # padding=0: pad right/bottom by one, as LDM does
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(out_ch)])

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for name in ("downsamplers", "upsamplers"):
            if hasattr(self, name):
                x = getattr(self, name)[0](x)
        return x


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2 * latent_channels, H / f, W / f): the moments of q(z | x)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, G, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            ResnetStack(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, G, "down" if i < n - 1 else None)
            for i in range(n)])
        self.mid_block = MidBlock(ch[-1], G, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(G, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch[0], H, W)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)  # (B, ch[-1], H / f, W / f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2 * latent_channels, H / f, W / f)


class Decoder(nn.Module):
    """(B, latent_channels, h, w) -> (B, out_channels, h * f, w * f); each up block has one resnet more."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, G, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], G, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            ResnetStack(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, G, "up" if i < n - 1 else None)
            for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(G, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))  # (B, ch[-1], h, w)
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, h * f, w * f)


def _blend(a: Tensor, b: Tensor, extent: int, dim: int) -> Tensor:
    """Linear cross-fade, in place, from the end of tile `a` into the start of tile `b` along `dim`."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent == 0:
        return b
    w = (torch.arange(extent, dtype=torch.float64) / extent).to(b.device)  # weight of b, 0 -> (e-1)/e
    shape = [1] * b.ndim
    shape[dim] = extent
    w = w.view(shape)
    head = b.narrow(dim, 0, extent)
    head.copy_(a.narrow(dim, a.shape[dim] - extent, extent) * (1 - w).to(b.dtype) + head * w.to(b.dtype))
    return b


def _tiled(fn, x: Tensor, tile_in: int, tile_out: int, overlap_factor: float) -> Tensor:
    """Run `fn` on overlapping tile_in-sized tiles of x (stride tile_in * (1 - overlap)), fade each tile's
    upper and left neighbours into it across the overlap, and keep the first tile_out - blend rows/columns of each (diffusers'
    tiled_encode / tiled_decode: blending is in place and in raster order, so a neighbour is already blended)."""
    stride = int(tile_in * (1 - overlap_factor))
    blend = int(tile_out * overlap_factor)
    keep = tile_out - blend
    rows = [[fn(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                _blend(rows[i - 1][j], tile, blend, dim=2)
            if j > 0:
                _blend(row[j - 1], tile, blend, dim=3)
        out_rows.append(torch.cat([tile[:, :, :keep, :keep] for tile in row], dim=3))
    return torch.cat(out_rows, dim=2)


class AutoencoderKL(nn.Module):
    """Encoder -> quant_conv -> DiagonalGaussian -> post_quant_conv -> Decoder (LDM's AutoencoderKL).

    The config's `force_upcast` is advice for pipelines (SD's VAE overflows in fp16); the module itself
    computes in whatever dtype and device its parameters have, so inputs must match them."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config or VAEConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None
        self.use_slicing = False
        self.use_tiling = False
        self.tile_sample_min_size = config.sample_size
        self.tile_overlap_factor = 0.25

    # --- config -------------------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict) -> "AutoencoderKL":
        """Build from a diffusers AutoencoderKL config.json dict (keys starting with "_" are ignored)."""
        return cls(config_from_dict(config))

    def to_config(self) -> dict:
        """A config dict that diffusers' AutoencoderKL.from_config accepts."""
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.config).items()}
        return {"_class_name": "AutoencoderKL", **cfg}

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor or 0.0

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def tile_latent_min_size(self) -> int:
        return int(self.tile_sample_min_size / self.downsample_factor)

    # --- memory -------------------------------------------------------------------------------------

    def enable_slicing(self) -> None:
        """Encode and decode one batch item at a time (identical results, less peak memory)."""
        self.use_slicing = True

    def disable_slicing(self) -> None:
        self.use_slicing = False

    def enable_tiling(self, tile_sample_min_size: int | None = None, tile_overlap_factor: float = 0.25) -> None:
        """Encode/decode inputs larger than a tile as overlapping tiles (tile_sample_min_size pixels, default
        config.sample_size; tile_sample_min_size / f latents) blended linearly across the overlap, as
        diffusers does. Output differs from the untiled one: each tile sees only its own context."""
        size = self.config.sample_size if tile_sample_min_size is None else tile_sample_min_size
        o, f = tile_overlap_factor, self.downsample_factor
        if not 0 <= o < 1:
            raise ValueError(f"tile_overlap_factor: expected a float in [0, 1); got {o}")
        if not isinstance(size, int) or size % f or int(size // f * (1 - o)) < 1:
            raise ValueError(f"tile_sample_min_size: expected a multiple of downsample_factor={f} with a latent "
                             f"tile stride >= 1; got {size!r}")
        # Tiles are placed at the input stride but cut to the output's kept width: the two must agree, or the
        # output is misaligned and the wrong size (diffusers does not check). They do when the overlap is a
        # whole number of latents.
        latent = size // f
        if int(size * (1 - o)) != f * (latent - int(latent * o)) or f * int(latent * (1 - o)) != size - int(size * o):
            raise ValueError(f"tile_overlap_factor: tile_sample_min_size * tile_overlap_factor must be a multiple "
                             f"of downsample_factor={f}; got {size} * {o}")
        self.use_tiling = True
        self.tile_sample_min_size, self.tile_overlap_factor = size, tile_overlap_factor

    def disable_tiling(self) -> None:
        self.use_tiling = False

    # --- encode / decode ----------------------------------------------------------------------------

    def _moments(self, x: Tensor) -> Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h  # (B, 2 * latent_channels, h, w)

    def _decode(self, z: Tensor) -> Tensor:
        z = self.post_quant_conv(z) if self.post_quant_conv is not None else z
        return self.decoder(z)

    def _encode_batch(self, x: Tensor) -> Tensor:
        t = self.tile_sample_min_size
        if self.use_tiling and (x.shape[2] > t or x.shape[3] > t):
            return _tiled(self._moments, x, t, self.tile_latent_min_size, self.tile_overlap_factor)
        return self._moments(x)

    def _decode_batch(self, z: Tensor) -> Tensor:
        t = self.tile_latent_min_size
        if self.use_tiling and (z.shape[2] > t or z.shape[3] > t):
            return _tiled(self._decode, z, t, self.tile_sample_min_size, self.tile_overlap_factor)
        return self._decode(z)

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """(B, in_channels, H, W) images in [-1, 1], H and W multiples of downsample_factor -> q(z | x)."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"x: expected (B, {self.config.in_channels}, H, W) with H and W multiples of "
                             f"downsample_factor={f}; got {tuple(x.shape)}")
        if self.use_slicing and x.shape[0] > 1:
            return DiagonalGaussian(torch.cat([self._encode_batch(xi) for xi in x.split(1)]))
        return DiagonalGaussian(self._encode_batch(x))

    def decode(self, z: Tensor) -> Tensor:
        """(B, latent_channels, h, w) unscaled latents -> (B, out_channels, h * f, w * f) images."""
        if z.ndim != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"z: expected (B, {self.config.latent_channels}, h, w); got {tuple(z.shape)}")
        if self.use_slicing and z.shape[0] > 1:
            return torch.cat([self._decode_batch(zi) for zi in z.split(1)])
        return self._decode_batch(z)

    def forward(self, x: Tensor, sample_posterior: bool = False, generator=None) -> Tensor:
        """Reconstruction of x through the posterior's mode (or a sample of it)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode())

    # --- for the pipeline ---------------------------------------------------------------------------

    def latents_from_images(self, x: Tensor, generator=None) -> Tensor:
        """Images in [-1, 1] -> the diffusion model's latents: (z - shift_factor) * scaling_factor, z ~ q(z | x)."""
        return (self.encode(x).sample(generator) - self.shift_factor) * self.scaling_factor

    def images_from_latents(self, z: Tensor) -> Tensor:
        """The diffusion model's latents -> images in (about) [-1, 1]; the inverse scaling of latents_from_images."""
        return self.decode(z / self.scaling_factor + self.shift_factor)


# diffusers AutoencoderKL arguments reverie does not implement, with the only value it accepts
_UNSUPPORTED_DEFAULTS = {"latents_mean": None, "latents_std": None}


def config_from_dict(config: dict) -> VAEConfig:
    """A diffusers AutoencoderKL config dict -> VAEConfig; unknown keys and unsupported values raise."""
    fields = {f.name for f in dataclasses.fields(VAEConfig)}
    kwargs = {}
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key in _UNSUPPORTED_DEFAULTS:
            if value != _UNSUPPORTED_DEFAULTS[key]:
                raise ValueError(f"{key}: only {_UNSUPPORTED_DEFAULTS[key]!r} is supported; got {value!r}")
            continue
        if key not in fields:
            raise ValueError(f"{key}: not an AutoencoderKL config key; allowed: {sorted(fields)}")
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    defaults = {"down_block_types": DOWN_BLOCK_TYPES, "up_block_types": UP_BLOCK_TYPES,
                "block_out_channels": (64,), "layers_per_block": 1, "sample_size": 32}
    return VAEConfig(**{**defaults, **kwargs})  # missing keys take diffusers' defaults, not SD's
