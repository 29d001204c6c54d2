"""reverie's UNet equals diffusers' UNet2DConditionModel: same config keys, same parameter names, same outputs
(diffusers is a test-only oracle)."""

import dataclasses
import functools

import pytest
import torch

from reverie.models.layers import Attention
from reverie.models.unet import UNET_PRESETS, UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")

TINY = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
SD1_STYLE = UNetConfig(**TINY, attention_head_dim=2)  # 1x1-conv proj_in, one head count for every block
SD2_STYLE = UNetConfig(**{**TINY, "block_out_channels": (16, 32, 32), "layers_per_block": 2,  # linear proj_in,
                          "down_block_types": ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),  # per-block heads
                          "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2},
                       attention_head_dim=(1, 2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2, 1))


@functools.lru_cache(maxsize=None)
def pair(config: UNetConfig, seed: int = 0):
    """diffusers' model with every parameter randomised (norm weights and biases included), and reverie's
    UNet holding the same state dict, loaded strictly. Cached: callers must not change the models."""
    ref = diffusers.UNet2DConditionModel.from_config(config.to_dict()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    net = UNet(config).eval()
    net.load_state_dict(ref.state_dict(), strict=True)
    return ref, net


def inputs(config: UNetConfig, batch: int = 3, size: tuple[int, int] = (8, 8), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, *size, generator=g)
    context = torch.randn(batch, 7, config.encoder_hid_dim or config.per_block("cross_attention_dim")[0], generator=g)
    t = torch.tensor([999.0, 500.25, 1.5, 0.0][:batch])
    return x, t, context


@pytest.mark.parametrize("config", [SD1_STYLE, SD2_STYLE], ids=["sd1_style", "sd2_style"])
def test_matches_diffusers(config):
    ref, net = pair(config)
    x, t, context = inputs(config)
    with torch.no_grad():
        expected = ref(x, t, context).sample
        out = net(x, t, context)
    assert out.shape == x.shape
    assert (out - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("timestep", [7, 631.75, torch.tensor(250), torch.tensor(250.5), torch.tensor([42.0])])
def test_scalar_timesteps_broadcast_like_diffusers(timestep):
    ref, net = pair(SD1_STYLE)
    x, _, context = inputs(SD1_STYLE, batch=2)
    with torch.no_grad():
        out = net(x, timestep, context)
        assert (out - ref(x, timestep, context).sample).abs().max() <= 1e-4
        batched = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(2)
        assert (out - net(x, batched, context)).abs().max() <= 1e-6


def test_odd_latent_size_matches_diffusers():
    ref, net = pair(SD1_STYLE)
    x, t, context = inputs(SD1_STYLE, batch=2, size=(13, 11))
    with torch.no_grad():
        out = net(x, t, context)
        assert out.shape == x.shape
        assert (out - ref(x, t, context).sample).abs().max() <= 1e-4


@pytest.mark.parametrize("change", [dict(mid_block_type=None), dict(mid_block_type="UNetMidBlock2D"),
                                    dict(only_cross_attention=(True, False)), dict(center_input_sample=True),
                                    dict(num_attention_heads=4, attention_head_dim=99)])
def test_config_variants_match_diffusers(change):
    config = dataclasses.replace(SD1_STYLE, **change)
    ref, net = pair(config)
    x, t, context = inputs(config, batch=2)
    with torch.no_grad():
        assert (net(x, t, context) - ref(x, t, context).sample).abs().max() <= 1e-4


def test_text_projection_matches_diffusers():
    """encoder_hid_dim: a Linear from another text encoder's width (a sentence encoder's 40 here) to the
    cross-attention width, diffusers' "text_proj"; the config round-trips through diffusers."""
    config = dataclasses.replace(SD1_STYLE, encoder_hid_dim=40)
    assert config.encoder_hid_dim_type == "text_proj"
    ref, net = pair(config)
    assert tuple(net.encoder_hid_proj.weight.shape) == (24, 40)
    x, t, context = inputs(config, batch=2)
    with torch.no_grad():
        assert (net(x, t, context) - ref(x, t, context).sample).abs().max() <= 1e-4
    assert UNetConfig.from_dict(dict(ref.config)) == config
    with pytest.raises(ValueError, match="encoder_hid_dim_type"):
        dataclasses.replace(SD1_STYLE, encoder_hid_dim=40, encoder_hid_dim_type="image_proj")
    with pytest.raises(ValueError, match="encoder_hid_dim"):
        dataclasses.replace(SD1_STYLE, encoder_hid_dim_type="text_proj")


def test_inpainting_layout_matches_diffusers():
    config = dataclasses.replace(SD1_STYLE, in_channels=9)
    ref, net = pair(config)
    x, t, context = inputs(config, batch=2)
    assert net.conv_in.weight.shape[1] == 9
    with torch.no_grad():
        out = net(x, t, context)
        assert out.shape == (2, 4, 8, 8)
        assert (out - ref(x, t, context).sample).abs().max() <= 1e-4


@pytest.mark.parametrize("config", [SD1_STYLE, SD2_STYLE, dataclasses.replace(SD1_STYLE, num_attention_heads=4)],
                         ids=["sd1_style", "sd2_style", "num_attention_heads"])
def test_config_round_trip(config):
    with torch.device("meta"):
        net = UNet(config)
        ref = diffusers.UNet2DConditionModel.from_config(net.to_config())
    assert net.to_config()["_class_name"] == "UNet2DConditionModel"
    assert set(net.state_dict()) == set(ref.state_dict())
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in ref.parameters())
    # diffusers' full config (every key, "_" metadata) reads back as the same network
    back = UNetConfig.from_dict(dict(ref.config))
    assert back.per_block("heads") == config.per_block("heads")
    if config.num_attention_heads is None:
        assert back == config


def test_additional_residuals_match_diffusers():
    ref, net = pair(SD1_STYLE)
    x, t, context = inputs(SD1_STYLE, batch=2)
    g = torch.Generator().manual_seed(3)
    shapes = [(2, 16, 8, 8)] * 2 + [(2, 16, 4, 4), (2, 32, 4, 4)]  # conv_in, resnet, downsample, resnet
    down = [torch.randn(s, generator=g) for s in shapes]
    mid = torch.randn(2, 32, 4, 4, generator=g)
    with torch.no_grad():
        out = net(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        expected = ref(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        assert (out - expected).abs().max() <= 1e-4
        assert (out - net(x, t, context)).abs().max() > 1e-2  # the residuals are not ignored
        with pytest.raises(ValueError, match="down_block_additional_residuals"):
            net(x, t, context, down_block_additional_residuals=down[:-1], mid_block_additional_residual=mid)


def test_attention_slicing_and_upcast_change_nothing_in_fp32():
    ref, net = pair.__wrapped__(SD2_STYLE)  # not the cached pair: this test changes the models
    x, t, context = inputs(SD2_STYLE, batch=2)
    with torch.no_grad():
        plain = net(x, t, context)
        for size in (1, 3):
            net.set_attention_slice(size)
            assert all(m.slice_size == size for m in net.modules() if isinstance(m, Attention))
            assert (net(x, t, context) - plain).abs().max() <= 1e-5
        net.set_attention_slice(None)
        ref.set_attention_slice(1)  # diffusers' sliced processor agrees too
        assert (ref(x, t, context).sample - plain).abs().max() <= 1e-5

    upcast = UNet(dataclasses.replace(SD2_STYLE, upcast_attention=True)).eval()
    upcast.load_state_dict(net.state_dict())
    attentions = [m for m in upcast.modules() if isinstance(m, Attention)]
    assert attentions and all(m.upcast for m in attentions)
    assert not any(m.upcast for m in net.modules() if isinstance(m, Attention))
    with torch.no_grad():
        assert (upcast(x, t, context) - plain).abs().max() <= 1e-5
        # bfloat16 end to end (timestep embedding cast to the sample dtype), close to the fp32 result
        low = upcast.to(torch.bfloat16)(x.bfloat16(), t, context.bfloat16())
    assert low.dtype == torch.bfloat16
    assert (low.float() - plain).abs().max() <= 0.1 * plain.abs().max()


def test_presets_match_diffusers_parameter_counts():
    with torch.device("meta"):
        counts = {}
        for name in ("sd15", "sd21", "small", "tiny"):
            net = UNet(UNET_PRESETS[name])
            ref = diffusers.UNet2DConditionModel.from_config(UNET_PRESETS[name].to_dict())
            counts[name] = sum(p.numel() for p in net.parameters())
            assert counts[name] == sum(p.numel() for p in ref.parameters()), name
            assert set(net.state_dict()) == set(ref.state_dict()), name
    assert counts["sd15"] == 859_520_964
    assert counts["tiny"] < 500_000 and 1_000_000 < counts["small"] < 10_000_000
    assert UNET_PRESETS["sd21"].per_block("heads") == (5, 10, 20, 20)
    assert UNET_PRESETS["sd21"].use_linear_projection and UNET_PRESETS["sd21"].cross_attention_dim == 1024


@pytest.mark.parametrize("key, value", [
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"]), ("up_block_types", ["UpBlock2D", "KUpBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("class_embed_type", "timestep"),
    ("addition_embed_type", "text_time"), ("resnet_time_scale_shift", "scale_shift"),
    ("time_embedding_type", "fourier"), ("dual_cross_attention", True), ("act_fn", "gelu"),
    ("layers_per_block", [1, 1, 1]), ("attention_head_dim", [2, 2, 2]), ("norm_num_groups", 5),
    ("transformer_layers_per_block", [[1, 2], [1, 2]]), ("conv_in_kernel", 2), ("some_new_feature", 3),
])
def test_bad_config_names_the_field(key, value):
    config = {**SD1_STYLE.to_dict(), key: value}
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_dict(config)


def test_unknown_keys_that_are_off_are_ignored():
    config = {**SD1_STYLE.to_dict(), "_diffusers_version": "0.6.0", "some_new_feature": None,
              "class_embed_type": None, "mid_block_only_cross_attention": True}
    assert UNetConfig.from_dict(config) == SD1_STYLE


def test_bad_inputs_raise():
    net = UNet(SD1_STYLE)
    x, t, context = inputs(SD1_STYLE)
    with pytest.raises(ValueError, match="timestep"):
        net(x, t[:2], context)
    with pytest.raises(ValueError, match="in_channels"):
        net(x[:, :3], t, context)


def test_small_convolutions_take_the_unfold_path_and_equal_the_convolution():
    """reverie.models.layers.conv2d: at or below SMALL_CONV_PIXELS output pixels a plain float32 conv runs as
    unfold + matmul, equal to F.conv2d up to rounding, for 3x3 and 1x1 kernels, stride 1 and 2, odd sizes; above
    the bound, and for other layers (circular padding), it is the layer itself."""
    from reverie.models.layers import SMALL_CONV_PIXELS, conv2d

    torch.manual_seed(0)
    for kernel, stride, padding, size in ((3, 1, 1, (7, 5)), (3, 2, 1, (9, 8)), (1, 1, 0, (4, 6)), (3, 2, 0, (8, 8))):
        layer = torch.nn.Conv2d(6, 5, kernel, stride=stride, padding=padding)
        x = torch.randn(2, 6, *size)
        with torch.no_grad():
            torch.testing.assert_close(conv2d(layer, x), layer(x), rtol=0, atol=1e-5)
    big = torch.nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 32, 32)  # 1024 output pixels > SMALL_CONV_PIXELS: the layer's own kernel, to the bit
    assert 32 * 32 > SMALL_CONV_PIXELS
    with torch.no_grad():
        assert torch.equal(conv2d(big, x), big(x))
        big.padding_mode = "circular"
        small = torch.randn(1, 4, 4, 4)
        assert torch.equal(conv2d(big, small), big(small))
