"""T5 text encoder for SD3 and FLUX.1: transformers' `T5EncoderModel` (Raffel et al. 2020, "Exploring the Limits of
Transfer Learning with a Unified Text-to-Text Transformer"; both families use T5 v1.1 XXL's encoder) plus its
tokenizer, encoding exactly as diffusers' `StableDiffusion3Pipeline._get_t5_prompt_embeds` and
`FluxPipeline._get_t5_prompt_embeds`:

- every prompt is padded to `max_sequence_length` tokens ("<pad>", id 0) and truncated to it, `</s>` appended
  (add_special_tokens=True), so a prompt always yields max_sequence_length states;
- NO attention mask reaches the encoder: the padding positions attend and are attended to, as in both pipelines
  (and in BFL's and Stability's reference code), and their states are part of the conditioning;
- the output is the last hidden state (after T5's final RMS LayerNorm).

A prompt longer than max_sequence_length loses its tail, with a `warnings.warn` naming max_sequence_length and
how many tokens were dropped (diffusers logs a similar warning). max_sequence_length above 512 raises: both
pipelines refuse it (`check_inputs`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import AutoTokenizer, T5EncoderModel

from .text import check_prompts, warn_truncated

MAX_SEQUENCE_LENGTH = 512  # the SD3 and FLUX pipelines' limit (check_inputs); T5's relative positions have none


class T5Encoder(nn.Module):
    """transformers' T5EncoderModel plus its tokenizer: prompts -> (B, max_sequence_length, d_model) states."""

    def __init__(self, text_model: T5EncoderModel, tokenizer):
        super().__init__()
        if not isinstance(text_model, T5EncoderModel):
            raise ValueError(f"text_model must be a transformers T5EncoderModel, got {type(text_model).__name__}")
        for name in ("eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name, None) is None:
                raise ValueError(f"tokenizer must define {name} (T5: </s> and <pad>), got None")
        self.text_model = text_model
        self.tokenizer = tokenizer

    # ---------------------------------------------------------------- construction and saving

    @classmethod
    def from_pretrained(cls, text_encoder_dir, tokenizer_dir, *, device=None, dtype=None, variant=None) -> T5Encoder:
        """Load diffusers' `text_encoder_3/` (SD3) or `text_encoder_2/` (FLUX) folder and its tokenizer folder,
        offline: config.json + model.safetensors (or sharded, with model.safetensors.index.json); pickled .bin
        weights are never loaded. The tokenizer folder is what transformers saves (tokenizer_config.json).
        dtype=None loads in torch's default dtype (float32), whatever the checkpoint stores. variant: "fp16" /
        "bf16" weights (model.fp16.safetensors)."""
        from .text import _variant_names

        text_encoder_dir, tokenizer_dir = Path(text_encoder_dir), Path(tokenizer_dir)
        config_path = text_encoder_dir / "config.json"
        weights = [text_encoder_dir / n for n in _variant_names(variant)]
        if not config_path.is_file() or not any(w.is_file() for w in weights):
            raise ValueError(f"text_encoder_dir must hold config.json and model.safetensors (or a sharded "
                             f"model.safetensors.index.json; pickled .bin weights are never loaded), got "
                             f"{str(text_encoder_dir)!r}")
        model_type = json.loads(config_path.read_text()).get("model_type")
        if model_type != "t5":
            raise ValueError(f"text_encoder_dir: config.json's model_type must be 't5' (a T5 encoder), got "
                             f"{model_type!r}")
        if not (tokenizer_dir / "tokenizer_config.json").is_file():
            raise ValueError(f"tokenizer_dir must hold tokenizer_config.json (a transformers-saved T5 tokenizer), "
                             f"got {str(tokenizer_dir)!r}")
        # transformers 5 loads in the checkpoint's dtype when given none: ask for the default one explicitly
        text_model = T5EncoderModel.from_pretrained(text_encoder_dir, local_files_only=True, use_safetensors=True,
                                                    dtype=dtype or torch.get_default_dtype(), variant=variant)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(text_model.eval(), tokenizer).to(device)

    def save_pretrained(self, text_encoder_dir, tokenizer_dir, dtype: torch.dtype | None = None) -> None:
        """Write diffusers' T5 folders: config.json + model.safetensors (transformers' names, the tied
        `encoder.embed_tokens.weight` left out as transformers leaves it) and the tokenizer folder."""
        path = Path(text_encoder_dir)
        path.mkdir(parents=True, exist_ok=True)
        self.text_model.config.architectures = ["T5EncoderModel"]
        self.text_model.config.save_pretrained(path)
        tied = set(getattr(self.text_model, "_tied_weights_keys", None) or ())
        weights = {k: v.detach().contiguous().cpu() for k, v in self.text_model.state_dict().items() if k not in tied}
        if dtype is not None:
            weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(tokenizer_dir)

    # ---------------------------------------------------------------- properties

    @property
    def hidden_size(self) -> int:
        """d_model: the width of the states (4096 for T5 v1.1 XXL; SD3's and FLUX's joint_attention_dim)."""
        return self.text_model.config.d_model

    @property
    def device(self) -> torch.device:
        return self.text_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.dtype

    # ---------------------------------------------------------------- encoding

    def tokenize(self, prompt: str | list[str], max_sequence_length: int) -> Tensor:
        """Prompts -> (B, max_sequence_length) ids: the prompt's tokens, `</s>`, then `<pad>` up to the length."""
        check_max_sequence_length(max_sequence_length)
        prompts = check_prompts(prompt)
        ids = self.tokenizer(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                             add_special_tokens=True, return_tensors="pt").input_ids
        full = self.tokenizer(prompts, add_special_tokens=True, truncation=False, verbose=False).input_ids
        warn_truncated(full, max_sequence_length, self.tokenizer, "T5",
                        f"max_sequence_length={max_sequence_length}")
        return ids  # (B, max_sequence_length)

    def encode(self, prompt: str | list[str], max_sequence_length: int) -> Tensor:
        """Prompts -> (B, max_sequence_length, d_model): the encoder's last hidden state, no attention mask."""
        ids = self.tokenize(prompt, max_sequence_length).to(self.device)
        return self.text_model(ids).last_hidden_state  # (B, L, d_model)

    def forward(self, prompt: str | list[str], max_sequence_length: int) -> Tensor:
        return self.encode(prompt, max_sequence_length)


def check_max_sequence_length(max_sequence_length) -> None:
    if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) \
            or not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise ValueError(f"max_sequence_length must be an int in [1, {MAX_SEQUENCE_LENGTH}] (the SD3 and FLUX "
                         f"pipelines' limit), got {max_sequence_length!r}")
