"""SD3 / SD3.5's MMDiT equals diffusers' SD3Transformer2DModel, and Stability single files convert both ways."""

import inspect

import pytest
import torch

from reverie.formats.safetensors_io import FormatError
from reverie.formats.sd3_single_file import (PREFIX, infer_mmdit_config, is_sd3_checkpoint,
                                             sd3_transformer_to_diffusers, sd3_transformer_to_original,
                                             split_sd3_checkpoint)
from reverie.models.mmdit import MMDiT, MMDiTConfig

diffusers = pytest.importorskip("diffusers")
from diffusers import SD3Transformer2DModel  # noqa: E402
from diffusers.loaders import single_file_utils  # noqa: E402

# diffusers' tiny SD3 (tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py)
TINY = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
            caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4)
VARIANTS = {
    "pipeline": {},
    "model": dict(num_layers=4, pos_embed_max_size=96),  # tests/models/transformers/test_models_transformer_sd3.py
    "model-patch2": dict(num_layers=4, pos_embed_max_size=96, patch_size=2),
    "sd35": dict(num_layers=4, pos_embed_max_size=96, dual_attention_layers=(0,), qk_norm="rms_norm"),  # ibid.
    "sd35-dual-last-patch2": dict(num_layers=2, patch_size=2, dual_attention_layers=(0, 1), qk_norm="rms_norm"),
    "no-table": dict(num_layers=2, pos_embed_max_size=None),  # positions computed per input, not stored
}
SINGLE_FILE = [v for v in VARIANTS if v != "no-table"]  # Stability's files always store the table


def reference(**overrides) -> SD3Transformer2DModel:
    """diffusers' tiny SD3, seed 0, every parameter perturbed (RMSNorm scales start at one)."""
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**(TINY | overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def ours_from(ref: SD3Transformer2DModel) -> MMDiT:
    model = MMDiT.from_config(dict(ref.config)).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def inputs(ref, h: int, w: int, length: int = 7):
    """Batch 2 with different timesteps (sigma * 1000, as the pipeline passes them), an (h, w) latent."""
    c = ref.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, c.in_channels, h, w, generator=g)
    context = torch.randn(2, length, c.joint_attention_dim, generator=g)
    pooled = torch.randn(2, c.pooled_projection_dim, generator=g)
    return x, torch.tensor([250.0, 800.0]), context, pooled


def both(ref, ours, x, t, context, pooled, skip_layers=None):
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                       skip_layers=skip_layers).sample
        return ours(x, t, context, pooled, skip_layers=skip_layers), expected


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("h,w", [(8, 8), (6, 10), (12, 4)])
def test_forward_matches_diffusers(variant, h, w):
    ref = reference(**VARIANTS[variant])
    out, expected = both(ref, ours_from(ref), *inputs(ref, h, w))
    assert out.shape == (2, 4, h, w)
    assert expected.abs().max() > 0.1  # not trivially zero
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["model", "sd35"])
@pytest.mark.parametrize("skip", [[1], [0, 3]])  # sd35: [0, 3] skips the dual-attention and the last block
def test_skip_layers_match_diffusers(variant, skip):
    ref = reference(**VARIANTS[variant])
    ours = ours_from(ref)
    args = inputs(ref, 6, 10, length=154)  # the model tests' context length
    out, expected = both(ref, ours, *args, skip_layers=skip)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert (out - ours(*args)).abs().max() > 1e-3  # skipping changes the prediction


def test_batch_rows_are_independent_and_scalar_t_broadcasts():
    ref = reference(**VARIANTS["sd35"])
    ours = ours_from(ref)
    x, t, context, pooled = inputs(ref, 8, 6)
    with torch.no_grad():
        out = ours(x, t, context, pooled)
        torch.testing.assert_close(ours(x[1:], t[1:], context[1:], pooled[1:]), out[1:], rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(x, 500.0, context, pooled), ours(x, torch.full((2,), 500.0), context, pooled))


# ---------------------------------------------------------------- config and inputs

def test_config_defaults_equal_diffusers_and_round_trip():
    params = inspect.signature(SD3Transformer2DModel.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k != "self"}
    ours = MMDiTConfig().to_dict()
    assert ours.pop("_class_name") == "SD3Transformer2DModel"
    assert ours == defaults | {"dual_attention_layers": list(defaults["dual_attention_layers"])}
    config = MMDiT(MMDiTConfig.from_dict(TINY | VARIANTS["sd35"])).to_config()
    ref = SD3Transformer2DModel.from_config(config)  # diffusers accepts it
    assert {k: ref.config[k] for k in config if not k.startswith("_")} == \
        {k: v for k, v in config.items() if not k.startswith("_")}
    assert MMDiT.from_config(dict(ref.config)).to_config() == config
    assert set(MMDiT(MMDiTConfig.from_dict(config)).state_dict()) == set(ref.state_dict())


@pytest.mark.parametrize("bad,field", [
    (dict(caption_projection_dim=48), "caption_projection_dim"),  # must be 4 heads x 8 = 32
    (dict(qk_norm="layer_norm"), "qk_norm"),
    (dict(dual_attention_layers=[1]), "dual_attention_layers"),  # only block 0 exists
    (dict(patch_size=0), "patch_size"),
    (dict(num_layers=0), "num_layers"),
    (dict(in_channels=2.5), "in_channels"),
    (dict(out_channels=0), "out_channels"),
    (dict(pos_embed_max_size=-1), "pos_embed_max_size"),
    (dict(sample_size=1, patch_size=2), "sample_size"),
    (dict(mlp_ratio=2.0), "mlp_ratio"),  # not an SD3Transformer2DModel key
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        MMDiTConfig.from_dict(TINY | bad)


def test_bad_inputs_name_the_argument():
    ref = reference(**VARIANTS["model-patch2"])
    ours = ours_from(ref)
    x, t, context, pooled = inputs(ref, 8, 8)
    cases = {
        "x must be": [(x[:, :3], t, context, pooled), (x[..., :7], t, context, pooled)],  # channels; odd width
        "encoder_hidden_states": [(x, t, context[..., :16], pooled)],
        "pooled_projections": [(x, t, context, pooled[:1])],
        "t must be": [(x, torch.rand(3), context, pooled)],
    }
    for match, calls in cases.items():
        for args in calls:
            with pytest.raises(ValueError, match=match):
                ours(*args)
    with pytest.raises(ValueError, match="skip_layers"):
        ours(x, t, context, pooled, skip_layers=[4])


def test_latent_beyond_the_position_table_is_refused_like_diffusers():
    ref = reference()  # pos_embed_max_size 96, patch 1
    x, t, context, pooled = inputs(ref, 97, 2)
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        ours_from(ref)(x, t, context, pooled)
    with pytest.raises(ValueError), torch.no_grad():
        ref(x, context, pooled, t)


# ---------------------------------------------------------------- Stability single files

def _original(ref, prefix: str = "") -> dict:
    return {prefix + k: v for k, v in sd3_transformer_to_original(ref.state_dict()).items()}


@pytest.mark.parametrize("variant", SINGLE_FILE)
@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_single_file_round_trip(variant, prefix):
    ref = reference(**VARIANTS[variant])
    original = _original(ref, prefix)
    assert is_sd3_checkpoint(original) and not is_sd3_checkpoint(ref.state_dict())
    head_dim = None if ref.config.qk_norm else 8  # without qk-norm the head width is not in the weights
    config = infer_mmdit_config(original, attention_head_dim=head_dim, sample_size=32)
    assert config == MMDiT.from_config(dict(ref.config)).to_config()
    converted = sd3_transformer_to_diffusers(original)
    expected = ref.state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    theirs = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(dict(original))  # it pops keys
    assert theirs.keys() == expected.keys() and all(torch.equal(theirs[k], converted[k]) for k in theirs)
    ours = MMDiT.from_config(config).eval()
    ours.load_state_dict(converted, strict=True)
    out, reference_out = both(ref, ours, *inputs(ref, 6, 10))
    torch.testing.assert_close(out, reference_out, rtol=0, atol=1e-5)


RELEASES = {  # (diffusers model type, config); shapes as released (scripts/convert_sd3_to_diffusers.py)
    "sd3-medium": ("sd3", dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                               pos_embed_max_size=192)),
    "sd3.5-large": ("sd35_large", dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                                       pos_embed_max_size=192, qk_norm="rms_norm")),
    "sd3.5-medium": ("sd35_medium", dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                                         pos_embed_max_size=384, qk_norm="rms_norm",
                                         dual_attention_layers=tuple(range(13)))),
}


@pytest.mark.parametrize("release", RELEASES)
def test_release_shapes_infer_the_release_config(release):
    """Full-size layouts on the meta device (no memory): heads = width / 64 = num_layers, as diffusers'
    conversion script assumes, and diffusers' own detection names the same release."""
    model_type, overrides = RELEASES[release]
    with torch.device("meta"):
        model = SD3Transformer2DModel(sample_size=128, **overrides)
    original = _original(model, PREFIX)
    assert single_file_utils.infer_diffusers_model_type(original) == model_type
    config = infer_mmdit_config(original)
    assert config == MMDiTConfig.from_dict(dict(model.config)).to_dict()  # (a full-size MMDiT would not fit)
    assert config["num_attention_heads"] == config["num_layers"]


def test_single_file_errors():
    ref = reference(**VARIANTS["model"])
    original = _original(ref)
    with pytest.raises(ValueError, match="attention_head_dim"):  # 32 wide: SD3's 64-wide heads do not fit
        infer_mmdit_config(original)
    with pytest.raises(ValueError, match="attention_head_dim"):  # contradicts the qk-norm width 8
        infer_mmdit_config(_original(reference(**VARIANTS["sd35"])), attention_head_dim=16)
    with pytest.raises(FormatError, match="unexpected key.*extra.weight"):
        sd3_transformer_to_diffusers(original | {"extra.weight": torch.zeros(1)})
    missing = "joint_blocks.2.context_block.mlp.fc2.bias"
    with pytest.raises(FormatError, match=f"missing key.*{missing}"):
        sd3_transformer_to_diffusers({k: v for k, v in original.items() if k != missing})
    with pytest.raises(FormatError, match="not an SD3 checkpoint"):
        sd3_transformer_to_diffusers(ref.state_dict())
    with pytest.raises(FormatError, match="missing key"):  # a diffusers dict without one tensor
        sd3_transformer_to_original({k: v for k, v in ref.state_dict().items() if k != "proj_out.bias"})


def _tiny_vae_ldm() -> tuple[dict, dict]:
    """A tiny SD3-style AutoencoderKL (no quant convs) and its raw LDM names."""
    from reverie.formats.single_file import to_ldm_checkpoint

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(4, 8), layers_per_block=1, latent_channels=4,
                                  norm_num_groups=2, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False,
                                  use_post_quant_conv=False).state_dict()
    return vae, to_ldm_checkpoint({"vae": vae})  # keys prefixed first_stage_model., as in SD3 files


def test_split_bundled_file_and_map_its_vae():
    from reverie.formats.single_file import split_ldm_checkpoint

    transformer = _original(reference(**VARIANTS["sd35"]))
    vae, vae_ldm = _tiny_vae_ldm()
    clip_l = {"text_model.embeddings.token_embedding.weight": torch.zeros(3, 2)}
    clip_g = {"text_model.final_layer_norm.weight": torch.zeros(2), "text_projection.weight": torch.zeros(2, 2)}
    t5 = {"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}
    bundled = ({PREFIX + k: v for k, v in transformer.items()} | vae_ldm
               | {"text_encoders.clip_l.transformer." + k: v for k, v in clip_l.items()}
               | {"text_encoders.clip_g.transformer." + k: v for k, v in clip_g.items()}
               | {"text_encoders.t5xxl.transformer." + k: v for k, v in t5.items()})
    parts = split_sd3_checkpoint(bundled)
    assert parts.keys() == {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert parts["transformer"] == transformer and parts["text_encoder"] == clip_l
    assert parts["text_encoder_2"] == clip_g and parts["text_encoder_3"] == t5
    assert parts["vae"] == {k.removeprefix("first_stage_model."): v for k, v in vae_ldm.items()}
    # the VAE part is LDM-named: re-prefixed, the SD 1.x/2.x splitter maps it to AutoencoderKL names
    back = split_ldm_checkpoint({"first_stage_model." + k: v for k, v in parts["vae"].items()})["vae"]
    assert back.keys() == vae.keys() and all(torch.equal(back[k], vae[k]) for k in vae)
    assert split_sd3_checkpoint(transformer) == {"transformer": transformer}  # an unprefixed transformer alone
    with pytest.raises(FormatError, match="no known component.*conditioner.foo"):
        split_sd3_checkpoint(bundled | {"conditioner.foo": torch.zeros(1)})
    with pytest.raises(FormatError, match="not an SD3 checkpoint"):
        split_sd3_checkpoint(vae_ldm)
