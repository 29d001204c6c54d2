"""Stable Diffusion 3 / 3.5's MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution
Image Synthesis"): image patches and text tokens keep separate weights but attend jointly, conditioned by
adaLN-Zero on the timestep plus the pooled text vector (the DiT recipe of Peebles & Xie 2023).

SD3.5 adds RMS-normalised queries and keys (qk_norm="rms_norm"; Dehghani et al. 2023) and, in SD3.5 Medium,
"MMDiT-X" blocks: a second, image-only attention (attn2) with its own shift, scale and gate (9 adaLN chunks).

Config keys and parameter names are those of diffusers' SD3Transformer2DModel, so a diffusers config.json builds
the same network and its state dict loads with `load_state_dict(..., strict=True)`, no key map. The joint
sequence is [image, text] (FLUX puts the text first).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..schedules import _check_choice
from .blocks import AdaNorm, FeedForward, PatchEmbed, RMSNorm, attention, heads, modulate
from .flux import TimeTextEmbedding, _check_int
from .step_cache import BlockCached, run_blocks
from .unet import config_kwargs

QK_NORMS = (None, "rms_norm")  # SD3: none; SD3.5: RMSNorm over each head's queries and keys


@dataclass(frozen=True)
class MMDiTConfig:
    """diffusers' SD3Transformer2DModel config (same names, same defaults)."""

    sample_size: int = 128  # latent size of training (1024 px / 8); sets the scale of the sin-cos positions
    patch_size: int = 2  # patches are patch x patch latent pixels
    in_channels: int = 16  # latent channels in
    num_layers: int = 18  # joint blocks; the last one only reads the text (context_pre_only)
    attention_head_dim: int = 64  # width of one head
    num_attention_heads: int = 18  # heads; the model is num_attention_heads * attention_head_dim wide
    joint_attention_dim: int = 4096  # width of the text tokens (T5-XXL; CLIP states are zero-padded to it)
    caption_projection_dim: int = 1152  # width of the projected text tokens; must equal the model width
    pooled_projection_dim: int = 2048  # width of the pooled text vector (CLIP-L 768 + CLIP-G 1280)
    out_channels: int | None = 16  # channels predicted (the flow velocity); None: in_channels
    pos_embed_max_size: int | None = 96  # side of the stored position table, in patches; None: computed per input
    dual_attention_layers: tuple[int, ...] = ()  # blocks with a second image-only attention (SD3.5 Medium: 0..12)
    qk_norm: str | None = None  # in QK_NORMS: None (SD3) or "rms_norm" (SD3.5)

    def __post_init__(self):
        if isinstance(self.dual_attention_layers, list):  # JSON lists -> tuples, so configs compare as values
            object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        for name in ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                     "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim"):
            _check_int(name, getattr(self, name), 1)
        for name in ("out_channels", "pos_embed_max_size"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 1)
        if self.sample_size < self.patch_size:
            raise ValueError(f"sample_size must be at least patch_size={self.patch_size}; got {self.sample_size}")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(f"caption_projection_dim must equal num_attention_heads * attention_head_dim = "
                             f"{self.inner_dim} (text and image share the attention); "
                             f"got {self.caption_projection_dim}")
        dual = self.dual_attention_layers
        if not isinstance(dual, tuple) or any(isinstance(i, bool) or not isinstance(i, int)
                                              or not 0 <= i < self.num_layers for i in dual):
            raise ValueError(f"dual_attention_layers must be block indices in 0..{self.num_layers - 1} "
                             f"(num_layers={self.num_layers}); got {dual!r}")
        _check_choice("qk_norm", self.qk_norm, QK_NORMS)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MMDiTConfig":
        """From a diffusers SD3Transformer2DModel config.json dict; keys starting with "_" are ignored and an
        unknown key must be None or False."""
        return cls(**config_kwargs(cls, d, "SD3 transformer", {}, ()))

    def to_dict(self) -> dict[str, Any]:
        """A diffusers SD3Transformer2DModel config dict."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"_class_name": "SD3Transformer2DModel", **d, "dual_attention_layers": list(self.dual_attention_layers)}


# ---------------------------------------------------------------- blocks

# Small MMDiTs for reverie's own models (reverie.train's mmdit task: latent channels, sample size and text widths
# are fitted to the run's VAE and text encoder). "small" is 256 wide (4 heads of 64), 4 joint blocks: about 10M
# parameters, 64 image tokens on 16x16 latents.
MMDIT_PRESETS = {
    "tiny": MMDiTConfig(sample_size=16, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=32,
                        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64,
                        pooled_projection_dim=64, pos_embed_max_size=8),
    "small": MMDiTConfig(sample_size=16, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=64,
                         num_attention_heads=4, joint_attention_dim=256, caption_projection_dim=256,
                         pooled_projection_dim=256, pos_embed_max_size=8),
    "base": MMDiTConfig(sample_size=16, in_channels=4, out_channels=4, num_layers=8, attention_head_dim=64,
                        num_attention_heads=6, joint_attention_dim=384, caption_projection_dim=384,
                        pooled_projection_dim=384, pos_embed_max_size=8),
}


class JointAttention(nn.Module):
    """Multi-head attention, optionally with RMS qk-norm per head. With `joint`, the text has its own
    projections (add_*_proj, norm_added_*) and attends together with the image over [image, text]; its output
    projection (to_add_out) is absent in the last block, whose text output is never used."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qk_norm: str | None, joint: bool,
                 context_pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        norm = (lambda: RMSNorm(head_dim)) if qk_norm else nn.Identity  # eps 1e-6, as diffusers' Attention
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k = norm(), norm()
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        if joint:
            self.add_q_proj, self.add_k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.add_v_proj = nn.Linear(dim, dim)
            self.norm_added_q, self.norm_added_k = norm(), norm()
            self.to_add_out = None if context_pre_only else nn.Linear(dim, dim)

    def _qkv(self, x: Tensor, q, k, v, norm_q, norm_k) -> tuple[Tensor, Tensor, Tensor]:
        n = self.num_heads
        return norm_q(heads(q(x), n)), norm_k(heads(k(x), n)), heads(v(x), n)  # (B, heads, N, d) each

    def forward(self, x: Tensor, context: Tensor | None = None):
        """x (B, N, dim) -> (B, N, dim); with context (B, L, dim) -> (image out, text out or None)."""
        q, k, v = self._qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        if context is not None:
            cq, ck, cv = self._qkv(context, self.add_q_proj, self.add_k_proj, self.add_v_proj,
                                   self.norm_added_q, self.norm_added_k)
            q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        out = attention(q, k, v)  # (B, N [+ L], dim)
        img = self.to_out[1](self.to_out[0](out[:, :x.shape[1]]))
        if context is None:
            return img
        return img, None if self.to_add_out is None else self.to_add_out(out[:, x.shape[1]:])


class JointTransformerBlock(nn.Module):
    """One MMDiT block: per-stream adaLN-Zero and MLPs around one joint attention. context_pre_only (the last
    block): the text is only read, so its norm is AdaLayerNormContinuous (scale, shift) and it has no MLP."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qk_norm: str | None, context_pre_only: bool,
                 dual_attention: bool):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = AdaNorm(dim, 9 if dual_attention else 6)
        self.norm1_context = AdaNorm(dim, 2 if context_pre_only else 6)
        self.attn = JointAttention(dim, num_heads, head_dim, qk_norm, joint=True, context_pre_only=context_pre_only)
        self.attn2 = JointAttention(dim, num_heads, head_dim, qk_norm, joint=False) if dual_attention else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim)
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(dim)

    def forward(self, img: Tensor, txt: Tensor, temb: Tensor) -> tuple[Tensor, Tensor | None]:
        # adaLN-Zero chunks: (shift, scale, gate) for attention, for the MLP, then (dual) for attn2
        img_n, chunks = self.norm1(img, temb)
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = chunks[:6]
        txt_n, c_chunks = self.norm1_context(txt, temb)
        c_shift, c_scale = (c_chunks[1], c_chunks[0]) if self.context_pre_only else c_chunks[:2]
        img_attn, txt_attn = self.attn(modulate(img_n, shift, scale), modulate(txt_n, c_shift, c_scale))
        img = img + gate[:, None] * img_attn  # (B, N, dim)
        if self.attn2 is not None:
            shift2, scale2, gate2 = chunks[6:]
            img = img + gate2[:, None] * self.attn2(modulate(img_n, shift2, scale2))
        img = img + gate_mlp[:, None] * self.ff(modulate(self.norm2(img), shift_mlp, scale_mlp))
        if self.context_pre_only:
            return img, None
        c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_chunks[2:]
        txt = txt + c_gate[:, None] * txt_attn  # (B, L, dim)
        txt = txt + c_gate_mlp[:, None] * self.ff_context(modulate(self.norm2_context(txt), c_shift_mlp, c_scale_mlp))
        return img, txt


# ---------------------------------------------------------------- the network

class MMDiT(BlockCached, nn.Module):
    """SD3 / SD3.5 transformer: latents, t = sigma * 1000 and text -> flow velocity."""

    def __init__(self, config: MMDiTConfig | None = None):
        super().__init__()
        c = self.config = config or MMDiTConfig()
        dim, n, d = c.inner_dim, c.num_attention_heads, c.attention_head_dim
        self.out_channels = c.out_channels or c.in_channels
        self.pos_embed = PatchEmbed(c.sample_size, c.patch_size, c.in_channels, dim, c.pos_embed_max_size)
        self.time_text_embed = TimeTextEmbedding(dim, c.pooled_projection_dim, guidance=False)
        self.context_embedder = nn.Linear(c.joint_attention_dim, c.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([
            JointTransformerBlock(dim, n, d, c.qk_norm, context_pre_only=i == c.num_layers - 1,
                                  dual_attention=i in c.dual_attention_layers) for i in range(c.num_layers)])
        self.norm_out = AdaNorm(dim, 2)  # AdaLayerNormContinuous: chunks (scale, shift)
        self.proj_out = nn.Linear(dim, c.patch_size ** 2 * self.out_channels)

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> "MMDiT":
        """Build from a diffusers config.json dict (see MMDiTConfig.from_dict)."""
        return cls(MMDiTConfig.from_dict(d))

    def to_config(self) -> dict[str, Any]:
        """A config dict that diffusers' SD3Transformer2DModel.from_config accepts."""
        return self.config.to_dict()

    def forward(self, x: Tensor, t: Tensor | float, encoder_hidden_states: Tensor, pooled_projections: Tensor,
                skip_layers: Sequence[int] | None = None) -> Tensor:
        """x (B, in_channels, H, W) latents, H and W multiples of patch_size; t (B,) or a number: sigma * 1000,
        as the SD3 pipeline passes it; encoder_hidden_states (B, L, joint_attention_dim); pooled_projections
        (B, pooled_projection_dim); skip_layers: block indices to pass through unchanged (skip-layer guidance)
        -> velocity (B, out_channels, H, W)."""
        B, H, W = self._check(x, encoder_hidden_states, pooled_projections, skip_layers)
        p, skip = self.config.patch_size, set(skip_layers or ())
        img = self.pos_embed(x)  # (B, N, dim), N = (H/p)(W/p)
        temb = self.time_text_embed(_per_row(t, B, x.device), None, pooled_projections)  # (B, dim)
        txt = self.context_embedder(encoder_hidden_states)  # (B, L, dim)
        def blocks(start: int, stop: int | None):
            def run(state):
                img, txt = state
                for i, block in list(enumerate(self.transformer_blocks))[start:stop]:
                    if i not in skip:
                        img, txt = block(img, txt, temb)
                return img, txt
            return run

        cache = None if skip else self.block_cache  # skip-layer guidance's extra call runs in full, unseen
        img, _ = run_blocks(cache, blocks(0, 1), blocks(1, None), (img, txt), x)
        h, (scale, shift) = self.norm_out(img, temb)
        out = self.proj_out(modulate(h, shift, scale))  # (B, N, p * p * out_channels)
        out = out.reshape(B, H // p, W // p, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, self.out_channels, H, W)

    def _check(self, x, context, pooled, skip_layers) -> tuple[int, int, int]:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[2] % c.patch_size or x.shape[3] % c.patch_size:
            raise ValueError(f"x must be (B, in_channels={c.in_channels}, H, W) with H and W multiples of "
                             f"patch_size={c.patch_size}; got {tuple(x.shape)}")
        B, _, H, W = x.shape
        if context.ndim != 3 or context.shape[0] != B or context.shape[-1] != c.joint_attention_dim:
            raise ValueError(f"encoder_hidden_states must be (B={B}, L, joint_attention_dim="
                             f"{c.joint_attention_dim}); got {tuple(context.shape)}")
        if tuple(pooled.shape) != (B, c.pooled_projection_dim):
            raise ValueError(f"pooled_projections must be (B={B}, pooled_projection_dim="
                             f"{c.pooled_projection_dim}); got {tuple(pooled.shape)}")
        bad = [i for i in skip_layers or () if isinstance(i, bool) or not isinstance(i, int)
               or not 0 <= i < c.num_layers]
        if bad:
            raise ValueError(f"skip_layers must be block indices in 0..{c.num_layers - 1}; got {list(skip_layers)}")
        return B, H, W


def _per_row(t, batch: int, device) -> Tensor:
    """A number, 0-d, (1,) or (B,) tensor -> (B,)."""
    v = torch.as_tensor(t, device=device)
    v = v[None] if v.ndim == 0 else v
    if v.ndim != 1 or len(v) not in (1, batch):
        raise ValueError(f"t must be a number or a (B,) tensor with B={batch}; got shape {tuple(v.shape)}")
    return v.expand(batch)
