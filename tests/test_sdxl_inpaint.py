"""SDXL inpainting through reverie's one pipeline against diffusers' StableDiffusionXLInpaintPipeline on tiny random
models (tests/tiny_families.py): a 9-channel inpainting UNet (latents + mask + masked-image latents) and the
4-channel base UNet, whose known region reverie re-imposes at every step.

What is compared, and why (as tests/test_inpaint.py does for SD 1/2):
- diffusers returns the decoded latents everywhere; reverie pastes the input back outside the mask (A1111's
  overlay; diffusers only does so with padding_mask_crop). So the expected image is diffusers' inside the mask and
  the input outside it, and the whole of it must match (mean abs pixel difference <= 0.02 on 0..255); outside the
  mask reverie's pixels must be the input's exactly.
- Masks are binary boxes on even pixel coordinates, with mask_blur=0: diffusers binarizes the mask and shrinks it to
  the latents by nearest-neighbour interpolation, reverie repaints a latent if any of its pixels is masked; the two
  agree when every 2x2 latent cell is wholly in or out.
- 4-channel UNet at strength 1.0 differs by design: diffusers starts from pure noise everywhere (its is_strength_max
  rule, for 4- and 9-channel UNets alike) and blends the noised known latents in after each step; reverie starts
  the known region on the image's own noised trajectory (A1111's "original" masked content) and re-imposes it on
  the x0 estimate. The first step's prediction then differs, so the masked region does too (about 2.7 / 255 mean
  here). Below strength 1 both start from the noised image and the images are equal; those are tested, and
  strength 1.0 is tested only for being on the input's trajectory outside the mask.
"""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from reverie import Pipeline

from tiny_families import pixels, sdxl_folder, sdxl_inpaint_folder

diffusers = pytest.importorskip("diffusers")

PROMPT = "A painting of a squirrel eating a burger"
SCHEDULERS = {"euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
SIZE = 64


def picture(size=SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size), (30, 60, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size // 8, size // 8, size * 5 // 8, size * 5 // 8), fill=(220, 40, 40))
    draw.rectangle((size // 2, size * 9 // 16, size - 2, size - 2), fill=(40, 200, 60))
    return image


def box_mask(box, size=SIZE) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)  # inclusive corners
    return mask


MASK = box_mask((16, 12, 47, 43))  # pixels 16..47 x 12..43: whole 2x2 latent cells
INSIDE = np.asarray(MASK) > 127



def open_pair(path):
    theirs = diffusers.StableDiffusionXLInpaintPipeline.from_pretrained(path)
    theirs.set_progress_bar_config(disable=True)
    return theirs, Pipeline.from_pretrained(path)


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
    """(diffusers, reverie) on the 9-channel inpainting model."""
    return open_pair(sdxl_inpaint_folder(tmp_path_factory.mktemp("sdxl_inpaint")))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(diffusers' inpainting pipeline on the base model's components, reverie on the base folder)."""
    path = sdxl_folder(tmp_path_factory.mktemp("sdxl_base"))
    theirs = diffusers.StableDiffusionXLInpaintPipeline(
        **diffusers.StableDiffusionXLPipeline.from_pretrained(path).components)
    theirs.set_progress_bar_config(disable=True)
    return theirs, Pipeline.from_pretrained(path)


def run_theirs(pipe, sampler, strength, seed, steps):
    pipe.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(
        {k: v for k, v in pipe.scheduler.config.items() if k != "use_karras_sigmas"})
    out = pipe(PROMPT, image=picture(), mask_image=MASK, strength=strength, num_inference_steps=steps,
               guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return (out.images[0] * 255).round()  # (H, W, 3), decoded everywhere


def run_ours(pipe, sampler, strength, seed, steps):
    result = pipe(PROMPT, image=picture(), mask_image=MASK, strength=strength, steps=steps, guidance_scale=5.0,
                  sampler=sampler, seed=seed, mask_blur=0, progress=False)
    return pixels(result.images)[0]


def assert_inpainted_like_diffusers(ours, theirs, tol=0.02):
    original = np.asarray(picture(), dtype=np.float64)
    assert np.array_equal(ours[~INSIDE], original[~INSIDE])  # reverie pastes the input back outside the mask
    expected = np.where(INSIDE[..., None], theirs, original)
    diff = np.abs(ours - expected).mean()
    assert diff <= tol, f"mean abs pixel difference {diff:.4f} > {tol}"
    assert np.abs(ours - original)[INSIDE].mean() > 5  # the masked region was painted


@pytest.mark.parametrize("sampler,strength", [("euler", 1.0), ("euler", 0.8), ("euler", 0.9999),
                                              ("dpmpp_2m", 1.0)])
def test_inpainting_unet_matches_diffusers(inpainting, sampler, strength):
    theirs, ours = inpainting
    assert ours.inpaint_network and ours.unet.config.in_channels == 9 and ours.family.name == "sdxl"
    expected = run_theirs(theirs, sampler, strength, seed=0, steps=5)
    assert_inpainted_like_diffusers(run_ours(ours, sampler, strength, seed=0, steps=5), expected)


def test_another_seed_paints_another_region(inpainting):
    theirs, _ = inpainting  # the comparisons above mean something: the masked region depends on the noise
    a, b = (run_theirs(theirs, "euler", 1.0, seed=s, steps=3) for s in (0, 1))
    assert np.abs(a - b)[INSIDE].mean() > 1


@pytest.mark.parametrize("sampler,strength", [("euler", 0.8), ("euler", 0.6), ("dpmpp_2m", 0.8)])
def test_base_unet_known_region_matches_diffusers_blend(base, sampler, strength):
    theirs, ours = base
    assert not ours.inpaint_network
    expected = run_theirs(theirs, sampler, strength, seed=0, steps=6)
    assert_inpainted_like_diffusers(run_ours(ours, sampler, strength, seed=0, steps=6), expected)


def test_base_unet_at_full_strength_keeps_the_input(base):
    """Strength 1.0 with a 4-channel UNet: reverie's start differs from diffusers' by design (module docstring);
    the known region is the input's, and the painted region stays near diffusers' without equalling it."""
    theirs, ours = base
    a, b = run_ours(ours, "euler", 1.0, seed=0, steps=6), run_theirs(theirs, "euler", 1.0, seed=0, steps=6)
    original = np.asarray(picture(), dtype=np.float64)
    assert np.array_equal(a[~INSIDE], original[~INSIDE])
    assert np.abs(a - original)[INSIDE].mean() > 5
    assert 0 < np.abs(a - b)[INSIDE].mean() < 10
