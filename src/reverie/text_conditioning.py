"""How prompts become conditioning for the transformer families, exactly as diffusers computes it.

SD3 / SD3.5 (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis": two CLIP
text encoders and T5 v1.1 XXL) — `StableDiffusion3Pipeline.encode_prompt`:
  each CLIP (L and bigG, both CLIPTextModelWithProjection) reads the prompt truncated and padded to 77 tokens;
  its penultimate hidden states (hidden_states[-2], no final LayerNorm; [-(clip_skip + 2)] with clip_skip) are
  concatenated on channels (768 + 1280 = 2048), zero-padded to the T5 width (4096) — or cropped when T5 is
  narrower, as in diffusers' tiny test models (32 + 32 > 32) — and put before T5's max_sequence_length states:
  (B, 77 + max_sequence_length, 4096). The pooled vector is cat(L text_embeds, G text_embeds) (2048).
  Without T5 (SD3 loaded with text_encoder_3=None) its part is zeros.
FLUX.1 (Black Forest Labs 2024) — `FluxPipeline.encode_prompt`: T5's states are the sequence
  (B, max_sequence_length, 4096); CLIP-L's `pooler_output` (the final-LayerNorm EOS feature, unprojected, 768)
  is the pooled vector. No clip_skip.

Each function encodes one list of prompts; a family calls it again for the negatives (SD3: clip_skip=None, as
diffusers applies clip_skip to the positive prompt only). Results are on the first CLIP's device; CLIP states
in its dtype, T5 states in T5's (diffusers' casts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .models.t5 import T5Encoder, check_max_sequence_length
from .models.text import CLIPTextModel, TextEncoder, check_prompts


def sd3_conditioning(clip_l: TextEncoder, clip_g: TextEncoder, t5: T5Encoder | None, prompts: str | list[str], *,
                     clip_skip: int | None = None, max_sequence_length: int = 256,
                     joint_attention_dim: int | None = None, prompt_2: str | list[str] | None = None,
                     prompt_3: str | list[str] | None = None) -> tuple[Tensor, Tensor]:
    """Prompts -> (embeds (B, 77 + max_sequence_length, W), pooled (B, P_L + P_G)) for SD3 / SD3.5.

    W is T5's width, or joint_attention_dim when t5 is None (required then; when both are given they must
    agree). prompt_2 goes to CLIP-G and prompt_3 to T5 instead of prompts (diffusers' `prompt_2 or prompt`:
    None or "" means the same prompts; one str applies to every prompt).
    """
    prompts = check_prompts(prompts)
    prompt_2, prompt_3 = _per_encoder("prompt_2", prompt_2, prompts), _per_encoder("prompt_3", prompt_3, prompts)
    check_max_sequence_length(max_sequence_length)
    _check_clip("clip_l", clip_l)
    _check_clip("clip_g", clip_g)
    width = _sd3_width(t5, joint_attention_dim)
    layers = min(c.text_model.config.num_hidden_layers for c in (clip_l, clip_g))
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int)
                                  or not 0 <= clip_skip < layers):
        raise ValueError(f"clip_skip must be None or an int in [0, {layers - 1}], got {clip_skip!r}")
    layer = -2 if clip_skip is None else -(clip_skip + 2)  # penultimate by default: no final LayerNorm

    device, dtype = clip_l.device, clip_l.dtype
    l_states, l_pooled = clip_l.encode_pooled(prompts, hidden_layer=layer)  # (B, 77, D_L), (B, P_L)
    g_states, g_pooled = clip_g.encode_pooled(prompt_2, hidden_layer=layer)  # (B, 77, D_G), (B, P_G)
    clip = torch.cat([l_states.to(device, dtype), g_states.to(device, dtype)], dim=-1)  # (B, 77, D_L + D_G)
    if t5 is None:
        t5_states = torch.zeros(len(prompts), max_sequence_length, width, device=device, dtype=dtype)
    else:
        t5_states = t5.encode(prompt_3, max_sequence_length).to(device)  # (B, max_sequence_length, W)
    clip = F.pad(clip, (0, width - clip.shape[-1])) if width >= clip.shape[-1] else clip[..., :width]  # (B, 77, W)
    embeds = torch.cat([clip, t5_states], dim=-2)  # (B, 77 + max_sequence_length, W)
    pooled = torch.cat([l_pooled.to(device), g_pooled.to(device)], dim=-1)  # (B, P_L + P_G)
    return embeds, pooled


def flux_conditioning(clip: TextEncoder, t5: T5Encoder, prompts: str | list[str], *, max_sequence_length: int = 512,
                      prompt_2: str | list[str] | None = None) -> tuple[Tensor, Tensor]:
    """Prompts -> (embeds (B, max_sequence_length, d_model) from T5, pooled (B, D) CLIP pooler_output) for FLUX.1.

    prompt_2 goes to T5 instead of prompts (diffusers' `prompt_2 or prompt`; one str applies to every prompt).
    FLUX's text ids (zeros, one row per T5 token) are the network's business, not this function's.
    """
    prompts = check_prompts(prompts)
    prompt_2 = _per_encoder("prompt_2", prompt_2, prompts)
    check_max_sequence_length(max_sequence_length)
    _check_clip("clip", clip)
    if type(clip.text_model) is not CLIPTextModel:
        raise ValueError(f"clip: FLUX's text_encoder is a CLIPTextModel (its pooled vector is the unprojected "
                         f"pooler_output), got {type(clip.text_model).__name__}")
    if not isinstance(t5, T5Encoder):
        raise ValueError(f"t5 must be a reverie T5Encoder (FLUX's text_encoder_2), got {type(t5).__name__}")
    _, pooled = clip.encode_pooled(prompts)  # (B, D)
    embeds = t5.encode(prompt_2, max_sequence_length).to(clip.device)  # (B, max_sequence_length, d_model)
    return embeds, pooled


def _per_encoder(name: str, value, prompts: list[str]) -> list[str]:
    """diffusers' `prompt_2 = prompt_2 or prompt`, with one str applying to every prompt."""
    if not value:
        return prompts
    if isinstance(value, str):
        return [value] * len(prompts)
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value) \
            or len(value) != len(prompts):
        raise ValueError(f"{name} must be None, a str or a list of {len(prompts)} str (one per prompt), got "
                         f"{value!r:.80}")
    return list(value)


def _check_clip(name: str, encoder) -> None:
    if not isinstance(encoder, TextEncoder) or not encoder.is_clip:
        raise ValueError(f"{name} must be a reverie TextEncoder wrapping a CLIP text model, got "
                         f"{type(getattr(encoder, 'text_model', encoder)).__name__}")


def _sd3_width(t5: T5Encoder | None, joint_attention_dim: int | None) -> int:
    """The width of SD3's text tokens: T5's d_model (diffusers pads CLIP to it), or joint_attention_dim without T5."""
    if joint_attention_dim is not None and (isinstance(joint_attention_dim, bool)
                                            or not isinstance(joint_attention_dim, int) or joint_attention_dim < 1):
        raise ValueError(f"joint_attention_dim must be None or an int >= 1, got {joint_attention_dim!r}")
    if t5 is None:
        if joint_attention_dim is None:
            raise ValueError("joint_attention_dim: give the transformer's joint_attention_dim when t5 is None (the "
                             "T5 part of the sequence is then zeros of that width)")
        return joint_attention_dim
    if not isinstance(t5, T5Encoder):
        raise ValueError(f"t5 must be a reverie T5Encoder or None, got {type(t5).__name__}")
    if joint_attention_dim is not None and joint_attention_dim != t5.hidden_size:
        raise ValueError(f"joint_attention_dim={joint_attention_dim} does not match T5's width d_model="
                         f"{t5.hidden_size}: the transformer cannot read these states")
    return t5.hidden_size
