"""The transformer building blocks equal diffusers' modules with the same weights."""

import pytest
import torch

from reverie.models import blocks

emb = pytest.importorskip("diffusers.models.embeddings")
norms = pytest.importorskip("diffusers.models.normalization")
attention = pytest.importorskip("diffusers.models.attention")


@pytest.mark.parametrize("h,w,base", [(4, 4, 4), (3, 5, 4), (6, 2, 8)])
def test_sincos_2d_matches_diffusers(h, w, base):
    ref = emb.get_2d_sincos_pos_embed(16, (h, w), base_size=base, interpolation_scale=1.0)
    assert torch.equal(blocks.sincos_2d(16, h, w, base), ref.float())


@pytest.mark.parametrize("max_size", [None, 8])
@pytest.mark.parametrize("h,w", [(8, 8), (4, 6), (6, 4)])
def test_patch_embed_matches_diffusers(max_size, h, w):
    torch.manual_seed(0)
    ref = emb.PatchEmbed(height=8, width=8, patch_size=2, in_channels=3, embed_dim=16, pos_embed_max_size=max_size)
    ours = blocks.PatchEmbed(8, 2, 3, 16, pos_embed_max_size=max_size)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, h, w)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)


def test_patch_embed_refuses_grids_beyond_the_table():
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        blocks.PatchEmbed(8, 2, 3, 16, pos_embed_max_size=4)(torch.randn(1, 3, 10, 8))


def test_adanorm_chunks_match_diffusers_zero_and_continuous():
    torch.manual_seed(0)
    x, c = torch.randn(2, 5, 8), torch.randn(2, 8)
    zero = norms.AdaLayerNormZero(8)
    ours = blocks.AdaNorm(8, 6)
    ours.load_state_dict(zero.state_dict())
    normed, (shift, scale, gate, *_) = ours(x, c)
    ref = zero(x, emb=c)
    torch.testing.assert_close(blocks.modulate(normed, shift, scale), ref[0])
    torch.testing.assert_close(gate, ref[1])
    cont = norms.AdaLayerNormContinuous(8, 12, elementwise_affine=False, eps=1e-6)
    ours = blocks.AdaNorm(8, 2, cond_dim=12)
    ours.load_state_dict(cont.state_dict())
    c = torch.randn(2, 12)
    normed, (scale, shift) = ours(x, c)
    torch.testing.assert_close(blocks.modulate(normed, shift, scale), cont(x, c))


def test_feedforward_and_rmsnorm_match_diffusers():
    torch.manual_seed(0)
    ref = attention.FeedForward(8, dim_out=8, activation_fn="gelu-approximate")
    ours = blocks.FeedForward(8)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    rms = norms.RMSNorm(8, eps=1e-6)
    torch.nn.init.normal_(rms.weight)
    ours = blocks.RMSNorm(8)
    ours.load_state_dict(rms.state_dict())
    torch.testing.assert_close(ours(x), rms(x), rtol=0, atol=0)
