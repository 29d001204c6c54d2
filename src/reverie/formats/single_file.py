"""Single-file Stable Diffusion 1.x/2.x checkpoints (original LDM key names) <-> diffusers component state dicts;
SDXL UNets too (SGM's layout: the LDM names plus label_emb, the added embedding), but not SDXL's text encoders.

LDM names come from CompVis' `ldm` code (Rombach et al. 2022: openaimodel.UNetModel, the KL autoencoder's
Encoder/Decoder) and the text encoders it wraps (HF CLIPTextModel for SD 1.x, OpenCLIP ViT-H/14 for SD 2.x).
Diffusers names are those of UNet2DConditionModel, AutoencoderKL and transformers' CLIPTextModel (flat
names, as transformers >= 5.6 writes them). Every key map is built from a config (blocks, layers per
block, where attention is), never from a fixed SD 1.5 list, and every key must be accounted for.
"""

import warnings

import torch

from .safetensors_io import FormatError, _plural, _shortlist

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: OpenAI CLIP ViT-L/14 as HF CLIPTextModel
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP ViT-H/14 text tower
EMA_PREFIX = "model_ema."  # LDM's EMA UNet, names without dots: "model_ema.diffusion_modelinput_blocks00weight"
PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "clip": CLIP_PREFIX, "open_clip": OPEN_CLIP_PREFIX}
LDM_BUFFERS = {  # DDPM schedule buffers saved by LDM; diffusers schedulers recompute them from betas
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar", "scale_factor",
}
CLIP_UNUSED = {"embeddings.position_ids"}  # an arange buffer old transformers saved; now non-persistent
OPEN_CLIP_UNUSED = {"text_projection", "logit_scale", "attn_mask"}  # contrastive head: SD and diffusers drop it
SD2_TEXT_LAYERS = 24  # ViT-H/14's depth; SD 2.x uses the penultimate layer, so diffusers drops resblocks.23
HEAD_WIDTH = 64  # per-head width of CLIP ViT-L/14, OpenCLIP ViT-H/14 and SD 2.x's UNet: heads = width // 64
SD1_UNET_HEADS = 8  # SD 1.x's UNet has 8 heads at every width (diffusers calls this attention_head_dim)

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}  # q/k/v are fused into attn.in_proj_{weight,bias}
_OPEN_CLIP_TOP = {"embeddings.token_embedding": "token_embedding", "final_layer_norm": "ln_final",
                  "embeddings.position_embedding.weight": "positional_embedding"}


# ---------------------------------------------------------------- key maps (diffusers module path -> LDM path)

def _add(mapping: dict, diffusers: str, ldm: str, parts: dict) -> None:
    mapping.update({f"{diffusers}.{d}": f"{ldm}.{l}" for d, l in parts.items()})


def unet_module_map(config: dict) -> dict[str, str]:
    """Diffusers -> LDM module paths for a UNet2DConditionModel config (down/up_block_types, layers_per_block)."""
    down, up, lpb = config["down_block_types"], config["up_block_types"], config["layers_per_block"]
    if not isinstance(lpb, int) or len(down) != len(up):
        raise ValueError(f"UNet config: layers_per_block must be an int and down/up_block_types the same length, "
                         f"got {lpb!r}, {len(down)} and {len(up)}")
    allowed = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
    if not set(down) | set(up) <= allowed or config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != \
            "UNetMidBlock2DCrossAttn":
        raise ValueError(f"UNet config: block types must be among {sorted(allowed)} with a cross-attention "
                         f"mid block, got {down}, {up}, {config.get('mid_block_type')}")
    m = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if config.get("addition_embed_type") == "text_time":  # SDXL: SGM's "adm" MLP on [pooled text, size ids]
        m |= {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    i = 1  # LDM's input_blocks: [conv_in, (resnet[, attention]) x lpb, downsample, ...]
    for b, kind in enumerate(down):
        for j in range(lpb):
            _add(m, f"down_blocks.{b}.resnets.{j}", f"input_blocks.{i}.0", _UNET_RESNET)
            if kind.startswith("CrossAttn"):
                m[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{i}.1"
            i += 1
        if b < len(down) - 1:
            m[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    _add(m, "mid_block.resnets.0", "middle_block.0", _UNET_RESNET)
    m["mid_block.attentions.0"] = "middle_block.1"
    _add(m, "mid_block.resnets.1", "middle_block.2", _UNET_RESNET)
    i = 0  # LDM's output_blocks: (resnet[, attention][, upsample]) x (lpb + 1) per block
    for b, kind in enumerate(up):
        for j in range(lpb + 1):
            _add(m, f"up_blocks.{b}.resnets.{j}", f"output_blocks.{i}.0", _UNET_RESNET)
            slot = 1
            if kind.startswith("CrossAttn"):
                m[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{i}.1"
                slot = 2
            if j == lpb and b < len(up) - 1:
                m[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{i}.{slot}.conv"
            i += 1
    return m


def vae_module_map(config: dict) -> dict[str, str]:
    """Diffusers -> LDM module paths for an AutoencoderKL config (block_out_channels, layers_per_block)."""
    n, lpb = len(config["block_out_channels"]), config["layers_per_block"]
    m = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        m.update({f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out",
                  f"{part}.conv_norm_out": f"{part}.norm_out"})
        _add(m, f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET)
        _add(m, f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION)
        _add(m, f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET)
    for b in range(n):
        for j in range(lpb):
            _add(m, f"encoder.down_blocks.{b}.resnets.{j}", f"encoder.down.{b}.block.{j}", _VAE_RESNET)
        if b < n - 1:
            m[f"encoder.down_blocks.{b}.downsamplers.0.conv"] = f"encoder.down.{b}.downsample.conv"
    for b in range(n):  # diffusers' up_blocks start at the lowest resolution; LDM's up.{level} is by resolution
        level = n - 1 - b
        for j in range(lpb + 1):
            _add(m, f"decoder.up_blocks.{b}.resnets.{j}", f"decoder.up.{level}.block.{j}", _VAE_RESNET)
        if b < n - 1:
            m[f"decoder.up_blocks.{b}.upsamplers.0.conv"] = f"decoder.up.{level}.upsample.conv"
    return m


def open_clip_module_map(num_layers: int) -> dict[str, str]:
    """Diffusers (CLIPTextModel) -> OpenCLIP paths, except q/k/v, which OpenCLIP fuses into in_proj."""
    m = dict(_OPEN_CLIP_TOP)
    for i in range(num_layers):
        _add(m, f"encoder.layers.{i}", f"transformer.resblocks.{i}", _OPEN_CLIP_LAYER)
    return m


def _rename(state_dict: dict, mapping: dict, label: str, prefix: str = "") -> dict:
    """Rename keys by their longest module path in `mapping`; refuse any key the layout does not explain."""
    out, unknown = {}, []
    for key, value in state_dict.items():
        parts = key.split(".")
        for cut in range(len(parts), 0, -1):
            head = ".".join(parts[:cut])
            if head in mapping:
                out[".".join([mapping[head], *parts[cut:]])] = value
                break
        else:
            unknown.append(prefix + key)
    if unknown:
        raise FormatError(f"{label}: {_plural(len(unknown), 'key')} outside the layout inferred from the "
                          f"checkpoint: {_shortlist(unknown)}")
    return out


def _indices(keys, prefix: str) -> list[int]:
    """Sorted distinct integers that follow `prefix` in keys, e.g. block numbers."""
    heads = (k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix))
    return sorted({int(h) for h in heads if h.isdigit()})


# ---------------------------------------------------------------- reading the layout from tensor shapes

def _group(state_dict: dict) -> dict[str, dict]:
    """Split an LDM state dict by component prefix (prefix stripped); refuse keys of no known component."""
    groups, unknown = {}, []
    for key, value in state_dict.items():
        for group, prefix in PREFIXES.items():
            if key.startswith(prefix):
                groups.setdefault(group, {})[key[len(prefix):]] = value
                break
        else:
            if key not in LDM_BUFFERS and not key.startswith(EMA_PREFIX):
                unknown.append(key)
    if unknown:
        raise FormatError(f"LDM checkpoint: {_plural(len(unknown), 'key')} of no SD 1.x/2.x component "
                          f"(SDXL and others are not supported): {_shortlist(unknown)}")
    if not groups:
        raise FormatError(f"LDM checkpoint: no key starts with any of {', '.join(PREFIXES.values())}")
    if "clip" in groups and "open_clip" in groups:
        raise FormatError(f"LDM checkpoint: has both {CLIP_PREFIX}* and {OPEN_CLIP_PREFIX}* text encoders")
    return groups


def _need(d: dict, key: str, prefix: str) -> torch.Tensor:
    if key not in d:
        raise FormatError(f"LDM checkpoint: missing {prefix}{key}, needed to infer the model's layout")
    return d[key]


def _unet_layout(u: dict) -> dict:
    """The shape facts of an LDM UNet: blocks, layers per block, channels, attention placement and kind."""
    n_in = len(_indices(u, "input_blocks."))
    downs = [i for i in _indices(u, "input_blocks.") if f"input_blocks.{i}.0.op.weight" in u]
    lpb = downs[0] - 1 if downs else n_in - 1
    n = len(downs) + 1
    if lpb < 1 or n_in != n * (lpb + 1) or downs != [(b + 1) * (lpb + 1) for b in range(n - 1)]:
        raise FormatError(f"LDM checkpoint: {UNET_PREFIX}input_blocks has {n_in} entries with downsamplers at "
                          f"{downs}: not a UNet layout with a fixed number of layers per block")
    firsts = [1 + b * (lpb + 1) for b in range(n)]  # first resnet of each down block
    cross_attention_dim = _need(u, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", UNET_PREFIX).shape[1]
    mid_depth = len(_indices(u, "middle_block.1.transformer_blocks."))
    depths = []  # per down block; 0 where it has no attention
    for i in firsts:
        block = {len(_indices(u, f"input_blocks.{i + j}.1.transformer_blocks.")) for j in range(lpb)}
        if len(block) != 1:
            raise FormatError(f"LDM checkpoint: transformer depths {sorted(block)} differ within a block "
                              f"(not supported)")
        depths.append(block.pop())
    if depths[-1] not in (0, mid_depth):
        raise FormatError(f"LDM checkpoint: the last block's transformer depth {depths[-1]} differs from the mid "
                          f"block's {mid_depth}; diffusers' config cannot express that")
    if set(depths) - {0} <= {mid_depth}:
        per_block = mid_depth  # SD 1.x/2.x and the SDXL refiner: one depth everywhere
    else:  # SDXL base, [1, 2, 10]: blocks without attention take 1, the last takes the mid block's depth
        per_block = [d or 1 for d in depths[:-1]] + [mid_depth]
    extra = {}
    if getattr(u.get("label_emb.0.0.weight"), "ndim", 0) == 2:  # SDXL's added (pooled text + size ids) embedding
        extra = {"addition_embed_type": "text_time",
                 "projection_class_embeddings_input_dim": u["label_emb.0.0.weight"].shape[1]}
    return extra | {
        "in_channels": _need(u, "input_blocks.0.0.weight", UNET_PREFIX).shape[1],
        "out_channels": _need(u, "out.2.weight", UNET_PREFIX).shape[0],
        "down_block_types": ["CrossAttnDownBlock2D" if f"input_blocks.{i}.1.proj_in.weight" in u else "DownBlock2D"
                             for i in firsts],
        "up_block_types": ["CrossAttnUpBlock2D" if f"output_blocks.{b * (lpb + 1)}.1.proj_in.weight" in u
                           else "UpBlock2D" for b in range(n)],
        "block_out_channels": [_need(u, f"input_blocks.{i}.0.out_layers.3.weight", UNET_PREFIX).shape[0]
                               for i in firsts],
        "layers_per_block": lpb,
        "cross_attention_dim": cross_attention_dim,
        "use_linear_projection": _need(u, "middle_block.1.proj_in.weight", UNET_PREFIX).ndim == 2,  # SD 2.x
        "transformer_layers_per_block": per_block,
    }


def _vae_layout(v: dict) -> dict:
    """The shape facts of an LDM KL autoencoder."""
    n = len(_indices(v, "encoder.down."))
    return {
        "in_channels": _need(v, "encoder.conv_in.weight", VAE_PREFIX).shape[1],
        "out_channels": _need(v, "decoder.conv_out.weight", VAE_PREFIX).shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [_need(v, f"encoder.down.{b}.block.0.conv1.weight", VAE_PREFIX).shape[0]
                               for b in range(n)],
        "layers_per_block": len(_indices(v, "encoder.down.0.block.")),
        "latent_channels": _need(v, "decoder.conv_in.weight", VAE_PREFIX).shape[1],
    }


def _heads(width: int, what: str, override: str) -> int:
    if width % HEAD_WIDTH:
        raise FormatError(f"{what}: width {width} is not a multiple of {HEAD_WIDTH}, cannot infer the head count; "
                          f"pass infer_sd_configs(..., overrides={override})")
    return width // HEAD_WIDTH


# ---------------------------------------------------------------- text encoders

def _clip_to_diffusers(t: dict) -> dict:
    """SD 1.x: HF CLIP names with or without the `text_model.` level -> flat CLIPTextModel names."""
    out, unknown = {}, []
    for key, value in t.items():
        key = key.removeprefix("text_model.")
        if key in CLIP_UNUSED:
            continue
        if key.split(".")[0] not in ("embeddings", "encoder", "final_layer_norm"):
            unknown.append(CLIP_PREFIX + key)
        out[key] = value
    if unknown:
        raise FormatError(f"LDM checkpoint: {_plural(len(unknown), 'key')} not in a CLIP text model: "
                          f"{_shortlist(unknown)}")
    return out


def _open_clip_to_diffusers(t: dict) -> dict:
    """SD 2.x: OpenCLIP text tower -> CLIPTextModel names, fused in_proj split into q/k/v, unused parts dropped."""
    n = len(_indices(t, "transformer.resblocks."))
    keep = n - 1 if n == SD2_TEXT_LAYERS else n  # diffusers drops resblocks.23, which SD 2.x never runs
    rest, out = {}, {}
    for key, value in t.items():
        layer = key.split(".")[2] if key.startswith("transformer.resblocks.") else None
        if key in OPEN_CLIP_UNUSED or (layer is not None and layer.isdigit() and int(layer) >= keep):
            continue
        if key.endswith((".attn.in_proj_weight", ".attn.in_proj_bias")):
            kind = key.rsplit("_", 1)[1]
            for proj, part in zip("qkv", value.chunk(3)):  # PyTorch MultiheadAttention packs [q; k; v]
                out[f"encoder.layers.{layer}.self_attn.{proj}_proj.{kind}"] = part
        else:
            rest[key] = value
    inverse = {ldm: d for d, ldm in open_clip_module_map(keep).items()}
    return out | _rename(rest, inverse, "OpenCLIP text encoder", OPEN_CLIP_PREFIX)


def _text_layout(te: dict) -> dict:
    """The shape facts of a flat CLIPTextModel state dict (CLIPTextConfig fields)."""
    vocab, hidden = _need(te, "embeddings.token_embedding.weight", "text encoder ").shape
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _need(te, "encoder.layers.0.mlp.fc1.weight", "text encoder ").shape[0],
        "num_hidden_layers": len(_indices(te, "encoder.layers.")),
        "max_position_embeddings": _need(te, "embeddings.position_embedding.weight", "text encoder ").shape[0],
    }


def _text_to_diffusers(groups: dict) -> dict | None:
    if "clip" in groups:
        return _clip_to_diffusers(groups["clip"])
    if "open_clip" in groups:
        return _open_clip_to_diffusers(groups["open_clip"])
    return None


# ---------------------------------------------------------------- public API

def _version(groups: dict, cross_attention_dim: int | None, sdxl: bool = False) -> str:
    """'sd1', 'sd2' or 'sdxl' (a UNet with the text_time embedding): from the UNet's added embedding, the text
    encoder's format, else from the UNet's cross-attention width."""
    if sdxl:
        return "sdxl"
    if "clip" in groups or "open_clip" in groups:
        return "sd1" if "clip" in groups else "sd2"
    if cross_attention_dim in (None, 768, 1024):
        return "sd2" if cross_attention_dim == 1024 else "sd1"
    raise FormatError(f"LDM checkpoint: no text encoder and cross-attention width {cross_attention_dim} is "
                      f"neither 768 (SD 1.x) nor 1024 (SD 2.x): cannot tell which release it follows; pass overrides")


def _plain(value):
    """Tuples as lists, recursively, so a config read from JSON compares equal to one built in Python."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _complete(name: str, facts: dict, conventions: dict, overrides: dict) -> dict:
    """facts | conventions | overrides; conventions are callables, evaluated only when not overridden."""
    given = overrides.get(name, {})
    clash = [f"{k} (checkpoint {facts[k]!r}, override {given[k]!r})" for k in given
             if k in facts and _plain(given[k]) != _plain(facts[k])]
    if clash:
        raise FormatError(f"{name}: overrides contradict the checkpoint's shapes: {_shortlist(clash)}")
    return facts | {k: make() for k, make in conventions.items() if k not in given} | dict(given)


def infer_sd_configs(state_dict: dict, *, overrides: dict[str, dict] | None = None) -> dict[str, dict]:
    """Diffusers/transformers configs {"unet", "vae", "text_encoder"} (those present) from an LDM checkpoint.

    Shapes give channels, blocks, layers, attention placement, cross-attention width and projection kind.
    What shapes cannot tell follows the releases: head counts (SD 1.x UNet: 8; SD 2.x UNet and both text
    encoders: width // 64), activations, sample sizes (512 px for 1.x, 768 px for 2.x, 1024 px for SDXL),
    the VAE's scaling factor (0.18215; SDXL 0.13025), SDXL's addition_time_embed_dim 256, and norm_num_groups
    (left at diffusers' default, 32). overrides {component: {field: value}} replaces those conventions, e.g.
    with a matching diffusers folder's config.json; an override that contradicts the shapes is an error.
    """
    overrides = overrides or {}
    unknown = sorted(overrides.keys() - {"unet", "vae", "text_encoder"})
    if unknown:
        raise ValueError(f"infer_sd_configs: unknown components in overrides {unknown}; allowed: unet, vae, "
                         f"text_encoder")
    groups = _group(state_dict)
    unet = _unet_layout(groups["unet"]) if "unet" in groups else None
    text = _text_to_diffusers(groups)

    def version() -> str:
        return _version(groups, unet and unet["cross_attention_dim"], unet is not None and "addition_embed_type" in unet)

    def sd1() -> bool:
        return version() == "sd1"

    def unet_heads():  # diffusers' attention_head_dim is the UNet's head count (a historical misnomer)
        if sd1():
            return SD1_UNET_HEADS
        return [_heads(c, "UNet block", "{'unet': {'attention_head_dim': ...}}") for c in unet["block_out_channels"]]

    configs = {}
    if unet is not None:
        conventions = {"attention_head_dim": unet_heads,
                       "sample_size": lambda: {"sd1": 64, "sd2": 96, "sdxl": 128}[version()]}
        if "addition_embed_type" in unet:  # SDXL (base and refiner): 256-wide sinusoid per size/crop/score id
            conventions["addition_time_embed_dim"] = lambda: 256
        configs["unet"] = _complete("unet", unet, conventions, overrides)
    if "vae" in groups:
        configs["vae"] = _complete("vae", _vae_layout(groups["vae"]), {
            "sample_size": lambda: {"sd1": 512, "sd2": 768, "sdxl": 1024}[version()],
            "scaling_factor": lambda: 0.13025 if version() == "sdxl" else 0.18215}, overrides)
    if text is not None:
        layout = _text_layout(text)
        configs["text_encoder"] = _complete("text_encoder", layout, {
            "num_attention_heads": lambda: _heads(layout["hidden_size"], "text encoder",
                                                 "{'text_encoder': {'num_attention_heads': ...}}"),
            "hidden_act": lambda: "quick_gelu" if sd1() else "gelu",  # OpenAI CLIP vs OpenCLIP
            "projection_dim": lambda: 768 if sd1() else 512,  # as released; CLIPTextModel does not use it
            "bos_token_id": lambda: 0, "eos_token_id": lambda: 2, "pad_token_id": lambda: 1,  # as released
        }, overrides)
        if unet is not None and unet["cross_attention_dim"] != layout["hidden_size"]:
            raise FormatError(f"LDM checkpoint: UNet cross-attention width {unet['cross_attention_dim']} differs "
                              f"from the text encoder width {layout['hidden_size']}")
    return configs


def _ema_key(key: str) -> str:
    """LDM's EMA stores model.diffusion_model.<path> as model_ema.diffusion_model<path without dots>."""
    return EMA_PREFIX + "diffusion_model" + key.replace(".", "")


def split_ldm_checkpoint(state_dict: dict, *, ema: bool = False) -> dict[str, dict]:
    """LDM single-file state dict -> {"unet", "vae", "text_encoder"} (those present) in diffusers names.

    ema=True takes the UNet's weights from the model_ema.* copy (full, non-pruned checkpoints). Tensors are
    shared with the input (renamed, reshaped or split views), never copied.
    """
    groups = _group(state_dict)
    out = {}
    if "unet" in groups:
        unet = groups["unet"]
        has_ema = any(k.startswith(EMA_PREFIX + "diffusion_model") for k in state_dict)
        if ema:
            missing = [_ema_key(k) for k in unet if _ema_key(k) not in state_dict]
            if missing:
                raise FormatError(f"LDM checkpoint: ema=True but {_plural(len(missing), 'EMA key')} missing: "
                                  f"{_shortlist(missing)}")
            unet = {k: state_dict[_ema_key(k)] for k in unet}
        elif has_ema:
            warnings.warn("LDM checkpoint has EMA weights (model_ema.*); using the non-EMA UNet. "
                          "Pass ema=True for the EMA weights, usually better for sampling.", stacklevel=2)
        inverse = {ldm: d for d, ldm in unet_module_map(_unet_layout(unet)).items()}
        out["unet"] = _rename(unet, inverse, "UNet", UNET_PREFIX)
    if "vae" in groups:
        inverse = {ldm: d for d, ldm in vae_module_map(_vae_layout(groups["vae"])).items()}
        vae = _rename(groups["vae"], inverse, "VAE", VAE_PREFIX)
        for key, value in vae.items():  # LDM's mid-block attention uses 1x1 convs where diffusers has Linear
            if ".mid_block.attentions." in key and key.endswith("weight") and value.ndim > 2:
                vae[key] = value.reshape(value.shape[:2])
        out["vae"] = vae
    text = _text_to_diffusers(groups)
    if text is not None:
        out["text_encoder"] = text
    return out


def _unet_layout_from_diffusers(sd: dict) -> dict:
    n = len(_indices(sd, "down_blocks."))
    return {
        "down_block_types": ["CrossAttnDownBlock2D" if _indices(sd, f"down_blocks.{b}.attentions.") else "DownBlock2D"
                             for b in range(n)],
        "up_block_types": ["CrossAttnUpBlock2D" if _indices(sd, f"up_blocks.{b}.attentions.") else "UpBlock2D"
                           for b in range(n)],
        "layers_per_block": len(_indices(sd, "down_blocks.0.resnets.")),
        "addition_embed_type": "text_time" if "add_embedding.linear_1.weight" in sd else None,
    }


def _text_to_ldm(te: dict, text_encoder_format: str) -> dict:
    te = {k.removeprefix("text_model."): v for k, v in te.items() if k.removeprefix("text_model.") not in CLIP_UNUSED}
    if text_encoder_format == "auto":  # 1024 wide: SD 2.x's OpenCLIP ViT-H/14
        width = _need(te, "embeddings.token_embedding.weight", "text encoder ").shape[1]
        text_encoder_format = "open_clip" if width == 1024 else "clip"
    if text_encoder_format == "clip":
        return {CLIP_PREFIX + "text_model." + k: v for k, v in _clip_to_diffusers(te).items()}
    if text_encoder_format != "open_clip":
        raise ValueError(f"text_encoder_format must be 'auto', 'clip' or 'open_clip', got {text_encoder_format!r}")
    n = len(_indices(te, "encoder.layers."))
    fused, rest = {}, {}
    for key, value in te.items():
        parts = key.split(".")
        if len(parts) == 6 and parts[-2] in ("q_proj", "k_proj", "v_proj") and parts[-3] == "self_attn":
            fused.setdefault((parts[2], parts[-1]), {})[parts[-2][0]] = value
        else:
            rest[key] = value
    out = _rename(rest, open_clip_module_map(n), "text encoder")
    for (layer, kind), qkv in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def to_ldm_checkpoint(components: dict[str, dict], *, text_encoder_format: str = "auto") -> dict:
    """{"unet", "vae", "text_encoder"} diffusers state dicts (any subset) -> one LDM single-file state dict.

    text_encoder_format: "clip" (SD 1.x), "open_clip" (SD 2.x) or "auto" (open_clip iff 1024 wide).
    """
    unknown = sorted(components.keys() - {"unet", "vae", "text_encoder"})
    if unknown:
        raise ValueError(f"to_ldm_checkpoint: unknown components {unknown}; allowed: unet, vae, text_encoder")
    out = {}
    if "unet" in components:
        unet = components["unet"]
        out |= {UNET_PREFIX + k: v for k, v in
                _rename(unet, unet_module_map(_unet_layout_from_diffusers(unet)), "unet").items()}
    if "vae" in components:
        vae = components["vae"]
        layout = {"block_out_channels": _indices(vae, "encoder.down_blocks."),  # only the count matters here
                  "layers_per_block": len(_indices(vae, "encoder.down_blocks.0.resnets."))}
        for key, value in _rename(vae, vae_module_map(layout), "vae").items():
            if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
                value = value[:, :, None, None]  # Linear -> 1x1 conv
            out[VAE_PREFIX + key] = value
    if "text_encoder" in components:
        out |= _text_to_ldm(components["text_encoder"], text_encoder_format)
    return out
