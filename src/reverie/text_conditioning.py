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

SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image Synthesis") —
  `StableDiffusionXLPipeline.encode_prompt`: the penultimate hidden states (hidden_states[-2], no final LayerNorm;
  [-(clip_skip + 2)] with clip_skip) of CLIP-L (CLIPTextModel) and OpenCLIP bigG (CLIPTextModelWithProjection) are
  concatenated on channels (768 + 1280 = 2048); the pooled vector is bigG's projected EOS feature `text_embeds`
  (1280). The refiner has bigG only (1280 channels). Micro-conditioning (section 2.2 of the paper) is six numbers
  per image, original size, crop corner and target size, or five for the refiner, with an aesthetic score in
  place of the target size (`sdxl_time_ids`, `sdxl_negative_time_ids`, diffusers' `_get_add_time_ids`).
  diffusers truncates prompts to 77 tokens; `chunked=True` instead splits them into 77-token chunks as
  AUTOMATIC1111's webui does (modules/sd_hijack_clip.py: both encoders and the negatives padded with empty-prompt
  chunks to one chunk count, pooled vector from the first chunk: its `zs[0].pooled`). For prompts that fit in
  77 tokens both ways give the same numbers.

Wan 2.1 (Wan Team 2025) — `WanPipeline._get_t5_prompt_embeds`: each prompt is cleaned (ftfy.fix_text if ftfy is
  importable, html.unescape twice, whitespace collapsed), tokenized to max_sequence_length with `</s>`, and read by
  UMT5 *with* its attention mask; each row keeps its real tokens' states and the rest is set to zero, so the network
  sees (B, max_sequence_length, d_model) with zero rows (it has no text mask: max_sequence_length matters).

Each function encodes one list of prompts; a family calls it again for the negatives (SD3: clip_skip=None, as
diffusers applies clip_skip to the positive prompt only; SDXL has `sdxl_negative_conditioning`). SD3/FLUX results
are on the first CLIP's device; CLIP states in its dtype, T5 states in T5's (diffusers' casts). SDXL results are
on text_encoder_2's device and in its dtype.
"""

from __future__ import annotations

import html
import numbers
import re
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .models.t5 import T5Encoder, check_max_sequence_length
from .models.text import CLIPTextModel, CLIPTextModelWithProjection, TextEncoder, check_prompts, warn_truncated


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


def wan_prompt_clean(text: str) -> str:
    """diffusers' Wan prompt_clean: ftfy.fix_text when ftfy is importable, html.unescape twice, whitespace runs -> one
    space, stripped (ftfy changes some prompts, so its presence must match to compare with diffusers)."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def wan_conditioning(text_model, tokenizer, prompts: str | list[str], *, max_sequence_length: int = 512) -> Tensor:
    """Prompts -> (B, max_sequence_length, d_model) states of a UMT5 (or T5) encoder, as WanPipeline: cleaned,
    padded / truncated to max_sequence_length (a warning names what truncation drops), encoded with the attention
    mask, and every position past a prompt's tokens (its `</s>` included in them) zeroed. On the encoder's device,
    in its dtype."""
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be an integer >= 1; got {max_sequence_length!r}")
    prompts = [wan_prompt_clean(p) for p in check_prompts(prompts)]
    tokens = tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    full = tokenizer(prompts, add_special_tokens=True, truncation=False, verbose=False).input_ids
    warn_truncated(full, max_sequence_length, tokenizer, "UMT5", f"max_sequence_length={max_sequence_length}")
    mask = tokens.attention_mask.to(text_model.device)  # (B, L)
    states = text_model(tokens.input_ids.to(text_model.device), mask).last_hidden_state  # (B, L, d_model)
    return states.masked_fill(mask[..., None] == 0, 0.0)  # real tokens kept, the padding exactly zero


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


# ------------------------------------------------------------------------------------------------------------- SDXL


def sdxl_conditioning(text_encoder: TextEncoder | None, text_encoder_2: TextEncoder, prompts: str | list[str], *,
                      prompt_2: str | list[str] | None = None, clip_skip: int | None = None, chunked: bool = True,
                      chunks: int | None = None) -> tuple[Tensor, Tensor]:
    """Prompts -> (embeds (B, 77 k, D_1 + D_2), pooled (B, P_2)) for SDXL; text_encoder=None for the refiner
    (embeds (B, 77 k, D_2)).

    chunked=False is diffusers' `encode_prompt` (k = 1, longer prompts truncated with a warning). chunked=True
    splits every prompt into 75-token chunks (BOS + 75 + EOS, padded), k = the largest chunk count of the batch
    over both encoders, or `chunks` when larger (give `sdxl_chunk_count(...)` of the prompts and the negatives so
    both sides get the same k, as A1111 pads the shorter); each chunk is encoded on its own and pooled comes from
    the first chunk. prompt_2 goes to text_encoder_2 (diffusers' `prompt_2 or prompt`); without text_encoder it
    is ignored (with a warning when it differs), as in diffusers' refiner, which feeds `prompt` to
    text_encoder_2.
    """
    prompts = check_prompts(prompts)
    prompt_2 = _per_encoder("prompt_2", prompt_2, prompts)
    encoders = _sdxl_encoders(text_encoder, text_encoder_2, chunked)
    layers = min(e.text_model.config.num_hidden_layers for e in encoders)
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int)
                                  or not 0 <= clip_skip < layers):
        raise ValueError(f"clip_skip must be None or an int in [0, {layers - 1}], got {clip_skip!r}")
    layer = -2 if clip_skip is None else -(clip_skip + 2)  # "2": SDXL always counts from the penultimate layer
    texts = [prompts, prompt_2] if text_encoder is not None else [prompts]  # the refiner reads `prompt`
    if text_encoder is None and prompt_2 != prompts:
        warnings.warn("prompt_2 is ignored without text_encoder: the refiner's text_encoder_2 reads the prompts, "
                      "as in diffusers", stacklevel=2)
    if chunked:
        k = max(sdxl_chunk_count(text_encoder, text_encoder_2, *texts), _check_chunks(chunks))
    elif chunks not in (None, 1):
        raise ValueError(f"chunks must be None or 1 with chunked=False (diffusers encodes one 77-token chunk), "
                         f"got {chunks!r}")
    ids = [_chunk_ids(e, t, k) if chunked else e.tokenize_truncated(t)[:, None] for e, t in zip(encoders, texts)]
    return _sdxl_encode(encoders, ids, layer)


def sdxl_negative_conditioning(text_encoder: TextEncoder | None, text_encoder_2: TextEncoder,
                               negative_prompt: str | list[str] | None, embeds: Tensor, pooled: Tensor, *,
                               negative_prompt_2: str | list[str] | None = None,
                               force_zeros_for_empty_prompt: bool = True,
                               chunked: bool = True) -> tuple[Tensor, Tensor]:
    """The negative side of SDXL's classifier-free guidance, shaped like the positive (embeds, pooled) it is given.

    diffusers' rules: negative_prompt None with force_zeros_for_empty_prompt (model_index.json; True for the base
    model) gives zeros for both; otherwise `negative_prompt or ""` (one str for every prompt, or a list of B) and
    `negative_prompt_2 or negative_prompt` for text_encoder_2 are encoded from hidden_states[-2] (never clip_skip)
    to the positive's token length. With chunked=True that length is k chunks of 77 (a negative needing more
    raises: pass chunks=sdxl_chunk_count(...) to sdxl_conditioning); chunked=False is diffusers' one chunk.
    Without text_encoder (refiner) negative_prompt_2 is ignored (a warning when it differs), as in diffusers.
    """
    encoders = _sdxl_encoders(text_encoder, text_encoder_2, chunked)
    if not isinstance(embeds, Tensor) or embeds.ndim != 3 or not isinstance(pooled, Tensor) or pooled.ndim != 2 \
            or pooled.shape[0] != embeds.shape[0]:
        raise ValueError(f"embeds and pooled must be the positive (B, N, D) and (B, P) tensors of "
                         f"sdxl_conditioning, got {_shape(embeds)} and {_shape(pooled)}")
    if not isinstance(force_zeros_for_empty_prompt, bool):
        raise ValueError(f"force_zeros_for_empty_prompt must be a bool, got {force_zeros_for_empty_prompt!r}")
    if negative_prompt is None and force_zeros_for_empty_prompt:
        return torch.zeros_like(embeds), torch.zeros_like(pooled)
    B, L = embeds.shape[0], text_encoder_2.max_length
    negatives = _per_encoder("negative_prompt", negative_prompt or "", [""] * B)
    negatives_2 = _per_encoder("negative_prompt_2", negative_prompt_2, negatives)
    texts = [negatives, negatives_2] if text_encoder is not None else [negatives]
    if text_encoder is None and negatives_2 != negatives:
        warnings.warn("negative_prompt_2 is ignored without text_encoder: the refiner's text_encoder_2 reads "
                      "negative_prompt, as in diffusers", stacklevel=2)
    k, rest = divmod(embeds.shape[1], L)
    if rest or (not chunked and k != 1):
        raise ValueError(f"embeds: the positive has {embeds.shape[1]} tokens; expected "
                         f"{'a multiple of ' if chunked else ''}{L} (chunked={chunked})")
    if chunked:
        need = sdxl_chunk_count(text_encoder, text_encoder_2, *texts)
        if need > k:
            raise ValueError(f"negative_prompt needs {need} chunks of {L} tokens but the positive has {k}: encode "
                             f"the prompts with chunks=sdxl_chunk_count(text_encoder, text_encoder_2, prompts, "
                             f"negatives, ...) so both sides get the same count")
    ids = [_chunk_ids(e, t, k) if chunked else e.tokenize_truncated(t)[:, None] for e, t in zip(encoders, texts)]
    return _sdxl_encode(encoders, ids, -2)


def sdxl_chunk_count(text_encoder: TextEncoder | None, text_encoder_2: TextEncoder, *prompts) -> int:
    """The number of 77-token chunks (BOS + 75 + EOS) the longest of these prompts needs in either encoder
    (None entries are skipped; each entry is a str or a list of str)."""
    encoders = _sdxl_encoders(text_encoder, text_encoder_2)
    counts = [e.tokenize(p).shape[1] for p in prompts if p is not None for e in encoders]
    return max(counts, default=1)


def sdxl_time_ids(original_size, crops_coords_top_left, target_size=None, *, aesthetic_score=None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023, section 2.2) as diffusers' `_get_add_time_ids` lays it out:
    (6,) = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) for the base model, or (5,) =
    (orig_h, orig_w, crop_top, crop_left, aesthetic_score) for the refiner (requires_aesthetics_score: the target
    size is then not used and may be None). The pipelines default original_size = target_size = (height, width)
    and the crop to (0, 0)."""
    ids = [*_size("original_size", original_size), *_size("crops_coords_top_left", crops_coords_top_left)]
    if aesthetic_score is not None:
        return torch.tensor([*ids, _score("aesthetic_score", aesthetic_score)], dtype=dtype)  # (5,)
    return torch.tensor([*ids, *_size("target_size", target_size)], dtype=dtype)  # (6,)


def sdxl_negative_time_ids(original_size, crops_coords_top_left, target_size=None, *, negative_original_size=None,
                           negative_crops_coords_top_left=(0, 0), negative_target_size=None, aesthetic_score=None,
                           negative_aesthetic_score=2.5, img2img: bool = False,
                           dtype: torch.dtype = torch.float32) -> Tensor:
    """The micro-conditioning of the negative (unconditional) side, by diffusers' rules:
    - text-to-image (StableDiffusionXLPipeline): the positive ids, unless negative_original_size and
      negative_target_size are both given: then negative_original_size + negative_crops_coords_top_left +
      negative_target_size;
    - img2img (StableDiffusionXLImg2ImgPipeline, img2img=True) with aesthetic_score (requires_aesthetics_score):
      (negative_original_size or original_size) + negative_crops_coords_top_left + (negative_aesthetic_score,);
    - img2img without aesthetics: (negative_original_size or original_size) + crops_coords_top_left (the
      POSITIVE crop: diffusers ignores negative_crops_coords_top_left there) + (negative_target_size or
      target_size).
    diffusers' img2img defaults are aesthetic_score 6.0 and negative_aesthetic_score 2.5."""
    if not isinstance(img2img, bool):
        raise ValueError(f"img2img must be a bool, got {img2img!r}")
    if aesthetic_score is not None and not img2img:
        raise ValueError("aesthetic_score: only the img2img pipeline (the refiner, requires_aesthetics_score) reads "
                         "aesthetic scores; pass img2img=True or aesthetic_score=None")
    if aesthetic_score is not None:
        return sdxl_time_ids(negative_original_size or original_size, negative_crops_coords_top_left,
                             aesthetic_score=_score("negative_aesthetic_score", negative_aesthetic_score),
                             dtype=dtype)
    if img2img:
        return sdxl_time_ids(negative_original_size or original_size, crops_coords_top_left,
                             negative_target_size or target_size, dtype=dtype)
    if negative_original_size is not None and negative_target_size is not None:
        return sdxl_time_ids(negative_original_size, negative_crops_coords_top_left, negative_target_size,
                             dtype=dtype)
    return sdxl_time_ids(original_size, crops_coords_top_left, target_size, dtype=dtype)


def _sdxl_encoders(text_encoder, text_encoder_2, chunked: bool = True) -> list[TextEncoder]:
    """[text_encoder, text_encoder_2], or [text_encoder_2] for the refiner, checked (and the chunked flag)."""
    if not isinstance(chunked, bool):
        raise ValueError(f"chunked must be a bool (True: A1111's 77-token chunks, False: diffusers' truncation), "
                         f"got {chunked!r}")
    if not isinstance(text_encoder_2, TextEncoder) or type(text_encoder_2.text_model) \
            is not CLIPTextModelWithProjection:
        raise ValueError(f"text_encoder_2 must be a reverie TextEncoder wrapping a CLIPTextModelWithProjection "
                         f"(SDXL's OpenCLIP bigG, whose text_embeds is the pooled vector), got "
                         f"{type(getattr(text_encoder_2, 'text_model', text_encoder_2)).__name__}")
    if text_encoder is None:
        return [text_encoder_2]
    _check_clip("text_encoder", text_encoder)
    if text_encoder.max_length != text_encoder_2.max_length:
        raise ValueError(f"text_encoder and text_encoder_2 must read the same number of tokens to be concatenated, "
                         f"got {text_encoder.max_length} and {text_encoder_2.max_length}")
    return [text_encoder, text_encoder_2]


def _chunk_ids(encoder: TextEncoder, prompts: list[str], chunks: int) -> Tensor:
    """(B, chunks, L) ids: the prompts' own chunks, then empty-prompt chunks (BOS, EOS, padding) up to `chunks`."""
    ids = encoder.tokenize(prompts)  # (B, k, L)
    B, k, L = ids.shape
    empty = encoder.tokenize("")[:, :1].expand(B, chunks - k, L)  # (B, chunks - k, L)
    return torch.cat([ids, empty], dim=1)


def _sdxl_encode(encoders: list[TextEncoder], ids: list[Tensor], layer: int) -> tuple[Tensor, Tensor]:
    """Per encoder (B, k, L) ids -> (embeds (B, k L, sum D), pooled (B, P) of text_encoder_2's first chunk)."""
    last = encoders[-1]
    states = []
    for encoder, chunk_ids in zip(encoders, ids):
        B, k, L = chunk_ids.shape
        out = encoder.text_model(chunk_ids.reshape(B * k, L).to(encoder.device), output_hidden_states=True)
        states.append(out.hidden_states[layer].reshape(B, k * L, -1).to(last.device))  # (B, k L, D)
    pooled = out.text_embeds.reshape(B, k, -1)[:, 0]  # (B, P): text_encoder_2 runs last
    embeds = torch.cat(states, dim=-1).to(last.dtype)  # (B, k L, sum D)
    return embeds, pooled


def _check_chunks(chunks) -> int:
    if chunks is None:
        return 1
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be None or an int >= 1, got {chunks!r}")
    return chunks


def _size(name: str, value) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != 2 \
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value):
        raise ValueError(f"{name} must be a pair of numbers (height, width) / (top, left), got {value!r}")
    return tuple(value)


def _score(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return value


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__
