"""reverie's AutoencoderKL equals diffusers' (a test-only oracle) on tiny random configs: same parameter names,
same moments, reconstructions, posterior samples and tiled outputs."""

import dataclasses

import pytest
import torch

from reverie.models.vae import VAE_PRESETS, AutoencoderKL, DiagonalGaussian, VAEConfig, config_from_dict

diffusers = pytest.importorskip("diffusers")

TINY = VAE_PRESETS["tiny"]  # block_out_channels (8, 16): f = 2
F4 = dataclasses.replace(TINY, block_out_channels=(8, 8, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3, sample_size=16)  # f = 4, for tiling
VARIANT = dataclasses.replace(F4, layers_per_block=2, latent_channels=3, mid_block_add_attention=False,
                              use_quant_conv=False, in_channels=1, out_channels=2)
TOL = 1e-4


def pair(cfg: VAEConfig, seed: int = 0):
    """A diffusers AutoencoderKL with random weights (norms and biases too) and ours loaded from it."""
    theirs = diffusers.AutoencoderKL.from_config(AutoencoderKL(cfg).to_config()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def images(cfg: VAEConfig, b: int = 2, h: int = 16, w: int = 16, seed: int = 1):
    return torch.randn(b, cfg.in_channels, h, w, generator=torch.Generator().manual_seed(seed)).clamp(-1, 1)


def maxdiff(a, b):
    return (a - b).abs().max().item()


def test_state_dict_names_and_shapes_equal_diffusers():
    for cfg in (TINY, VARIANT):
        ours, theirs = pair(cfg)
        assert {k: v.shape for k, v in ours.state_dict().items()} == \
               {k: v.shape for k, v in theirs.state_dict().items()}
        theirs.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("cfg", [TINY, VARIANT], ids=["tiny", "variant"])
@torch.no_grad()
def test_encode_decode_forward_match_diffusers(cfg):
    ours, theirs = pair(cfg)
    x = images(cfg, h=16, w=24)
    q, p = ours.encode(x), theirs.encode(x).latent_dist
    assert q.mean.shape == (2, cfg.latent_channels, 16 // ours.downsample_factor, 24 // ours.downsample_factor)
    assert maxdiff(q.mean, p.mean) < TOL and maxdiff(q.logvar, p.logvar) < TOL and maxdiff(q.std, p.std) < TOL
    assert maxdiff(q.kl(), p.kl()) < 1e-3 * p.kl().abs().max().item()
    other = ours.encode(images(cfg, h=16, w=24, seed=5))
    other_theirs = theirs.encode(images(cfg, h=16, w=24, seed=5)).latent_dist
    assert maxdiff(q.kl(other), p.kl(other_theirs)) < 1e-3 * p.kl(other_theirs).abs().max().item()
    z = torch.randn_like(p.mean)
    assert maxdiff(ours.decode(z), theirs.decode(z).sample) < TOL
    assert maxdiff(ours(x), theirs(x).sample) < TOL
    assert ours(x).shape == (2, cfg.out_channels, 16, 24)


@torch.no_grad()
def test_posterior_sample_matches_diffusers_for_a_generator_and_a_generator_list():
    ours, theirs = pair(TINY)
    x = images(TINY, b=3)
    q, p = ours.encode(x), theirs.encode(x).latent_dist
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    assert maxdiff(q.sample(gen(7)), p.sample(gen(7))) < TOL
    assert maxdiff(q.sample([gen(1), gen(2), gen(3)]), p.sample([gen(1), gen(2), gen(3)])) < TOL
    assert maxdiff(q.sample(gen(7)), q.mode()) > 1e-2  # the noise is really there
    recon, recon_theirs = ours(x, sample_posterior=True, generator=gen(4)), theirs(x, True, generator=gen(4))
    assert maxdiff(recon, recon_theirs.sample) < TOL


def test_logvar_is_clamped_like_ldm():
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 2, 2, 2), -100.0), torch.full((1, 2, 2, 2), 100.0)],
                        dim=1)  # mean 0; logvar -100 in two channels, +100 in two
    q = DiagonalGaussian(moments)
    assert q.logvar[:, :2].eq(-30).all() and q.logvar[:, 2:].eq(20).all()


def test_to_config_round_trips_through_diffusers():
    for cfg in (TINY, VARIANT, VAE_PRESETS["sd"]):
        with torch.device("meta"):
            ours = AutoencoderKL(cfg)
            config = ours.to_config()
            theirs = diffusers.AutoencoderKL.from_config(config)
        assert config["_class_name"] == "AutoencoderKL"
        assert set(theirs.state_dict()) == set(ours.state_dict())
        assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())
        assert config_from_dict(dict(theirs.config)) == cfg  # diffusers' own config ("_" keys too) reads back


def test_from_config_reads_an_sd_config_json():
    sd_json = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
               "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
               "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
               "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4}
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(sd_json)
    assert vae.config == VAE_PRESETS["sd"]
    assert vae.scaling_factor == 0.18215 and vae.shift_factor == 0.0 and vae.downsample_factor == 8


@torch.no_grad()
def test_slicing_runs_one_item_at_a_time_and_equals_unsliced():
    ours, _ = pair(TINY)
    x = images(TINY, b=3)
    moments = ours.encode(x).moments
    out = ours.decode(moments[:, :4])
    batch_sizes = []
    for net in (ours.encoder, ours.decoder):
        net.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    ours.enable_slicing()
    sliced_moments, sliced_out = ours.encode(x).moments, ours.decode(moments[:, :4])
    assert batch_sizes == [1] * 6
    ours.disable_slicing()
    singles = torch.cat([ours.encode(xi).moments for xi in x.split(1)])
    assert torch.equal(sliced_moments, singles)  # bit-exact with running each item alone
    # batched convolutions round differently from single-item ones, so "equal" to the batch means ~1 ulp
    assert maxdiff(sliced_moments, moments) < 1e-5 and maxdiff(sliced_out, out) < 1e-5


@pytest.mark.parametrize("overlap", [0.25, 0.5])
@torch.no_grad()
def test_tiled_encode_and_decode_match_diffusers(overlap):
    ours, theirs = pair(F4)
    ours.enable_tiling(tile_sample_min_size=16, tile_overlap_factor=overlap)
    theirs.enable_tiling()
    theirs.tile_sample_min_size, theirs.tile_latent_min_size, theirs.tile_overlap_factor = 16, 4, overlap
    x = images(F4, b=2, h=40, w=56)
    moments = ours.encode(x).moments
    assert moments.shape == (2, 8, 10, 14)
    assert maxdiff(moments, theirs.encode(x).latent_dist.parameters) < TOL
    z = torch.randn(2, 4, 10, 14, generator=torch.Generator().manual_seed(3))
    out = ours.decode(z)
    assert out.shape == (2, 3, 40, 56)
    assert maxdiff(out, theirs.decode(z).sample) < TOL



@torch.no_grad()
def test_tiled_outputs_stay_close_to_untiled():
    ours, _ = pair(F4)
    x = images(F4, b=2, h=40, w=56)
    z = torch.randn(2, 4, 10, 14, generator=torch.Generator().manual_seed(3))
    plain = ours.encode(x).moments, ours.decode(z)
    ours.enable_tiling(32)
    tiled = ours.encode(x).moments, ours.decode(z)
    for t, p in zip(tiled, plain):
        assert t.shape == p.shape
        assert (t - p).abs().max() > 1e-3  # the tiled path really ran: each tile sees only its own context
        assert torch.corrcoef(torch.stack([t.flatten(), p.flatten()]))[0, 1] > 0.7  # yet it is the same output


@torch.no_grad()
def test_tiling_leaves_inputs_no_larger_than_a_tile_untouched():
    ours, _ = pair(F4)
    x, z = images(F4, h=16, w=16), torch.randn(2, 4, 4, 4)
    plain = ours.encode(x).moments, ours.decode(z)
    ours.enable_tiling(16)
    assert torch.equal(ours.encode(x).moments, plain[0]) and torch.equal(ours.decode(z), plain[1])


def test_downsample_factor_and_shapes():
    for cfg, f in ((TINY, 2), (F4, 4), (VAE_PRESETS["small-f4"], 4), (VAE_PRESETS["small-f8"], 8)):
        with torch.device("meta"):
            vae = AutoencoderKL(cfg)
            assert vae.downsample_factor == f
            assert vae.encode(torch.zeros(1, 3, 8 * f, 4 * f)).mean.shape == (1, cfg.latent_channels, 8, 4)
            assert vae.decode(torch.zeros(1, cfg.latent_channels, 8, 4)).shape == (1, 3, 8 * f, 4 * f)


def test_sd_preset_parameter_count_equals_diffusers():
    with torch.device("meta"):
        ours = AutoencoderKL(VAE_PRESETS["sd"])
        theirs = diffusers.AutoencoderKL.from_config(ours.to_config())
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters()) == 83_653_863


@torch.no_grad()
def test_latent_scaling_helpers_and_dtype_follow_the_module():
    cfg = dataclasses.replace(TINY, scaling_factor=0.5, shift_factor=0.25)
    ours, _ = pair(cfg)
    ours.double()
    x = images(cfg).double()
    latents = ours.latents_from_images(x, torch.Generator().manual_seed(0))
    assert latents.dtype == torch.float64
    expected = (ours.encode(x).sample(torch.Generator().manual_seed(0)) - 0.25) * 0.5
    assert torch.equal(latents, expected)
    assert torch.allclose(ours.images_from_latents(latents), ours.decode(latents / 0.5 + 0.25))


@pytest.mark.parametrize("field,value", [
    ("down_block_types", ("AttnDownEncoderBlock2D", "DownEncoderBlock2D")),
    ("up_block_types", ("UpDecoderBlock2D",)),
    ("block_out_channels", (8, 0)),
    ("act_fn", "gelu"),
    ("norm_num_groups", 3),
    ("latent_channels", 0),
    ("layers_per_block", 0),
    ("scaling_factor", 0.0),
])
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **{field: value})


@pytest.mark.parametrize("key,value", [("latents_mean", [0.0] * 4), ("time_embedding", "yes")])
def test_from_config_rejects_unsupported_keys(key, value):
    with pytest.raises(ValueError, match=key):
        AutoencoderKL.from_config({**AutoencoderKL(TINY).to_config(), key: value})


def test_bad_inputs_raise():
    vae = AutoencoderKL(TINY)
    for bad in (torch.zeros(1, 4, 16, 16), torch.zeros(3, 16, 16), torch.zeros(1, 3, 15, 16)):
        with pytest.raises(ValueError, match="x: expected"):
            vae.encode(bad)
    with pytest.raises(ValueError, match="z: expected"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    for size, overlap in ((15, 0.25), (2, 0.25), (16, 1.0), (16, 0.3)):
        with pytest.raises(ValueError, match="tile_"):
            vae.enable_tiling(size, overlap)
