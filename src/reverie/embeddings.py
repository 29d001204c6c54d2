"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors that a prompt names, as A1111, kohya and
diffusers write them.

    load_embedding(pipe, "bad-hands.safetensors")       # name: the file's stem, as A1111 names it
    pipe("a photo, bad-hands")                          # the name in a prompt or negative prompt picks it up

Files: A1111's `.pt` / `.safetensors` (`string_to_param: {"*": (n, dim)}`, with `name`), kohya's `emb_params`
(n, dim), diffusers' single key `{token: (dim,) or (n, dim)}`, SDXL's `{"clip_l": (n, 768), "clip_g": (n, 1280)}`.
Pickled `.pt` / `.bin` files open only with allow_pickle=True.

The vectors become new tokens of each CLIP text encoder they fit (SDXL: clip_l -> text_encoder, clip_g ->
text_encoder_2): NAME, NAME_1, ..., NAME_{n-1}, added to the tokenizer with their rows written into the token
embedding, and the encoder rewrites NAME in a prompt to those n tokens before tokenizing (diffusers'
load_textual_inversion + maybe_convert_prompt). A name already in the vocabulary, or vectors whose width fits no
text encoder, is a ValueError naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
FILE_SUFFIXES = (".safetensors", ".pt", ".bin")


def read_embedding(source, *, allow_pickle: bool = False) -> tuple[dict[str, Tensor], str | None]:
    """({"": vectors} or SDXL's {"clip_l": ..., "clip_g": ...}, the name the file gives or None); vectors (n, dim)."""
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"embedding: no file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(path))
    elif allow_pickle:
        data = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"embedding {path}: only .safetensors opens without allow_pickle=True (a {path.suffix} "
                         f"file is a pickle, which can run code)")
    name = data.get("name") if isinstance(data.get("name"), str) else None
    if "string_to_param" in data:  # A1111
        params = data["string_to_param"]
        vectors = {"": next(iter(params.values()))} if isinstance(params, dict) and len(params) == 1 else None
    elif "emb_params" in data:  # kohya
        vectors = {"": data["emb_params"]}
    elif set(SDXL_KEYS) & set(data):
        vectors = {k: data[k] for k in SDXL_KEYS if k in data}
    else:
        tensors = {k: v for k, v in data.items() if isinstance(v, Tensor)}
        vectors = {"": next(iter(tensors.values()))} if len(tensors) == 1 else None
        name = name or (next(iter(tensors)) if len(tensors) == 1 else None)
    if not vectors or not all(isinstance(v, Tensor) and v.ndim in (1, 2) for v in vectors.values()):
        raise ValueError(f"embedding {path}: not a textual-inversion file (expected string_to_param, emb_params, "
                         f"clip_l / clip_g, or one tensor of shape (n, dim)); keys: {sorted(data)[:8]}")
    return {k: v.reshape(-1, v.shape[-1]).float() for k, v in vectors.items()}, name


def load_embedding(pipe, source, *, name: str | None = None, allow_pickle: bool = False) -> str:
    """Add an embedding file's vectors to the pipeline's CLIP text encoders; returns the name prompts use (the
    file's stem unless `name` is given, as A1111; a diffusers file's own token name is not used)."""
    vectors, _ = read_embedding(source, allow_pickle=allow_pickle)
    name = name or Path(source).stem
    encoders = {key: pipe.components[key] for key in ("text_encoder", "text_encoder_2")
                if getattr(pipe.components.get(key), "is_clip", False)}
    if "" in vectors:  # one set of vectors: every CLIP encoder of that width
        targets = {key: vectors[""] for key, te in encoders.items() if te.hidden_size == vectors[""].shape[1]}
    else:
        targets = {SDXL_KEYS[k]: v for k, v in vectors.items() if SDXL_KEYS[k] in encoders}
    if not targets:
        widths = {key: te.hidden_size for key, te in encoders.items()}
        shapes = ", ".join(f"{k or name}: {tuple(v.shape)}" for k, v in vectors.items())
        raise ValueError(f"embedding {name!r}: its vectors ({shapes}) "
                         f"fit none of this model's text encoders ({widths or 'no CLIP text encoder'})")
    for key, v in targets.items():
        te = encoders[key]
        if v.shape[1] != te.hidden_size:
            raise ValueError(f"embedding {name!r}: {key} is {te.hidden_size} wide, its vectors {v.shape[1]}")
        tokens = [name] + [f"{name}_{i}" for i in range(1, v.shape[0])]
        taken = [t for t in tokens if t in te.tokenizer.get_vocab()]
        if taken:
            raise ValueError(f"embedding {name!r}: {', '.join(map(repr, taken))} is already a token of {key}'s "
                             f"tokenizer; load it under another name")
    for key, v in targets.items():  # every check passed: now change the encoders
        encoders[key].add_embedding(name, v)
    return name


def embedding_files(source) -> list[Path]:
    """A file, or the embedding files in a folder (A1111's embeddings folder; subfolders too)."""
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES and p.is_file())
    return [path]
