"""SDXL single files as whole pipelines: the original SGM layout people download (Stability's
sd_xl_base_1.0.safetensors and sd_xl_refiner_1.0.safetensors, and the fine-tunes saved like them), read into the
components that SDXL.load_folder gives for the equivalent diffusers folder, so both give the same images.

SGM (Podell et al. 2023, github.com/Stability-AI/generative-models) stores one state dict:
    model.diffusion_model.*              the UNet, LDM names plus label_emb (diffusers' add_embedding)
    first_stage_model.*                  the VAE, LDM names
    conditioner.embedders.0.transformer.*  base: CLIP ViT-L as transformers' CLIPTextModel (text_encoder)
    conditioner.embedders.1.model.*      base: OpenCLIP ViT-bigG text tower (text_encoder_2): fused attn.in_proj,
                                         a bare text_projection applied from the right (so transposed here)
    conditioner.embedders.0.model.*      refiner: the same bigG tower, its only text encoder
What the weights do not record comes from `config=` (a diffusers SDXL folder) when given: every component's
config, the tokenizers, the scheduler and the pipeline settings; else from the released models (heads =
width / 64, addition_time_embed_dim 256, VAE scaling 0.13025, SDXL's Euler scheduler). Tokenizers are never in
the file: config= or tokenizer= (a diffusers SDXL folder with tokenizer/ and tokenizer_2/) must supply them.
"""

from __future__ import annotations

from pathlib import Path

from .formats import FormatError, infer_sd_configs, load_checkpoint, read_config, read_model_index, \
    split_ldm_checkpoint, to_ldm_checkpoint
from .formats.folder import read_json
from .formats.single_file import OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, _text_to_ldm
from .loading import _build
from .models.unet import UNet
from .single_files import Slot, _config_folder, _tokenizer_dir, load_vae, single_file_text_encoder

CLIP_L = "conditioner.embedders.0.transformer."  # base: HF CLIPTextModel names (text_model.* or flat)
BIG_G = "conditioner.embedders.1.model."  # base: OpenCLIP bigG
REFINER_BIG_G = "conditioner.embedders.0.model."  # refiner: OpenCLIP bigG, its only text encoder
LABEL_EMB = UNET_PREFIX + "label_emb.0.0.weight"  # SGM's "adm" MLP: diffusers' add_embedding.linear_1
SCHEDULER = {  # stabilityai/stable-diffusion-xl-base-1.0 (and refiner-1.0) scheduler_config.json
    "_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "epsilon",
    "interpolation_type": "linear", "use_karras_sigmas": False, "clip_sample": False, "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True,
}
VAE = dict(scaling_factor=0.13025, sample_size=1024, force_upcast=True)  # SDXL's VAE settings no weight records
SLOTS = (Slot("text_encoder", "clip_l", "CLIP-L", "", projection=False),
         Slot("text_encoder_2", "clip_g", "OpenCLIP bigG", "", projection=True))
SETTINGS = {False: dict(force_zeros_for_empty_prompt=True, requires_aesthetics_score=False),  # base
            True: dict(force_zeros_for_empty_prompt=False, requires_aesthetics_score=True)}  # refiner


def is_sdxl_checkpoint(state_dict: dict) -> bool:
    """Whether a single file's keys (values may be None: a safetensors header) are SGM's SDXL base or refiner:
    base bigG keys, or a refiner's bigG at embedders.0 with the UNet's label_emb; or a UNet-only file whose
    label_emb.0.0 is a Linear (2-D) and that has no SD 1/2 text encoder (SD 2 unCLIP has label_emb too)."""
    keys = state_dict.keys()
    if any(k.startswith(BIG_G + "transformer.resblocks.") for k in keys):
        return True
    if LABEL_EMB not in state_dict:
        return False
    if any(k.startswith(REFINER_BIG_G) for k in keys):
        return True
    weight = state_dict[LABEL_EMB]
    return getattr(weight, "ndim", 2) == 2 and not any(k.startswith("cond_stage_model.") for k in keys)


# ---------------------------------------------------------------- reading

def load_sdxl_single_file(path, *, config=None, tokenizer=None, vae=None, allow_pickle: bool = False, dtype=None,
                          **_) -> tuple[dict, dict]:
    """(components, scheduler config) of an SDXL base or refiner single file, as SDXL.load_folder gives them
    (unet, vae, text_encoder (None for the refiner), text_encoder_2, settings).

    config: a diffusers SDXL folder for configs, tokenizers, scheduler and settings. tokenizer: a diffusers SDXL
    folder with tokenizer/ and tokenizer_2/ (a bare CLIP tokenizer folder serves text_encoder only). vae: a VAE
    file or folder instead of the file's. dtype: the pipeline's compute dtype (an fp8 UNet stays fp8, computing
    in it; see loading._build)."""
    from .families import get

    path = Path(path)
    config = _config_folder(config, get("sdxl"))
    tokenizer = Path(tokenizer) if tokenizer is not None else None
    state_dict = load_checkpoint(path, allow_pickle=allow_pickle)
    refiner = not any(k.startswith(CLIP_L) for k in state_dict)
    texts = {"text_encoder": None if refiner else _part(state_dict, CLIP_L),
             "text_encoder_2": _part(state_dict, REFINER_BIG_G if refiner else BIG_G)}
    tokenizers, missing = {}, []
    for slot in SLOTS:  # every tokenizer is found before any weight is built
        if texts[slot.name] is None:
            continue
        tokenizers[slot.name] = _tokenizer_dir(slot.name, None, tokenizer, config)
        if tokenizers[slot.name] is None:
            missing.append(slot.name.replace("text_encoder", "tokenizer"))
    if missing:
        raise ValueError(f"{path.name}: single files hold no tokenizer ({', '.join(missing)} missing); pass "
                         f"config=a diffusers SDXL folder (its tokenizer/ and tokenizer_2/) or tokenizer=such a "
                         f"folder")
    if not texts["text_encoder_2"]:
        raise FormatError(f"{path.name}: no OpenCLIP bigG text encoder ({BIG_G}* or {REFINER_BIG_G}*); reverie "
                          f"reads SDXL files with their text encoders")
    ldm = {k: v for k, v in state_dict.items() if not k.startswith("conditioner.")}
    components = {"unet": _unet(ldm, config, dtype), "vae": _vae(ldm, vae, config, allow_pickle)}
    for slot in SLOTS:
        given = config / slot.name / "config.json" if config else None
        components[slot.name] = None if texts[slot.name] is None else single_file_text_encoder(
            texts[slot.name], slot, tokenizers[slot.name], allow_pickle=allow_pickle,
            config=read_json(given) if given and given.is_file() else None)
    index = read_model_index(config) if config else {}
    components["settings"] = {k: index.get(k, v) for k, v in SETTINGS[refiner].items()}
    scheduler = config / "scheduler" / "scheduler_config.json" if config else None
    return components, read_json(scheduler) if scheduler and scheduler.is_file() else dict(SCHEDULER)


def _part(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _unet(ldm: dict, config: Path | None, dtype) -> UNet:
    """The UNet from its LDM weights; a config= folder's unet/config.json must agree with the shapes (what the
    shapes tell) and supplies the rest (head counts, time-id width, group count, sample size)."""
    unet_only = {k: v for k, v in ldm.items() if k.startswith(UNET_PREFIX)}
    if not unet_only:
        raise FormatError(f"SDXL checkpoint: no UNet ({UNET_PREFIX}*)")
    weights = split_ldm_checkpoint(unet_only)["unet"]
    given = config / "unet" / "config.json" if config else None
    if given is None or not given.is_file():
        try:
            unet_config = infer_sd_configs(unet_only)["unet"]
        except FormatError as e:
            raise ValueError(f"unet: {e}. Not stored in the file: pass config=a diffusers SDXL folder of this "
                             f"model (its unet/config.json)") from e
    else:
        unet_config = read_json(given)
        facts = infer_sd_configs(unet_only, overrides={"unet": {"attention_head_dim": 1}})["unet"]  # heads: unused
        wrong = [f"{k} (file {v!r}, config {unet_config.get(k)!r})" for k, v in facts.items()
                 if k not in ("attention_head_dim", "sample_size", "addition_time_embed_dim",
                              "transformer_layers_per_block") and _plain(unet_config.get(k)) != _plain(v)]
        if wrong:
            raise ValueError(f"config: {given.parent} does not describe this file's UNet: {', '.join(wrong)}; give "
                             f"the diffusers folder of the same model")
    return _build(UNet, unet_config, weights, "unet", compute_dtype=dtype)


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _vae(ldm: dict, vae, config: Path | None, allow_pickle: bool):
    """The file's VAE (or vae=), its unstored settings from config= else SDXL's."""
    base = read_config(config / "vae") if config and (config / "vae" / "config.json").is_file() else VAE
    if vae is not None:
        return load_vae(Path(vae), base, allow_pickle=allow_pickle)
    weights = {k: v for k, v in ldm.items() if k.startswith(VAE_PREFIX)}
    if not weights:
        raise ValueError(f"vae: the file has no VAE ({VAE_PREFIX}*); pass vae=a VAE file or folder")
    return load_vae(weights, base)


# ---------------------------------------------------------------- writing (the inverse, for tests and export)

def sdxl_to_single_file(pipe_or_components) -> dict:
    """An SGM single-file state dict from a reverie SDXL Pipeline or its components dict: the inverse of
    load_sdxl_single_file (CLIP-L under embedders.0.transformer.text_model.*, bigG with fused in_proj and a
    transposed bare text_projection under embedders.1.model.*, or embedders.0.model.* for a refiner)."""
    components = getattr(pipe_or_components, "components", pipe_or_components)
    out = to_ldm_checkpoint({"unet": components["unet"].state_dict(), "vae": components["vae"].state_dict()})
    clip_l, big_g = components.get("text_encoder"), components["text_encoder_2"]
    if clip_l is not None:
        flat = {k.removeprefix("text_model."): v for k, v in clip_l.text_model.state_dict().items()}
        out |= {CLIP_L + "text_model." + k: v for k, v in flat.items() if k != "embeddings.position_ids"}
    g = {k.removeprefix("text_model."): v for k, v in big_g.text_model.state_dict().items()}
    projection = g.pop("text_projection.weight")  # (P, W) Linear weight; OpenCLIP's x @ text_projection is (W, P)
    open_clip = _text_to_ldm(g, "open_clip")
    prefix = BIG_G if clip_l is not None else REFINER_BIG_G
    out |= {prefix + k.removeprefix(OPEN_CLIP_PREFIX): v for k, v in open_clip.items()}
    out[prefix + "text_projection"] = projection.T.contiguous()
    return {k: v.detach().contiguous() for k, v in out.items()}


__all__ = ["is_sdxl_checkpoint", "load_sdxl_single_file", "sdxl_to_single_file"]
