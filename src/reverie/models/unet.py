"""The Stable Diffusion denoising UNet, SD 1.x / 2.x / SDXL layouts (Rombach et al. 2022, "High-Resolution Image
Synthesis with Latent Diffusion Models"; the UNet of Ho et al. 2020 with the transformer blocks of LDM; SDXL's
per-block transformer depths and size/crop conditioning, Podell et al. 2023).

Config keys and parameter names are those of diffusers' UNet2DConditionModel, so a diffusers config.json
builds the same network and its state dict loads with `load_state_dict(..., strict=True)`, no key map.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..schedules import _check_choice
from .step_cache import DeepCache
from .layers import (Attention, Downsample2D, ResnetBlock2D, TimestepEmbedding, Upsample2D, set_attention_slice,
                     timestep_embedding)

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
ADDITION_EMBED_TYPES = ("text_time", None)  # "text_time": SDXL's pooled-text + size/crop conditioning

# diffusers config keys for features reverie does not implement: the only value each may take.
FIXED_KEYS = {
    "class_embed_type": None, "num_class_embeds": None, "class_embeddings_concat": False,
    "dual_cross_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_act_fn": None, "timestep_post_act": None,
    "reverse_transformer_layers_per_block": None, "attention_type": "default",
    "cross_attention_norm": None,
}
# diffusers config keys that only matter for block types reverie does not build: any value is accepted.
IGNORED_KEYS = ("mid_block_only_cross_attention", "addition_embed_type_num_heads")
PER_BLOCK = ("only_cross_attention", "layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
             "attention_head_dim", "num_attention_heads")


def config_kwargs(cls, d: dict[str, Any], what: str, fixed: dict, ignored) -> dict[str, Any]:
    """The dataclass `cls`'s keyword arguments from a diffusers config dict: keys starting with "_" and `ignored`
    ones are skipped; a key for a feature reverie lacks (`fixed`) must hold its only supported value; an unknown
    key must be None or False."""
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key.startswith("_") or key in ignored:
            continue
        if key in fields:
            kwargs[key] = value
        elif key in fixed:
            if value != fixed[key]:
                raise ValueError(f"{key}={value!r} is not supported; the only supported value is {fixed[key]!r}")
        elif value is not None and value is not False:
            raise ValueError(f"unknown {what} config key {key}={value!r}; only None or False are accepted for "
                             f"keys reverie does not know")
    return kwargs


@dataclass(frozen=True)
class UNetConfig:
    """diffusers' UNet2DConditionModel config (same names, same defaults). Per-block fields take one value
    for all blocks or a tuple with one entry per down block (up blocks use them in reverse)."""

    sample_size: int | tuple[int, int] | None = None  # latent size the model was trained at (informational)
    in_channels: int = 4  # latent channels in; 9 for SD inpainting (latents + mask + masked-image latents)
    out_channels: int = 4  # channels predicted (eps or v)
    center_input_sample: bool = False  # feed 2 * sample - 1 instead of sample
    flip_sin_to_cos: bool = True  # timestep embedding order [cos, sin] rather than [sin, cos]
    freq_shift: float = 0  # frequency exponent divisor is (C0 / 2 - freq_shift)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)  # in DOWN_BLOCK_TYPES
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"  # in MID_BLOCK_TYPES (None: no mid block)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3  # in UP_BLOCK_TYPES
    only_cross_attention: bool | tuple[bool, ...] = False  # per block: attn1 also attends to the text
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # channels of each resolution level
    layers_per_block: int | tuple[int, ...] = 2  # per block: resnets per down block (up blocks get one more)
    downsample_padding: int = 1  # padding of the stride-2 downsampling conv (0: pad right/bottom only)
    mid_block_scale_factor: float = 1.0  # the mid block's resnets divide their output by this
    dropout: float = 0.0  # dropout in resnets, attention outputs and feed-forwards
    act_fn: str = "silu"  # "silu" (alias "swish"), the only activation of the SD UNet
    norm_num_groups: int = 32  # GroupNorm groups; must divide every block_out_channels entry
    norm_eps: float = 1e-5  # GroupNorm eps of resnets and the output norm (transformers use 1e-6)
    cross_attention_dim: int | tuple[int, ...] = 1280  # per block: width of encoder_hidden_states (768 SD1, 1024 SD2)
    transformer_layers_per_block: int | tuple[int, ...] = 1  # per block: BasicTransformerBlocks per transformer
    # diffusers' naming quirk: attention_head_dim holds the NUMBER OF HEADS (head dim = channels // heads)
    attention_head_dim: int | tuple[int, ...] = 8  # per block: heads, unless num_attention_heads is set
    num_attention_heads: int | tuple[int, ...] | None = None  # per block: heads; overrides attention_head_dim
    use_linear_projection: bool = False  # transformer proj_in/proj_out as Linear (SD2) rather than 1x1 conv (SD1)
    upcast_attention: bool = False  # compute attention in float32 for half-precision inputs (SD 2.1 in fp16)
    time_embedding_dim: int | None = None  # width of the time embedding; None: 4 * block_out_channels[0]
    conv_in_kernel: int = 3  # kernel size of conv_in (odd)
    conv_out_kernel: int = 3  # kernel size of conv_out (odd)
    # a Linear from the text encoder's width to cross_attention_dim ("text_proj", the only type reverie builds):
    # conditions the UNet on an encoder of another width (a frozen sentence encoder)
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None  # "text_proj" (or None: text_proj when encoder_hid_dim is set)
    # SDXL's micro-conditioning (Podell et al. 2023, "SDXL", section 2.2): each of the time_ids (original size,
    # crop, target size or aesthetic score) gets a sinusoid of addition_time_embed_dim; they follow the pooled
    # text embedding into add_embedding, an MLP whose output is added to the time embedding
    addition_embed_type: str | None = None  # in ADDITION_EMBED_TYPES
    addition_time_embed_dim: int | None = None  # sinusoid width per time id (256 in SDXL); text_time only
    projection_class_embeddings_input_dim: int | None = None  # add_embedding's input: pooled dim + ids * time dim
    # LCM (Luo et al. 2023): width of `timestep_cond` (the guidance-scale embedding), which a bias-free Linear
    # adds to the timestep sinusoid before the time MLP
    time_cond_proj_dim: int | None = None

    def __post_init__(self):
        for f in dataclasses.fields(self):  # JSON lists -> tuples, so configs compare and hash as values
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))
        n = len(self.block_out_channels)
        for name in ("down_block_types", "up_block_types"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} must have one entry per block_out_channels entry ({n}); "
                                 f"got {getattr(self, name)!r}")
        for i, kind in enumerate(self.down_block_types):
            _check_choice(f"down_block_types[{i}]", kind, DOWN_BLOCK_TYPES)
        for i, kind in enumerate(self.up_block_types):
            _check_choice(f"up_block_types[{i}]", kind, UP_BLOCK_TYPES)
        _check_choice("mid_block_type", self.mid_block_type, MID_BLOCK_TYPES)
        _check_choice("act_fn", self.act_fn, ("silu", "swish"))
        for name in PER_BLOCK:
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != n:
                raise ValueError(f"{name} must be one value or one per block ({n}); got {value!r}")
        if any(isinstance(v, (tuple, list)) for v in self.per_block("transformer_layers_per_block")):
            raise ValueError("transformer_layers_per_block: per-layer lists (asymmetric UNets, with "
                             "reverse_transformer_layers_per_block) are not supported; give one integer per block; "
                             f"got {self.transformer_layers_per_block!r}")
        for name in ("layers_per_block", "transformer_layers_per_block", "cross_attention_dim", "heads"):
            for v in self.per_block(name):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    field = "attention_head_dim/num_attention_heads" if name == "heads" else name
                    raise ValueError(f"{field} must be integers >= 1; got {v!r}")
        groups = self.norm_num_groups
        if not isinstance(groups, int) or groups < 1 or any(c % groups for c in self.block_out_channels):
            raise ValueError(f"norm_num_groups must be an integer dividing every block_out_channels entry "
                             f"{self.block_out_channels}; got {groups!r}")
        for name in ("conv_in_kernel", "conv_out_kernel"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) % 2 != 1:
                raise ValueError(f"{name} must be an odd integer; got {getattr(self, name)!r}")
        if self.encoder_hid_dim is None:
            if self.encoder_hid_dim_type is not None:
                raise ValueError(f"encoder_hid_dim must be set when encoder_hid_dim_type is "
                                 f"{self.encoder_hid_dim_type!r}")
        else:
            if isinstance(self.encoder_hid_dim, bool) or not isinstance(self.encoder_hid_dim, int) \
                    or self.encoder_hid_dim < 1:
                raise ValueError(f"encoder_hid_dim must be None or an integer >= 1; got {self.encoder_hid_dim!r}")
            _check_choice("encoder_hid_dim_type", self.encoder_hid_dim_type, ("text_proj", None))
            object.__setattr__(self, "encoder_hid_dim_type", "text_proj")  # diffusers' default for a set dim
            if len(set(self.per_block("cross_attention_dim"))) != 1:
                raise ValueError("encoder_hid_dim: the text projection needs one cross_attention_dim for all "
                                 f"blocks; got {self.cross_attention_dim!r}")
        self._check_addition_embedding()
        d = self.time_cond_proj_dim
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise ValueError(f"time_cond_proj_dim must be None or an integer >= 1; got {d!r}")

    def _check_addition_embedding(self):
        _check_choice("addition_embed_type", self.addition_embed_type, ADDITION_EMBED_TYPES)
        dims = ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
        if self.addition_embed_type is None:
            for name in dims:  # diffusers would ignore them, but a set one suggests a mistyped config
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}={getattr(self, name)!r} is only used with "
                                     f"addition_embed_type='text_time'; got addition_embed_type=None")
            return
        for name in dims:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"addition_embed_type='text_time' needs {name} as an integer >= 1; got {v!r}")

    def per_block(self, name: str) -> tuple:
        """A per-block field (or "heads", the number of attention heads) as a tuple with one entry per block."""
        if name == "heads":
            name = "attention_head_dim" if self.num_attention_heads is None else "num_attention_heads"
        value = getattr(self, name)
        return value if isinstance(value, tuple) else (value,) * len(self.block_out_channels)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        """From a diffusers UNet2DConditionModel config.json dict. Keys starting with "_" are ignored; a key for a
        feature reverie lacks must hold its default, and an unknown key must be None or False."""
        return cls(**config_kwargs(cls, d, "UNet", FIXED_KEYS, IGNORED_KEYS))

    def to_dict(self) -> dict[str, Any]:
        """A diffusers UNet2DConditionModel config dict. The heads go in attention_head_dim, because diffusers
        refuses num_attention_heads for this class."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["attention_head_dim"] = d["num_attention_heads"] or d["attention_head_dim"]
        d["num_attention_heads"] = None
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        return {"_class_name": "UNet2DConditionModel", **d}


class GEGLU(nn.Module):
    """Linear -> (x, gate) -> x * GELU(gate) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer MLP: GEGLU to 4 * dim, dropout, back to dim."""

    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(dropout), nn.Linear(mult * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer layer on image tokens: self-attention, cross-attention to the text tokens,
    GEGLU feed-forward, each with a residual connection (Vaswani et al. 2017; LDM, Rombach et al. 2022)."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int,
                 only_cross_attention: bool = False, dropout: float = 0.0):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, cross_attention_dim if only_cross_attention else None, heads, dim_head,
                               dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, cross_attention_dim, heads, dim_head, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:  # x: (B, N, dim), context: (B, T, D)
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> transformer layers over the H * W tokens -> proj_out, plus the input (LDM's
    SpatialTransformer). proj_in/proj_out are 1x1 convs (SD1) or Linear layers (SD2)."""

    def __init__(self, channels: int, heads: int, cross_attention_dim: int, num_layers: int = 1, groups: int = 32,
                 use_linear_projection: bool = False, only_cross_attention: bool = False, dropout: float = 0.0):
        super().__init__()
        dim_head = channels // heads
        inner = heads * dim_head  # == channels unless heads does not divide it (diffusers allows that)
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = nn.Linear if use_linear_projection else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, inner)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim, only_cross_attention, dropout)
            for _ in range(num_layers)])
        self.proj_out = proj(inner, channels)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        B, _, H, W = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, -1)  # (B, HW, C)
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W), NCHW memory like x
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return h + x


class DownBlock(nn.Module):
    """One resolution level on the way down: resnets (each followed by a transformer in CrossAttnDownBlock2D),
    then a stride-2 conv unless it is the last level. Returns the output and the skip tensors it leaves."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, num_layers: int,
                 add_downsample: bool, transformer=None, groups: int = 32, eps: float = 1e-5,
                 dropout: float = 0.0, downsample_padding: int = 1):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, temb_channels, groups, eps, dropout)
            for j in range(num_layers)])
        self.attentions = nn.ModuleList([transformer(out_channels) for _ in range(num_layers)]) if transformer else None
        self.downsamplers = (nn.ModuleList([Downsample2D(out_channels, padding=downsample_padding)])
                             if add_downsample else None)

    def forward(self, x: Tensor, temb: Tensor, context: Tensor, downsample: bool = True) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            skips.append(x)
        if self.downsamplers is not None and downsample:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """The bottleneck: resnet, then (UNetMidBlock2DCrossAttn) transformer -> resnet; UNetMidBlock2D is one resnet."""

    def __init__(self, channels: int, temb_channels: int, transformer=None, groups: int = 32, eps: float = 1e-5,
                 dropout: float = 0.0, output_scale_factor: float = 1.0):
        super().__init__()
        n_attn = 1 if transformer else 0
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, temb_channels, groups, eps, dropout, output_scale_factor)
            for _ in range(1 + n_attn)])
        self.attentions = nn.ModuleList([transformer(channels) for _ in range(n_attn)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attn(x, context), temb)
        return x


class UpBlock(nn.Module):
    """One resolution level on the way up: each resnet takes the running tensor concatenated with a skip
    (the last one pushed first), followed by a transformer in CrossAttnUpBlock2D; then 2x upsampling."""

    def __init__(self, in_channels: int, prev_output_channel: int, out_channels: int, temb_channels: int,
                 num_layers: int, add_upsample: bool, transformer=None, groups: int = 32, eps: float = 1e-5,
                 dropout: float = 0.0):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_output_channel if j == 0 else out_channels)
                          + (in_channels if j == num_layers - 1 else out_channels),
                          out_channels, temb_channels, groups, eps, dropout)
            for j in range(num_layers)])
        self.attentions = nn.ModuleList([transformer(out_channels) for _ in range(num_layers)]) if transformer else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None
        self.freeu: tuple[float, float] | None = None  # (b, s): UNet.enable_freeu

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor, context: Tensor,
                upsample_size: tuple[int, int] | None = None) -> Tensor:
        for j, resnet in enumerate(self.resnets):
            skip = skips[-1 - j]
            if self.freeu is not None:  # FreeU: amplify half the backbone's channels, damp the skip's low frequencies
                b, s = self.freeu
                half = x.shape[1] // 2
                x = torch.cat([x[:, :half] * b, x[:, half:]], dim=1)
                skip = fourier_filter(skip, 1, s)
            x = resnet(torch.cat([x, skip], dim=1), temb)  # (B, C + C_skip, H, W) -> (B, C_out, H, W)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


def fourier_filter(x: Tensor, threshold: int, scale: float) -> Tensor:
    """FreeU's skip filter (Si et al. 2023, eq. 6): the centred (2 threshold)^2 lowest spatial frequencies of x
    scaled by `scale`, in float32 (diffusers' fourier_filter)."""
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    H, W = x.shape[-2:]
    mask = torch.ones(H, W, device=x.device)
    mask[H // 2 - threshold:H // 2 + threshold, W // 2 - threshold:W // 2 + threshold] = scale
    out = torch.fft.ifftn(torch.fft.ifftshift(freq * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return out.to(x.dtype)


def transformer_factory(c: UNetConfig, i: int):
    """A Transformer2DModel factory (channels -> module) for block i, in the down order, of config c."""
    heads, depth, cross_dims, only_cross = (c.per_block(k)[i] for k in (
        "heads", "transformer_layers_per_block", "cross_attention_dim", "only_cross_attention"))
    return lambda channels: Transformer2DModel(channels, heads, cross_dims, depth, c.norm_num_groups,
                                               c.use_linear_projection, only_cross, c.dropout)


class ConditionedTimestepEmbedding(TimestepEmbedding):
    """The time MLP with diffusers' optional `cond_proj`: a bias-free Linear from a condition of cond_dim to the
    sinusoid's width, added to the sinusoid before linear_1 (LCM's guidance-scale embedding, Luo et al. 2023)."""

    def __init__(self, in_dim: int, dim: int, cond_dim: int | None = None):
        super().__init__(in_dim, dim)
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim else None

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        if condition is not None:
            if self.cond_proj is None:
                raise ValueError("timestep_cond is only used by a UNet with time_cond_proj_dim set (LCM); this "
                                 "UNet has time_cond_proj_dim=None")
            x = x + self.cond_proj(condition)  # (B, C0)
        return super().forward(x)


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """The w-embedding of LCM's guided distillation (Luo et al. 2023, section 4.2; VDM's sinusoid, Kingma et al.
    2021): sin and cos of 1000 w at dim // 2 frequencies 10000^(-k / (dim // 2 - 1)), zero-padded to an odd dim.
    w (B,) -> (B, dim) float32 (diffusers' LatentConsistencyModelPipeline.get_guidance_scale_embedding)."""
    half = dim // 2
    step = torch.log(torch.tensor(10000.0)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -step)  # (half,)
    angles = (w.float() * 1000.0)[:, None] * freqs[None, :]  # (B, half)
    return F.pad(torch.cat([angles.sin(), angles.cos()], dim=1), (0, dim % 2))


def build_encoder(c: UNetConfig) -> tuple[nn.Conv2d, TimestepEmbedding, nn.ModuleList, MidBlock | None]:
    """The UNet's conv_in, time_embedding, down_blocks and mid_block: the half a ControlNet copies."""
    chans, n, layers = c.block_out_channels, len(c.block_out_channels), c.per_block("layers_per_block")
    temb_dim = c.time_embedding_dim or 4 * chans[0]
    norm = dict(groups=c.norm_num_groups, eps=c.norm_eps, dropout=c.dropout)
    conv_in = nn.Conv2d(c.in_channels, chans[0], c.conv_in_kernel, padding=c.conv_in_kernel // 2)
    time_embedding = ConditionedTimestepEmbedding(chans[0], temb_dim, c.time_cond_proj_dim)
    down_blocks = nn.ModuleList([
        DownBlock(chans[max(i - 1, 0)], chans[i], temb_dim, layers[i], i < n - 1,
                  transformer_factory(c, i) if kind == "CrossAttnDownBlock2D" else None,
                  downsample_padding=c.downsample_padding, **norm)
        for i, kind in enumerate(c.down_block_types)])
    mid_block = None if c.mid_block_type is None else MidBlock(
        chans[-1], temb_dim, transformer_factory(c, n - 1) if c.mid_block_type == "UNetMidBlock2DCrossAttn" else None,
        output_scale_factor=c.mid_block_scale_factor, **norm)
    return conv_in, time_embedding, down_blocks, mid_block


class UNet(nn.Module):
    """The text-conditioned denoising UNet: net(sample, timestep, encoder_hidden_states) -> eps or v, shaped
    like the sample (U-Net, Ronneberger et al. 2015; DDPM's version, Ho et al. 2020; with LDM's cross-attention
    transformers, Rombach et al. 2022).

        net = UNet(UNET_PRESETS["sd15"])  # or UNet.from_config(json.load(open("unet/config.json")))
        net.load_state_dict(diffusers_state_dict)  # diffusers' names, no key map
    """

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        c = self.config = config or UNetConfig()
        chans, n, layers = c.block_out_channels, len(c.block_out_channels), c.per_block("layers_per_block")
        temb_dim = c.time_embedding_dim or 4 * chans[0]
        norm = dict(groups=c.norm_num_groups, eps=c.norm_eps, dropout=c.dropout)
        self.conv_in, self.time_embedding, self.down_blocks, self.mid_block = build_encoder(c)
        self.encoder_hid_proj = (None if c.encoder_hid_dim is None else
                                 nn.Linear(c.encoder_hid_dim, c.per_block("cross_attention_dim")[0]))
        # diffusers' add_time_proj is a parameterless sinusoid (timestep_embedding in forward)
        self.add_embedding = (None if c.addition_embed_type is None else
                              TimestepEmbedding(c.projection_class_embeddings_input_dim, temb_dim))
        self.up_blocks = nn.ModuleList([
            UpBlock(chans[max(n - 2 - i, 0)], chans[min(n - i, n - 1)], chans[n - 1 - i], temb_dim,
                    layers[n - 1 - i] + 1, i < n - 1,
                    transformer_factory(c, n - 1 - i) if kind == "CrossAttnUpBlock2D" else None, **norm)
            for i, kind in enumerate(c.up_block_types)])
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, chans[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(chans[0], c.out_channels, c.conv_out_kernel, padding=c.conv_out_kernel // 2)
        self.deep_cache: DeepCache | None = None  # enable_deepcache
        for m in self.modules():
            if isinstance(m, Attention):
                m.upcast = c.upcast_attention

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> "UNet":
        """Build from a diffusers config.json dict (see UNetConfig.from_dict)."""
        return cls(UNetConfig.from_dict(d))

    def to_config(self) -> dict[str, Any]:
        """A config dict that diffusers' UNet2DConditionModel.from_config accepts."""
        return self.config.to_dict()

    def set_attention_slice(self, slice_size: int | None) -> None:
        """Compute attention `slice_size` (batch x head) slices at a time to bound memory; None turns it off."""
        set_attention_slice(self, slice_size)

    def _timesteps(self, timestep, sample: Tensor) -> Tensor:
        """Number, 0-d or (B,) tensor, int or float -> (B,) timesteps on the sample's device."""
        t = torch.as_tensor(timestep, device=sample.device)
        t = t[None] if t.ndim == 0 else t
        if t.ndim != 1 or len(t) not in (1, len(sample)):
            raise ValueError(f"timestep must be a number, a 0-d tensor or a (B,) tensor with B={len(sample)}; "
                             f"got shape {tuple(t.shape)}")
        return t.expand(len(sample))

    def _text_time_embedding(self, text_embeds: Tensor | None, time_ids: Tensor | None, batch: int,
                             dtype: torch.dtype) -> Tensor:
        """SDXL's added embedding: [text_embeds, sinusoid(time_ids)] -> add_embedding -> (B, temb_dim)."""
        c = self.config
        missing = [name for name, v in (("text_embeds", text_embeds), ("time_ids", time_ids)) if v is None]
        if missing:
            raise ValueError(f"addition_embed_type='text_time' needs the keyword arguments text_embeds (B, pooled "
                             f"dim) and time_ids (B, n ids); missing: {', '.join(missing)}")
        if text_embeds.ndim != 2 or time_ids.ndim != 2 or len(text_embeds) != batch or len(time_ids) != batch:
            raise ValueError(f"text_embeds and time_ids must be 2-D with B={batch} rows; got "
                             f"{tuple(text_embeds.shape)} and {tuple(time_ids.shape)}")
        width = text_embeds.shape[1] + time_ids.shape[1] * c.addition_time_embed_dim
        if width != c.projection_class_embeddings_input_dim:
            raise ValueError(f"text_embeds {tuple(text_embeds.shape)} and time_ids {tuple(time_ids.shape)} give "
                             f"{width} features; projection_class_embeddings_input_dim is "
                             f"{c.projection_class_embeddings_input_dim} (pooled dim + ids * addition_time_embed_dim)")
        ids = timestep_embedding(time_ids.flatten(), c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
        ids = ids.reshape(batch, -1)  # (B, n * addition_time_embed_dim), float32
        return self.add_embedding(torch.cat([text_embeds, ids], dim=-1).to(dtype))  # (B, temb_dim)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU (Si et al. 2023) on the two lowest-resolution up blocks, as diffusers' enable_freeu: b1 / b2 scale
        half of the backbone's channels, s1 / s2 the skips' lowest frequencies. (SD 1.x: s1 0.9, s2 0.2, b1 1.5,
        b2 1.6; SDXL: 0.9, 0.2, 1.3, 1.4, the paper's suggestions.)"""
        for name, value in (("s1", s1), ("s2", s2), ("b1", b1), ("b2", b2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 10:
                raise ValueError(f"freeu {name} must be a number in [0, 10]; got {value!r}")
        if len(self.up_blocks) < 2:
            raise ValueError("freeu: the UNet needs at least two up blocks")
        self.up_blocks[0].freeu, self.up_blocks[1].freeu = (float(b1), float(s1)), (float(b2), float(s2))

    def disable_freeu(self) -> None:
        for block in self.up_blocks:
            block.freeu = None

    def _skip_count(self) -> int:
        """Skip connections of a full call: conv_in's output, each down resnet's, each downsampler's."""
        return 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in self.down_blocks)

    def enable_deepcache(self, interval: int) -> DeepCache:
        """DeepCache (reverie.models.step_cache): every `interval`-th call in full, the calls between through the
        first down block and the last up block only, on the deep features of the last full call. The cache is the
        returned object's; reset() it at the start of each sampling run."""
        self.deep_cache = DeepCache(interval)
        return self.deep_cache

    def disable_deepcache(self) -> None:
        self.deep_cache = None

    def forward(self, sample: Tensor, timestep: Tensor | float, encoder_hidden_states: Tensor, *,
                down_block_additional_residuals: Sequence[Tensor] | None = None,
                mid_block_additional_residual: Tensor | None = None,
                text_embeds: Tensor | None = None, time_ids: Tensor | None = None,
                timestep_cond: Tensor | None = None) -> Tensor:
        """sample (B, in_channels, H, W), timestep (B,) or scalar (fractional allowed), encoder_hidden_states
        (B, T, cross_attention_dim), or (B, T, encoder_hid_dim) when set -> (B, out_channels, H, W).

        The additional residuals are ControlNet's outputs: one tensor per skip connection, added to the skips,
        and one added to the mid block's output. (diffusers applies them only when both are given; here each
        applies on its own.)

        text_embeds (B, pooled dim) and time_ids (B, n) are diffusers' added_cond_kwargs, required with
        addition_embed_type="text_time" (SDXL: n = 6, original size + crop top-left + target size; the refiner:
        n = 5, original size + crop + aesthetic score) and refused otherwise.

        timestep_cond (B, time_cond_proj_dim): LCM's guidance-scale embedding (guidance_embedding), for a UNet with
        time_cond_proj_dim set."""
        c = self.config
        if sample.ndim != 4 or sample.shape[1] != c.in_channels:
            raise ValueError(f"sample must be (B, in_channels={c.in_channels}, H, W); got {tuple(sample.shape)}")
        t = self._timesteps(timestep, sample)
        # the sinusoidal embedding is computed in float32 (fractional timesteps near 1000), then cast
        temb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)  # (B, C0)
        cond = None if timestep_cond is None else timestep_cond.to(sample.dtype)
        temb = self.time_embedding(temb.to(sample.dtype), cond)  # (B, temb_dim)
        if self.add_embedding is not None:
            temb = temb + self._text_time_embedding(text_embeds, time_ids, len(sample), temb.dtype)
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds and time_ids are only used with addition_embed_type='text_time'; this "
                             "UNet has addition_embed_type=None")
        if c.center_input_sample:
            sample = 2 * sample - 1.0
        context = encoder_hidden_states  # (B, T, D)
        if self.encoder_hid_proj is not None:
            context = self.encoder_hid_proj(context)  # (B, T, cross_attention_dim)

        cache = self.deep_cache
        shallow = cache is not None and cache.reuse(sample)  # DeepCache: the first level only, deep features kept
        h = self.conv_in(sample)  # (B, C0, H, W)
        skips = [h]
        for block in self.down_blocks[:1] if shallow else self.down_blocks:
            h, block_skips = block(h, temb, context, downsample=not shallow)
            skips += block_skips
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != self._skip_count():
                raise ValueError(f"down_block_additional_residuals must hold one tensor per skip connection "
                                 f"({self._skip_count()}); got {len(down_block_additional_residuals)}")
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        if shallow:  # the last up block consumes exactly the first level's skips
            return self.conv_out(F.silu(self.conv_norm_out(self.up_blocks[-1](cache.features, skips, temb, context))))
        if self.mid_block is not None:
            h = self.mid_block(h, temb, context)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual

        # odd latent sizes: upsample to each skip's size rather than exactly 2x
        factor = 2 ** sum(b.upsamplers is not None for b in self.up_blocks)
        exact = sample.shape[-2] % factor == 0 and sample.shape[-1] % factor == 0
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = None if exact or block.upsamplers is None else tuple(skips[-1].shape[-2:])
            if cache is not None and block is self.up_blocks[-1]:
                cache.store(h, sample)
            h = block(h, block_skips, temb, context, size)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, H, W)


SD1_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
UNET_PRESETS: dict[str, UNetConfig] = {
    # tests: two levels, attention at the first, 200,644 parameters
    "tiny": UNetConfig(sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                       cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8),
    # the SD layout at a size one can train on a CPU (32x32 latents, 256-wide text features): 6,105,348 parameters
    "small": UNetConfig(sample_size=32, block_out_channels=(64, 128, 128), layers_per_block=1,
                        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                        cross_attention_dim=256, attention_head_dim=4),
    # runwayml/stable-diffusion-v1-5 (and 1.4): 859,520,964 parameters
    "sd15": UNetConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8, **SD1_BLOCKS),
    # stabilityai/stable-diffusion-2-1 (768-v): OpenCLIP-H text features, 64-dim heads, linear projections,
    # upcast attention (it overflows in fp16 otherwise): 865,910,724 parameters
    "sd21": UNetConfig(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                       use_linear_projection=True, upcast_attention=True, **SD1_BLOCKS),
}
