"""img2img against diffusers' StableDiffusionImg2ImgPipeline on a tiny random model (same seed, same images for
every scheduler family), and its invariants: strength 0 is the VAE round trip, strength s runs int(steps * s)
steps, batches equal singles, bad input names its field."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from reverie import Pipeline
from reverie.edit import as_images, strength_sigmas
from reverie.pipeline import to_pil

diffusers = pytest.importorskip("diffusers")
from test_pipeline import tiny_diffusers_pipeline  # noqa: E402  (the shared tiny SD model)

PROMPT = "a red circle above a blue square"

# reverie sampler -> the diffusers scheduler it must reproduce. Not here: LMS (diffusers' LMSDiscreteScheduler
# computes order-k coefficients from step_index, so after an img2img slice it weights its first derivatives with
# coefficients meant for a longer history; reverie's lms, like k-diffusion's, uses the history it has).
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}


def picture(size=32, shift=0) -> Image.Image:
    image = Image.new("RGB", (size, size), (30, 60, 200))
    draw = ImageDraw.Draw(image)
    draw.ellipse((4 + shift, 4, 20 + shift, 20), fill=(220, 40, 40))
    draw.rectangle((16, 18 - shift, 30, 30), fill=(40, 200, 60))
    return image


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float64) for im in images])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("img2img")
    theirs = diffusers.StableDiffusionImg2ImgPipeline(**tiny_diffusers_pipeline(tmp).components)
    theirs.set_progress_bar_config(disable=True)
    return theirs, Pipeline.from_pretrained(tmp / "sd"), tmp


def diffusers_img2img(theirs, sampler, image, strength, seed, steps=8):
    cls, flags = SCHEDULERS[sampler]
    config = {k: v for k, v in theirs.scheduler.config.items() if k != "use_karras_sigmas"}
    theirs.scheduler = getattr(diffusers, cls).from_config(config, **flags)
    out = theirs(PROMPT, image=image, strength=strength, num_inference_steps=steps, guidance_scale=7.5,
                 generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return (out.images * 255).round()


@pytest.mark.parametrize("sampler,strength", [(s, v) for s in ("ddim", "euler", "dpmpp_2m") for v in (0.3, 0.75, 1.0)]
                         + [(s, 0.5) for s in ("DPM++ 2M Karras", "heun", "unipc", "Euler a", "ddpm")])
def test_same_images_as_diffusers(models, sampler, strength):
    theirs, pipe, _ = models
    result = pipe(PROMPT, image=picture(), strength=strength, steps=8, sampler=sampler, seed=3, progress=False)
    a, b = pixels(result.images), diffusers_img2img(theirs, sampler, picture(), strength, seed=3)
    assert a.shape == b.shape == (1, 32, 32, 3)
    assert np.abs(a - b).mean() <= 1.0
    assert a.std() > 2  # a picture, not a flat field: the comparison means something
    assert result.params["strength"] == strength
    # one step more or less is another image: the comparison sees the slicing of the schedule
    neighbour = diffusers_img2img(theirs, sampler, picture(), strength - 0.125 if strength == 1 else strength + 0.125, 3)
    assert np.abs(a - neighbour).mean() > 1

def test_strength_zero_is_the_vae_round_trip(models):
    _, pipe, _ = models
    result = pipe(PROMPT, image=picture(), strength=0.0, steps=8, seed=11, progress=False)
    latents = pipe.encode_images(as_images(picture()), torch.Generator("cpu").manual_seed(11))
    assert torch.equal(result.latents, latents.cpu())  # exactly the image's own latents
    with torch.inference_mode():
        expected = to_pil(pipe.vae.decode(latents / pipe.vae.scaling_factor))
    assert np.array_equal(pixels(result.images), pixels(expected))
    # below one step, nothing is denoised either
    tiny = pipe(PROMPT, image=picture(), strength=0.1, steps=8, seed=11, progress=False)
    assert np.array_equal(pixels(tiny.images), pixels(expected))


@pytest.mark.parametrize("sampler", ["euler", "heun", "ddim"])
def test_strength_runs_the_last_steps_of_the_schedule(models, sampler):
    _, pipe, _ = models
    full = pipe.schedule.sampling_sigmas(10, "default", pipe_family(sampler))
    for strength, steps_run in ((1.0, 10), (0.75, 7), (0.35, 3), (0.05, 0)):
        seen = []
        pipe(PROMPT, image=picture(), strength=strength, steps=10, sampler=sampler, seed=0, progress=False,
             callback=lambda step: seen.append(step.sigma))
        assert len(seen) == steps_run
        assert torch.equal(strength_sigmas(full, strength), full[10 - steps_run:])
        if seen:  # the first step is at the schedule's level 10 - steps_run
            assert seen[0] == pytest.approx(full[10 - steps_run].item())


def pipe_family(sampler):
    from reverie.samplers import resolve

    return resolve(sampler).family


def test_strength_one_nearly_ignores_the_image(models):
    """As diffusers: at strength 1 the image enters only through sqrt(alphabar) at the first level (0.07 here)."""
    _, pipe, _ = models

    def spread(strength):
        a, b = (pipe(PROMPT, image=picture(shift=s), strength=strength, steps=8, sampler="euler", seed=2,
                     progress=False).images for s in (0, 8))
        return np.abs(pixels(a) - pixels(b)).mean()

    assert spread(1.0) < spread(0.5) / 3


def test_batches_equal_single_images(models):
    _, pipe, _ = models
    images = [picture(), picture(shift=6)]
    batch = pipe([PROMPT, "a photo of a cat"], image=images, strength=0.6, steps=6, sampler="euler", seed=[4, 5],
                 progress=False)
    for i, (prompt, seed) in enumerate(((PROMPT, 4), ("a photo of a cat", 5))):
        alone = pipe(prompt, image=images[i], strength=0.6, steps=6, sampler="euler", seed=seed, progress=False)
        assert np.abs(pixels(batch.images)[i] - pixels(alone.images)[0]).max() <= 1
    # a tensor in [-1, 1] is the same input as the PIL image; one image serves every prompt and copy
    tensor = as_images(images)
    again = pipe([PROMPT, "a photo of a cat"], image=tensor, strength=0.6, steps=6, sampler="euler", seed=[4, 5],
                 progress=False)
    assert np.array_equal(pixels(again.images), pixels(batch.images))
    copies = pipe(PROMPT, image=images[0], num_images=2, strength=0.6, steps=6, sampler="euler", seed=[4, 9],
                  progress=False)
    assert np.abs(pixels(copies.images)[0] - pixels(batch.images)[0]).max() <= 1


def test_processing_size(models):
    _, pipe, _ = models
    odd = picture(40).crop((0, 0, 35, 33))  # not a multiple of the VAE factor (2): rounded down, as diffusers
    assert pipe(PROMPT, image=odd, strength=0.5, steps=2, progress=False).images[0].size == (34, 32)
    resized = pipe(PROMPT, image=picture(40), strength=0.5, steps=2, width=32, height=24, progress=False)
    assert resized.images[0].size == (32, 24) and resized.params["width"] == 32


@pytest.mark.parametrize("kwargs,field", [
    (dict(strength=-0.1), "strength"), (dict(strength=1.5), "strength"), (dict(strength=float("nan")), "strength"),
    (dict(strength="0.5"), "strength"), (dict(image=42), "image"), (dict(image="no/such/file.png"), "image"),
    (dict(image=torch.zeros(1, 4, 32, 32)), "image"), (dict(image=torch.full((1, 3, 32, 32), 3.0)), "image"),
    (dict(image=[picture(), picture(40)]), "image"), (dict(image=[picture()] * 3), "image"),
    (dict(image=None, strength=0.5), "strength"), (dict(width=33), "width"),
    (dict(latents=torch.zeros(1, 4, 3, 3)), "latents"),
])
def test_bad_input_names_the_field(models, kwargs, field):
    _, pipe, _ = models
    kwargs = {"image": picture(), **kwargs}
    with pytest.raises(ValueError, match=field):
        pipe([PROMPT, "a photo of a cat"], steps=2, progress=False, **kwargs)


def test_unreadable_file_names_the_field(models, tmp_path):
    _, pipe, _ = models
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    with pytest.raises(ValueError, match=r"image: cannot read"):
        pipe(PROMPT, image=str(bad), steps=2, progress=False)


def test_generate_command(models, tmp_path):
    from reverie.cli import main

    _, pipe, tmp = models
    picture().save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, "--model", str(tmp / "sd"), "--image", str(tmp_path / "in.png"), "--strength",
                 "0.6", "--steps", "4", "--seed", "7", "--sampler", "euler", "--out", str(out)]) == 0
    expected = pipe(PROMPT, image=picture(), strength=0.6, steps=4, sampler="euler", seed=7, progress=False)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB"), dtype=np.float64), pixels(expected.images)[0])
    assert main(["generate", PROMPT, "--model", str(tmp / "sd"), "--strength", "0.5", "--out", str(out)]) == 2
