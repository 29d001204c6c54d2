"""Inpainting and outpainting: a 9-channel inpainting UNet against diffusers' StableDiffusionInpaintPipeline (whole
picture and diffusers' padding_mask_crop = A1111's "only masked"); any model through the known-region denoiser,
whose unmasked pixels are the input's exactly; fill modes, crop regions, outpaint canvases, bad input."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from reverie import Pipeline
from reverie.edit import (EditSource, as_images, as_masks, crop_region, fill_masked, gaussian_blur, outpaint,
                          plan_edit, prepare)

diffusers = pytest.importorskip("diffusers")
from test_pipeline import tiny_diffusers_pipeline  # noqa: E402  (the shared tiny SD model)

PROMPT = "a red circle above a blue square"
SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def picture(size=32) -> Image.Image:
    image = Image.new("RGB", (size, size), (30, 60, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 8, size // 8, size * 5 // 8, size * 5 // 8), fill=(220, 40, 40))
    draw.rectangle((size // 2, size * 9 // 16, size - 2, size - 2), fill=(40, 200, 60))
    return image


def box_mask(size, box) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)  # inclusive corners
    return mask


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) for im in images])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(diffusers' 9-channel inpainting pipeline, reverie on the same folder, reverie on the 4-channel model)."""
    tmp = tmp_path_factory.mktemp("inpaint")
    base = tiny_diffusers_pipeline(tmp)
    torch.manual_seed(1)
    unet = diffusers.UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    with torch.no_grad():
        unet.conv_out.weight.mul_(3)
    theirs = diffusers.StableDiffusionInpaintPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet, scheduler=base.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    theirs.save_pretrained(tmp / "inpaint", safe_serialization=True)
    theirs = diffusers.StableDiffusionInpaintPipeline.from_pretrained(tmp / "inpaint", safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    return theirs, Pipeline.from_pretrained(tmp / "inpaint"), Pipeline.from_pretrained(tmp / "sd"), tmp


def diffusers_inpaint(theirs, sampler, image, mask, strength, seed, steps=8, size=32, **kwargs):
    theirs.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(theirs.scheduler.config)
    out = theirs(PROMPT, image=image, mask_image=mask, strength=strength, num_inference_steps=steps, height=size,
                 width=size, generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
    return out.images


# --- 9-channel inpainting networks against diffusers -------------------------------------------------------------


@pytest.mark.parametrize("sampler,strength", [("ddim", 1.0), ("euler", 1.0), ("dpmpp_2m", 1.0), ("euler", 0.6),
                                              ("dpmpp_2m", 0.6)])
def test_inpainting_network_matches_diffusers(models, sampler, strength):
    theirs, pipe, _, _ = models
    assert pipe.inpaint_network and pipe.unet.config.in_channels == 9  # the diffusers folder loads as it is
    mask = box_mask(32, (8, 6, 23, 21))
    inside = np.asarray(mask) > 127
    result = pipe(PROMPT, image=picture(), mask_image=mask, strength=strength, steps=8, sampler=sampler, seed=3,
                  mask_blur=0, progress=False)
    a = pixels(result.images)[0]
    b = pixels(diffusers_inpaint(theirs, sampler, picture(), mask, strength, seed=3))[0]
    assert np.abs(a - b)[inside].mean() <= 1.0  # the painted region is diffusers'
    assert np.array_equal(a[~inside], np.asarray(picture(), dtype=np.float64)[~inside])  # the rest is the input's
    assert a[inside].std() > 2
    other = pixels(diffusers_inpaint(theirs, sampler, picture(), mask, strength, seed=4))[0]
    assert np.abs(other - b)[inside].mean() > 1  # another seed paints another region: the comparison means something


def test_only_masked_matches_diffusers_padding_mask_crop(models):
    """A1111's "only masked" is diffusers' padding_mask_crop: the crop around the mask, grown by the padding and to
    the output's aspect ratio, is inpainted at the processing size and pasted back into the full image."""
    theirs, pipe, _, _ = models
    image, mask = picture(64), box_mask(64, (20, 24, 35, 31))  # crop: 16x8 + 8 each side -> 32x24 -> 32x32
    result = pipe(PROMPT, image=image, mask_image=mask, steps=8, sampler="euler", seed=5, width=32, height=32,
                  mask_blur=0, inpaint_only_masked=True, inpaint_padding=8, progress=False)
    expected = diffusers_inpaint(theirs, "euler", image, mask, 1.0, seed=5, padding_mask_crop=8)
    a, b = pixels(result.images)[0], pixels(expected)[0]
    assert a.shape == b.shape == (64, 64, 3)
    inside = np.asarray(mask) > 127
    assert np.abs(a - b)[inside].mean() <= 1.0 and np.abs(a - b).mean() <= 0.5
    assert np.array_equal(a[~inside], np.asarray(image, dtype=np.float64)[~inside])
    assert result.params["inpaint_only_masked"] and result.params["inpaint_padding"] == 8


def test_text_to_image_with_an_inpainting_network(models):
    _, pipe, _, _ = models
    result = pipe(PROMPT, steps=3, seed=0, width=32, height=24, progress=False)
    assert result.images[0].size == (32, 24) and pixels(result.images).std() > 2


# --- any model: the known region is kept ---------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim", "Euler a", "heun"])
def test_outside_the_mask_is_the_input(models, sampler):
    _, _, pipe, _ = models
    mask = box_mask(32, (8, 6, 23, 21))
    inside = np.asarray(mask) > 127
    result = pipe(PROMPT, image=picture(), mask_image=mask, steps=6, sampler=sampler, seed=7, mask_blur=0,
                  progress=False)
    a, original = pixels(result.images)[0], np.asarray(picture(), dtype=np.float64)
    assert np.array_equal(a[~inside], original[~inside])  # pixels: exactly the input
    assert np.abs(a - original)[inside].mean() > 5  # and the masked region was painted
    # latents: exactly the image's own outside the latent mask (a latent is repainted if any of its pixels is)
    known = pipe.encode_images(as_images(picture()), torch.Generator("cpu").manual_seed(7)).cpu()
    keep = F.max_pool2d(torch.from_numpy(inside).float()[None, None], 2) == 0
    assert torch.equal(result.latents[keep.expand_as(known)], known[keep.expand_as(known)])
    assert not torch.equal(result.latents, known)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim"])
def test_known_region_follows_its_noised_trajectory(models, sampler):
    """With its x0 estimate pinned, the known region stays x = x0_known + sigma * eps with one eps throughout."""
    _, _, pipe, _ = models
    mask = box_mask(32, (8, 6, 23, 21))
    seen = []
    pipe(PROMPT, image=picture(), mask_image=mask, steps=6, sampler=sampler, seed=7, mask_blur=0, strength=0.8,
         progress=False, callback=lambda step: seen.append((step.x.clone(), step.sigma)))
    known = pipe.encode_images(as_images(picture()), torch.Generator("cpu").manual_seed(7))
    keep = (F.max_pool2d(torch.from_numpy(np.asarray(mask) > 127).float()[None, None], 2) == 0).expand_as(known)
    eps = [((x - known) / sigma)[keep] for x, sigma in seen]
    assert len(eps) == 4
    for e in eps[1:]:
        torch.testing.assert_close(e, eps[0], atol=2e-4, rtol=1e-4)


def test_mask_blur_keeps_pixels_the_blur_does_not_reach(models):
    _, _, pipe, _ = models
    mask = box_mask(32, (10, 10, 21, 21))
    result = pipe(PROMPT, image=picture(), mask_image=mask, steps=4, seed=1, mask_blur=2, progress=False)
    reach = gaussian_blur(as_masks(mask), 2)[0, 0].numpy() > 0
    a, original = pixels(result.images)[0], np.asarray(picture(), dtype=np.float64)
    assert np.array_equal(a[~reach], original[~reach])
    assert reach.sum() > (np.asarray(mask) > 127).sum()  # the blur reaches beyond the mask: a softer seam


def test_only_masked_with_any_model_pastes_into_the_full_image(models):
    _, _, pipe, _ = models
    mask = box_mask(64, (40, 8, 51, 19))
    result = pipe(PROMPT, image=picture(64), mask_image=mask, steps=4, seed=2, mask_blur=0,
                  inpaint_only_masked=True, inpaint_padding=4, width=32, height=32, progress=False)
    a, original = pixels(result.images)[0], np.asarray(picture(64), dtype=np.float64)
    inside = np.asarray(mask) > 127
    assert a.shape == (64, 64, 3) and result.params["width"] == 32
    assert np.array_equal(a[~inside], original[~inside]) and np.abs(a - original)[inside].mean() > 5


# --- fill modes, with a stand-in VAE (average pooling) so each start is known exactly ----------------------------


def fake_encode(images, generator):
    pooled = F.avg_pool2d(images, 2)
    return torch.cat([pooled, pooled[:, :1]], dim=1)  # (B, 4, h, w)


@pytest.mark.parametrize("fill", ["original", "fill", "latent noise", "latent nothing"])
def test_fill_modes_set_the_start_under_the_mask(fill):
    source = prepare(picture(), box_mask(32, (8, 8, 19, 19)), mask_blur=0, multiple=2, fill=fill, strength=0.5)
    sigmas = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0])
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    plan = plan_edit(source, sigmas, encode=fake_encode, generator=torch.Generator().manual_seed(9),
                     shape=(1, 4, 16, 16), device="cpu", noise=noise)
    assert torch.equal(plan.sigmas, sigmas[2:])
    start = plan.x - 1.0 * noise  # the latents under the noise added at sigma 1
    image, hole = source.image, source.repaint
    m = plan.latent_mask
    expected = {
        "original": fake_encode(image, None),
        "fill": fake_encode(fill_masked(image, hole), None),
        "latent noise": torch.lerp(fake_encode(image, None), torch.randn(1, 4, 16, 16,
                                   generator=torch.Generator().manual_seed(9)), m),
        "latent nothing": fake_encode(image, None) * (1 - m),
    }[fill]
    torch.testing.assert_close(start, expected, atol=1e-6, rtol=0)
    assert torch.equal(plan.known, fake_encode(fill_masked(image, hole) if fill == "fill" else image, None))
    assert m.sum() == 36  # the 12x12 pixel box covers 6x6 latents
    # accepted spellings: A1111's numbers and underscores
    assert prepare(picture(), box_mask(32, (0, 0, 3, 3)), fill=2, multiple=2).fill == "latent noise"
    assert prepare(picture(), box_mask(32, (0, 0, 3, 3)), fill="latent_nothing", multiple=2).fill == "latent nothing"


def test_fill_masked_extends_the_surrounding_colours():
    image = torch.cat([torch.full((1, 3, 16, 8), -0.8), torch.full((1, 3, 16, 8), 0.6)], dim=3)  # dark | light
    hole = torch.zeros(1, 1, 16, 16)
    hole[..., 4:12, 4:12] = 1
    filled = fill_masked(image, hole)
    assert torch.equal(filled[hole.expand_as(filled) == 0], image[hole.expand_as(image) == 0])  # known kept
    assert filled.min() >= -0.8 - 1e-6 and filled.max() <= 0.6 + 1e-6  # averages of known colours
    assert filled[0, 0, 8, 4] < filled[0, 0, 8, 11]  # near the dark side darker than near the light side
    flat = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(fill_masked(flat, hole), flat)


# --- geometry: crop regions and outpaint canvases --------------------------------------------------------------------


def test_crop_region_equals_diffusers():
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(0)
    for _ in range(60):
        W, H = (int(v) for v in rng.integers(16, 80, 2))
        x1, y1 = int(rng.integers(0, W - 2)), int(rng.integers(0, H - 2))
        x2, y2 = int(rng.integers(x1 + 1, W)), int(rng.integers(y1 + 1, H))
        mask = Image.new("L", (W, H), 0)
        ImageDraw.Draw(mask).rectangle((x1, y1, x2, y2), fill=255)
        width, height, pad = int(rng.integers(8, 64)), int(rng.integers(8, 64)), int(rng.integers(0, 20))
        ours = crop_region(as_masks(mask)[0], width, height, pad)
        assert ours == VaeImageProcessor.get_crop_region(mask, width, height, pad), (W, H, x1, y1, x2, y2, pad)


def test_outpaint_canvas_geometry():
    image = as_images(picture(30))
    canvas, mask = outpaint(picture(30), left=8, top=5, multiple=4)
    # 30 + 8 = 38 -> 40 wide: only the left side is extended, so it grows; 30 + 5 = 35 -> 36 tall: the top grows
    assert canvas.shape == (1, 3, 36, 40) and mask.shape == (1, 1, 36, 40)
    assert torch.equal(canvas[..., 6:, 10:], image)  # the image sits at (left, top) = (10, 6)
    assert mask[..., 6:, 10:].sum() == 0 and mask.sum() == 36 * 40 - 30 * 30
    canvas, mask = outpaint(picture(30), left=3, right=4, bottom=2, multiple=4)
    assert canvas.shape == (1, 3, 32, 40)  # 30 + 3 + 4 = 37 -> 40 by the right side; 32 by the bottom
    assert torch.equal(canvas[..., :30, 3:33], image) and mask[..., :30, 3:33].sum() == 0
    assert canvas.min() >= -1 and canvas.max() <= 1
    for kwargs, field in ((dict(left=-1), "left"), (dict(), "at least one side"), (dict(top=1.5), "top")):
        with pytest.raises(ValueError, match=field):
            outpaint(picture(30), **kwargs)


def test_outpaint_through_the_pipeline(models):
    _, _, pipe, _ = models
    result = pipe.outpaint(PROMPT, picture(), right=8, bottom=4, steps=4, seed=0, mask_blur=0, progress=False)
    a = pixels(result.images)[0]
    assert a.shape == (36, 40, 3)
    assert np.array_equal(a[:32, :32], np.asarray(picture(), dtype=np.float64))  # the original, untouched
    assert a[32:, :].std() > 2  # the new border is painted


# --- bad input and the command line ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,field", [
    (dict(mask_image=box_mask(16, (0, 0, 3, 3))), "mask_image"), (dict(image=None), "mask_image"),
    (dict(mask_image=torch.full((1, 1, 32, 32), 2.0)), "mask_image"), (dict(mask_image=3), "mask_image"),
    (dict(fill="bogus"), "fill"), (dict(fill=7), "fill"), (dict(mask_blur=-1), "mask_blur"),
    (dict(mask_blur=float("inf")), "mask_blur"), (dict(inpaint_padding=-2), "inpaint_padding"),
    (dict(mask_image=None, inpaint_only_masked=True), "inpaint_only_masked"), (dict(strength=2), "strength"),
])
def test_bad_input_names_the_field(models, kwargs, field):
    _, _, pipe, _ = models
    kwargs = {"image": picture(), "mask_image": box_mask(32, (4, 4, 9, 9)), **kwargs}
    with pytest.raises(ValueError, match=field):
        pipe(PROMPT, steps=2, progress=False, **kwargs)


def test_paste_without_a_mask_passes_images_through():
    source = prepare(picture(), multiple=2)
    assert isinstance(source, EditSource) and source.repaint is None and source.strength == 0.75
    images = torch.rand(1, 3, 32, 32)
    assert source.paste(images) is images


def test_generate_command(models, tmp_path):
    from reverie.cli import main

    _, _, pipe, tmp = models
    picture().save(tmp_path / "in.png")
    box_mask(32, (8, 6, 23, 21)).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    common = ["--model", str(tmp / "sd"), "--image", str(tmp_path / "in.png"), "--steps", "3", "--seed", "7",
              "--sampler", "euler", "--out", str(out)]
    assert main(["generate", PROMPT, *common, "--mask", str(tmp_path / "mask.png"), "--mask-blur", "0", "--fill",
                 "fill"]) == 0
    expected = pipe(PROMPT, image=picture(), mask_image=box_mask(32, (8, 6, 23, 21)), steps=3, sampler="euler",
                    seed=7, mask_blur=0, fill="fill", progress=False)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB"), dtype=np.float64), pixels(expected.images)[0])
    assert main(["generate", PROMPT, *common, "--outpaint", "4,0,0,6"]) == 0
    assert Image.open(out).size == (36, 38)
    assert main(["generate", PROMPT, *common, "--outpaint", "4,0"]) == 2
    assert main(["generate", PROMPT, *common, "--mask", str(tmp_path / "nope.png")]) == 2
