"""Step caching (reverie.models.step_cache): DeepCache on UNets, first-block caching on diffusion transformers.
Each is the uncached model at its neutral setting (interval 1, threshold 0) to the bit; on, it skips the work it
says it skips, keeps its image close to the uncached one, starts fresh at every pipeline call, and is recorded in
the image's parameters."""

import math

import numpy as np
import pytest
import torch

from reverie import Pipeline
from reverie.cli import main, model_path
from reverie.models.step_cache import BlockCache, DeepCache

from tiny_families import dit_folder, flux_folder, sd3_folder, sd_folder, wan_folder

PROMPTS = ["a red circle above a blue square", "a green triangle", "a small yellow square", "a blue circle"]


@pytest.fixture(scope="module")
def shapes():
    return Pipeline.from_pretrained(model_path("shapes"))


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.float64) for image in result.images])


def test_deepcache_interval_1_is_the_uncached_unet_and_interval_3_skips_two_calls_in_three(shapes):
    kwargs = dict(steps=10, seed=[0, 1, 2, 3], progress=False)
    plain = shapes(PROMPTS, **kwargs)
    try:
        shapes.enable_deepcache(1)
        same = shapes(PROMPTS, **kwargs)
        assert torch.equal(same.latents, plain.latents) and shapes.network.deep_cache.skipped == 0
        shapes.enable_deepcache(3)
        cached = shapes(PROMPTS, **kwargs)
        assert shapes.network.deep_cache.skipped == 10 - math.ceil(10 / 3)  # dpmpp_2m: one call per step
        again = shapes(PROMPTS, **kwargs)  # the cache starts empty at every call
        assert torch.equal(again.latents, cached.latents)
        assert cached.params["deepcache"] == 3
    finally:
        shapes.disable_step_cache()
    assert "deepcache" not in shapes(PROMPTS[:1], steps=2, progress=False).params
    diff = np.abs(_pixels(cached) - _pixels(plain)).mean()
    assert 0 < diff <= 16, diff  # measured 8.3 on 0..255 at 20 steps (docs/speed.md)


def test_deepcache_on_a_diffusers_sd_model_against_its_uncached_image(tmp_path):
    pipe = Pipeline.from_pretrained(sd_folder(tmp_path / "sd"))
    kwargs = dict(steps=8, seed=[3, 4], height=64, width=48, progress=False)  # non-square: the shallow path's skips
    plain = pipe(PROMPTS[:2], **kwargs)
    pipe.enable_deepcache(2)
    cached = pipe(PROMPTS[:2], **kwargs)
    assert pipe.network.deep_cache.skipped == 4
    assert np.abs(_pixels(cached) - _pixels(plain)).mean() <= 10
    pipe.enable_deepcache(1)
    assert torch.equal(pipe(PROMPTS[:2], **kwargs).latents, plain.latents)


def test_deepcache_shallow_call_reuses_exactly_the_deep_features():
    """A shallow call on the same input as the full call before it gives the full call's output (the deep
    features are the ones that call would compute), with ControlNet-style residuals too."""
    from reverie.models.unet import UNET_PRESETS, UNet

    torch.manual_seed(0)
    net = UNet(UNET_PRESETS["tiny"]).eval()
    x, ctx = torch.randn(2, 4, 16, 12), torch.randn(2, 5, 16)
    residuals = [torch.randn(2, c, *s) for c, s in ((16, (16, 12)), (16, (16, 12)), (16, (8, 6)), (32, (8, 6)))]
    with torch.no_grad():
        full = net(x, 10, ctx, down_block_additional_residuals=residuals)
        cache = net.enable_deepcache(2)
        first = net(x, 10, ctx, down_block_additional_residuals=residuals)
        second = net(x, 10, ctx, down_block_additional_residuals=residuals)
    assert cache.skipped == 1
    assert torch.equal(first, full)
    torch.testing.assert_close(second, full, rtol=0, atol=1e-6)
    with torch.no_grad():  # another shape never reuses
        net(torch.randn(1, 4, 16, 12), 10, ctx[:1])
    assert cache.skipped == 1


@pytest.mark.parametrize("family", ["dit", "sd3", "flux", "wan"])
def test_block_cache_threshold_0_is_uncached_and_a_repeated_call_reuses_the_residual(tmp_path, family):
    folder = {"dit": dit_folder, "sd3": sd3_folder, "flux": lambda p: flux_folder(p, dev=True), "wan": wan_folder}
    pipe = Pipeline.from_pretrained(folder[family](tmp_path / family))
    prompt = 1 if family == "dit" else PROMPTS[0]
    kwargs = dict(steps=6, seed=[5], progress=False)
    if family == "wan":
        kwargs.update(num_frames=5, width=32, height=32)
    plain = pipe(prompt, **kwargs)
    pipe.enable_block_cache(0.0)
    assert torch.equal(pipe(prompt, **kwargs).latents, plain.latents) and pipe.network.block_cache.skipped == 0
    pipe.enable_block_cache(math.inf)  # every call after the first full one reuses the residual
    cached = pipe(prompt, **kwargs)
    cache = pipe.network.block_cache
    assert cache.skipped == cache.calls - 1 > 0 and cached.params["block_cache"] == math.inf
    if family != "sd3":  # diffusers' tiny SD3 has one block: nothing after it to skip, reuse is exact
        assert not torch.equal(cached.latents, plain.latents)
    pipe.disable_step_cache()
    assert pipe.step_cache is None


def test_block_cache_network_level_invariants():
    """Calling twice on the same input: the second call skips every block but the first and gives the first call's
    output up to rounding; a small threshold does not skip a call whose input changed a lot."""
    from reverie.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    net = DiT(DiTConfig(sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=3,
                        attention_head_dim=8, num_attention_heads=2, num_embeds_ada_norm=10)).eval()
    for p in net.parameters():
        p.data += 0.02 * torch.randn_like(p)
    x, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    with torch.no_grad():
        full = net(x, 500, labels)
        cache = net.enable_block_cache(0.05)
        assert torch.equal(net(x, 500, labels), full)
        torch.testing.assert_close(net(x, 500, labels), full, rtol=0, atol=1e-5)
        assert cache.skipped == 1
        net(torch.randn(2, 4, 8, 8), 500, labels)  # a new input: its first block output moved by far more
        assert cache.skipped == 1


def test_bad_settings_and_families_are_refused(shapes, tmp_path):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="interval"):
            DeepCache(bad)
    for bad in (-0.1, math.nan, True, "0.1"):
        with pytest.raises(ValueError, match="threshold"):
            BlockCache(bad)
    with pytest.raises(ValueError, match="block_cache"):
        shapes.enable_block_cache(0.1)
    dit = Pipeline.from_pretrained(dit_folder(tmp_path / "dit"))
    with pytest.raises(ValueError, match="deepcache"):
        dit.enable_deepcache(3)


def test_cli_deepcache(tmp_path, capsys):
    from reverie.metadata import read_png_info

    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--steps", "6", "--seed", "1", "--deepcache", "3", "--out", str(out)]) == 0
    assert read_png_info(out)["request"]["deepcache"] == 3
    assert main(["generate", "a red circle", "--steps", "6", "--block-cache", "0.1", "--out", str(out)]) == 2
    assert "block_cache" in capsys.readouterr().err


def test_compile_keeps_the_network_and_its_outputs(tmp_path):
    """Pipeline.compile compiles the network in place (same module, same state dict names) and draws the eager
    images up to float rounding (a tiny diffusers SD model: compiling it takes seconds, not minutes)."""
    pipe = Pipeline.from_pretrained(sd_folder(tmp_path / "sd"))
    kwargs = dict(steps=3, seed=[1], progress=False)
    eager = pipe(PROMPTS[:1], **kwargs)
    network, keys = pipe.network, list(pipe.network.state_dict())
    pipe.compile()
    compiled = pipe(PROMPTS[:1], **kwargs)
    assert pipe.network is network and list(pipe.network.state_dict()) == keys
    torch.testing.assert_close(compiled.latents, eager.latents, rtol=1e-4, atol=1e-4)
