"""ControlNet: the model equals diffusers' ControlNetModel; an untrained one changes nothing, bit for bit; the
pipeline equals diffusers' StableDiffusionControlNetPipeline (single and multi-ControlNet, conditioning scale,
guidance start/end, guess mode, control image resizing); preprocessors; the training task learns.
diffusers is a test-only oracle."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from reverie import Pipeline
from reverie.control import (CONTROL_TYPES, SEGMENT_PALETTE, Control, ControlledUNet, canny, control_tensor, dataset_control,
                             preprocess, segmentation, shape_masks, shapes_segmentation)
from reverie.data.shapes import ShapesDataset, render
from reverie.loading import load_controlnet, save_controlnet
from reverie.models.controlnet import ControlNet, ControlNetConfig
from reverie.models.unet import UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TINY = UNetConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)


def randomize(module, seed, std=0.05):
    """Perturb every parameter (the zero convs included, so the residuals are not zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return module


def control_images(n, size=32, seed=0):
    """Blocky random RGB images (a control image's kind of structure)."""
    g = np.random.default_rng(seed)
    return [Image.fromarray(g.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)).resize((size, size),
                                                                                                  Image.NEAREST)
            for _ in range(n)]


# ------------------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("config", [
    dict(),
    dict(controlnet_conditioning_channel_order="bgr", use_linear_projection=True, attention_head_dim=(1, 2)),
    dict(global_pool_conditions=True, mid_block_type="UNetMidBlock2D", transformer_layers_per_block=(1, 2)),
], ids=["default", "bgr_linear", "global_pool"])
@pytest.mark.parametrize("guess_mode", [False, True])
def test_model_matches_diffusers(config, guess_mode):
    ours = ControlNet(ControlNetConfig.from_unet(TINY, conditioning_embedding_out_channels=(8, 16), **config))
    ref = randomize(diffusers.ControlNetModel.from_config(ours.to_config()), seed=1).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # same names, same shapes: no key map
    g = torch.Generator().manual_seed(2)
    x, context, image = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 24, generator=g), torch.rand(2, 3, 16, 16)
    t = torch.tensor([999.0, 10.5])
    with torch.no_grad():
        down, mid = ours(x, t, context, image, conditioning_scale=0.7, guess_mode=guess_mode)
        ref_down, ref_mid = ref(x, t, context, image, conditioning_scale=0.7, guess_mode=guess_mode, return_dict=False)
    assert len(down) == len(ref_down) == 4  # conv_in, resnet, downsample, resnet
    for a, b in zip([*down, mid], [*ref_down, ref_mid]):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-5
    assert mid.abs().max() > 1e-3  # the comparison means something
    assert ControlNetConfig.from_dict(dict(ref.config)) == ours.config


def test_from_unet_copies_the_encoder_as_diffusers_does():
    unet = randomize(UNet(TINY), seed=3)
    ref_unet = diffusers.UNet2DConditionModel.from_config(TINY.to_dict())
    ref_unet.load_state_dict(unet.state_dict())
    ours = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    ref = diffusers.ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=(8, 16))
    assert ControlNetConfig.from_dict(dict(ref.config)) == ours.config
    theirs = ref.state_dict()
    copied = [k for k in theirs if k.split(".")[0] in ("conv_in", "time_embedding", "down_blocks", "mid_block")]
    assert copied and all(torch.equal(ours.state_dict()[k], theirs[k]) for k in copied)
    zero = [k for k in theirs if k.startswith(("controlnet_down_blocks", "controlnet_mid_block",
                                                "controlnet_cond_embedding.conv_out"))]
    assert zero and all(ours.state_dict()[k].abs().max() == 0 for k in zero)


def test_untrained_controlnet_outputs_zero_residuals():
    unet = randomize(UNet(TINY), seed=3)
    net = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    down, mid = net(torch.randn(2, 4, 8, 8), torch.tensor([500.0, 3.0]), torch.randn(2, 7, 24), torch.rand(2, 3, 16, 16))
    assert all(torch.equal(d, torch.zeros_like(d)) for d in [*down, mid])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="controlnet_conditioning_channel_order"):
        ControlNetConfig(controlnet_conditioning_channel_order="rbg")
    with pytest.raises(ValueError, match="class_embed_type"):
        ControlNetConfig.from_dict({"class_embed_type": "timestep"})
    net = ControlNet(ControlNetConfig.from_unet(TINY, conditioning_embedding_out_channels=(8, 16)))
    with pytest.raises(ValueError, match=r"controlnet_cond must be \(1, 3, 16, 16\)"):
        net(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 7, 24), torch.rand(1, 3, 8, 8))


def test_save_and_load_round_trip_with_diffusers(tmp_path):
    ours = randomize(ControlNet(ControlNetConfig.from_unet(TINY, conditioning_embedding_out_channels=(8, 16))), 4)
    save_controlnet(ours, tmp_path / "cn")
    theirs = diffusers.ControlNetModel.from_pretrained(tmp_path / "cn")
    assert all(torch.equal(theirs.state_dict()[k], v) for k, v in ours.state_dict().items())
    theirs.save_pretrained(tmp_path / "back")
    again = load_controlnet(tmp_path / "back")
    assert again.config == ours.config
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())
    with pytest.raises(ValueError, match="not a ControlNet folder"):
        load_controlnet(tmp_path)


# ------------------------------------------------------------------------------------------------ the pipeline


CORPUS = ["a red circle above a blue square", "a small green triangle on the left", "a photo of a cat"] * 30


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """diffusers' tiny SD pipeline (VAE factor 2) with two random ControlNets, and reverie's, read from the
    folders diffusers saved."""
    from reverie.models.text import train_bpe_tokenizer

    tmp = tmp_path_factory.mktemp("controlnet")
    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer(CORPUS, 600, tmp / "bpe")
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=32,
        block_out_channels=(32, 64), attention_head_dim=4, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    with torch.no_grad():
        unet.conv_out.weight.mul_(3)  # eps of about unit scale
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                                  layers_per_block=1, norm_num_groups=16, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
                                        set_alpha_to_one=False)
    sd = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                           scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    sd.save_pretrained(tmp / "sd", safe_serialization=True)
    controlnets = []
    for i in range(2):
        cn = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
        randomize(cn, seed=10 + i, std=0.1)
        cn.save_pretrained(tmp / f"cn{i}")
        controlnets.append(diffusers.ControlNetModel.from_pretrained(tmp / f"cn{i}"))
    sd = diffusers.StableDiffusionPipeline.from_pretrained(tmp / "sd", safety_checker=None)
    theirs = {}
    for key, nets in (("one", controlnets[0]), ("two", controlnets)):
        theirs[key] = diffusers.StableDiffusionControlNetPipeline(**sd.components, controlnet=nets)
        theirs[key].set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(tmp / "sd")
    return theirs, ours, [load_controlnet(tmp / f"cn{i}") for i in range(2)], tmp


SCHEDULERS = {"ddim": ("DDIMScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
              "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})}


def theirs_images(pipe, sampler, prompt, images, seed=7, steps=8, **kwargs):
    cls, flags = SCHEDULERS[sampler]
    config = {k: v for k, v in pipe.scheduler.config.items() if k != "use_karras_sigmas"}
    pipe.scheduler = getattr(diffusers, cls).from_config(config, **flags)
    out = pipe(prompt, image=images, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed),
               output_type="np", **kwargs)
    return (out.images * 255).round()


def our_images(pipe, sampler, prompt, seed=7, steps=8, **kwargs):
    result = pipe(prompt, steps=steps, sampler=sampler, seed=seed, progress=False, **kwargs)
    return np.stack([np.asarray(im, dtype=np.float64) for im in result.images]), result


CASES = {  # (sampler, our kwargs, diffusers kwargs); the control images are filled in by the test
    "one": ("ddim", dict(controlnet_conditioning_scale=0.7), dict(controlnet_conditioning_scale=0.7)),
    "one_start_end": ("euler", dict(control_guidance_start=0.25, control_guidance_end=0.75),
                      dict(control_guidance_start=0.25, control_guidance_end=0.75)),
    "one_guess_mode": ("DPM++ 2M Karras", dict(guess_mode=True, guidance_scale=5.0),
                       dict(guess_mode=True, guidance_scale=5.0)),
    "one_no_cfg": ("ddim", dict(guidance_scale=1.0), dict(guidance_scale=1.0)),
    "two": ("ddim", dict(controlnet_conditioning_scale=[0.6, 1.3], control_guidance_start=[0.0, 0.5],
                         control_guidance_end=[0.5, 1.0]),
            dict(controlnet_conditioning_scale=[0.6, 1.3], control_guidance_start=[0.0, 0.5],
                 control_guidance_end=[0.5, 1.0])),
    "two_euler": ("euler", dict(controlnet_conditioning_scale=0.9), dict(controlnet_conditioning_scale=0.9)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_images_as_diffusers_controlnet_pipeline(pipes, case):
    theirs, ours, nets, _ = pipes
    sampler, mine, their_kwargs = CASES[case]
    prompt = "a red circle above a blue square"
    two = case.startswith("two")
    images = control_images(2, seed=3)
    image = images if two else images[0]
    b = theirs_images(theirs["two" if two else "one"], sampler, prompt, image, height=32, width=32, **their_kwargs)
    a, result = our_images(ours, sampler, prompt, controlnet=nets if two else nets[0], control_image=image,
                           height=32, width=32, **mine)
    assert a.shape == b.shape == (1, 32, 32, 3)
    assert np.abs(a - b).mean() <= 1.0
    plain, _ = our_images(ours, sampler, prompt, height=32, width=32, guidance_scale=mine.get("guidance_scale", 7.5))
    assert np.abs(a - plain).mean() > 3  # the ControlNets change the image: the comparison means something
    assert result.params["controlnet"] == ["controlnet"] * (2 if two else 1)


def test_batches_of_prompts_and_control_images_like_diffusers(pipes):
    theirs, ours, nets, _ = pipes
    prompts = ["a photo of a cat", "a small green triangle on the left"]
    images = control_images(2, seed=5)
    b = theirs_images(theirs["one"], "euler", prompts, images, num_images_per_prompt=2, height=32, width=32)
    a, _ = our_images(ours, "euler", prompts, controlnet=nets[0], control_image=images, num_images=2, height=32,
                      width=32)
    assert a.shape == b.shape == (4, 32, 32, 3)
    assert np.abs(a - b).mean() <= 1.0


def test_control_image_of_another_size_is_resized_like_diffusers(pipes):
    theirs, ours, nets, _ = pipes
    image = control_images(1, size=48, seed=6)[0].resize((48, 40))
    b = theirs_images(theirs["one"], "ddim", "a photo of a cat", image, height=32, width=32)
    a, _ = our_images(ours, "ddim", "a photo of a cat", controlnet=nets[0], control_image=image, height=32, width=32)
    assert np.abs(a - b).mean() <= 1.0
    # no size given: the control image's, rounded down to the VAE factor (diffusers' default)
    odd = image.resize((41, 24))
    b = theirs_images(theirs["one"], "ddim", "a photo of a cat", odd)
    a, result = our_images(ours, "ddim", "a photo of a cat", controlnet=nets[0], control_image=odd)
    assert a.shape == b.shape == (1, 24, 40, 3) and (result.params["width"], result.params["height"]) == (40, 24)
    assert np.abs(a - b).mean() <= 1.0


def test_untrained_controlnet_is_a_no_op_bit_for_bit(pipes):
    _, ours, _, _ = pipes
    fresh = ControlNet.from_unet(ours.unet, conditioning_embedding_out_channels=(8, 16))
    image = control_images(1, seed=8)[0]
    for sampler in ("ddim", "DPM++ 2M Karras"):
        plain = ours("a photo of a cat", steps=6, sampler=sampler, seed=3, width=32, height=32, progress=False)
        controlled = ours("a photo of a cat", steps=6, sampler=sampler, seed=3, controlnet=[fresh, fresh],
                          control_image=[image, image], progress=False)
        assert torch.equal(plain.latents, controlled.latents)
        assert np.array_equal(np.asarray(plain.images[0]), np.asarray(controlled.images[0]))


def test_controlnet_from_a_path_and_params(pipes):
    _, ours, nets, tmp = pipes
    image = control_images(1, seed=9)[0]
    a, result = our_images(ours, "ddim", "a photo of a cat", controlnet=str(tmp / "cn0"), control_image=image,
                           controlnet_conditioning_scale=0.5)
    b, _ = our_images(ours, "ddim", "a photo of a cat", controlnet=nets[0], control_image=image,
                      controlnet_conditioning_scale=0.5)
    assert np.array_equal(a, b)
    assert result.params["controlnet"] == [str(tmp / "cn0")]
    assert result.params["controlnet_conditioning_scale"] == [0.5]
    assert result.params["control_guidance_start"] == [0.0] and result.params["control_guidance_end"] == [1.0]


NET, IMAGE = object(), object()  # stand-ins for the fixture's ControlNet and a control image


@pytest.mark.parametrize("kwargs,field", [
    (dict(control_image=IMAGE), "controlnet"),
    (dict(controlnet=NET), "control_image"),
    (dict(controlnet=NET, control_image=IMAGE, control_guidance_start=0.6, control_guidance_end=0.5),
     "control_guidance_start"),
    (dict(controlnet=NET, control_image=IMAGE, control_guidance_end=1.5), "control_guidance"),
    (dict(controlnet=NET, control_image=IMAGE, controlnet_conditioning_scale=[1.0, 2.0]),
     "controlnet_conditioning_scale"),
    (dict(controlnet=NET, control_image=IMAGE, controlnet_conditioning_scale=float("nan")),
     "controlnet_conditioning_scale"),
    (dict(controlnet=[NET, NET], control_image=IMAGE), "control_image"),
    (dict(controlnet=NET, control_image=[IMAGE] * 3), "control_image"),
    (dict(controlnet=NET, control_image=torch.zeros(1, 3, 32, 32) - 1), "control_image"),
    (dict(controlnet=3, control_image=IMAGE), "controlnet"),
    (dict(controlnet="no/such/folder", control_image=IMAGE), "controlnet"),
])
def test_bad_control_arguments_raise_naming_the_field(pipes, kwargs, field):
    _, ours, nets, _ = pipes
    image = control_images(1)[0]

    def real(v):
        return [real(x) for x in v] if isinstance(v, list) else nets[0] if v is NET else image if v is IMAGE else v

    with pytest.raises(ValueError, match=field):
        ours(["a photo of a cat", "a cat"], steps=2, width=32, height=32, progress=False,
             **{k: real(v) for k, v in kwargs.items()})


def test_controlled_unet_runs_each_controlnet_only_on_its_steps():
    """Step i of n is controlled unless i / n < start or (i + 1) / n > end (diffusers' controlnet_keep)."""
    unet = randomize(UNet(TINY), seed=3)
    calls = []
    net = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
    net.register_forward_hook(lambda module, args, kwargs_out: calls.append(float(args[1][0])))
    timesteps = torch.tensor([900.0, 700.0, 500.0, 300.0, 100.0])
    control = Control(net, torch.rand(1, 3, 16, 16), start=0.2, end=0.8)
    wrapped = ControlledUNet(unet, [control], timesteps)
    for t in timesteps:
        wrapped(torch.randn(2, 4, 8, 8), t.expand(2), torch.randn(2, 7, 24))  # a CFG batch of 2 x 1 image
    assert calls == [700.0, 500.0, 300.0]
    assert [control.active(i, 5) for i in range(5)] == [False, True, True, True, False]


# ------------------------------------------------------------------------------------------------ preprocessors


def test_unknown_control_type_names_the_field_and_the_choices():
    image = control_images(1)[0]
    with pytest.raises(ValueError, match="control_type must be one of 'none', 'canny', 'segmentation'; got 'depth'"):
        preprocess(image, "depth")
    assert set(CONTROL_TYPES) == {"none", "canny", "segmentation"}


def square(size=32, box=(8, 8, 24, 24), inside=255, outside=0):
    a = np.full((size, size, 3), outside, dtype=np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = inside
    return Image.fromarray(a)


def test_canny_finds_a_closed_one_pixel_outline():
    edges = np.asarray(canny(square()))[..., 0] > 0
    filled = np.zeros((32, 32), dtype=bool)
    filled[8:24, 8:24] = True
    ring = np.zeros((32, 32), dtype=bool)  # the square's border, one pixel either way
    ring[7:25, 7:25] = True
    ring[9:23, 9:23] = False
    assert edges.sum() > 0 and (edges <= ring).all()
    for side in (edges[7:25, 7:9], edges[7:25, 23:25], edges[7:9, 7:25], edges[23:25, 7:25]):
        assert side.any(axis=0).sum() + side.any(axis=1).sum() >= 14  # every side is traced along its length
    assert (edges[8:24, 7:9].sum(1) == 1).all()  # one pixel wide: non-maximum suppression
    assert not np.asarray(canny(square(inside=90, outside=90))).any()  # a flat image has no edges
    assert np.asarray(canny(square())).shape == (32, 32, 3)


def test_canny_thresholds_and_hysteresis():
    # vertical step edges: a contrast of 40 grey levels gives a Sobel magnitude of 160, between the thresholds
    a = np.full((32, 32, 3), 100, dtype=np.uint8)
    a[:, 8:] = 140
    weak = Image.fromarray(a)
    assert not np.asarray(canny(weak, 100, 200)).any()  # weak everywhere: nothing starts an edge
    assert (np.asarray(canny(weak, 100, 150))[..., 0] > 0).sum(0)[7] == 32  # the same edge, strong: one column
    # a strong top half (0 | 140) continues into a weak bottom half (100 | 140), and a weak edge stands alone
    a[:16, :8] = 0
    a[:, 24:] = 180
    edges = np.asarray(canny(Image.fromarray(a), 100, 200))[..., 0] > 0
    assert edges[:, 6:10].any(1).all()  # the weak half is kept: it connects to the strong one (hysteresis)
    assert not edges[:, 20:28].any()  # the isolated weak edge is dropped
    with pytest.raises(ValueError, match="low <= high"):
        canny(weak, 200, 100)


def test_shapes_segmentation_and_the_analyzer_agree():
    data = ShapesDataset(size=12, seed=4)
    for i in range(len(data)):
        drawn = np.asarray(shapes_segmentation(data.placements[i]))
        read = np.asarray(segmentation(render(data.placements[i])))
        assert (drawn == read).all(-1).mean() > 0.97
        masks = shape_masks(data.placements[i])
        for p, mask in zip(data.placements[i], masks):  # each shape's pixels, in its class colour
            assert mask.sum() > 50 and (drawn[mask] == SEGMENT_PALETTE[p.shape]).all()
        assert not drawn[~np.any(masks, axis=0)].any()  # black elsewhere
    assert dataset_control(data, 0, "segmentation").size == (64, 64)
    edges = np.asarray(dataset_control(data, 0, "canny"))
    assert edges.any() and set(np.unique(edges)) <= {0, 255}


def test_control_tensor_resizes_like_diffusers():
    processor = diffusers.image_processor.VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True,
                                                            do_normalize=False)
    image = control_images(1, size=48, seed=2)[0].resize((48, 40))
    expected = processor.preprocess(image, height=32, width=24)
    assert torch.equal(control_tensor(image, width=24, height=32), expected)
    tensor = torch.rand(2, 3, 20, 20)
    assert torch.equal(control_tensor(tensor, 24, 32), processor.preprocess(tensor, height=32, width=24))


# ------------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny random text-to-image folder (VAE factor 2) and a 16x16 shapes data set for ControlNet runs."""
    from reverie.models.text import TextEncoder, train_bpe_tokenizer
    from reverie.models.vae import VAE_PRESETS, AutoencoderKL
    from reverie.schedules import DiscreteSchedule

    tmp = tmp_path_factory.mktemp("base")
    data = ShapesDataset(size=8, resolution=16, seed=0)
    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer(data.captions * 8, 600, tmp / "bpe", max_length=12)
    text_encoder = TextEncoder.small(tokenizer, 16, 1, 2, 12)
    vae = AutoencoderKL(VAE_PRESETS["tiny"])
    channels = vae.config.latent_channels
    unet = UNet(dataclasses.replace(TINY, in_channels=channels, out_channels=channels, cross_attention_dim=16))
    schedule = DiscreteSchedule.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                             "beta_end": 0.012})
    Pipeline(unet, vae, text_encoder, schedule).save_pretrained(tmp / "base")
    return tmp / "base", data


def controlnet_config(base, out, *overrides):
    from reverie.train import load_config

    return load_config(None, ["--model.kind=controlnet", f"--model.base_model={base}", f"--train.output_dir={out}",
                              "--train.batch_size=4", "--optim.lr=1e-2", "--optim.warmup_steps=2",
                              "--train.ema_decay=0.9", "--log.progress=false", "--log.sample_every=0",
                              "--log.sample_count=2", "--log.sample_steps=2", *overrides])


def test_controlnet_run_learns_and_exports(tmp_path, base_model):
    """A tiny ControlNet run on a frozen random model: the loss falls, only the ControlNet is trained and
    checkpointed, and the export is a ControlNetModel folder the pipeline uses."""
    from reverie.train import train

    base, data = base_model
    result = train(controlnet_config(base, tmp_path / "run", "--train.steps=30"), dataset=data)
    values = [loss for _, loss in result.losses]
    first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    assert result.state and all(k.startswith("controlnet.") for k in result.state)  # the UNet is not trained
    assert json.loads((result.export / "config.json").read_text())["_control_type"] == "segmentation"
    trained = load_controlnet(result.export)
    assert any(p.abs().max() > 0 for p in trained.controlnet_down_blocks.parameters())  # no longer zero
    pipe = Pipeline.from_pretrained(base)
    plain = pipe("a red circle", steps=3, seed=0, width=16, height=16, progress=False)
    out = pipe("a red circle", steps=3, seed=0, controlnet=trained, progress=False,
               control_image=dataset_control(data, 0, "segmentation"))
    assert out.images[0].size == (16, 16) and not torch.equal(out.latents, plain.latents)
    assert (tmp_path / "run" / "samples" / "step_00000030.png").is_file()


def test_controlnet_run_resumes_bit_exactly_with_canny_controls(tmp_path, base_model):
    from reverie.train import train

    base, data = base_model
    make = lambda out: controlnet_config(base, out, "--train.steps=4", "--model.control_type=canny",
                                         "--train.checkpoint_every=0")
    whole = train(make(tmp_path / "whole"), dataset=data)
    first = train(make(tmp_path / "split"), dataset=data, stop_at_step=2)
    second = train(make(tmp_path / "split"), dataset=data, resume=True)
    assert first.stopped and second.losses == whole.losses[2:]
    for a, b in ((second.state, whole.state), (second.ema_state, whole.ema_state)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="model.control_type must be one of"):
        train(controlnet_config(base, tmp_path / "bad", "--model.control_type=depth"), dataset=data)
    with pytest.raises(ValueError, match="model.base_model"):
        train(controlnet_config("", tmp_path / "none"), dataset=data)


# ------------------------------------------------------------------------------------------------ evaluation, CLI


def test_control_scores_of_a_perfect_and_a_recoloured_image():
    from reverie.data.shapes import Placed
    from reverie.eval.control import control_scores

    placed = [Placed("red", "triangle", 16, 32, 26), Placed("blue", "circle", 48, 32, 14)]
    caption = "a red triangle to the left of a blue circle"
    perfect = control_scores(render(placed), placed, caption)
    assert perfect["iou"] > 0.95 and perfect["layout_iou"] > 0.95 and perfect["color"] and perfect["shape"]
    swapped = [Placed("blue", "triangle", 16, 32, 26), Placed("red", "circle", 48, 32, 14)]
    wrong = control_scores(render(swapped), placed, caption)  # right layout, colours against the prompt
    assert wrong["iou"] < 0.05 and wrong["layout_iou"] > 0.95
    assert wrong["color"] and not wrong["shape"]  # the analyzer matches objects by colour: the shapes are wrong
    moved = [Placed("red", "triangle", 40, 32, 26), Placed("blue", "circle", 12, 32, 14)]
    assert control_scores(render(moved), placed, caption)["layout_iou"] < 0.3  # shapes elsewhere


@pytest.fixture(scope="module")
def shapes_controlnet(tmp_path_factory):
    """The bundled shapes model and an untrained ControlNet for it, saved as a folder."""
    from reverie.cli import model_path

    pipe = Pipeline.from_pretrained(model_path("shapes"))
    folder = tmp_path_factory.mktemp("shapes_cn") / "controlnet"
    save_controlnet(ControlNet.from_unet(pipe.unet, downsample_factor=4), folder)
    return pipe, folder


def test_a_controlnet_that_does_not_fit_the_model_is_refused(shapes_controlnet):
    pipe, _ = shapes_controlnet
    image = control_images(1, size=64)[0]
    eight = ControlNet.from_unet(pipe.unet)  # diffusers' default control encoder: for a VAE factor of 8, not 4
    assert eight.config.conditioning_embedding_out_channels == (16, 32, 96, 256)
    with pytest.raises(ValueError, match=r"controlnet: its control encoder downsamples 8x .* downsample_factor=4"):
        pipe("a red circle", steps=2, controlnet=eight, control_image=image, progress=False)
    other = ControlNet(ControlNetConfig.from_unet(TINY, conditioning_embedding_out_channels=(16, 32, 96)))
    with pytest.raises(ValueError, match="controlnet: made for another UNet"):
        pipe("a red circle", steps=2, controlnet=other, control_image=image, progress=False)


def test_evaluate_control_of_an_untrained_controlnet_equals_the_baseline(shapes_controlnet):
    from reverie.eval.control import evaluate_control

    pipe, folder = shapes_controlnet
    kwargs = dict(n=3, steps=3, batch_size=2, guidance_scale=4.0)
    controlled = evaluate_control(pipe, folder, **kwargs)
    assert controlled == evaluate_control(pipe, None, **kwargs)  # bit-identical images, identical scores
    assert controlled["n_one"] + controlled["n_two"] == 3
    assert all(0 <= v <= 1 for k, v in controlled.items() if not k.startswith("n_"))
    with pytest.raises(ValueError, match="control_type"):
        evaluate_control(pipe, folder, control_type="depth", **kwargs)


def test_cli_generate_and_eval_with_a_controlnet(shapes_controlnet, tmp_path, capsys):
    from reverie.cli import main

    _, folder = shapes_controlnet
    ShapesDataset(size=1, seed=0).image(0).save(tmp_path / "scene.png")
    common = ["generate", "a red circle", "--steps", "3", "--seed", "1", "--safety-checker", "none"]
    assert main(common + ["--out", str(tmp_path / "plain.png")]) == 0
    assert main(common + ["--out", str(tmp_path / "ctl.png"), "--controlnet", str(folder), "--control",
                          str(tmp_path / "scene.png"), "--control-type", "segmentation"]) == 0
    plain, ctl = (np.asarray(Image.open(tmp_path / name)) for name in ("plain.png", "ctl.png"))
    assert np.array_equal(plain, ctl)  # untrained: a no-op
    capsys.readouterr()
    assert main(common + ["--controlnet", str(folder), "--control", str(tmp_path / "scene.png"),
                          "--control-type", "depth", "--out", str(tmp_path / "x.png")]) == 2
    assert "control_type must be one of 'none', 'canny', 'segmentation'" in capsys.readouterr().err
    assert main(common + ["--control", str(tmp_path / "scene.png"), "--out", str(tmp_path / "x.png")]) == 2
    assert "--controlnet" in capsys.readouterr().err
    assert main(["eval", "--controlnet", str(folder), "--n", "2", "--steps", "2", "--plot",
                 str(tmp_path / "grid.png")]) == 0
    out = capsys.readouterr().out
    assert "control adherence (segmentation)" in out and "all/iou" in out and "all/layout_iou" in out
    assert Image.open(tmp_path / "grid.png").size == (2 * 64, 2 * 64)  # 2 controls above 2 images


def test_the_bundled_shapes_controlnet_places_the_shapes_where_the_control_says(shapes_controlnet):
    """The shipped ControlNet (bundled/controlnets/shapes-segmentation, opened by name) moves the model's shapes
    onto the control's: the layout IoU is high with it and low without it, on held-out scenes (the full figure,
    200 scenes at 20 steps, is in the README)."""
    from reverie.eval.control import evaluate_control
    from reverie.loading import bundled_controlnets, controlnet_folder

    pipe, _ = shapes_controlnet
    assert "shapes-segmentation" in bundled_controlnets()
    folder = controlnet_folder("shapes-segmentation")
    assert json.loads((folder / "config.json").read_text())["_control_type"] == "segmentation"
    kwargs = dict(n=8, steps=10, batch_size=8)
    controlled = evaluate_control(pipe, "shapes-segmentation", **kwargs)
    alone = evaluate_control(pipe, None, **kwargs)
    assert controlled["all/layout_iou"] >= 0.7, controlled
    assert controlled["all/layout_iou"] >= alone["all/layout_iou"] + 0.3, (controlled, alone)
