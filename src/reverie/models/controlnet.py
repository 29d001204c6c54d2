"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a
trainable copy of the UNet's encoder that reads a control image (edges, a segmentation map, ...) and returns one
residual per skip connection plus one for the mid block, which a frozen UNet adds to its own
(`UNet.forward(..., down_block_additional_residuals=, mid_block_additional_residual=)`).

Every output passes through a zero-initialised 1x1 conv ("zero convolution"), and so does the control image's
embedding, so a new ControlNet adds exactly zero: training starts from the frozen model's own behaviour.

For SDXL (addition_embed_type="text_time") the ControlNet also takes the UNet's added conditioning, the pooled
text embedding and the micro-conditioning ids (`text_embeds=`, `time_ids=`), into its time embedding.

Config keys and parameter names are those of diffusers' ControlNetModel: its config.json builds the same network
and its state dict loads strictly, no key map.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..schedules import _check_choice
from .layers import Attention, TimestepEmbedding, set_attention_slice, timestep_embedding
from .unet import DOWN_BLOCK_TYPES, UNet, UNetConfig, build_encoder, config_kwargs

CHANNEL_ORDERS = ("rgb", "bgr")
# diffusers ControlNetModel keys for features reverie does not implement: the only value each may take
FIXED_KEYS = {
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "class_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
}
IGNORED_KEYS = ("addition_embed_type_num_heads",)  # only used by addition embeddings reverie does not build ("text")
UP_BLOCK = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


@dataclass(frozen=True)
class ControlNetConfig:
    """diffusers' ControlNetModel config (same names, same defaults). The UNet fields mean what they mean in
    UNetConfig and must equal the UNet's for the residuals to fit it."""

    in_channels: int = 4  # latent channels of the UNet
    conditioning_channels: int = 3  # channels of the control image
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"  # or "UNetMidBlock2D" (a ControlNet always has a mid block)
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8  # the NUMBER of heads (diffusers' naming quirk), per block
    num_attention_heads: int | tuple[int, ...] | None = None  # heads; overrides attention_head_dim
    use_linear_projection: bool = False
    upcast_attention: bool = False
    controlnet_conditioning_channel_order: str = "rgb"  # "bgr": the control image's channels are flipped first
    # the control image's encoder: 3x3 convs, a stride-2 conv between entries, so the image is downsampled
    # 2 ** (len - 1) times; that must be the VAE's factor (8 for SD: 4 entries; 4 for the shapes model: 3)
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False  # residuals averaged over space (shuffle-style ControlNets)
    # SDXL's micro-conditioning, as in UNetConfig: the pooled text and the size/crop ids join the time embedding
    addition_embed_type: str | None = None  # None or "text_time" (SDXL)
    addition_time_embed_dim: int | None = None  # sinusoid width per time id (256 in SDXL); text_time only
    projection_class_embeddings_input_dim: int | None = None  # add_embedding's input: pooled dim + ids * time dim

    def __post_init__(self):
        for f in dataclasses.fields(self):  # JSON lists -> tuples
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        _check_choice("mid_block_type", self.mid_block_type, ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"))
        _check_choice("controlnet_conditioning_channel_order", self.controlnet_conditioning_channel_order,
                      CHANNEL_ORDERS)
        channels = self.conditioning_embedding_out_channels
        if not channels or not all(isinstance(c, int) and c >= 1 for c in channels):
            raise ValueError(f"conditioning_embedding_out_channels must be a non-empty list of integers >= 1; got "
                             f"{channels!r}")
        if not isinstance(self.conditioning_channels, int) or self.conditioning_channels < 1:
            raise ValueError(f"conditioning_channels must be an integer >= 1; got {self.conditioning_channels!r}")
        self.unet_config()  # checks the UNet fields

    def unet_config(self) -> UNetConfig:
        """The UNet config whose encoder this ControlNet copies (up blocks mirrored; a UNet's other fields at
        their defaults)."""
        for i, kind in enumerate(self.down_block_types):
            _check_choice(f"down_block_types[{i}]", kind, DOWN_BLOCK_TYPES)
        names = {f.name for f in dataclasses.fields(UNetConfig)}
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in names}
        up = tuple(UP_BLOCK[kind] for kind in reversed(self.down_block_types))
        return UNetConfig(**shared, out_channels=self.in_channels, up_block_types=up)

    @classmethod
    def from_unet(cls, unet: UNetConfig, **overrides) -> "ControlNetConfig":
        """The ControlNet config that fits a UNet (diffusers' ControlNetModel.from_unet), plus overrides such
        as conditioning_embedding_out_channels."""
        names = {f.name for f in dataclasses.fields(cls)}
        shared = {f.name: getattr(unet, f.name) for f in dataclasses.fields(unet) if f.name in names}
        for name in ("layers_per_block", "cross_attention_dim"):  # one value for all blocks in ControlNetModel
            values = set(unet.per_block(name))
            if len(values) != 1:
                raise ValueError(f"ControlNet: the UNet's {name} differs per block ({getattr(unet, name)!r}); "
                                 f"diffusers' ControlNetModel takes one value")
            shared[name] = values.pop()
        if unet.encoder_hid_dim is not None:
            raise ValueError("ControlNet: a UNet with encoder_hid_dim (a text projection) is not supported yet")
        if unet.mid_block_type is None:
            raise ValueError("ControlNet: the UNet has no mid block (mid_block_type=None); a ControlNet needs one")
        if unet.conv_in_kernel != 3 or unet.time_embedding_dim not in (None, 4 * unet.block_out_channels[0]):
            raise ValueError("ControlNet: the UNet's conv_in_kernel must be 3 and its time_embedding_dim None, as in "
                             "diffusers' ControlNetModel")
        return cls(**(shared | overrides))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ControlNetConfig":
        """From a diffusers ControlNetModel config.json dict; keys starting with "_" are ignored."""
        return cls(**config_kwargs(cls, d, "ControlNet", FIXED_KEYS, IGNORED_KEYS))

    def to_dict(self) -> dict[str, Any]:
        """A diffusers ControlNetModel config dict."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {"_class_name": "ControlNetModel", **d}


class ControlNetConditioningEmbedding(nn.Module):
    """The control image's encoder: conv_in, then per level a 3x3 conv and a stride-2 3x3 conv, SiLU after each,
    then a zero-initialised conv_out to the UNet's first width (ControlNet paper, section 3.2)."""

    def __init__(self, out_channels: int, in_channels: int = 3, channels: tuple[int, ...] = (16, 32, 96, 256)):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = zero_module(nn.Conv2d(channels[-1], out_channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, C0, H / f, W / f)
        x = F.silu(self.conv_in(x))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


def conditioning_channels_for(downsample_factor: int) -> tuple[int, ...]:
    """conditioning_embedding_out_channels for a VAE factor (a power of 2): diffusers' (16, 32, 96, 256) cut to
    log2(factor) + 1 entries (one stride-2 conv between entries), extended with 256 beyond 8."""
    f = downsample_factor
    if isinstance(f, bool) or not isinstance(f, int) or f < 1 or f & (f - 1):
        raise ValueError(f"downsample_factor must be a power of 2 >= 1; got {f!r}")
    return ((16, 32, 96) + (256,) * f.bit_length())[:f.bit_length()]


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` (the paper's "zero convolution")."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


class ControlNet(nn.Module):
    """net(sample, timestep, encoder_hidden_states, controlnet_cond) -> (down residuals, mid residual), with
    one down residual per skip connection of the UNet it was made for.

        controlnet = ControlNet.from_unet(unet)  # the encoder's weights copied, the zero convs zero
        down, mid = controlnet(x_t, t, context, control_image)  # control_image (B, 3, H, W) in [0, 1]
        eps = unet(x_t, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    """

    def __init__(self, config: ControlNetConfig | None = None):
        super().__init__()
        c = self.config = config or ControlNetConfig()
        u = c.unet_config()
        chans = c.block_out_channels
        self.conv_in, self.time_embedding, self.down_blocks, self.mid_block = build_encoder(u)
        # SDXL: the same added embedding as the UNet's (diffusers' add_time_proj has no parameters)
        self.add_embedding = (None if c.addition_embed_type is None else
                              TimestepEmbedding(c.projection_class_embeddings_input_dim, 4 * chans[0]))
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(chans[0], c.conditioning_channels,
                                                                         c.conditioning_embedding_out_channels)
        # one zero conv per skip connection: conv_in's output, every resnet's, every downsampler's
        skip_channels = [chans[0]]
        for block, width in zip(self.down_blocks, chans):
            skip_channels += [width] * (len(block.resnets) + (block.downsamplers is not None))
        self.controlnet_down_blocks = nn.ModuleList([zero_module(nn.Conv2d(ch, ch, 1)) for ch in skip_channels])
        self.controlnet_mid_block = zero_module(nn.Conv2d(chans[-1], chans[-1], 1))
        for m in self.modules():
            if isinstance(m, Attention):
                m.upcast = c.upcast_attention

    @classmethod
    def from_unet(cls, unet: UNet, *, downsample_factor: int | None = None, copy_weights: bool = True,
                  **overrides) -> "ControlNet":
        """A ControlNet for `unet`: its config, and (copy_weights) the weights of its conv_in, time embedding,
        added (SDXL text_time) embedding, down blocks and mid block, as diffusers' ControlNetModel.from_unet.
        downsample_factor: the VAE's (sets conditioning_embedding_out_channels, e.g. (16, 32, 96) for 4; None:
        diffusers' default, for 8).
        overrides: other ControlNetConfig fields."""
        if downsample_factor is not None:
            overrides.setdefault("conditioning_embedding_out_channels", conditioning_channels_for(downsample_factor))
        net = cls(ControlNetConfig.from_unet(unet.config, **overrides))
        if copy_weights:
            for name in ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block"):
                if getattr(net, name) is not None:
                    getattr(net, name).load_state_dict(getattr(unet, name).state_dict())
        return net.to(next(unet.parameters()).device, next(unet.parameters()).dtype)

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> "ControlNet":
        """Build from a diffusers ControlNetModel config.json dict."""
        return cls(ControlNetConfig.from_dict(d))

    def to_config(self) -> dict[str, Any]:
        return self.config.to_dict()

    @property
    def downsample_factor(self) -> int:
        """How much smaller the latents are than the control image (the VAE's factor this ControlNet expects)."""
        return 2 ** (len(self.config.conditioning_embedding_out_channels) - 1)

    def set_attention_slice(self, slice_size: int | None) -> None:
        set_attention_slice(self, slice_size)

    def forward(self, sample: Tensor, timestep, encoder_hidden_states: Tensor, controlnet_cond: Tensor, *,
                conditioning_scale: float = 1.0, guess_mode: bool = False, text_embeds: Tensor | None = None,
                time_ids: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        """sample (B, in_channels, h, w), timestep (B,) or scalar, encoder_hidden_states (B, T, D),
        controlnet_cond (B, conditioning_channels, h * f, w * f) in [0, 1] -> (down residuals, mid residual).
        text_embeds (B, pooled dim) and time_ids (B, n): SDXL's added conditioning, as UNet.forward takes them
        (required with addition_embed_type="text_time", refused otherwise).

        Residuals are multiplied by conditioning_scale; guess_mode scales them from 0.1 (first skip) to 1 (mid
        block) on a log scale, as diffusers does for prompt-free control."""
        c = self.config
        if sample.ndim != 4 or sample.shape[1] != c.in_channels:
            raise ValueError(f"sample must be (B, in_channels={c.in_channels}, h, w); got {tuple(sample.shape)}")
        f = self.downsample_factor
        expected = (len(sample), c.conditioning_channels, sample.shape[2] * f, sample.shape[3] * f)
        if tuple(controlnet_cond.shape) != expected:
            raise ValueError(f"controlnet_cond must be {expected} (the latents' size times {f}); got "
                             f"{tuple(controlnet_cond.shape)}")
        if c.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond.flip(1)
        t = UNet._timesteps(self, timestep, sample)  # same broadcasting rules as the UNet
        temb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        temb = self.time_embedding(temb.to(sample.dtype))  # (B, 4 * C0)
        if self.add_embedding is not None:  # same checks and arithmetic as the UNet's
            temb = temb + UNet._text_time_embedding(self, text_embeds, time_ids, len(sample), temb.dtype)
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds and time_ids are only used with addition_embed_type='text_time'; this "
                             "ControlNet has addition_embed_type=None")

        h = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)  # (B, C0, h, w)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, encoder_hidden_states)
            skips += block_skips
        h = self.mid_block(h, temb, encoder_hidden_states)

        down = [zero_conv(s) for s, zero_conv in zip(skips, self.controlnet_down_blocks)]
        mid = self.controlnet_mid_block(h)
        if guess_mode and not c.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * conditioning_scale
            down, mid = [d * s for d, s in zip(down, scales)], mid * scales[-1]
        else:
            down, mid = [d * conditioning_scale for d in down], mid * conditioning_scale
        if c.global_pool_conditions:
            down, mid = [d.mean(dim=(2, 3), keepdim=True) for d in down], mid.mean(dim=(2, 3), keepdim=True)
        return down, mid
