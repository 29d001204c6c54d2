"""SDXL ControlNet: the model (text_time added embedding) equals diffusers' ControlNetModel, from_unet copies an SDXL
UNet as diffusers' does, and reverie's pipeline with a ControlNet equals diffusers' StableDiffusionXLControlNetPipeline
on the tiny model of diffusers' test_controlnet_sdxl.py (mean absolute pixel difference <= 0.02 on 0..255).
diffusers is a test-only oracle."""

import numpy as np
import pytest
import torch
from PIL import Image

from reverie import Pipeline
from reverie.loading import load_controlnet
from reverie.models.controlnet import ControlNet, ControlNetConfig
from reverie.models.unet import UNet

from tiny_families import CLIP_CONFIG, clip_tokenizer, pixels

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

# diffusers' test_controlnet_sdxl.py get_dummy_components: the UNet's and the ControlNet's shared fields
SDXL_LAYOUT = dict(block_out_channels=(32, 64), layers_per_block=2, in_channels=4,
                   down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), attention_head_dim=(2, 4),
                   use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                   transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
                   cross_attention_dim=64)


def randomize(module, seed, std=0.05):
    """Perturb every parameter (the zero convs included, so the residuals are not zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return module


def tiny_unet():
    return diffusers.UNet2DConditionModel(sample_size=32, out_channels=4, up_block_types=("CrossAttnUpBlock2D",
                                                                                          "UpBlock2D"), **SDXL_LAYOUT)


def tiny_controlnet():
    return diffusers.ControlNetModel(conditioning_embedding_out_channels=(16, 32), **SDXL_LAYOUT)


# ------------------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("size", [(8, 8), (6, 10)])
@pytest.mark.parametrize("guess_mode", [False, True])
def test_sdxl_controlnet_matches_diffusers(size, guess_mode):
    torch.manual_seed(0)
    ref = randomize(tiny_controlnet(), seed=1).eval()
    ours = ControlNet.from_config(dict(ref.config))
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names, same shapes: no key map
    assert ours.add_embedding is not None
    g = torch.Generator().manual_seed(2)
    h, w = size
    x, context = torch.randn(2, 4, h, w, generator=g), torch.randn(2, 7, 64, generator=g)
    image = torch.rand(2, 3, 2 * h, 2 * w, generator=g)
    pooled = torch.randn(2, 32, generator=g)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [128, 96, 4, 8, 64, 48]])
    t = torch.tensor([999.0, 10.5])
    with torch.no_grad():
        down, mid = ours(x, t, context, image, conditioning_scale=0.7, guess_mode=guess_mode, text_embeds=pooled,
                         time_ids=ids)
        ref_down, ref_mid = ref(x, t, context, image, conditioning_scale=0.7, guess_mode=guess_mode,
                                added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}, return_dict=False)
        _, other_mid = ours(x, t, context, image, text_embeds=pooled, time_ids=ids.flip(0))
    assert len(down) == len(ref_down) == 6  # conv_in, 2 resnets, downsample, 2 resnets
    for a, b in zip([*down, mid], [*ref_down, ref_mid]):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5
    assert mid.abs().max() > 1e-3  # the comparison means something
    assert (other_mid - mid / 0.7).abs().max() > 1e-4  # the time ids matter (mid's scale is 0.7 in guess mode too)
    assert ControlNetConfig.from_dict(dict(ref.config)) == ours.config
    assert ControlNetConfig.from_dict(ours.to_config()) == ours.config


def test_sdxl_controlnet_needs_and_refuses_added_conditioning():
    net = ControlNet.from_config(dict(tiny_controlnet().config))
    x, context, image = torch.randn(1, 4, 8, 8), torch.randn(1, 7, 64), torch.rand(1, 3, 16, 16)
    with pytest.raises(ValueError, match="text_embeds"):
        net(x, 10, context, image)
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        net(x, 10, context, image, text_embeds=torch.randn(1, 32), time_ids=torch.zeros(1, 5))
    sd = ControlNet(ControlNetConfig(block_out_channels=(32, 64), down_block_types=("DownBlock2D",) * 2,
                                     conditioning_embedding_out_channels=(16, 32)))
    with pytest.raises(ValueError, match="addition_embed_type"):
        sd(x, 10, torch.randn(1, 7, 1280), image, text_embeds=torch.randn(1, 32), time_ids=torch.zeros(1, 6))
    with pytest.raises(ValueError, match="addition_time_embed_dim"):
        ControlNetConfig(addition_embed_type="text_time", projection_class_embeddings_input_dim=80)


def test_from_sdxl_unet_copies_the_encoder_as_diffusers_does():
    torch.manual_seed(0)
    ref_unet = randomize(tiny_unet(), seed=3)
    unet = UNet.from_config(dict(ref_unet.config))
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    ours = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    ref = diffusers.ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=(16, 32))
    assert ControlNetConfig.from_dict(dict(ref.config)) == ours.config
    theirs = ref.state_dict()
    assert set(ours.state_dict()) == set(theirs)
    copied = [k for k in theirs if k.split(".")[0] in ("conv_in", "time_embedding", "add_embedding", "down_blocks",
                                                       "mid_block")]
    assert any(k.startswith("add_embedding") for k in copied)
    assert all(torch.equal(ours.state_dict()[k], theirs[k]) for k in copied)
    down, mid = ours(torch.randn(1, 4, 8, 8), 500, torch.randn(1, 7, 64), torch.rand(1, 3, 16, 16),
                     text_embeds=torch.randn(1, 32), time_ids=torch.zeros(1, 6))
    assert all(torch.equal(d, torch.zeros_like(d)) for d in [*down, mid])  # zero convs: no change yet


# ------------------------------------------------------------------------------------------------ the pipeline


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """diffusers' tiny StableDiffusionXLControlNetPipeline as get_dummy_components builds it (seed 0 -> UNet, seed 0
    -> ControlNet, Euler, seed 0 -> VAE, seed 0 -> CLIPTextModel and CLIPTextModelWithProjection back to back;
    reverie's offline tiny CLIP tokenizers, tokenizer_2 padding with "!" as tests/tiny_families.sdxl_folder), the
    ControlNet perturbed so its residuals are not zero; reverie's pipeline and ControlNet read from the folders
    diffusers saved."""
    tmp = tmp_path_factory.mktemp("sdxl_controlnet")
    torch.manual_seed(0)
    unet = tiny_unet()
    torch.manual_seed(0)
    controlnet = randomize(tiny_controlnet(), seed=10, std=0.1)
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                                 beta_schedule="scaled_linear", timestep_spacing="leading")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                                  down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                                  up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4)
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(**CLIP_CONFIG)
    text_encoder = transformers.CLIPTextModel(config)
    text_encoder_2 = transformers.CLIPTextModelWithProjection(config)
    parts = dict(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
                 text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(pad_token="!"))
    diffusers.StableDiffusionXLPipeline(**parts).save_pretrained(tmp / "sdxl", safe_serialization=True)
    controlnet.save_pretrained(tmp / "cn")
    theirs = diffusers.StableDiffusionXLControlNetPipeline(**parts, controlnet=controlnet)
    theirs.set_progress_bar_config(disable=True)
    return theirs, Pipeline.from_pretrained(tmp / "sdxl"), load_controlnet(tmp / "cn")


def control_image(size=(64, 64), seed=3):
    """A blocky random RGB image (a control image's kind of structure)."""
    g = np.random.default_rng(seed)
    w, h = size
    return Image.fromarray(g.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h), Image.NEAREST)



PROMPT = "A painting of a squirrel eating a burger"
CASES = {  # our kwargs; diffusers takes the same ones
    "no_negative": dict(),
    "negative": dict(negative_prompt="bad quality", controlnet_conditioning_scale=0.7),
    "guess_mode": dict(guess_mode=True, control_guidance_end=0.75),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_images_as_diffusers_sdxl_controlnet_pipeline(pipes, case):
    theirs, ours, net = pipes
    kwargs = CASES[case]
    image = control_image((64, 48) if case == "negative" else (64, 64))  # (width, height): one non-square
    out = theirs(PROMPT, image=image, num_inference_steps=4, guidance_scale=6.0, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(0), **kwargs)
    expected = (out.images * 255).round()
    result = ours(PROMPT, controlnet=net, control_image=image, steps=4, guidance_scale=6.0, seed=0, progress=False,
                  **kwargs)
    a = pixels(result.images)
    assert a.shape == expected.shape == (1, image.height, image.width, 3)
    diff = np.abs(a - expected).mean()
    assert diff <= 0.02, f"mean abs pixel difference {diff:.4f} > 0.02"
    assert a.std() > 1
    plain = pixels(ours(PROMPT, steps=4, guidance_scale=6.0, seed=0, progress=False, width=image.width,
                        height=image.height, negative_prompt=kwargs.get("negative_prompt")).images)
    assert np.abs(a - plain).mean() > 1  # the ControlNet changes the image: the comparison means something
    assert result.params["controlnet"] == ["controlnet"]


def test_sd_controlnet_refused_by_an_sdxl_pipeline(pipes):
    _, ours, _ = pipes
    layout = {k: v for k, v in SDXL_LAYOUT.items() if "addition" not in k and "projection" not in k}
    sd = ControlNet(ControlNetConfig(conditioning_embedding_out_channels=(16, 32), **layout))  # no text_time
    with pytest.raises(ValueError, match="addition_embed_type"):
        ours(PROMPT, controlnet=sd, control_image=control_image(), steps=1, progress=False)
