"""reverie's UNet with SDXL's features (text_time added embedding, per-block transformer depth, linear
projections, per-block heads) equals diffusers' UNet2DConditionModel on the tiny SDXL test configs."""

import pytest
import torch

from reverie.models.unet import UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")

# diffusers' tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py (base): 6 time ids * 8 + pooled 32
BASE = UNetConfig(block_out_channels=(2, 4), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                  transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                  cross_attention_dim=64, norm_num_groups=1)
# test_stable_diffusion_xl_img2img.py (refiner style): 5 time ids (aesthetic score) * 8 + pooled 32
REFINER = UNetConfig(block_out_channels=(32, 64), layers_per_block=2, sample_size=32,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                     use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                     transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=72,
                     cross_attention_dim=32)
CONFIGS = {"base": (BASE, 6), "refiner": (REFINER, 5)}


def pair(config: UNetConfig, seed: int = 0):
    """diffusers' model with every parameter moved off its init, and reverie's UNet loaded strictly from it."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel.from_config(config.to_dict()).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    net = UNet(config).eval()
    net.load_state_dict(ref.state_dict(), strict=True)
    return ref, net


def inputs(config: UNetConfig, n_ids: int, size: tuple[int, int], batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, *size, generator=g)
    context = torch.randn(batch, 7, config.cross_attention_dim, generator=g)
    pooled = config.projection_class_embeddings_input_dim - n_ids * config.addition_time_embed_dim
    text_embeds = torch.randn(batch, pooled, generator=g)
    ids = [[1024.0, 768.0, 0.0, 16.0, 1024.0, 768.0], [512.0, 640.0, 32.0, 0.0, 896.0, 1152.0]]
    if n_ids == 5:  # original size, crop top-left, aesthetic score
        ids = [[1024.0, 768.0, 0.0, 16.0, 6.0], [512.0, 640.0, 32.0, 0.0, 2.5]]
    t = torch.tensor([999.0, 261.5])
    return x, t, context, text_embeds, torch.tensor(ids[:batch])


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request):
    config, n_ids = CONFIGS[request.param]
    return (config, n_ids, *pair(config))


@pytest.mark.parametrize("size", [(8, 8), (16, 8), (7, 10)], ids=["square", "non_square", "odd"])
def test_matches_diffusers(models, size):
    config, n_ids, ref, net = models
    x, t, context, text_embeds, time_ids = inputs(config, n_ids, size)
    with torch.no_grad():
        expected = ref(x, t, context, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        out = net(x, t, context, text_embeds=text_embeds, time_ids=time_ids)
    assert out.shape == x.shape
    assert (out - expected).abs().max() <= 1e-5
    # the added embedding matters: other time ids change the output
    with torch.no_grad():
        other = net(x, t, context, text_embeds=text_embeds, time_ids=time_ids.flip(0))
    assert (other - out).abs().max() > 1e-3


def test_batch_equals_singles(models):
    config, n_ids, _, net = models
    x, t, context, text_embeds, time_ids = inputs(config, n_ids, (8, 8))
    with torch.no_grad():
        out = net(x, t, context, text_embeds=text_embeds, time_ids=time_ids)
        for i in range(2):
            one = net(x[i:i + 1], t[i:i + 1], context[i:i + 1], text_embeds=text_embeds[i:i + 1],
                      time_ids=time_ids[i:i + 1])
            assert (one - out[i:i + 1]).abs().max() <= 1e-5


def test_controlnet_residuals_with_text_time_match_diffusers():
    ref, net = pair(BASE)
    x, t, context, text_embeds, time_ids = inputs(BASE, 6, (8, 8))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        skips = [net.conv_in(x)]
        temb = torch.zeros(2, 8)
        h = skips[0]
        for block in net.down_blocks:
            h, s = block(h, temb, context)
            skips += s
        down = [torch.randn(s.shape, generator=g) for s in skips]
        mid = torch.randn(h.shape, generator=g)
        expected = ref(x, t, context, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                       down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        out = net(x, t, context, text_embeds=text_embeds, time_ids=time_ids,
                  down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert (out - expected).abs().max() <= 1e-5


def test_mid_block_uses_the_last_transformer_depth():
    net = UNet(BASE)
    assert [len(a.transformer_blocks) for a in net.down_blocks[1].attentions] == [2, 2]
    assert len(net.mid_block.attentions[0].transformer_blocks) == 2
    assert [len(a.transformer_blocks) for a in net.up_blocks[0].attentions] == [2, 2, 2]
    assert net.add_embedding.linear_1.in_features == 80


@pytest.mark.parametrize("config", [BASE, REFINER], ids=["base", "refiner"])
def test_config_round_trip(config):
    with torch.device("meta"):
        net = UNet(config)
        ref = diffusers.UNet2DConditionModel.from_config(net.to_config())
    assert ref.config.addition_embed_type == "text_time"
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert UNetConfig.from_dict(dict(ref.config)) == config


def test_missing_added_inputs_name_them():
    net = UNet(BASE)
    x, t, context, text_embeds, time_ids = inputs(BASE, 6, (8, 8))
    with pytest.raises(ValueError, match="text_embeds, time_ids"):
        net(x, t, context)
    with pytest.raises(ValueError, match="missing: time_ids"):
        net(x, t, context, text_embeds=text_embeds)
    with pytest.raises(ValueError, match="missing: text_embeds"):
        net(x, t, context, time_ids=time_ids)
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        net(x, t, context, text_embeds=text_embeds, time_ids=time_ids[:, :5])
    with pytest.raises(ValueError, match="B=2"):
        net(x, t, context, text_embeds=text_embeds[:1], time_ids=time_ids)
    plain = UNet(UNetConfig(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=1,
                            cross_attention_dim=64, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2))
    with pytest.raises(ValueError, match="addition_embed_type"):
        plain(x, t, context, text_embeds=text_embeds, time_ids=time_ids)


@pytest.mark.parametrize("change, field", [
    (dict(addition_time_embed_dim=None), "addition_time_embed_dim"),
    (dict(projection_class_embeddings_input_dim=0), "projection_class_embeddings_input_dim"),
    (dict(addition_embed_type="text"), "addition_embed_type"),
    (dict(addition_embed_type=None), "addition_time_embed_dim"),
    (dict(transformer_layers_per_block=((1, 2), (1, 2))), "transformer_layers_per_block"),
])
def test_bad_addition_config_names_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        UNetConfig.from_dict({**BASE.to_dict(), **change})


def test_bfloat16_matches_diffusers_with_float32_time_ids():
    ref, net = pair(REFINER)
    ref, net = ref.to(torch.bfloat16), net.to(torch.bfloat16)
    x, t, context, text_embeds, time_ids = inputs(REFINER, 5, (8, 8))
    x, context, text_embeds = x.bfloat16(), context.bfloat16(), text_embeds.bfloat16()
    with torch.no_grad():
        expected = ref(x, t, context, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
        out = net(x, t, context, text_embeds=text_embeds, time_ids=time_ids)
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected.float()).abs().max() <= 1e-2


@pytest.mark.parametrize("name", list(CONFIGS))
def test_single_file_round_trip(name):
    """diffusers names -> SGM/LDM single-file names (label_emb for the added embedding) -> back, read by
    diffusers' own converter, and a UNet built from the inferred config gives the same output."""
    from reverie.formats import infer_sd_configs, split_ldm_checkpoint, to_ldm_checkpoint
    su = pytest.importorskip("diffusers.loaders.single_file_utils")
    config, n_ids = CONFIGS[name]
    ref, net = pair(config)
    state = net.state_dict()
    ldm = to_ldm_checkpoint({"unet": state})
    assert "model.diffusion_model.label_emb.0.2.bias" in ldm and len(ldm) == len(state)
    back = split_ldm_checkpoint(ldm)["unet"]
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    theirs = su.convert_ldm_unet_checkpoint(ldm, dict(ref.config))
    assert theirs.keys() == state.keys() and all(torch.equal(theirs[k], state[k]) for k in state)

    # shapes give the added embedding's input width; head counts, groups and the sinusoid width are conventions
    given = dict(attention_head_dim=list(config.attention_head_dim), norm_num_groups=config.norm_num_groups,
                 addition_time_embed_dim=8)
    inferred = infer_sd_configs(ldm, overrides={"unet": given})["unet"]
    assert inferred["addition_embed_type"] == "text_time"
    assert inferred["projection_class_embeddings_input_dim"] == config.projection_class_embeddings_input_dim
    rebuilt = UNet.from_config(inferred).eval()
    rebuilt.load_state_dict(back, strict=True)
    x, t, context, text_embeds, time_ids = inputs(config, n_ids, (8, 16))
    with torch.no_grad():
        assert torch.equal(rebuilt(x, t, context, text_embeds=text_embeds, time_ids=time_ids),
                           net(x, t, context, text_embeds=text_embeds, time_ids=time_ids))


def test_single_file_sdxl_base_depths_and_conventions():
    """The real SDXL base layout ([1, 2, 10] transformer depths, mid 10) read from shapes, at tiny widths."""
    from reverie.formats import infer_sd_configs, to_ldm_checkpoint
    config = UNetConfig(block_out_channels=(64, 128, 192), layers_per_block=1, norm_num_groups=8,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                        attention_head_dim=(1, 2, 3), use_linear_projection=True, cross_attention_dim=2048,
                        transformer_layers_per_block=(1, 2, 3), addition_embed_type="text_time",
                        addition_time_embed_dim=256, projection_class_embeddings_input_dim=6 * 256 + 32)
    with torch.device("meta"):
        ldm = to_ldm_checkpoint({"unet": UNet(config).state_dict()})
    inferred = infer_sd_configs(ldm, overrides={"unet": {"norm_num_groups": 8}})["unet"]
    assert UNetConfig.from_dict(inferred) == UNetConfig(**{**config.__dict__, "sample_size": 128})
