"""Wan 2.1's transformer and causal 3-D VAE equal diffusers' WanTransformer3DModel and AutoencoderKLWan, and load
from their save_pretrained folders strictly."""

import inspect

import pytest
import torch
from safetensors.torch import load_file

from reverie.loading import load_network, save_network
from reverie.models.wan import WanTransformer, WanTransformerConfig, grid_ids
from reverie.models.wan_vae import WanVAE, WanVAEConfig

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: E402

# diffusers' tiny Wan (tests/pipelines/wan/test_wan.py)
TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
VARIANTS = {
    "t2v": {},
    "patch-2x2x2": dict(patch_size=[2, 2, 2], attention_head_dim=16, num_layers=1, out_channels=8),
    "i2v": dict(image_dim=4, added_kv_proj_dim=24, in_channels=36),  # 2.1 I2V's image branch, tiny CLIP width
    "flf2v": dict(image_dim=4, added_kv_proj_dim=24, pos_embed_seq_len=6, cross_attn_norm=False),
}
TINY_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])


def perturbed(model):
    """Seeded, with every parameter moved off its init (norm scales start at one, tables at random)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def reference(**overrides) -> WanTransformer3DModel:
    torch.manual_seed(0)
    return perturbed(WanTransformer3DModel(**(TINY | overrides)))


def ours_from(ref) -> WanTransformer:
    model = WanTransformer.from_config(dict(ref.config)).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def inputs(ref, frames: int, h: int, w: int, per_token: bool = False, text_len: int = 7):
    """Batch 2, a different t per row (or per token), zero-padded text rows as the pipeline passes them."""
    c = ref.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, c.in_channels, frames, h, w, generator=g)
    context = torch.randn(2, text_len, c.text_dim, generator=g)
    context[1, text_len // 2:] = 0  # the second prompt is shorter
    tokens = (frames // c.patch_size[0]) * (h // c.patch_size[1]) * (w // c.patch_size[2])
    t = 1000 * torch.rand(2, tokens, generator=g) if per_token else torch.tensor([999.0, 250.5])
    image = None
    if c.image_dim:  # diffusers splits image tokens off as len - 512: exact with 512 text tokens
        image = torch.randn(4 if c.pos_embed_seq_len else 2, 3, c.image_dim, generator=g)
    return x, t, context, image


def both(ref, ours, x, t, context, image):
    with torch.no_grad():
        expected = ref(x, t, context, encoder_hidden_states_image=image).sample
        return ours(x, t, context, image), expected


# ---------------------------------------------------------------- transformer

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("frames,h,w", [(3, 2, 2), (4, 6, 8), (2, 8, 4)])  # 1 token per frame; 12 and 8 per frame
def test_transformer_matches_diffusers(variant, frames, h, w):
    ref = reference(**VARIANTS[variant])
    frames *= ref.config.patch_size[0]  # the same token grid for 2-frame patches
    text_len = 512 if "image_dim" in VARIANTS[variant] else 7
    out, expected = both(ref, ours_from(ref), *inputs(ref, frames, h, w, text_len=text_len))
    assert out.shape == (2, ref.config.out_channels, frames, h, w)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["t2v", "patch-2x2x2"])
def test_per_token_timesteps_match_diffusers(variant):
    """Wan 2.2 TI2V's (B, N) timesteps: per-token modulation in every block and in the output norm."""
    ref = reference(**VARIANTS[variant])
    out, expected = both(ref, ours_from(ref), *inputs(ref, 4, 6, 4, per_token=True))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_attention_spans_space_and_time_and_rows_are_independent():
    """Changing one token's input moves other frames' and other positions' outputs (attention reaches across
    frames and the frame's grid); a batch equals its rows one at a time; a scalar t equals a (B,) t and a
    (B, N) t that is constant per row."""
    ref = reference()
    ours = ours_from(ref)
    x, _, context, _ = inputs(ref, 4, 6, 8)
    with torch.no_grad():
        base = ours(x, 500.0, context)
        moved = x.clone()
        moved[:, :, 0, :2, :2] += 1.0  # the first token of frame 0 only
        delta = (ours(moved, 500.0, context) - base).abs()
        assert delta[:, :, 3].amax() > 1e-3 and delta[:, :, 0, 4:, 4:].amax() > 1e-3
        singles = torch.cat([ours(x[i:i + 1], 500.0, context[i:i + 1]) for i in range(2)])
        torch.testing.assert_close(base, singles, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(x, torch.tensor([500.0, 500.0]), context), base, rtol=0, atol=0)
        per_token = ours(x, torch.full((2, 48), 500.0), context)  # the time MLP on 96 rows, not 2: last bits
        torch.testing.assert_close(per_token, base, rtol=0, atol=1e-5)


def test_rope_split_and_token_order():
    c = WanTransformerConfig(attention_head_dim=128)
    assert c.rope_dims == (44, 42, 42)
    assert WanTransformerConfig.from_dict(TINY).rope_dims == (4, 4, 4)
    ids = grid_ids(2, 3, 4)
    assert ids.shape == (24, 3) and ids[0].tolist() == [0, 0, 0] and ids[13].tolist() == [1, 0, 1]


def test_state_dict_keys_and_config_round_trip():
    for overrides in VARIANTS.values():
        ref = reference(**overrides)
        ours = ours_from(ref)
        assert set(ours.state_dict()) == set(ref.state_dict())
        assert public(WanTransformer3DModel.from_config(ours.to_config()).config) == public(ref.config)
    assert sum(p.numel() for p in ours_from(reference()).parameters()) == 28328  # the diffusers test model's count


@pytest.mark.parametrize("bad,field", [
    (dict(patch_size=[1, 2]), "patch_size"),
    (dict(attention_head_dim=13), "attention_head_dim"),
    (dict(num_layers=-1), "num_layers"),
    (dict(in_channels=2.5), "in_channels"),
    (dict(out_channels=0), "out_channels"),
    (dict(qk_norm="rms_norm"), "qk_norm"),
    (dict(cross_attn_norm="yes"), "cross_attn_norm"),
    (dict(eps=0), "eps"),
    (dict(image_dim=4), "added_kv_proj_dim"),  # the image branch needs both
    (dict(image_dim=4, added_kv_proj_dim=8), "added_kv_proj_dim"),  # not the model width 24
    (dict(pos_embed_seq_len=6), "pos_embed_seq_len"),  # without image_dim
    (dict(window_size=[-1, -1]), "window_size"),  # not a WanTransformer3DModel key
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        WanTransformerConfig.from_dict(TINY | bad)


def test_bad_inputs_name_the_argument():
    ours = ours_from(reference())
    x, t, context, _ = inputs(reference(), 4, 6, 8)
    cases = {
        "x must be": (x[:, :, :, :5], t, context),  # odd height for 2x2 patches
        "rope_max_seq_len": (torch.randn(1, 16, 33, 2, 2), 1.0, context[:1]),
        "encoder_hidden_states": (x, t, context[..., :16]),
        "t must be": (x, torch.rand(2, 5), context),  # 5 timesteps for 48 tokens
        "encoder_hidden_states_image": (x, t, context, torch.randn(2, 3, 4)),  # a text-only model
    }
    for match, args in cases.items():
        with pytest.raises(ValueError, match=match):
            ours(*args)
    i2v = ours_from(reference(**VARIANTS["flf2v"]))
    x, t, context, image = inputs(i2v, 2, 2, 2, text_len=3)
    with pytest.raises(ValueError, match="encoder_hidden_states_image"):
        i2v(x, t, context, image[:2])  # FLF2V takes 2B images


def test_transformer_folder_loads_strictly_both_ways(tmp_path):
    ref = reference()
    ref.save_pretrained(tmp_path / "theirs")
    ours = load_network(WanTransformer, tmp_path / "theirs")
    args = inputs(ref, 4, 6, 8)
    out, expected = both(ref, ours.eval(), *args)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    save_network(ours, tmp_path / "ours")
    # from_pretrained needs accelerate for this model (its fp32 modules), absent here: its config, then strictly
    # its weights, as from_pretrained would read them
    back = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(tmp_path / "ours")).eval()
    back.load_state_dict(load_file(tmp_path / "ours" / "diffusion_pytorch_model.safetensors"), strict=True)
    _, again = both(back, ours, *args)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


# ---------------------------------------------------------------- VAE

def reference_vae(**overrides) -> AutoencoderKLWan:
    torch.manual_seed(0)
    return perturbed(AutoencoderKLWan(**(TINY_VAE | overrides)))


def ours_vae(ref) -> WanVAE:
    model = WanVAE.from_config(dict(ref.config)).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def video(batch: int, frames: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return 2 * torch.rand(batch, 3, frames, h, w, generator=torch.Generator().manual_seed(seed)) - 1


@pytest.fixture(scope="module")
def tiny_vae():
    ref = reference_vae()
    return ref, ours_vae(ref)


@pytest.mark.parametrize("frames,h,w,batch", [(1, 16, 16, 2), (5, 16, 24, 1), (9, 16, 16, 1), (9, 24, 16, 2)])
def test_vae_matches_diffusers(tiny_vae, frames, h, w, batch):
    """Encode (mean and logvar) and decode, through the chunked cache: 9 frames = frame 0 + two chunks of 4."""
    ref, ours = tiny_vae
    x = video(batch, frames, h, w)
    with torch.no_grad():
        theirs, posterior = ref.encode(x).latent_dist, ours.encode(x)
        latents = torch.randn(theirs.mean.shape, generator=torch.Generator().manual_seed(2))
        decoded, expected = ours.decode(latents), ref.decode(latents).sample
    assert posterior.mean.shape == (batch, 16, 1 + (frames - 1) // 4, h // 8, w // 8)
    torch.testing.assert_close(posterior.mean, theirs.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(posterior.logvar, theirs.logvar, rtol=0, atol=1e-5)
    assert theirs.logvar.std() > 0.05 and theirs.mean.abs().max() > 0.1
    assert decoded.shape == (batch, 3, frames, h, w)
    assert (expected.abs() < 0.99).float().mean() > 0.3  # not everything clamped
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-5)


def test_vae_other_shape_matches_diffusers():
    """Widths that change (1x1x1 shortcuts), 2 resnets, one time halving at the first level, decoder_base_dim."""
    overrides = dict(base_dim=4, decoder_base_dim=6, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=2,
                     temperal_downsample=[True, False], latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
                     scale_factor_temporal=2, scale_factor_spatial=4)
    ref = reference_vae(**overrides)
    ours = ours_vae(ref)
    x = video(1, 5, 8, 12)
    with torch.no_grad():
        theirs, posterior = ref.encode(x).latent_dist, ours.encode(x)
        decoded, expected = ours.decode(theirs.mean), ref.decode(theirs.mean).sample
    assert posterior.mean.shape == (1, 4, 3, 2, 3)
    torch.testing.assert_close(posterior.mean, theirs.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(posterior.logvar, theirs.logvar, rtol=0, atol=1e-5)
    assert decoded.shape == (1, 3, 5, 8, 12)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-5)


def test_vae_is_causal(tiny_vae):
    """The first frame encodes alone to latent frame 0 of the clip, and frames 0-4 to latent frames 0-1; latent
    frame 0 decodes alone to frame 0 of the whole video."""
    _, ours = tiny_vae
    x = video(1, 9, 16, 16)
    with torch.no_grad():
        full = ours.encode(x).mean
        torch.testing.assert_close(ours.encode(x[:, :, :1]).mean, full[:, :, :1], rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.encode(x[:, :, :5]).mean, full[:, :, :2], rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.decode(full[:, :, :1]), ours.decode(full)[:, :, :1], rtol=0, atol=1e-6)


def test_vae_posterior_and_latent_normalisation(tiny_vae):
    ref, ours = tiny_vae
    x = video(1, 1, 16, 16)
    with torch.no_grad():
        posterior = ours.encode(x)
        assert torch.equal(posterior.mode(), posterior.mean)
        a = posterior.sample(torch.Generator().manual_seed(3))
        b = ref.encode(x).latent_dist.sample(torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        recon = ours(x)
    assert recon.shape == x.shape and recon.abs().max() <= 1.0
    default = WanVAE(WanVAEConfig(base_dim=2, dim_mult=(1, 1, 1, 1), num_res_blocks=1))  # Wan 2.1's statistics
    z = torch.randn(1, 16, 2, 2, 2)
    mean = torch.tensor(default.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(default.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(default.normalize_latents(z), (z - mean) / std, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(default.denormalize_latents(default.normalize_latents(z)), z, rtol=0, atol=1e-6)
    defaults = inspect.signature(AutoencoderKLWan.__init__).parameters  # Wan 2.1's values, as diffusers' defaults
    assert default.config.latents_mean == tuple(defaults["latents_mean"].default)
    assert default.config.latents_std == tuple(defaults["latents_std"].default)


@pytest.mark.parametrize("bad,field", [
    (dict(temperal_downsample=[False, True]), "temperal_downsample"),  # 2 flags for 3 downsampling levels
    (dict(temperal_downsample=[True, True, True]), "temperal_downsample"),  # 8x time: more than a chunk holds
    (dict(dim_mult=[]), "dim_mult"),
    (dict(z_dim=4), "latents_mean"),  # 16 built-in statistics for 4 channels
    (dict(latents_std=[0.0] * 16), "latents_std"),
    (dict(attn_scales=[0.5]), "attn_scales"),
    (dict(is_residual=True), "is_residual"),
    (dict(patch_size=2), "patch_size"),
    (dict(scale_factor_spatial=16), "scale_factor_spatial"),
    (dict(scale_factor_temporal=8), "scale_factor_temporal"),
    (dict(base_dim=0), "base_dim"),
    (dict(clip_output=True), "clip_output"),  # not an AutoencoderKLWan key
])
def test_bad_vae_config_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        WanVAEConfig.from_dict(TINY_VAE | bad)


def test_bad_vae_inputs(tiny_vae):
    _, ours = tiny_vae
    for bad in (video(1, 7, 16, 16), video(1, 5, 12, 16), torch.zeros(1, 3, 16, 16)):  # 7 = not 1 + 4k; 12 % 8
        with pytest.raises(ValueError, match="x must be"):
            ours.encode(bad)
    with pytest.raises(ValueError, match="z must be"):
        ours.decode(torch.zeros(1, 4, 1, 2, 2))


def test_vae_folder_loads_strictly_both_ways(tmp_path):
    ref = reference_vae()
    ref.save_pretrained(tmp_path / "theirs")
    ours = load_network(WanVAE, tmp_path / "theirs").eval()
    assert ours.config == WanVAEConfig.from_dict(dict(ref.config))
    x = video(1, 5, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x).mean, ref.encode(x).latent_dist.mean, rtol=0, atol=1e-5)
    save_network(ours, tmp_path / "ours")
    back = AutoencoderKLWan.from_pretrained(tmp_path / "ours")
    assert public(back.config) == public(ref.config)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in back.state_dict().items())
