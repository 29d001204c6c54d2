"""Build a pipeline's components from disk, and write them back, in the formats others use.

A diffusers folder is read component by component (config.json -> module, safetensors -> strict load). A
single-file LDM checkpoint is split by the key map in reverie.formats.single_file, its configs inferred
from tensor shapes. Nothing is half-loaded: each strict load checks every key and shape first.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .formats import (FormatError, infer_sd_configs, load_checkpoint, load_state_dict_strict, load_weights,
                      read_config, read_model_index, save_component, write_model_index)
from .formats.folder import read_json, write_json
from .models.text import TextEncoder, load_tokenizer
from .models.unet import UNet
from .models.vae import AutoencoderKL

REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD_SCHEDULER = {  # what SD 1.x/2.x single files imply; prediction_type can be overridden (SD 2.x 768: v)
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "steps_offset": 1, "skip_prk_steps": True,
    "clip_sample": False, "prediction_type": "epsilon",
}


def _build(cls, config: dict, state_dict: dict, name: str, compute_dtype=None):
    """Instantiate without random init (meta device), then load every weight strictly (reverie's UNet and VAE
    have no buffers outside their state dict, so nothing is left uninitialised). fp8 weights (float8_e4m3fn
    files) stay fp8 and each layer upcasts to `compute_dtype` (default float32, the dtype everything else loads
    in; a Pipeline then sets its own) for its call (reverie.models.quant): a FLUX-size transformer needs half
    its bf16 memory."""
    with torch.device("meta"):
        module = cls.from_config(config)
    from .models import quant

    if quant.is_fp8_state_dict(state_dict):
        return quant.store_fp8(module, state_dict, compute_dtype=compute_dtype or torch.float32, device="cpu",
                               name=name)
    module.to_empty(device="cpu")
    load_state_dict_strict(module, state_dict, name=name)
    return module


def load_network(cls, folder: Path, *, variant: str | None = None, allow_pickle: bool = False, dtype=None):
    """A diffusers model folder (config.json + weights, sharded or not, optionally a variant such as "fp16") as
    reverie's `cls`, loaded strictly; fp8 weights stay fp8, computing in `dtype` (see _build)."""
    folder = Path(folder)
    return _build(cls, read_config(folder), load_weights(folder, variant, allow_pickle=allow_pickle), folder.name,
                  compute_dtype=dtype)


def save_network(module, folder: Path, *, dtype=None) -> Path:
    """Write a network as a diffusers model folder (config.json + diffusion_pytorch_model.safetensors)."""
    return save_component(Path(folder), module.state_dict(), module.to_config(),
                          "diffusion_pytorch_model.safetensors", dtype)


def _text_encoder(config: dict, state_dict: dict, tokenizer_dir) -> TextEncoder:
    from transformers import AutoConfig

    from .models.text import MODELS

    model_type = config.get("model_type", "clip_text_model")
    if model_type not in MODELS:
        raise FormatError(f"text_encoder: config.json's model_type must be one of {', '.join(MODELS)}, got "
                          f"{model_type!r}")
    config = {k: v for k, v in config.items() if k != "model_type"}
    model = MODELS[model_type](AutoConfig.for_model(model_type, **config))  # not on meta: buffers (position_ids)
    own = model.state_dict()
    if model_type == "clip_text_model":  # transformers 4 nests CLIPTextModel under text_model., 5 does not
        prefixed = next(iter(own)).startswith("text_model.")
        state_dict = {(k if prefixed else k.removeprefix("text_model.")): v for k, v in state_dict.items()}
    state_dict = {k: own[k] for k in own if k.endswith("position_ids")} | state_dict  # optional in files
    load_state_dict_strict(model, state_dict, name="text_encoder")
    return TextEncoder(model.eval(), load_tokenizer(tokenizer_dir, config.get("max_position_embeddings", 77)))


def load_folder(path: Path, *, allow_pickle: bool = False, tokenizer=None):
    """(unet, vae, text_encoder, scheduler_config) from a diffusers pipeline folder."""
    index = read_model_index(path)
    missing = [name for name in REQUIRED if not (path / name).is_dir()]
    if missing:
        raise FormatError(f"{path}: not a text-to-image folder, missing {', '.join(missing)} "
                          f"(model_index.json lists {', '.join(k for k in index if not k.startswith('_'))})")
    unet = _build(UNet, read_config(path / "unet"), load_weights(path / "unet", allow_pickle=allow_pickle), "unet")
    vae = _build(AutoencoderKL, read_config(path / "vae"), load_weights(path / "vae", allow_pickle=allow_pickle),
                 "vae")
    text_encoder = _text_encoder(read_config(path / "text_encoder"),
                                 load_weights(path / "text_encoder", allow_pickle=allow_pickle),
                                 tokenizer or path / "tokenizer")
    scheduler_config = read_json(path / "scheduler" / "scheduler_config.json")
    return unet, vae, text_encoder, scheduler_config


def load_single_file(path: Path, *, allow_pickle: bool = False, tokenizer=None):
    """(unet, vae, text_encoder, scheduler_config) from an SD 1.x/2.x single-file checkpoint."""
    if tokenizer is None:
        raise ValueError("tokenizer: single-file checkpoints contain no tokenizer; pass tokenizer=FOLDER (the "
                         "tokenizer/ folder of a matching diffusers model)")
    from .formats import split_ldm_checkpoint

    state_dict = load_checkpoint(path, allow_pickle=allow_pickle)
    configs, parts = infer_sd_configs(state_dict), split_ldm_checkpoint(state_dict)
    missing = [name for name in ("unet", "vae", "text_encoder") if name not in parts]
    if missing:
        raise FormatError(f"{path}: the checkpoint has no {', '.join(missing)}")
    unet = _build(UNet, configs["unet"], parts["unet"], "unet")
    vae = _build(AutoencoderKL, configs["vae"], parts["vae"], "vae")
    text_encoder = _text_encoder(configs["text_encoder"], parts["text_encoder"], tokenizer)
    return unet, vae, text_encoder, dict(SD_SCHEDULER)


def save_folder(pipe, path: Path, *, dtype=None) -> None:
    """Write pipe as a diffusers StableDiffusionPipeline folder (LatentConsistencyModelPipeline for an LCM UNet,
    one with time_cond_proj_dim: the same components, run without CFG)."""
    path.mkdir(parents=True, exist_ok=True)
    weights = "diffusion_pytorch_model.safetensors"
    save_component(path / "unet", pipe.unet.state_dict(), pipe.unet.to_config(), weights, dtype)
    save_component(path / "vae", pipe.vae.state_dict(), pipe.vae.to_config(), weights, dtype)
    pipe.text_encoder.save_pretrained(path / "text_encoder", path / "tokenizer", dtype=dtype)
    (path / "scheduler").mkdir(exist_ok=True)
    write_json(path / "scheduler" / "scheduler_config.json", pipe.scheduler_config)
    tokenizer_class = type(pipe.text_encoder.tokenizer).__name__.removesuffix("Fast")
    safety = _copy_safety_checker(pipe, path)
    write_model_index(path, {
        "unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
        "text_encoder": ("transformers", type(pipe.text_encoder.text_model).__name__),
        "tokenizer": ("transformers", tokenizer_class),
        "scheduler": ("diffusers", pipe.scheduler_config.get("_class_name", "DDIMScheduler")),
        "safety_checker": safety and ("stable_diffusion", "StableDiffusionSafetyChecker"),
        "feature_extractor": safety and safety[1] and ("transformers", "CLIPImageProcessor"),
    }, class_name="LatentConsistencyModelPipeline" if pipe.unet.config.time_cond_proj_dim is not None
        else "StableDiffusionPipeline", extra={"requires_safety_checker": bool(safety)})


def _copy_safety_checker(pipe, path: Path):
    """A folder's own SD safety checker goes with it: its safety_checker/ (and feature_extractor/) are copied
    as read. Returns what was copied, or None (no checker, or one that is not SD's concept checker)."""
    import shutil

    checker = getattr(pipe.safety_checker, "checker", None)
    source = getattr(checker, "source", None)
    if source is None:
        return None
    for src, name in zip(source, ("safety_checker", "feature_extractor")):
        if src is not None and Path(src).resolve() != (path / name).resolve():
            shutil.copytree(src, path / name, dirs_exist_ok=True)
    return source


# --- ControlNets --------------------------------------------------------------------------------------------


def bundled_controlnets() -> list[str]:
    """Names of the ControlNets shipped with the package (bundled/controlnets/NAME)."""
    root = BUNDLED / "controlnets"
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def controlnet_folder(path: Path) -> Path:
    """The ControlNetModel folder at `path`: the folder itself (config.json + weights), the controlnet/
    component of a diffusers ControlNet pipeline folder, or a bundled ControlNet's name."""
    path = Path(path)
    if not path.exists() and str(path) in bundled_controlnets():
        path = BUNDLED / "controlnets" / str(path)
    for folder in (path, path / "controlnet"):
        if (folder / "config.json").is_file():
            return folder
    raise ValueError(f"controlnet: {path} is not a ControlNet folder (config.json + "
                     f"diffusion_pytorch_model.safetensors), nor a pipeline folder with controlnet/, nor a bundled "
                     f"ControlNet ({', '.join(bundled_controlnets()) or 'none'})")


def load_controlnet(path, *, allow_pickle: bool = False):
    """A ControlNet from a diffusers ControlNetModel folder (see controlnet_folder), loaded strictly."""
    from .models.controlnet import ControlNet

    folder = controlnet_folder(path)
    return _build(ControlNet, read_config(folder), load_weights(folder, allow_pickle=allow_pickle), "controlnet")


def save_controlnet(controlnet, path, *, dtype=None) -> Path:
    """Write a ControlNet as a diffusers ControlNetModel folder (ControlNetModel.from_pretrained opens it)."""
    return save_component(Path(path), controlnet.state_dict(), controlnet.to_config(),
                          "diffusion_pytorch_model.safetensors", dtype)


# --- safety checker ---------------------------------------------------------------------------------------------


def load_safety_checker(path: Path):
    """The safety checker a pipeline folder ships (model_index.json names a safety_checker class and the folder
    has safety_checker/), as a reverie.safety.ConceptChecker reading feature_extractor/ too; None if it ships
    none (reverie's own folders write [null, null])."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        return None
    spec = read_model_index(path).get("safety_checker")
    if not (isinstance(spec, list) and len(spec) == 2 and spec[1]) or not (path / "safety_checker").is_dir():
        return None
    from .safety import ConceptChecker

    return ConceptChecker.from_pretrained(path / "safety_checker", path / "feature_extractor")


BUNDLED = Path(__file__).parent / "bundled"  # models trained by reverie, shipped with the package


def model_path(model: str | None) -> Path:
    """A path as given, or the name of a bundled model ("shapes" when None)."""
    bundled = sorted(p.name for p in BUNDLED.iterdir() if (p / "model_index.json").is_file()) \
        if BUNDLED.is_dir() else []
    if model is None:
        if "shapes" not in bundled:
            raise ValueError("--model: no bundled model is installed; pass a diffusers folder or a .safetensors file")
        return BUNDLED / "shapes"
    if Path(model).exists():
        return Path(model)
    if model in bundled:
        return BUNDLED / model
    raise ValueError(f"--model: {model!r} is neither a path nor a bundled model ({', '.join(bundled) or 'none'})")


FAST_SUFFIX = "-lcm"  # a bundled model NAME's few-step sibling: NAME-lcm, distilled from it (reverie train, lcm task)


def fast_model_path(model: str | None) -> Path:
    """`--fast`: the few-step (latent consistency) model for `model` — a bundled model's NAME-lcm sibling, or the
    folder itself when it already is a LatentConsistencyModelPipeline."""
    from .formats import read_model_index

    path = model_path(model)
    if path.parent == BUNDLED and not path.name.endswith(FAST_SUFFIX):
        path = BUNDLED / f"{path.name}{FAST_SUFFIX}"
    if (path / "model_index.json").is_file() and \
            read_model_index(path).get("_class_name") == "LatentConsistencyModelPipeline":
        return path
    fast = sorted(p.name[:-len(FAST_SUFFIX)] for p in BUNDLED.glob(f"*{FAST_SUFFIX}") if p.is_dir())
    raise ValueError(f"--fast: {model or 'shapes'!r} has no few-step (LCM) version; bundled models with one: "
                     f"{', '.join(fast) or 'none'}; or pass a LatentConsistencyModelPipeline folder as --model")


# --- the transformer families (DiT, SD3, FLUX) ---------------------------------------------------------------


def _tokenizer_dir(path: Path, name: str) -> Path:
    return path / name.replace("text_encoder", "tokenizer")  # text_encoder_2 -> tokenizer_2


def load_text_encoder(text_encoder_dir: Path, tokenizer_dir: Path, *, variant: str | None = None):
    """A text encoder folder as reverie's wrapper: CLIP (with or without projection) or T5, by its config."""
    from .models.t5 import T5Encoder
    from .models.text import text_encoder_from_folder

    config = read_config(text_encoder_dir)
    if any(a.startswith("T5") for a in config.get("architectures") or []) or config.get("model_type") == "t5":
        return T5Encoder.from_pretrained(text_encoder_dir, tokenizer_dir, variant=variant)
    return text_encoder_from_folder(text_encoder_dir, tokenizer_dir, variant=variant)


def load_transformer_folder(path: Path, network_cls, text_encoders: tuple[str, ...], *, variant=None,
                            allow_pickle: bool = False, vae=None, dtype=None, network_dir: str = "transformer", **_):
    """(components, scheduler config) of an SD3, FLUX or SDXL (network_dir="unet") diffusers folder. A text
    encoder that model_index.json lists as [null, null] (SD3 without T5, the SDXL refiner's first) is None.
    vae: a VAE file or folder to use instead of the folder's."""
    index = read_model_index(path)
    components = {network_dir: load_network(network_cls, path / network_dir, variant=variant,
                                            allow_pickle=allow_pickle, dtype=dtype),
                  "vae": load_network(AutoencoderKL, path / "vae", variant=variant, allow_pickle=allow_pickle)}
    for name in text_encoders:
        spec = index.get(name)
        present = isinstance(spec, list) and spec[-1] is not None and (path / name).is_dir()
        components[name] = load_text_encoder(path / name, _tokenizer_dir(path, name), variant=variant) \
            if present else None
    if vae is not None:
        from .single_files import replace_vae

        components = replace_vae(components, vae, allow_pickle=allow_pickle, variant=variant)
    return components, read_json(path / "scheduler" / "scheduler_config.json")


def save_transformer_folder(pipe, path: Path, pipeline_class: str, transformer_class: str,
                            text_encoders: tuple[str, ...], *, dtype=None, network_dir: str = "transformer",
                            extra: dict | None = None) -> None:
    """Write an SD3, FLUX or SDXL pipeline as a diffusers folder that its diffusers pipeline class opens (extra:
    plain settings for model_index.json, e.g. SDXL's force_zeros_for_empty_prompt)."""
    save_network(pipe.network, path / network_dir, dtype=dtype)
    save_network(pipe.vae, path / "vae", dtype=dtype)
    entries = {network_dir: ("diffusers", transformer_class), "vae": ("diffusers", "AutoencoderKL")}
    for name in text_encoders:
        encoder = pipe.components.get(name)
        tokenizer = name.replace("text_encoder", "tokenizer")
        if encoder is None:
            entries[name] = entries[tokenizer] = None
            continue
        encoder.save_pretrained(path / name, path / tokenizer, dtype=dtype)
        entries[name] = ("transformers", type(encoder.text_model).__name__)
        entries[tokenizer] = ("transformers", type(encoder.tokenizer).__name__.removesuffix("Fast"))
    (path / "scheduler").mkdir(parents=True, exist_ok=True)
    write_json(path / "scheduler" / "scheduler_config.json", pipe.scheduler_config)
    entries["scheduler"] = ("diffusers", pipe.scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler"))
    write_model_index(path, entries, class_name=pipeline_class, extra=extra)
