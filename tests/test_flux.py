"""FLUX.1's transformer equals diffusers' FluxTransformer2DModel, and BFL single files convert both ways."""

import inspect

import pytest
import torch

from reverie.formats.flux_single_file import (PREFIX, flux_transformer_to_diffusers, flux_transformer_to_original,
                                              flux_variant, infer_flux_config, is_flux_checkpoint,
                                              split_flux_checkpoint)
from reverie.formats.safetensors_io import FormatError
from reverie.models.flux import Flux, FluxConfig, image_ids, pack_latents, text_ids, unpack_latents

diffusers = pytest.importorskip("diffusers")
from diffusers import FluxTransformer2DModel  # noqa: E402
from diffusers.loaders import single_file_utils  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # noqa: E402

# diffusers' tiny FLUX (tests/pipelines/flux/test_pipeline_flux.py)
TINY = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
VARIANTS = {"schnell": dict(guidance_embeds=False), "dev": dict(guidance_embeds=True),
            "dev-2+2": dict(guidance_embeds=True, num_layers=2, num_single_layers=2)}


def reference(**overrides) -> FluxTransformer2DModel:
    """diffusers' tiny FLUX, seed 0, every parameter perturbed (RMSNorm scales start at one)."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**(TINY | overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def ours_from(ref: FluxTransformer2DModel) -> Flux:
    model = Flux.from_config(dict(ref.config)).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def inputs(ref, h: int, w: int, length: int = 7, random_ids: bool = False):
    """Batch 2, different t and guidance per row, an (h, w) latent (h/2 x w/2 patches)."""
    c = ref.config
    g = torch.Generator().manual_seed(1)
    n = (h // 2) * (w // 2)
    x = torch.randn(2, n, c.in_channels, generator=g)
    context = torch.randn(2, length, c.joint_attention_dim, generator=g)
    pooled = torch.randn(2, c.pooled_projection_dim, generator=g)
    img, txt = image_ids(h, w), text_ids(length)
    if random_ids:  # exercise every rotary axis (the pipeline's first id column is always zero)
        img, txt = 8 * torch.rand(n, 3, generator=g), 8 * torch.rand(length, 3, generator=g)
    t = torch.tensor([0.25, 0.8])
    guidance = torch.tensor([3.5, 1.0]) if c.guidance_embeds else None
    return x, t, context, pooled, img, txt, guidance


def both(ref, ours, x, t, context, pooled, img, txt, guidance):
    with torch.no_grad():
        expected = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                       img_ids=img, txt_ids=txt, guidance=guidance).sample
        return ours(x, t, context, pooled, img, txt, guidance), expected


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("h,w", [(4, 4), (8, 12), (12, 8)])  # 2x2, 4x6 and 6x4 patches
def test_forward_matches_diffusers(variant, h, w):
    ref = reference(**VARIANTS[variant])
    out, expected = both(ref, ours_from(ref), *inputs(ref, h, w))
    assert out.shape == (2, (h // 2) * (w // 2), 4)
    assert expected.abs().max() > 0.1  # not trivially zero
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_forward_matches_diffusers_with_random_ids_and_batch_rows_independent():
    ref = reference(guidance_embeds=True)
    ours = ours_from(ref)
    args = inputs(ref, 8, 12, length=5, random_ids=True)
    out, expected = both(ref, ours, *args)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    x, t, context, pooled, img, txt, guidance = args
    with torch.no_grad():  # batch = singles
        single = ours(x[1:], t[1:], context[1:], pooled[1:], img, txt, guidance[1:])
    torch.testing.assert_close(single, out[1:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_equals_diffusers_to_the_bit(dtype):
    """Same op order as diffusers: torch's RMSNorm for q/k, contiguous inputs to the output projections, the
    hidden-dtype cast of t before * 1000, fp16 clipping."""
    ref = reference(**VARIANTS["dev-2+2"]).to(dtype)
    ours = ours_from(ref).to(dtype)
    x, t, context, pooled, img, txt, guidance = inputs(ref, 8, 12)
    out, expected = both(ref, ours, x.to(dtype), t, context.to(dtype), pooled.to(dtype), img, txt, guidance)
    assert out.dtype == dtype and torch.equal(out, expected)


def test_scalar_t_and_guidance_broadcast_over_the_batch():
    ref = reference(guidance_embeds=True)
    ours = ours_from(ref)
    x, _, context, pooled, img, txt, _ = inputs(ref, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 0.5, context, pooled, img, txt, 3.5),
                                   ours(x, torch.full((2,), 0.5), context, pooled, img, txt, torch.full((2,), 3.5)))


# ---------------------------------------------------------------- config

def test_config_defaults_equal_diffusers_and_round_trip():
    params = inspect.signature(FluxTransformer2DModel.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k != "self"}
    ours = FluxConfig().to_dict()
    assert ours.pop("_class_name") == "FluxTransformer2DModel"
    assert ours == defaults | {"axes_dims_rope": list(defaults["axes_dims_rope"])}
    config = Flux(FluxConfig.from_dict(TINY | {"guidance_embeds": True})).to_config()
    ref = FluxTransformer2DModel.from_config(config)  # diffusers accepts it
    assert {k: ref.config[k] for k in config if not k.startswith("_")} == \
        {k: v for k, v in config.items() if not k.startswith("_")}
    assert Flux.from_config(dict(ref.config)).to_config() == config
    assert set(Flux(FluxConfig.from_dict(config)).state_dict()) == set(ref.state_dict())


@pytest.mark.parametrize("bad,field", [
    (dict(axes_dims_rope=[4, 4, 4]), "axes_dims_rope"),  # sums to 12, head dim 16
    (dict(axes_dims_rope=[3, 5, 8]), "axes_dims_rope"),  # odd
    (dict(attention_head_dim=0), "attention_head_dim"),
    (dict(num_layers=-1), "num_layers"),
    (dict(in_channels=2.5), "in_channels"),
    (dict(out_channels=0), "out_channels"),
    (dict(guidance_embeds="yes"), "guidance_embeds"),
    (dict(mlp_ratio=2.0), "mlp_ratio"),  # not a FluxTransformer2DModel key
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        FluxConfig.from_dict(TINY | bad)


def test_guidance_required_exactly_when_embedded_as_diffusers_fails():
    """diffusers raises TypeError for both mistakes (its embedder's arity); reverie raises ValueError."""
    for guidance_embeds, pass_guidance, match in ((True, False, "guidance is required"),
                                                  (False, True, "guidance must be None")):
        ref = reference(guidance_embeds=guidance_embeds)
        x, t, context, pooled, img, txt, _ = inputs(ref, 4, 4)
        guidance = torch.tensor([3.5, 1.0]) if pass_guidance else None
        with pytest.raises(ValueError, match=match):
            ours_from(ref)(x, t, context, pooled, img, txt, guidance)
        with pytest.raises(TypeError), torch.no_grad():
            ref(x, context, pooled, t, img, txt, guidance)


def test_bad_inputs_name_the_argument():
    ref = reference()
    ours = ours_from(ref)
    x, t, context, pooled, img, txt, _ = inputs(ref, 4, 4)
    cases = {
        "img_ids": (x, t, context, pooled, image_ids(4, 8), txt),  # 8 ids for 4 tokens
        "txt_ids": (x, t, context, pooled, img, text_ids(6)),  # 6 ids for 7 text tokens
        "x must be": (x[..., :3], t, context, pooled, img, txt),
        "encoder_hidden_states": (x, t, context[..., :16], pooled, img, txt),
        "pooled_projections": (x, t, context, pooled[:1], img, txt),
        "t must be": (x, torch.rand(3), context, pooled, img, txt),
    }
    for match, args in cases.items():
        with pytest.raises(ValueError, match=match):
            ours(*args)
    with pytest.raises(ValueError, match="img_ids"):  # 2 id columns for 3 rotary axes
        ours(x, t, context, pooled, img[:, :2], txt)


# ---------------------------------------------------------------- packing and ids

@pytest.mark.parametrize("h,w", [(4, 4), (8, 12), (12, 8)])
def test_pack_unpack_and_ids_match_the_pipeline(h, w):
    latents = torch.randn(2, 3, h, w)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 3, h, w))
    assert torch.equal(unpack_latents(packed, h, w), latents)
    assert torch.equal(unpack_latents(packed, h, w), FluxPipeline._unpack_latents(packed, 8 * h, 8 * w, 8))
    assert torch.equal(image_ids(h, w), FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu",
                                                                               torch.float32))
    assert packed[1, (h // 2 - 1) * (w // 2) + 1, 2 * 4 + 1 * 2 + 0] == latents[1, 2, h - 1, 2]  # c*4 + dy*2 + dx
    assert torch.equal(text_ids(5), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 3, h + 1, w))
    with pytest.raises(ValueError, match="tokens"):
        unpack_latents(packed, h + 2, w)


# ---------------------------------------------------------------- BFL single files

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_bfl_round_trip(variant, prefix):
    ref = reference(**VARIANTS[variant])
    original = {prefix + k: v for k, v in flux_transformer_to_original(ref.state_dict()).items()}
    assert is_flux_checkpoint(original)
    assert flux_variant(original) == ("schnell" if variant == "schnell" else "dev")
    config = infer_flux_config(original, axes_dims_rope=[4, 4, 8])
    assert config == Flux.from_config(dict(ref.config)).to_config()
    converted = flux_transformer_to_diffusers(original, config)
    expected = ref.state_dict()
    assert converted.keys() == expected.keys()
    assert all(torch.equal(converted[k], expected[k]) for k in expected)
    ours = Flux.from_config(config).eval()
    ours.load_state_dict(converted, strict=True)
    out, reference_out = both(ref, ours, *inputs(ref, 8, 12))
    torch.testing.assert_close(out, reference_out, rtol=0, atol=1e-5)


def test_bfl_names_match_diffusers_own_converter_at_full_width():
    """diffusers' converter only reads 3072-wide files: build that layout (meta shapes, no memory), fill it with
    thin random tensors (the conversion only cuts dim 0) and convert it both ways."""
    with torch.device("meta"):
        layout = FluxTransformer2DModel(num_layers=1, num_single_layers=2, guidance_embeds=True).state_dict()
    bfl_shapes = flux_transformer_to_original(layout)
    g = torch.Generator().manual_seed(0)
    original = {k: torch.randn(v.shape[0], *[2] * (v.ndim - 1), generator=g) for k, v in bfl_shapes.items()}
    theirs = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    ours = flux_transformer_to_diffusers(original, dict(num_layers=1, num_single_layers=2, guidance_embeds=True))
    assert ours.keys() == theirs.keys() == layout.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    back = flux_transformer_to_original(ours)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)


@pytest.mark.parametrize("in_channels,ours,theirs", [(64, "dev", "flux-dev"), (384, "fill", "flux-fill"),
                                                      (128, "depth", "flux-depth")])
def test_variant_agrees_with_diffusers_detection(in_channels, ours, theirs):
    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True,
                                       in_channels=in_channels, out_channels=64)
    original = {PREFIX + k: v for k, v in flux_transformer_to_original(model.state_dict()).items()}
    assert flux_variant(original) == ours
    assert single_file_utils.infer_diffusers_model_type(original) == theirs
    config = infer_flux_config(original)  # 128-wide heads: FLUX.1's rotary split
    assert config["axes_dims_rope"] == [16, 56, 56] and config["in_channels"] == in_channels
    assert config["out_channels"] == (None if in_channels == 64 else 64)


def test_bfl_errors():
    original = flux_transformer_to_original(reference().state_dict())
    with pytest.raises(ValueError, match="axes_dims_rope"):  # 16-wide heads: not FLUX.1's split
        infer_flux_config(original)
    config = infer_flux_config(original, axes_dims_rope=[4, 4, 8])
    with pytest.raises(FormatError, match="unexpected key.*extra.weight"):
        flux_transformer_to_diffusers(original | {"extra.weight": torch.zeros(1)}, config)
    with pytest.raises(FormatError, match="missing key.*single_blocks.0.linear2.bias"):
        flux_transformer_to_diffusers({k: v for k, v in original.items() if k != "single_blocks.0.linear2.bias"},
                                      config)
    with pytest.raises(FormatError, match="guidance_in"):  # a dev config for a schnell file
        flux_transformer_to_diffusers(original, config | {"guidance_embeds": True})
    assert not is_flux_checkpoint(reference().state_dict())
    assert not is_flux_checkpoint(original | {"single_stream_modulation.lin.weight": torch.zeros(1)})


def test_split_comfyui_packed_file():
    transformer = flux_transformer_to_original(reference(guidance_embeds=True).state_dict())
    clip = {"text_model.embeddings.token_embedding.weight": torch.zeros(3, 2)}
    t5 = {"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}
    vae = {"encoder.conv_in.weight": torch.zeros(2, 3, 3, 3)}
    packed = ({PREFIX + k: v for k, v in transformer.items()}
              | {"text_encoders.clip_l.transformer." + k: v for k, v in clip.items()}
              | {"text_encoders.t5xxl.transformer." + k: v for k, v in t5.items()}
              | {"vae." + k: v for k, v in vae.items()})
    parts = split_flux_checkpoint(packed)
    assert parts == {"transformer": transformer, "text_encoder": clip, "text_encoder_2": t5, "vae": vae}
    assert split_flux_checkpoint(transformer | {"first_stage_model." + k: v for k, v in vae.items()}) == \
        {"transformer": transformer, "vae": vae}
    with pytest.raises(FormatError, match="no known component.*conditioner.foo"):
        split_flux_checkpoint(packed | {"conditioner.foo": torch.zeros(1)})
    with pytest.raises(FormatError, match="not a FLUX.1 checkpoint"):
        split_flux_checkpoint({"vae." + k: v for k, v in vae.items()})


def test_packed_vae_maps_with_the_ldm_vae_map():
    """The VAE part of a packed file is LDM-named: re-prefixed with first_stage_model., single_file's LDM
    splitter maps it to diffusers' AutoencoderKL (FLUX's VAE has no quant convs)."""
    from reverie.formats.single_file import split_ldm_checkpoint, to_ldm_checkpoint

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=(4, 8), layers_per_block=1, latent_channels=4,
                                  norm_num_groups=2, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False,
                                  use_post_quant_conv=False).state_dict()
    ldm = {k.removeprefix("first_stage_model."): v for k, v in to_ldm_checkpoint({"vae": vae}).items()}
    transformer = flux_transformer_to_original(reference().state_dict())
    part = split_flux_checkpoint(transformer | {"vae." + k: v for k, v in ldm.items()})["vae"]
    back = split_ldm_checkpoint({"first_stage_model." + k: v for k, v in part.items()})["vae"]
    assert back.keys() == vae.keys() and all(torch.equal(back[k], vae[k]) for k in vae)
