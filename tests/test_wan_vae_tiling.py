"""WanVAE.enable_tiling equals diffusers' AutoencoderKLWan tiled_encode / tiled_decode (spatial tiles, each streamed
through time with its own cache, cross-faded across the overlap), and is the untiled VAE when off or when the input
fits in one tile."""

import pytest
import torch

from reverie.models.wan_vae import WanVAE

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKLWan  # noqa: E402

TINY_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
# (tile h, tile w, stride h, stride w) in pixels; on 64 x 80: 3 x 4 tiles (latents 4 every 3 on 8 x 10), then
# 4 x 2 tiles with different overlaps per axis and none along the width
TILINGS = [(32, 32, 24, 24), (32, 40, 16, 40)]


@pytest.fixture(scope="module")
def vaes():
    torch.manual_seed(0)
    ref = AutoencoderKLWan(**TINY_VAE).eval()
    with torch.no_grad():  # every parameter off its init (norm scales start at one)
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = WanVAE.from_config(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def video(batch: int, frames: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return 2 * torch.rand(batch, 3, frames, h, w, generator=torch.Generator().manual_seed(seed)) - 1


def latents(batch: int, frames: int, h: int, w: int) -> torch.Tensor:
    return torch.randn(batch, 16, frames, h, w, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("tiling", TILINGS)
@pytest.mark.parametrize("frames,batch", [(5, 1), (9, 2)])
def test_tiled_matches_diffusers(vaes, tiling, frames, batch):
    ref, ours = vaes
    x, z = video(batch, frames, 64, 80), latents(batch, 1 + (frames - 1) // 4, 8, 10)
    try:
        ref.enable_tiling(*tiling)
        ours.enable_tiling(*tiling)
        with torch.no_grad():
            theirs, posterior = ref.encode(x).latent_dist, ours.encode(x)
            expected, decoded = ref.decode(z).sample, ours.decode(z)
            ours.disable_tiling()
            untiled, untiled_decoded = ours.encode(x), ours.decode(z)
    finally:
        ref.use_tiling = ours.use_tiling = False
    assert posterior.mean.shape == z.shape and decoded.shape == x.shape
    torch.testing.assert_close(posterior.mean, theirs.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(posterior.logvar, theirs.logvar, rtol=0, atol=1e-5)
    torch.testing.assert_close(decoded, expected, rtol=0, atol=1e-5)
    assert (expected.abs() < 0.99).float().mean() > 0.3  # not everything clamped
    # the tiles change the result: each sees only its own context (so the comparison above is of tiled outputs)
    assert (posterior.mean - untiled.mean).abs().max() > 1e-3
    assert (decoded - untiled_decoded).abs().max() > 1e-3


def test_tiling_off_or_one_tile_is_untiled(vaes):
    _, ours = vaes
    x, z = video(1, 5, 64, 80), latents(1, 2, 8, 10)
    with torch.no_grad():
        mean, decoded = ours.encode(x).mean, ours.decode(z)
        ours.enable_tiling(32, 32, 24, 24)
        ours.disable_tiling()
        assert not ours.use_tiling
        assert torch.equal(ours.encode(x).mean, mean) and torch.equal(ours.decode(z), decoded)
        ours.enable_tiling(64, 80, 32, 32)  # the input is no larger than a tile in either direction
        try:
            assert torch.equal(ours.encode(x).mean, mean) and torch.equal(ours.decode(z), decoded)
        finally:
            ours.disable_tiling()


def test_defaults_and_none_keep_values_as_diffusers(vaes):
    """enable_tiling() (what `reverie generate --vae-tiling` calls) takes diffusers' 256 / 192; None keeps the
    current value."""
    ref = AutoencoderKLWan(**TINY_VAE)
    ours = WanVAE.from_config(dict(ref.config))
    names = ("tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height", "tile_sample_stride_width")
    for args in ((), (64, None, 48), (None, 96, None, 64)):
        ref.enable_tiling(*args)
        ours.enable_tiling(*args)
        assert ours.use_tiling and [getattr(ours, n) for n in names] == [getattr(ref, n) for n in names]
    assert [getattr(ours, n) for n in names] == [64, 96, 48, 64]
    with pytest.raises(ValueError, match="tile_sample_stride_height"):  # 48 kept; diffusers would leave gaps
        ours.enable_tiling(32)


@pytest.mark.parametrize("args,field", [
    ((32, 32, 40, 24), "tile_sample_stride_height"),  # stride larger than the tile
    ((32, 32, 24, 40), "tile_sample_stride_width"),
    ((0, 32, 24, 24), "tile_sample_min_height"),
    ((32, -8, 24, 24), "tile_sample_min_width"),
    ((32, 32, -8, 24), "tile_sample_stride_height"),
    ((32, 32, 24, 0.5), "tile_sample_stride_width"),
    ((36, 32, 24, 24), "tile_sample_min_height"),  # not a multiple of the spatial compression (8)
    ((32, 32, 24, 20), "tile_sample_stride_width"),
])
def test_bad_tiling_names_the_argument(args, field):
    vae = WanVAE.from_config(TINY_VAE)
    with pytest.raises(ValueError, match=field):
        vae.enable_tiling(*args)
    assert not vae.use_tiling and vae.tile_sample_min_height == 256  # nothing half-written
