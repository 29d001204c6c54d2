"""SD3 / SD3.5 and FLUX.1 single files as whole pipelines: the .safetensors files people download (Stability's
all-in-one sd3_medium_incl_clips_t5xxlfp16 and transformer-only sd3.5_large, BFL's flux1-dev / flux1-schnell,
ComfyUI's packed flux1-dev-fp8) and the separate files that go with them (ComfyUI's clip_l, clip_g and
t5xxl_fp16.safetensors, BFL's ae.safetensors), read into the components that loading.load_transformer_folder
gives for the equivalent diffusers folder, so both give the same images.

Each component comes from, first found: the explicit option (text_encoder=, text_encoder_2=, text_encoder_3=,
vae=: a file or a folder), the single file itself, the `config=` folder (a diffusers folder of the same family),
else an error naming what to pass. SD3 alone may lack T5 (diffusers then conditions on zeros): a warning.
What the weights do not record comes from `config=` when given (the transformer's head width and rotary split,
the text encoders' head counts, the VAE's scaling and shift, the scheduler), else from the released models.
Tokenizers are never in single files: they come from a text encoder FOLDER given as an option (its own files or
its diffusers sibling tokenizer*/), from `tokenizer=` (CLIP-L's tokenizer folder, or a diffusers folder), or
from `config=`. Every source is resolved before any weight is read, so a missing piece fails fast.

Tensors are held in float32 (fp16, bf16 and fp8 files are upcast as they load); the pipeline casts to its
dtype. An fp8 transformer stays fp8 (reverie.models.quant.store_fp8) when the caller passes its compute dtype.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from .formats import (FormatError, infer_sd_configs, load_checkpoint, load_state_dict_strict, load_weights,
                      read_config, read_model_index, read_safetensors_header, split_ldm_checkpoint,
                      to_ldm_checkpoint)
from .formats.folder import find_weights, read_json
from .formats.safetensors_io import _shortlist
from .formats.single_file import VAE_PREFIX, _open_clip_to_diffusers
from .loading import _build, load_network
from .models.vae import AutoencoderKL

SCHEDULERS = {  # what the files imply when no config= folder gives a scheduler (diffusers' Hub configs)
    "sd3": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0},
    "flux_dev": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                 "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                 "max_image_seq_len": 4096},  # FLUX.1-dev (and Fill / Depth): mu from the image size
    "flux_schnell": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
                     "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                     "max_image_seq_len": 4096},  # FLUX.1-schnell: plain linear times, no shift
}
VAES = {  # the released 16-channel VAEs' settings that no weight records (scripts/convert_{sd3,flux}_to_diffusers.py)
    "sd3": dict(scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024),
    "flux": dict(scaling_factor=0.3611, shift_factor=0.1159, sample_size=1024),
}
VAE_UNSTORED = ("scaling_factor", "shift_factor", "norm_num_groups", "sample_size", "force_upcast", "act_fn")
CLIP_HEAD_WIDTH = 64  # CLIP ViT-L/14 and OpenCLIP bigG: heads = width / 64 (not stored)


class Slot(NamedTuple):
    """One text encoder of a family."""

    name: str  # diffusers' component name
    kind: str  # "clip_l", "clip_g" or "t5"
    label: str  # for messages
    example: str  # the separate file people use
    projection: bool = False  # CLIPTextModelWithProjection (SD3's pooled text_embeds) or CLIPTextModel (FLUX)
    optional: bool = False  # may be None (SD3's T5)


SLOTS = {
    "sd3": (Slot("text_encoder", "clip_l", "CLIP-L", "clip_l.safetensors", projection=True),
            Slot("text_encoder_2", "clip_g", "CLIP-G (OpenCLIP bigG)", "clip_g.safetensors", projection=True),
            Slot("text_encoder_3", "t5", "T5-XXL", "t5xxl_fp16.safetensors", optional=True)),
    "flux": (Slot("text_encoder", "clip_l", "CLIP-L", "clip_l.safetensors"),
             Slot("text_encoder_2", "t5", "T5-XXL", "t5xxl_fp16.safetensors")),
}


# ---------------------------------------------------------------- the whole pipeline

def load_transformer_single_file(path, family, *, text_encoder=None, text_encoder_2=None, text_encoder_3=None,
                                 vae=None, config=None, variant=None, allow_pickle: bool = False, tokenizer=None,
                                 dtype: torch.dtype | None = None, **_) -> tuple[dict, dict]:
    """(components, scheduler config) of an SD3 / SD3.5 or FLUX.1 single file, as load_transformer_folder gives
    them for a diffusers folder (transformer, vae, text_encoder, text_encoder_2[, text_encoder_3]).

    text_encoder* / vae: a safetensors file or a diffusers / transformers folder, used instead of what the file
    holds. config: a diffusers folder of the same family for configs, tokenizers, the scheduler and any
    component the file lacks. variant: the weights variant of the config folder's VAE. tokenizer: CLIP-L's
    tokenizer folder, or a diffusers folder with tokenizer*/. dtype: the pipeline's compute dtype, which keeps
    an fp8 transformer in fp8 (without it fp8 weights are upcast to float32)."""
    path = Path(path)
    if family.name not in SLOTS:
        raise ValueError(f"{family.name}: single files of this family are not read here (only {', '.join(SLOTS)})")
    options = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "text_encoder_3": text_encoder_3}
    for name, value in options.items():
        if value is not None and name not in family.text_encoders:
            raise ValueError(f"{name}: a {family.name} model has no {name} (its text encoders: "
                             f"{', '.join(family.text_encoders)})")
    options = {name: _existing(name, value) for name, value in options.items()} | {"vae": _existing("vae", vae)}
    config, tokenizer, split = _config_folder(config, family), _existing("tokenizer", tokenizer), _splitter(family)

    # decide every source from the key names alone (a pickle has no header: it is read once, here)
    state_dict = None if path.suffix.lower() == ".safetensors" else load_checkpoint(path, allow_pickle=allow_pickle)
    inside = split(state_dict or dict.fromkeys(k for k in read_safetensors_header(path) if k != "__metadata__"))
    plan = _plan(path, family, inside, options, config, tokenizer, variant)

    parts = split(state_dict or load_checkpoint(path))

    def part(source):  # a part of the file by its name, else a Path
        return parts[source] if isinstance(source, str) else source

    vae_base = read_config(config / "vae") if config and (config / "vae" / "config.json").is_file() \
        else VAES[family.name]
    components = {"transformer": _transformer(family, parts["transformer"], config, dtype),
                  "vae": load_vae(part(plan["vae"][0]), vae_base, allow_pickle=allow_pickle, variant=variant)}
    for slot in SLOTS[family.name]:
        if plan[slot.name] is None:
            components[slot.name] = None
            continue
        source, tokenizer_dir = plan[slot.name]
        given = config / slot.name / "config.json" if config else None
        components[slot.name] = single_file_text_encoder(
            part(source), slot, tokenizer_dir, allow_pickle=allow_pickle,
            config=read_json(given) if given and given.is_file() else None)
    return components, _scheduler_config(family, parts["transformer"], config)


def _plan(path: Path, family, inside: dict, options: dict, config, tokenizer, variant) -> dict:
    """{component: (source, tokenizer folder) or None}: a source is a Path (file or folder) or the name of a
    part of the single file. Everything missing is reported at once, before any weight is read."""
    missing, absent, plan = [], [], {}
    for slot in SLOTS[family.name]:
        source = options[slot.name] or (slot.name if slot.name in inside else None) or \
            _folder_component(config, slot.name)
        plan[slot.name] = None
        if source is None and slot.optional:
            absent.append(slot)
            continue
        if source is None:
            missing.append(f"{slot.name} ({slot.label}): pass {slot.name}=FILE or FOLDER (e.g. {slot.example})"
                           f"{_or_config(family, slot.name)}")
            continue
        tokenizer_dir = _tokenizer_dir(slot.name, options[slot.name], tokenizer, config)
        if tokenizer_dir is None:
            missing.append(f"the tokenizer of {slot.name} ({slot.label}): single files hold none; pass config=a "
                           f"diffusers {family.name} folder (its {_tokenizer_name(slot.name)}/), or {slot.name}=a "
                           f"folder with its tokenizer" + (", or tokenizer=CLIP-L's tokenizer folder"
                                                          if slot.name == "text_encoder" else ""))
        plan[slot.name] = (source, tokenizer_dir)
    vae = options["vae"] or ("vae" if "vae" in inside else None) or _folder_component(config, "vae", variant)
    if vae is None:
        missing.append(f"vae: pass vae=FILE or FOLDER (e.g. {'ae' if family.name == 'flux' else 'the SD3 VAE'}"
                       f".safetensors){_or_config(family, 'vae')}")
    if missing:
        raise ValueError(f"{path.name}: this {family.name} single file needs more: " + "; ".join(missing))
    for slot in absent:
        warnings.warn(f"{path.name}: no {slot.label} ({slot.name}) in the file, the options or config=; its prompt "
                      f"states are zeros, as diffusers does without it (pass {slot.name}={slot.example} for the full "
                      f"model)", stacklevel=5)
    return plan | {"vae": (vae, None)}


def replace_vae(components: dict, vae_path, *, allow_pickle: bool = False, variant=None) -> dict:
    """`components` with its VAE replaced by the one at vae_path (a file in LDM or diffusers names, a diffusers
    VAE folder, or a pipeline folder's vae/), for the folder loaders' vae= option (SD, SD3, FLUX). A file's
    unstored settings (scaling and shift factors, group count, sample size) are kept from the VAE it replaces;
    a folder brings its own config."""
    path = _existing("vae", vae_path)
    return {**components, "vae": load_vae(path, components["vae"].to_config(), allow_pickle=allow_pickle,
                                          variant=variant)}


# ---------------------------------------------------------------- sources

def _existing(name: str, value) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    if not path.exists():
        raise ValueError(f"{name}: no such file or folder: {path}")
    if name != "tokenizer" and path.is_dir() and (path / "model_index.json").is_file() and (path / name).is_dir():
        return path / name  # a pipeline folder: its component of that name
    return path


def _config_folder(config, family) -> Path | None:
    if config is None:
        return None
    from .families import family_of_folder

    folder = Path(config)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"config: {folder} is not a diffusers folder (no model_index.json); give a diffusers "
                         f"{family.name} folder (configs and tokenizers are enough)")
    found = family_of_folder(folder)
    if found.name != family.name:
        raise ValueError(f"config: {folder} holds a {found.name} model; this single file is {family.name}")
    return folder


def _folder_component(config: Path | None, name: str, variant=None) -> Path | None:
    """config/name when the folder ships that component's weights (a configs-only folder does not)."""
    spec = read_model_index(config).get(name) if config is not None else None
    if not (isinstance(spec, list) and spec[-1] is not None and (config / name / "config.json").is_file()):
        return None
    try:
        find_weights(config / name, variant if name == "vae" else None)
    except FormatError:
        return None
    return config / name


def _or_config(family, name: str) -> str:
    return f", or config=a diffusers {family.name} folder that has {name}/"


def _tokenizer_name(name: str) -> str:
    return name.replace("text_encoder", "tokenizer")  # text_encoder_2 -> tokenizer_2


def _has_tokenizer(folder: Path) -> bool:
    return folder.is_dir() and any((folder / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json",
                                                                    "vocab.json"))


def _tokenizer_dir(name: str, option: Path | None, tokenizer: Path | None, config: Path | None) -> Path | None:
    """The tokenizer folder of text encoder `name`: an option folder's own (or its diffusers sibling), then
    tokenizer= (a diffusers folder's tokenizer*/, or CLIP-L's tokenizer itself), then config=."""
    candidates = []
    if option is not None and option.is_dir():
        candidates += [option, option.parent / _tokenizer_name(option.name)] \
            if option.name.startswith("text_encoder") else [option]
    if tokenizer is not None:
        candidates += [tokenizer / _tokenizer_name(name)] + ([tokenizer] if name == "text_encoder" else [])
    if config is not None:
        candidates.append(config / _tokenizer_name(name))
    return next((c for c in candidates if _has_tokenizer(c)), None)


def _splitter(family):
    from .formats.flux_single_file import split_flux_checkpoint
    from .formats.sd3_single_file import split_sd3_checkpoint

    return split_sd3_checkpoint if family.name == "sd3" else split_flux_checkpoint


def _read(source, allow_pickle: bool, variant=None) -> tuple[dict, dict | None]:
    """(state dict, its folder's config.json or None) of a state dict, a file or a component folder."""
    if isinstance(source, dict):
        return source, None
    if source.is_dir():
        return load_weights(source, variant, allow_pickle=allow_pickle), read_config(source)
    return load_checkpoint(source, allow_pickle=allow_pickle), None


def _refuse_scaled_fp8(state_dict: dict) -> None:
    try:
        from .models.quant import refuse_scaled_fp8
    except ImportError:  # reverie without fp8 support: a scaled file then fails on its extra keys
        return
    refuse_scaled_fp8(state_dict)


# ---------------------------------------------------------------- transformer and scheduler

def _transformer(family, weights: dict, config: Path | None, dtype):
    """The network from its original-layout weights; a config= folder's transformer config supplies what the
    shapes cannot tell (SD3's head width without qk-norm, FLUX's rotary split, the sample size) and must agree
    with them on the rest."""
    _refuse_scaled_fp8(weights)
    given = read_config(config / "transformer") if config and (config / "transformer" / "config.json").is_file() \
        else None
    try:
        if family.name == "sd3":
            from .formats.sd3_single_file import SAMPLE_SIZE, infer_mmdit_config, sd3_transformer_to_diffusers
            from .models.mmdit import MMDiT as cls, MMDiTConfig as config_cls

            inferred = infer_mmdit_config(weights, attention_head_dim=given and given.get("attention_head_dim"),
                                          sample_size=(given or {}).get("sample_size", SAMPLE_SIZE))
        else:
            from .formats.flux_single_file import flux_transformer_to_diffusers, infer_flux_config
            from .models.flux import Flux as cls, FluxConfig as config_cls

            inferred = infer_flux_config(weights, axes_dims_rope=given and given.get("axes_dims_rope"))
    except ValueError as e:
        if given is not None or isinstance(e, FormatError):
            raise
        raise ValueError(f"transformer: {e}. Not stored in the file: pass config=a diffusers {family.name} folder "
                         f"of this model (its transformer/config.json)") from e
    state = sd3_transformer_to_diffusers(weights) if family.name == "sd3" else \
        flux_transformer_to_diffusers(weights, inferred)
    if given is not None:
        ours, theirs = config_cls.from_dict(inferred), config_cls.from_dict(given)
        wrong = [f"{f} (file {_field(ours, f)!r}, config {_field(theirs, f)!r})" for f in ours.__dataclass_fields__
                 if _field(ours, f) != _field(theirs, f)]
        if wrong:
            raise ValueError(f"config: {config / 'transformer'} does not describe this file's transformer: "
                             f"{_shortlist(wrong)}; give the diffusers folder of the same model")
    return _network(cls, inferred, state, dtype)


def _field(config, name: str):
    value = getattr(config, name)
    return config.in_channels if name == "out_channels" and value is None else value  # None: as many as in


def _network(cls, config: dict, state: dict, dtype):
    """Built and loaded strictly; an fp8 state dict stays fp8, each layer computing in `dtype` (loading._build)."""
    return _build(cls, config, state, "transformer", compute_dtype=dtype)


def _scheduler_config(family, weights: dict, config: Path | None) -> dict:
    if config is not None and (config / "scheduler" / "scheduler_config.json").is_file():
        return read_json(config / "scheduler" / "scheduler_config.json")
    return default_scheduler_config(family, weights)


def default_scheduler_config(family, weights: dict) -> dict:
    """The scheduler config a single file implies (SCHEDULERS): SD3's, or FLUX dev's or schnell's by its keys
    (weights: the file's tensors, or meta tensors of their shapes)."""
    if family.name == "sd3":
        return dict(SCHEDULERS["sd3"])
    from .formats.flux_single_file import flux_variant

    return dict(SCHEDULERS["flux_schnell" if flux_variant(weights) == "schnell" else "flux_dev"])


# ---------------------------------------------------------------- VAE

def load_vae(source, base_config: dict, *, allow_pickle: bool = False, variant=None) -> AutoencoderKL:
    """A VAE from a state dict or a file (LDM names as in ae.safetensors, or diffusers names; optionally
    prefixed first_stage_model. or vae.), whose layout is read from the shapes and whose unstored settings
    (VAE_UNSTORED) come from base_config; or from a diffusers VAE folder, with its own config."""
    if isinstance(source, Path) and source.is_dir():
        return load_network(AutoencoderKL, source, variant=variant, allow_pickle=allow_pickle)
    state_dict, _ = _read(source, allow_pickle)
    ldm = ldm_vae_state_dict(state_dict)
    facts = {"use_quant_conv": "quant_conv.weight" in ldm, "use_post_quant_conv": "post_quant_conv.weight" in ldm,
             "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in ldm}
    unstored = {k: base_config[k] for k in VAE_UNSTORED if k in base_config}
    prefixed = {VAE_PREFIX + k: v for k, v in ldm.items()}
    config = infer_sd_configs(prefixed, overrides={"vae": facts | unstored})["vae"]
    return _build(AutoencoderKL, config, split_ldm_checkpoint(prefixed)["vae"], "vae")


def ldm_vae_state_dict(state_dict: dict) -> dict:
    """A VAE state dict in LDM names without prefix, from LDM names (prefixed first_stage_model. / vae. or not)
    or diffusers' AutoencoderKL names."""
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("loss.", "model_ema."))}  # training only
    for prefix in (VAE_PREFIX, "vae."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    if "encoder.conv_norm_out.weight" in state_dict:  # diffusers names
        state_dict = {k.removeprefix(VAE_PREFIX): v for k, v in to_ldm_checkpoint({"vae": state_dict}).items()}
    if "encoder.norm_out.weight" not in state_dict:
        raise FormatError(f"vae: not an autoencoder in LDM or diffusers names (no encoder.norm_out.weight nor "
                          f"encoder.conv_norm_out.weight); keys: {_shortlist(sorted(state_dict))}")
    return state_dict


# ---------------------------------------------------------------- text encoders

def single_file_text_encoder(source, slot: Slot, tokenizer_dir: Path, *, config: dict | None = None,
                             allow_pickle: bool = False):
    """A TextEncoder (CLIP) or T5Encoder for `slot` from a state dict, a file or a transformers folder. The
    config is the folder's own, else `config` (a config= folder's), else inferred from the shapes."""
    state_dict, own = _read(source, allow_pickle)
    _refuse_scaled_fp8(state_dict)
    config = own or config
    label = f"{slot.name} ({slot.label})"
    if slot.kind == "t5":
        from transformers import AutoTokenizer, T5Config, T5EncoderModel

        from .models.t5 import T5Encoder

        weights = t5_state_dict(state_dict, label)
        t5_config = T5Config.from_dict(_plain_config(config)) if config else T5Config(**infer_t5_config(weights))
        model = _text_model(T5EncoderModel, t5_config, weights, label)
        return T5Encoder(model, AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True))
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .models.text import TextEncoder, load_tokenizer

    if config and config.get("model_type") == "clip":  # a whole CLIPModel folder (openai/clip-vit-large-patch14)
        config = config["text_config"]
    weights = clip_state_dict(state_dict, label)
    clip_config = CLIPTextConfig.from_dict(_plain_config(config)) if config else \
        CLIPTextConfig(**infer_clip_config(weights, slot.kind, label))
    if not slot.projection:
        weights.pop("text_projection.weight", None)  # FLUX reads CLIP-L's unprojected pooler_output
    elif "text_projection.weight" not in weights:  # Stability's packed CLIP-L: diffusers uses the identity
        if clip_config.projection_dim != clip_config.hidden_size:
            raise FormatError(f"{label}: no text_projection.weight and projection_dim {clip_config.projection_dim} "
                              f"!= hidden_size {clip_config.hidden_size}, so it cannot be the identity")
        weights["text_projection.weight"] = torch.eye(clip_config.hidden_size)
    model = _text_model(CLIPTextModelWithProjection if slot.projection else CLIPTextModel, clip_config, weights,
                        label)
    return TextEncoder(model, load_tokenizer(tokenizer_dir, clip_config.max_position_embeddings))


def _plain_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype", "architectures")}


def _text_model(cls, config, weights: dict, label: str):
    """A transformers model built without random init and loaded strictly in float32. CLIP's non-persistent
    position_ids are rebuilt; transformers 4 nests CLIPTextModel under text_model., 5 does not."""
    with torch.device("meta"):
        model = cls(config)
    model.to_empty(device="cpu").to(torch.float32)
    own = model.state_dict()
    if any(k.startswith("text_model.") for k in own):
        weights = {k if k.startswith(("text_model.", "text_projection.")) or "text_model." + k not in own
                   else "text_model." + k: v for k, v in weights.items()}
    load_state_dict_strict(model, weights, name=label)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name in own:
                continue
            if not name.endswith("position_ids"):
                raise FormatError(f"{label}: {cls.__name__} has a buffer {name} that no file holds")
            buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    return model.eval()


def clip_state_dict(state_dict: dict, label: str = "CLIP text encoder") -> dict:
    """A CLIP text tower in transformers' flat names (embeddings.*, encoder.layers.*, final_layer_norm.*, and
    text_projection.weight when present) from transformers' names (with or without text_model.) or OpenCLIP's
    (transformer.resblocks.*, as some clip_g files; ComfyUI opens both); a whole CLIP's vision tower is dropped.
    A bare `text_projection` (OpenCLIP, ComfyUI's CLIPSave) multiplies from the right, so it is transposed."""
    sd = dict(state_dict)
    projection = sd.pop("text_projection.weight", None)
    if "text_projection" in sd:
        projection = sd.pop("text_projection").T
    sd = {k: v for k, v in sd.items() if k != "logit_scale" and not k.startswith(("vision_model.", "visual.",
                                                                                  "visual_projection."))}
    if "transformer.resblocks.0.ln_1.weight" in sd:
        flat = _open_clip_to_diffusers(sd)  # fused in_proj split into q, k, v
    else:
        flat = {k.removeprefix("text_model."): v for k, v in sd.items()
                if k.removeprefix("text_model.") != "embeddings.position_ids"}
    unknown = [k for k in flat if k.split(".")[0] not in ("embeddings", "encoder", "final_layer_norm")]
    if unknown or "embeddings.token_embedding.weight" not in flat:
        raise FormatError(f"{label}: not a CLIP text model in transformers' or OpenCLIP's names: "
                          f"{_shortlist(unknown or sorted(flat))}")
    return flat | ({"text_projection.weight": projection} if projection is not None else {})


def infer_clip_config(weights: dict, kind: str, label: str = "CLIP text encoder") -> dict:
    """CLIPTextConfig fields from a clip_state_dict's shapes. The head count is not stored: width / 64, as in
    CLIP-L and bigG; activations and token ids as released (CLIP-L OpenAI's quick_gelu, bigG gelu)."""
    vocab, width = weights["embeddings.token_embedding.weight"].shape
    if width % CLIP_HEAD_WIDTH:
        raise FormatError(f"{label}: width {width} is not a multiple of {CLIP_HEAD_WIDTH}, so its head count cannot "
                          f"be inferred; pass config=a diffusers folder whose config.json for it gives "
                          f"num_attention_heads (or the text encoder as a folder)")
    projection = weights.get("text_projection.weight")
    return dict(vocab_size=vocab, hidden_size=width,
                intermediate_size=_need(weights, "encoder.layers.0.mlp.fc1.weight", label).shape[0],
                num_hidden_layers=len(_indices(weights, "encoder.layers.")),
                num_attention_heads=width // CLIP_HEAD_WIDTH,
                max_position_embeddings=_need(weights, "embeddings.position_embedding.weight", label).shape[0],
                projection_dim=width if projection is None else projection.shape[0],
                hidden_act="quick_gelu" if kind == "clip_l" else "gelu", layer_norm_eps=1e-5,
                bos_token_id=0, eos_token_id=2, pad_token_id=1)


def t5_state_dict(state_dict: dict, label: str = "T5 encoder") -> dict:
    """A T5 encoder in T5EncoderModel names (shared.weight and the tied encoder.embed_tokens.weight both
    present); a full T5's decoder and lm_head are dropped, as T5EncoderModel ignores them."""
    sd = {k: v for k, v in state_dict.items() if not k.startswith("decoder.") and k != "lm_head.weight"}
    embedding = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    unknown = [k for k in sd if not k.startswith("encoder.") and k != "shared.weight"]
    if embedding is None or unknown or "encoder.block.0.layer.0.SelfAttention.q.weight" not in sd:
        raise FormatError(f"{label}: not a T5 encoder in transformers' names (encoder.block.N..., shared.weight): "
                          f"{_shortlist(unknown or sorted(sd))}")
    return sd | {"shared.weight": embedding, "encoder.embed_tokens.weight": embedding}


def infer_t5_config(weights: dict) -> dict:
    """T5Config fields from a t5_state_dict's shapes: heads and buckets from the relative attention bias,
    gated-GELU (T5 v1.1, as SD3's and FLUX's T5-XXL) when the MLP has wi_0 / wi_1, else ReLU (T5 1.0)."""
    vocab, d_model = weights["shared.weight"].shape
    block = "encoder.block.0.layer."
    buckets, heads = _need(weights, block + "0.SelfAttention.relative_attention_bias.weight", "T5").shape
    gated = block + "1.DenseReluDense.wi_0.weight" in weights
    d_ff = _need(weights, block + ("1.DenseReluDense.wi_0.weight" if gated else "1.DenseReluDense.wi.weight"),
                 "T5").shape[0]
    return dict(vocab_size=vocab, d_model=d_model, d_kv=weights[block + "0.SelfAttention.q.weight"].shape[0] // heads,
                d_ff=d_ff, num_layers=len(_indices(weights, "encoder.block.")), num_heads=heads,
                relative_attention_num_buckets=buckets, feed_forward_proj="gated-gelu" if gated else "relu",
                layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0)


def _need(weights: dict, key: str, label: str) -> torch.Tensor:
    if key not in weights:
        raise FormatError(f"{label}: missing {key}, needed to infer its config")
    return weights[key]


def _indices(keys, prefix: str) -> list[int]:
    found = (k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix))
    return sorted({int(i) for i in found if i.isdigit()})
