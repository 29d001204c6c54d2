"""Diffusers folder layout: model_index.json at the top, one subfolder per component with config.json and weights.

    pipeline/model_index.json          {"_class_name": ..., "unet": ["diffusers", "UNet2DConditionModel"], ...}
    pipeline/unet/config.json
    pipeline/unet/diffusion_pytorch_model[.fp16].safetensors      (transformers components: model.safetensors)
    pipeline/unet/diffusion_pytorch_model.safetensors.index.json  (sharded: {"weight_map": {key: file}})

Everything written here opens with diffusers' from_pretrained; everything is written atomically.
"""

import json
from pathlib import Path

import torch

from .safetensors_io import FormatError, _atomic_write, _plural, _shortlist, load_checkpoint, load_safetensors, \
    save_safetensors

MODEL_INDEX = "model_index.json"
CONFIG = "config.json"
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")  # diffusers models, transformers models
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
DIFFUSERS_VERSION = "0.30.0"  # written to model_index.json; diffusers reads it only for pre-0.6 inpainting quirks


def _variant(name: str, variant: str | None) -> str:
    """diffusers' naming: the variant goes before the last suffix (model.safetensors -> model.fp16.safetensors)."""
    if not variant:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


def read_json(path) -> dict:
    """A JSON object from `path`; errors name the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def write_json(path, obj: dict) -> Path:
    """Write `obj` as indented, key-sorted JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_model_index(folder) -> dict:
    """model_index.json of a pipeline folder; each component entry is [library, class] (or [null, null])."""
    path = Path(folder) / MODEL_INDEX
    index = read_json(path)
    if not isinstance(index.get("_class_name"), str):
        raise FormatError(f"{path}: missing the string field _class_name")
    for name, spec in index.items():
        if isinstance(spec, list) and len(spec) == 2 and not all(s is None or isinstance(s, str) for s in spec):
            raise FormatError(f"{path}: component {name!r} must be [library, class], got {spec!r}")
    return index


def write_model_index(folder, components: dict[str, tuple[str, str] | None],
                      class_name: str = "StableDiffusionPipeline", extra: dict | None = None) -> Path:
    """Write model_index.json: components {name: (library, class_name) or None}, extra plain settings."""
    index = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION}
    for name, spec in components.items():
        if spec is not None and not (len(spec) == 2 and all(isinstance(s, str) for s in spec)):
            raise ValueError(f"write_model_index: component {name!r} must be (library, class_name) or None, "
                             f"got {spec!r}")
        index[name] = [None, None] if spec is None else list(spec)
    clash = sorted((extra or {}).keys() & index.keys())
    if clash:
        raise ValueError(f"write_model_index: extra settings {clash} clash with components or reserved fields")
    Path(folder).mkdir(parents=True, exist_ok=True)
    return write_json(Path(folder) / MODEL_INDEX, index | (extra or {}))


def read_config(subfolder) -> dict:
    """A component's config.json."""
    return read_json(Path(subfolder) / CONFIG)


def find_weights(subfolder, variant: str | None = None, *, allow_pickle: bool = False) -> Path:
    """The weights file of a component folder: a .safetensors file or a sharded index; .bin only if allow_pickle."""
    subfolder = Path(subfolder)
    candidates = [_variant(f"{stem}.safetensors", variant) for stem in WEIGHT_STEMS]
    candidates += [_variant(f"{stem}.safetensors.index.json", variant) for stem in WEIGHT_STEMS]
    pickles = [_variant(name, variant) for name in PICKLE_NAMES]
    for name in candidates + (pickles if allow_pickle else []):
        if (subfolder / name).is_file():
            return subfolder / name
    present = sorted(p.name for p in subfolder.iterdir()) if subfolder.is_dir() else []
    found_pickles = [name for name in pickles if name in present]
    if found_pickles:
        raise FormatError(f"{subfolder}: only pickle weights ({', '.join(found_pickles)}); unpickling can run "
                          f"arbitrary code. Convert them to safetensors, or pass allow_pickle=True if you trust them.")
    wanted = f"variant {variant!r} " if variant else ""
    raise FormatError(f"{subfolder}: no {wanted}weights among {', '.join(candidates)}; the folder holds: "
                      f"{', '.join(present) or 'nothing'}")


def _load_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    """Load every shard named by an index; each shard must hold exactly the keys the index gives it."""
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise FormatError(f"{index_path}: missing the object field weight_map")
    out = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise FormatError(f"{index_path}: shard {shard!r} must be a plain file name in the same folder")
        tensors = load_safetensors(index_path.parent / shard)
        expected = {k for k, v in weight_map.items() if v == shard}
        if tensors.keys() != expected:
            odd = sorted(tensors.keys() ^ expected)
            raise FormatError(f"{index_path.parent / shard}: keys disagree with {index_path.name} "
                              f"({_plural(len(odd), 'key')}: {_shortlist(odd)})")
        out |= tensors
    return out


def load_weights(subfolder, variant: str | None = None, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A component folder's state dict (single file or sharded), found with find_weights."""
    path = find_weights(subfolder, variant, allow_pickle=allow_pickle)
    if path.name.endswith(".json"):
        return _load_sharded(path)
    return load_checkpoint(path, allow_pickle=allow_pickle)


def save_component(subfolder, state_dict: dict[str, torch.Tensor], config: dict, weights_name: str,
                   dtype: torch.dtype | None = None) -> Path:
    """Write config.json and the weights (floating tensors cast to dtype if given) into subfolder, atomically each.

    weights_name: e.g. "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
    "model.safetensors" (transformers). Returns the weights path.
    """
    if Path(weights_name).name != weights_name or not weights_name.endswith(".safetensors"):
        raise ValueError(f"save_component: weights_name must be a plain *.safetensors file name, got {weights_name!r}")
    subfolder = Path(subfolder)
    subfolder.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    path = save_safetensors(state_dict, subfolder / weights_name, metadata={"format": "pt"})
    write_json(subfolder / CONFIG, dict(config))
    return path
