"""Checkpoint formats: safetensors safety, pickle refusal, strict loads, diffusers folders and LDM single files.

diffusers and transformers are oracles here: their models give the reference names and weights, their
from_pretrained must open what we write, and their own LDM converters must read our single files.
"""

import json
import struct

import pytest
import torch
from torch import nn

from reverie.formats import (FormatError, find_weights, infer_sd_configs, load_checkpoint, load_safetensors,
                             load_state_dict_strict, load_weights, read_config, read_model_index,
                             save_component, save_safetensors, split_ldm_checkpoint, to_ldm_checkpoint,
                             write_model_index)

UNET_CONFIGS = {  # tiny, but with the real layouts' variety: 3 vs 2 blocks, 2 vs 1 layers, attention placement
    "sd1": dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=64, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    "sd2": dict(block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=64, attention_head_dim=(1, 2),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), use_linear_projection=True),
}
TEXT_FORMAT = {"sd1": "clip", "sd2": "open_clip"}


def text_config(version, layers=2):
    from transformers import CLIPTextConfig
    return CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=1,
                          vocab_size=1000, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
                          pad_token_id=1, hidden_act="quick_gelu" if version == "sd1" else "gelu")


def build_models(version):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(sample_size=8, **UNET_CONFIGS[version]).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2).eval()
    text = transformers.CLIPTextModel(text_config(version)).eval()
    return {"unet": unet, "vae": vae, "text_encoder": text}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def sd(request):
    """(version, models, their state dicts, the LDM single-file dict made by to_ldm_checkpoint)."""
    models = build_models(request.param)
    states = {name: m.state_dict() for name, m in models.items()}
    ldm = to_ldm_checkpoint(states, text_encoder_format=TEXT_FORMAT[request.param])
    return request.param, models, states, ldm


def assert_same(a, b):
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:10]
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def outputs(models):
    """Deterministic outputs of all three components on fixed inputs."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ids = torch.randint(3, 1000, (2, 7), generator=g)
        context = models["text_encoder"](ids).last_hidden_state  # (B, 7, 64)
        sample = torch.randn(2, 4, 8, 8, generator=g)
        eps = models["unet"](sample, 10, encoder_hidden_states=context).sample
        image = torch.randn(1, 3, 16, 16, generator=g)
        latent = models["vae"].encode(image).latent_dist.mean
        decoded = models["vae"].decode(latent).sample
    return context, eps, latent, decoded


# ---------------------------------------------------------------- (a)-(d) LDM single files

def test_ldm_round_trip_is_exact(sd):
    version, _, states, ldm = sd
    back = split_ldm_checkpoint(ldm)
    for name in states:
        assert_same(back[name], states[name])
    # LDM's VAE attention is 1x1 convs, SD1 keeps HF CLIP names, SD2 fuses q/k/v into OpenCLIP's in_proj
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    key = {"sd1": "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
           "sd2": "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"}[version]
    assert key in ldm


@pytest.mark.parametrize("sd", ["sd1"], indirect=True)  # HF CLIP naming is SD 1.x's
def test_sd1_text_encoder_with_or_without_text_model_level_and_old_position_ids(sd):
    version, _, states, ldm = sd
    prefix = "cond_stage_model.transformer."
    flat = {k.replace(prefix + "text_model.", prefix): v for k, v in ldm.items()}
    assert flat.keys() != ldm.keys()
    old = ldm | {prefix + "text_model.embeddings.position_ids": torch.arange(16)[None]}  # older transformers
    for variant in (flat, old):
        assert_same(split_ldm_checkpoint(variant)["text_encoder"], states["text_encoder"])


def test_diffusers_converters_read_our_ldm_names(sd):
    su = pytest.importorskip("diffusers.loaders.single_file_utils")
    _, models, states, ldm = sd
    assert_same(su.convert_ldm_unet_checkpoint(ldm, dict(models["unet"].config)), states["unet"])
    assert_same(su.convert_ldm_vae_checkpoint(ldm, dict(models["vae"].config)), states["vae"])
    if "cond_stage_model.model.positional_embedding" in ldm:
        text = su.convert_open_clip_checkpoint(models["text_encoder"], ldm)
    else:
        text = su.convert_ldm_clip_checkpoint(ldm)
    # transformers >= 5.6 CLIPTextModel is flat; diffusers strips "text_model." for it the same way
    assert_same({k.removeprefix("text_model."): v for k, v in text.items()}, states["text_encoder"])


def test_infer_sd_configs_recovers_configs(sd):
    version, models, _, ldm = sd
    configs = infer_sd_configs(ldm)
    unet = models["unet"].config
    for field in ("in_channels", "out_channels", "layers_per_block", "cross_attention_dim", "use_linear_projection",
                  "transformer_layers_per_block"):
        assert configs["unet"][field] == unet[field], field
    for field in ("block_out_channels", "down_block_types", "up_block_types"):
        assert configs["unet"][field] == list(unet[field]), field
    heads = configs["unet"]["attention_head_dim"]
    assert (heads if isinstance(heads, int) else list(heads)) == \
        (unet.attention_head_dim if isinstance(unet.attention_head_dim, int) else list(unet.attention_head_dim))
    vae = models["vae"].config
    for field in ("in_channels", "out_channels", "latent_channels", "layers_per_block"):
        assert configs["vae"][field] == vae[field], field
    assert configs["vae"]["block_out_channels"] == list(vae.block_out_channels)
    text = models["text_encoder"].config
    for field, value in configs["text_encoder"].items():
        if field != "projection_dim":  # a convention CLIPTextModel does not use
            assert getattr(text, field) == value, field


def test_single_file_loads_into_fresh_models_with_equal_outputs(sd, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    _, models, _, ldm = sd
    save_safetensors(ldm, tmp_path / "model.safetensors")
    state = load_checkpoint(tmp_path / "model.safetensors")
    configs = infer_sd_configs(state)
    torch.manual_seed(123)  # fresh random weights, all to be overwritten
    fresh = {"unet": diffusers.UNet2DConditionModel(**configs["unet"]).eval(),
             "vae": diffusers.AutoencoderKL(**configs["vae"]).eval(),
             "text_encoder": transformers.CLIPTextModel(
                 transformers.CLIPTextConfig(**configs["text_encoder"])).eval()}
    for name, part in split_ldm_checkpoint(state).items():
        load_state_dict_strict(fresh[name], part, name=name)
    for ours, ref in zip(outputs(fresh), outputs(models)):
        assert torch.equal(ours, ref)


def test_sd2_penultimate_layer_and_projection_dropped_as_diffusers_does():
    su = pytest.importorskip("diffusers.loaders.single_file_utils")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    full = transformers.CLIPTextModel(text_config("sd2", layers=24))  # ViT-H/14's depth
    ldm = to_ldm_checkpoint({"text_encoder": full.state_dict()}, text_encoder_format="open_clip")
    ldm["cond_stage_model.model.text_projection"] = torch.randn(64, 32)
    ldm["cond_stage_model.model.logit_scale"] = torch.tensor(4.6)
    ours = split_ldm_checkpoint(ldm)["text_encoder"]
    kept = {k: v for k, v in full.state_dict().items() if not k.startswith("encoder.layers.23.")}
    assert_same(ours, kept)
    theirs = su.convert_open_clip_checkpoint(full, ldm)
    assert_same({k.removeprefix("text_model."): v for k, v in theirs.items()}, kept)
    assert infer_sd_configs(ldm)["text_encoder"]["num_hidden_layers"] == 23


def test_split_takes_ema_weights_on_request(sd):
    _, _, states, ldm = sd
    unet_keys = [k for k in ldm if k.startswith("model.diffusion_model.")]
    ema = {"model_ema." + "".join(k.split(".")[1:]): ldm[k] + 1 for k in unet_keys}  # LDM's flattened EMA names
    full = ldm | ema | {"model_ema.decay": torch.tensor(0.9999), "betas": torch.rand(1000)}
    with pytest.warns(UserWarning, match="EMA"):
        assert_same(split_ldm_checkpoint(full)["unet"], states["unet"])
    assert_same(split_ldm_checkpoint(full, ema=True)["unet"], {k: v + 1 for k, v in states["unet"].items()})


def test_split_refuses_keys_it_cannot_place(sd):
    _, _, _, ldm = sd
    with pytest.raises(FormatError, match="conditioner.embedders.0.foo"):
        split_ldm_checkpoint(ldm | {"conditioner.embedders.0.foo": torch.zeros(1)})
    with pytest.raises(FormatError, match="model.diffusion_model.label_emb.0.0.weight"):
        split_ldm_checkpoint(ldm | {"model.diffusion_model.label_emb.0.0.weight": torch.zeros(1)})
    with pytest.raises(FormatError, match="first_stage_model.encoder.mid.attn_2.q.weight"):
        split_ldm_checkpoint(ldm | {"first_stage_model.encoder.mid.attn_2.q.weight": torch.zeros(1)})


def test_release_conventions_from_cross_attention_width_without_text_encoder(sd):
    _, _, _, ldm = sd
    unet_only = {k: v for k, v in ldm.items() if k.startswith("model.diffusion_model.")}
    key = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    channels = unet_only[key].shape[0]
    with pytest.raises(FormatError, match="width 64 is neither 768"):
        infer_sd_configs(unet_only)
    sd1 = infer_sd_configs(unet_only | {key: torch.zeros(channels, 768)})["unet"]
    assert (sd1["attention_head_dim"], sd1["sample_size"], sd1["cross_attention_dim"]) == (8, 64, 768)
    as_sd2 = unet_only | {key: torch.zeros(channels, 1024)}
    if sd1["block_out_channels"][0] % 64:  # SD 2.x heads are 64 wide: a 32-channel block cannot follow it
        with pytest.raises(FormatError, match="width 32 is not a multiple of 64"):
            infer_sd_configs(as_sd2)
    else:
        sd2 = infer_sd_configs(as_sd2)["unet"]
        assert sd2["attention_head_dim"] == [c // 64 for c in sd2["block_out_channels"]] == [1, 2]
        assert sd2["sample_size"] == 96


def test_overrides_supply_what_shapes_cannot_tell(sd):
    transformers = pytest.importorskip("transformers")
    version, models, _, ldm = sd
    own = {"unet": dict(models["unet"].config), "vae": dict(models["vae"].config),
           "text_encoder": models["text_encoder"].config.to_dict()}
    assert infer_sd_configs(ldm, overrides=own)["unet"]["norm_num_groups"] == 32  # agrees with its own shapes
    with pytest.raises(FormatError, match=r"unet: overrides contradict .*block_out_channels \(checkpoint \["):
        infer_sd_configs(ldm, overrides={"unet": {"block_out_channels": [1, 2]}})
    torch.manual_seed(0)  # 32 wide with 4 heads: no release convention fits, an override does
    odd = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=100,
        max_position_embeddings=8, hidden_act="quick_gelu" if version == "sd1" else "gelu")).eval()
    odd_ldm = to_ldm_checkpoint({"text_encoder": odd.state_dict()}, text_encoder_format=TEXT_FORMAT[version])
    with pytest.raises(FormatError, match="text encoder: width 32 is not a multiple of 64"):
        infer_sd_configs(odd_ldm)
    config = infer_sd_configs(odd_ldm, overrides={"text_encoder": {"num_attention_heads": 4}})["text_encoder"]
    fresh = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).eval()
    load_state_dict_strict(fresh, split_ldm_checkpoint(odd_ldm)["text_encoder"])
    ids = torch.tensor([[5, 17, 42, 3]])
    with torch.no_grad():
        assert torch.equal(fresh(ids).last_hidden_state, odd(ids).last_hidden_state)


def test_text_encoder_format_auto_picks_open_clip_for_1024_wide():
    def text(width):
        return {"embeddings.token_embedding.weight": torch.zeros(10, width),
                "embeddings.position_embedding.weight": torch.zeros(4, width)}
    assert "cond_stage_model.model.positional_embedding" in to_ldm_checkpoint({"text_encoder": text(1024)})
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in \
        to_ldm_checkpoint({"text_encoder": text(768)})
    with pytest.raises(ValueError, match="text_encoder_format must be"):
        to_ldm_checkpoint({"text_encoder": text(64)}, text_encoder_format="t5")
    with pytest.raises(ValueError, match="unknown components"):
        to_ldm_checkpoint({"controlnet": {}})


# ---------------------------------------------------------------- (e) pickles

class Payload:
    """Unpickling this would create a file: a stand-in for code hidden in a .ckpt."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickle_refused_by_default_and_loaded_on_opt_in(tmp_path):
    state = {"w": torch.randn(3, 2), "b": torch.arange(4)}
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "model.ckpt")
    with pytest.raises(FormatError, match=r"(?s)model\.ckpt.*arbitrary code.*allow_pickle=True"):
        load_checkpoint(tmp_path / "model.ckpt")
    assert_same(load_checkpoint(tmp_path / "model.ckpt", allow_pickle=True), state)
    torch.save(state, tmp_path / "weights.bin")
    assert_same(load_checkpoint(tmp_path / "weights.bin", allow_pickle=True), state)
    with pytest.raises(FormatError, match=r"\.pkl.*allowed: \.safetensors"):
        load_checkpoint(tmp_path / "model.pkl")


def test_opt_in_pickle_still_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(1), "x": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(FormatError, match="weights_only=True"):
        load_checkpoint(tmp_path / "evil.pt", allow_pickle=True)
    assert not marker.exists()


# ---------------------------------------------------------------- (f) corrupt files and strict loads

def raw_file(path, header, data=b""):
    """A safetensors file written by hand: header is a dict (JSON-encoded) or raw bytes."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


CORRUPT = {  # name -> (header, data, expected message)
    "offsets out of range": ({"a": entry(offsets=(0, 8))}, bytes(4), "run past the end"),
    "shape vs offsets": ({"a": entry(shape=(3,))}, bytes(8), r"needs 12 bytes but data_offsets \[0, 8\] span 8"),
    "overlap": ({"a": entry(), "b": entry(offsets=(4, 12))}, bytes(12), "overlap"),
    "gap": ({"a": entry(offsets=(4, 12))}, bytes(12), "belong to no tensor"),
    "trailing bytes": ({"a": entry()}, bytes(12), "4 trailing bytes"),
    "unknown dtype": ({"a": entry(dtype="F128")}, bytes(8), "unknown dtype 'F128'"),
    "garbage JSON": (b"{not json", b"", "corrupted JSON header"),
    "not an object": (b"[1, 2]", b"", "corrupted JSON header"),
    "duplicate key": (b'{"a": {}, "a": {}}', b"", "duplicate key 'a'"),
    "bad metadata": ({"__metadata__": {"k": 1}}, b"", "__metadata__ must map strings to strings"),
    "negative shape": ({"a": entry(shape=(-2,))}, bytes(8), "non-negative"),
}


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_header_raises_naming_file_and_problem(tmp_path, name):
    header, data, message = CORRUPT[name]
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(FormatError, match=message) as info:
        load_safetensors(path)
    assert str(path) in str(info.value)


def test_truncated_and_oversized_headers(tmp_path):
    good = tmp_path / "good.safetensors"
    save_safetensors({"a": torch.randn(4, 4)}, good)
    blob = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[:-10])
    with pytest.raises(FormatError, match="run past the end"):
        load_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(blob[:5])
    with pytest.raises(FormatError, match="truncated: 5 bytes"):
        load_safetensors(tmp_path / "tiny.safetensors")
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 10**6) + blob[8:])
    with pytest.raises(FormatError, match="header length 1000000 bytes but only"):
        load_safetensors(tmp_path / "long.safetensors")
    with pytest.raises(FormatError, match="exceeds the bound max_header_bytes=16"):
        load_safetensors(good, max_header_bytes=16)
    save_safetensors({"a": torch.ones(1), "b": torch.ones(1)}, tmp_path / "two.safetensors")
    with pytest.raises(FormatError, match="2 tensors exceed the bound max_tensors=1"):
        load_safetensors(tmp_path / "two.safetensors", max_tensors=1)
    assert torch.equal(load_safetensors(good)["a"], load_checkpoint(good)["a"])


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("steps", torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("problem, message", [
    ("wrong shape", r"1 wrong shape: lin\.weight \(file \(3, 3\) vs small \(2, 3\)\)"),
    ("missing", r"1 missing key: lin\.bias"),
    ("unexpected", r"1 unexpected key: lin\.extra"),
    ("dtype", r"1 incompatible dtype: steps"),
])
def test_strict_load_lists_problems_and_leaves_module_unchanged(problem, message):
    module = Small()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    state = {"lin.weight": torch.ones(2, 3), "lin.bias": torch.ones(2), "steps": torch.ones(2, dtype=torch.long)}
    if problem == "wrong shape":
        state["lin.weight"] = torch.ones(3, 3)
    elif problem == "missing":
        del state["lin.bias"]
    elif problem == "unexpected":
        state["lin.extra"] = torch.ones(1)
    else:
        state["steps"] = torch.ones(2)  # a float into a step counter
    with pytest.raises(ValueError, match=f"cannot load state dict into small .*{message}"):
        load_state_dict_strict(module, state, name="small")
    assert_same(module.state_dict(), before)


def test_strict_load_casts_to_module_dtype():
    module = Small()
    state = {"lin.weight": torch.randn(2, 3, dtype=torch.float64), "lin.bias": torch.randn(2, dtype=torch.float64),
             "steps": torch.tensor([3, 4], dtype=torch.int32)}
    load_state_dict_strict(module, state)
    assert module.lin.weight.dtype == torch.float32 and module.steps.dtype == torch.long
    assert torch.equal(module.lin.weight, state["lin.weight"].float())
    assert module.steps.tolist() == [3, 4]


def test_error_lists_are_capped_with_counts():
    module = nn.Sequential(*[nn.Linear(1, 1) for _ in range(15)])
    with pytest.raises(ValueError, match=r"30 missing keys: .*\(20 more\)"):
        load_state_dict_strict(module, {})


# ---------------------------------------------------------------- (g) atomic writes

def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    import safetensors.torch

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # half a file
        raise OSError("disk full")

    target = tmp_path / "model.safetensors"
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors({"a": torch.ones(3)}, target)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    save_safetensors({"a": torch.ones(3)}, target)
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError):
        save_safetensors({"a": torch.zeros(3)}, target)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert torch.equal(load_safetensors(target)["a"], torch.ones(3))  # the old file, whole


def test_save_refuses_bad_entries_before_writing(tmp_path):
    with pytest.raises(TypeError, match="'b'"):
        save_safetensors({"a": torch.ones(1), "b": [1, 2]}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_handles_shared_and_strided_tensors(tmp_path):
    base = torch.randn(4, 3)
    tensors = {"a": base, "tied": base, "view": base[1:3], "t": base.t()}
    save_safetensors(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    assert_same(load_safetensors(tmp_path / "x.safetensors"), {k: v.contiguous() for k, v in tensors.items()})


# ---------------------------------------------------------------- (h) diffusers folders

def test_folder_written_by_us_opens_in_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    models = build_models("sd1")
    for name in ("unet", "vae"):
        config = dict(models[name].config) | {"_class_name": type(models[name]).__name__}
        save_component(tmp_path / name, models[name].state_dict(), config, "diffusion_pytorch_model.safetensors")
    save_component(tmp_path / "text_encoder", models["text_encoder"].state_dict(),
                   models["text_encoder"].config.to_dict(), "model.safetensors")
    write_model_index(tmp_path, {"unet": ("diffusers", "UNet2DConditionModel"),
                                 "vae": ("diffusers", "AutoencoderKL"),
                                 "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": None,
                                 "scheduler": None, "safety_checker": None, "feature_extractor": None},
                      extra={"requires_safety_checker": False})
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        tmp_path, scheduler=diffusers.DDIMScheduler(), tokenizer=None, safety_checker=None, feature_extractor=None)
    for name, model in models.items():
        assert_same(getattr(pipe, name).state_dict(), model.state_dict())
    assert isinstance(pipe.text_encoder, transformers.CLIPTextModel)
    assert read_model_index(tmp_path)["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_fp16_variant_written_by_us_opens_in_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    vae = build_models("sd1")["vae"]
    save_component(tmp_path, vae.state_dict(), dict(vae.config), "diffusion_pytorch_model.fp16.safetensors",
                   dtype=torch.float16)
    assert find_weights(tmp_path, "fp16").name == "diffusion_pytorch_model.fp16.safetensors"
    with pytest.raises(FormatError, match="no variant 'bf16' weights"):
        find_weights(tmp_path, "bf16")
    loaded = diffusers.AutoencoderKL.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert_same(loaded.state_dict(), {k: v.half() for k, v in vae.state_dict().items()})


def test_folder_written_by_diffusers_reads_identically(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    models = build_models("sd1")
    pipe = diffusers.StableDiffusionPipeline(**models, scheduler=diffusers.DDIMScheduler(), tokenizer=None,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    index = read_model_index(tmp_path)
    assert index["_class_name"] == "StableDiffusionPipeline" and index["vae"] == ["diffusers", "AutoencoderKL"]
    for name, model in models.items():
        assert_same(load_weights(tmp_path / name), model.state_dict())
    assert read_config(tmp_path / "unet")["block_out_channels"] == [32, 64, 64]
    models["vae"].save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="100KB")
    assert find_weights(tmp_path / "sharded").name.endswith(".index.json")
    assert_same(load_weights(tmp_path / "sharded"), models["vae"].state_dict())


def test_pickle_only_folder_refused_unless_allowed(tmp_path):
    state = {"w": torch.randn(2, 2)}
    torch.save(state, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(FormatError, match="only pickle weights .*allow_pickle=True"):
        find_weights(tmp_path)
    assert_same(load_weights(tmp_path, allow_pickle=True), state)


def test_bad_json_names_the_file(tmp_path):
    (tmp_path / "model_index.json").write_text("{oops")
    with pytest.raises(FormatError, match="model_index.json: invalid JSON"):
        read_model_index(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_config(tmp_path / "unet")
