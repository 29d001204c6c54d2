"""SDXL through reverie's one pipeline, image for image against diffusers' StableDiffusionXLPipeline on the tiny
random model diffusers' own tests build (tests/tiny_families.py): same seed, same images (mean absolute pixel
difference <= 0.02 on 0..255)."""

import numpy as np
import pytest
import torch

from reverie import Pipeline

from tiny_families import assert_same_images, pixels, sdxl_folder, source_image

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["A painting of a squirrel eating a burger", "a red circle above a blue square"]




@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    path = sdxl_folder(tmp_path_factory.mktemp("sdxl"))
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(path)
    theirs.set_progress_bar_config(disable=True)
    return theirs, Pipeline.from_pretrained(path), path


def run_theirs(pipe, cls="EulerDiscreteScheduler", flags=None, **kwargs):
    pipe.scheduler = getattr(diffusers, cls).from_config(
        {k: v for k, v in pipe.scheduler.config.items() if k != "use_karras_sigmas"}, **(flags or {}))
    out = pipe(generator=torch.Generator("cpu").manual_seed(kwargs.pop("seed", 0)), output_type="np", **kwargs)
    return (out.images * 255).round()


@pytest.mark.parametrize("negative", [None, "", "bad quality"])
def test_sdxl_base_matches_diffusers(sdxl, negative):
    theirs, ours, _ = sdxl
    expected = run_theirs(theirs, prompt=PROMPTS, negative_prompt=negative, num_inference_steps=4,
                          guidance_scale=5.0)
    result = ours(PROMPTS, negative_prompt=negative, steps=4, guidance_scale=5.0, seed=0, progress=False)
    assert_same_images(pixels(result.images), expected)
    assert result.params["family"] == "sdxl"


def test_sdxl_none_and_empty_negatives_differ(sdxl):
    _, ours, _ = sdxl  # force_zeros_for_empty_prompt: None gives zero embeddings, "" is encoded
    a, b = (ours(PROMPTS[:1], negative_prompt=n, steps=3, seed=1, progress=False) for n in (None, ""))
    assert np.abs(pixels(a.images) - pixels(b.images)).mean() > 0.1


def test_sdxl_prompt_2_sizes_and_multistep_sampler(sdxl):
    theirs, ours, _ = sdxl
    kwargs = dict(prompt_2="a photo of a cat", original_size=(128, 96), target_size=(64, 48),
                  crops_coords_top_left=(4, 8))
    expected = run_theirs(theirs, "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, prompt=PROMPTS[:1],
                          num_inference_steps=5, guidance_scale=6.0, height=64, width=48, seed=3, **kwargs)
    result = ours(PROMPTS[:1], steps=5, guidance_scale=6.0, sampler="DPM++ 2M Karras", height=64, width=48, seed=3,
                  progress=False, **kwargs)
    assert_same_images(pixels(result.images), expected)


def test_sdxl_refuses_what_it_lacks(sdxl):
    _, ours, _ = sdxl
    with pytest.raises(ValueError, match="aesthetic_score"):
        ours("a cat", steps=1, aesthetic_score=6.0, progress=False)
    with pytest.raises(ValueError, match="width"):
        ours("a cat", steps=1, width=61, progress=False)  # the tiny VAE downsamples 2x
    with pytest.raises(ValueError, match="controlnet"):
        ours("a cat", steps=1, controlnet="shapes-segmentation", progress=False)



def test_sdxl_img2img_matches_diffusers(sdxl):
    theirs, ours, _ = sdxl
    i2i = diffusers.StableDiffusionXLImg2ImgPipeline(**theirs.components)
    i2i.set_progress_bar_config(disable=True)
    image = source_image((64, 64))
    expected = run_theirs(i2i, prompt=PROMPTS[:1], image=image, strength=0.6, num_inference_steps=6,
                          guidance_scale=5.0, seed=4)
    result = ours(PROMPTS[:1], image=image, strength=0.6, steps=6, guidance_scale=5.0, seed=4, progress=False)
    assert_same_images(pixels(result.images), expected)


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    path = sdxl_folder(tmp_path_factory.mktemp("refiner"), refiner=True)
    theirs = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(path)
    theirs.set_progress_bar_config(disable=True)
    return theirs, Pipeline.from_pretrained(path), path


@pytest.mark.parametrize("scores", [{}, {"aesthetic_score": 7.5, "negative_aesthetic_score": 1.0}])
def test_sdxl_refiner_img2img_matches_diffusers(refiner, scores):
    theirs, ours, _ = refiner
    assert ours.family.name == "sdxl" and ours.components["text_encoder"] is None
    image = source_image((32, 32))
    expected = run_theirs(theirs, prompt=PROMPTS, image=image, strength=0.5, num_inference_steps=6,
                          guidance_scale=5.0, seed=5, **scores)
    result = ours(PROMPTS, image=image, strength=0.5, steps=6, guidance_scale=5.0, seed=5, progress=False, **scores)
    assert_same_images(pixels(result.images), expected)


def test_sdxl_long_prompts_are_chunked_and_folders_round_trip(sdxl, tmp_path):
    """Prompts over 75 tokens get 77-token chunks for both encoders (A1111), so nothing is cut; a saved folder
    opens in diffusers with the same weights and settings, and in reverie with the same images."""
    _, ours, _ = sdxl
    long = "a red circle above a blue square, " * 12
    ids = ours.text_encoder.tokenize([long])
    assert ids.shape[1] >= 2
    a = ours(long, steps=2, seed=0, progress=False)
    b = ours(long.rsplit(",", 6)[0], steps=2, seed=0, progress=False)  # the cut text differs: so does the image
    assert np.abs(pixels(a.images) - pixels(b.images)).mean() > 0
    ours.save_pretrained(tmp_path / "saved")
    reloaded = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "saved")
    assert reloaded.config.force_zeros_for_empty_prompt is True
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = ours.components[name]
        mine, theirs = getattr(module, "text_model", module).state_dict(), reloaded.components[name].state_dict()
        keys = {k.removeprefix("text_model.") for k in mine}
        assert keys == {k.removeprefix("text_model.") for k in theirs}, name
    again = Pipeline.from_pretrained(tmp_path / "saved")
    c, d = (p("a cat", steps=2, seed=0, progress=False) for p in (ours, again))
    assert np.array_equal(pixels(c.images), pixels(d.images))


@pytest.mark.parametrize("split", [0.8, 0.5])
def test_base_to_refiner_handoff_matches_diffusers(sdxl, split):
    """The ensemble of experts: the base stops at denoising_end, the next pipeline resumes from its latents at
    denoising_start (diffusers' test_stable_diffusion_two_xl_mixture_of_denoiser_fast: base components both times)."""
    theirs, ours, _ = sdxl
    theirs.scheduler = diffusers.EulerDiscreteScheduler.from_config(
        {k: v for k, v in theirs.scheduler.config.items() if k != "use_karras_sigmas"})
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(**theirs.components)
    refiner.set_progress_bar_config(disable=True)
    latents = theirs(PROMPTS[:1], num_inference_steps=10, guidance_scale=5.0, denoising_end=split,
                     output_type="latent", generator=torch.Generator("cpu").manual_seed(6)).images
    expected = (refiner(PROMPTS[:1], image=latents, num_inference_steps=10, guidance_scale=5.0, denoising_start=split,
                        generator=torch.Generator("cpu").manual_seed(7), output_type="np").images * 255).round()
    first = ours(PROMPTS[:1], steps=10, guidance_scale=5.0, sampler="euler", denoising_end=split, seed=6, progress=False)
    torch.testing.assert_close(first.latents, latents.float(), atol=1e-4, rtol=1e-4)
    assert first.params["latent_sigma"] > 0
    second = ours(PROMPTS[:1], image=first.latents, steps=10, guidance_scale=5.0, sampler="euler",
                  denoising_start=split, seed=7, progress=False)
    assert_same_images(pixels(second.images), expected)


def test_handoff_refuses_bad_input(sdxl):
    _, ours, _ = sdxl
    with pytest.raises(ValueError, match="denoising_end"):
        ours("a cat", steps=2, denoising_end=1.2, progress=False)
    with pytest.raises(ValueError, match="image"):
        ours("a cat", steps=2, denoising_start=0.8, progress=False)


def test_cli_refiner_equals_the_python_handoff(sdxl, tmp_path):
    """reverie generate --refiner MODEL --refiner-switch-at f: the first model stops at f, the refiner finishes from
    its latents (A1111's refiner); the PNG records Refiner and Refiner switch at."""
    from PIL import Image

    from reverie.cli import main

    _, ours, path = sdxl
    out = tmp_path / "refined.png"
    assert main(["generate", PROMPTS[0], "--model", str(path), "--refiner", str(path), "--refiner-switch-at", "0.6",
                 "--steps", "5", "--seed", "3", "--out", str(out), "--safety-checker", "none"]) in (0, None)
    first = ours(PROMPTS[0], steps=5, seed=3, denoising_end=0.6, progress=False)
    second = ours(PROMPTS[0], steps=5, seed=3, image=first.latents, denoising_start=0.6, sampler=first.params["sampler"],
                  progress=False)
    image = Image.open(out)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(second.images[0]))
    assert "Refiner switch at: 0.6" in image.info["parameters"] and "Refiner: " in image.info["parameters"]


def test_refiner_refuses_text_to_image(refiner):
    _, ours, _ = refiner
    with pytest.raises(ValueError, match="image"):
        ours("a cat", steps=2, progress=False)


def test_sdxl_v_prediction_zero_terminal_snr_matches_diffusers(sdxl, tmp_path):
    """A v-prediction SDXL with zero terminal SNR and trailing spacing (as such fine-tunes ship) equals diffusers."""
    import json
    import shutil

    _, _, path = sdxl
    folder = tmp_path / "vpred"
    shutil.copytree(path, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.update(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    config_path.write_text(json.dumps(config))
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    theirs.set_progress_bar_config(disable=True)
    expected = (theirs(PROMPTS[:1], num_inference_steps=4, guidance_scale=5.0, output_type="np",
                       generator=torch.Generator("cpu").manual_seed(8)).images * 255).round()
    result = Pipeline.from_pretrained(folder)(PROMPTS[:1], steps=4, guidance_scale=5.0, seed=8, progress=False)
    assert_same_images(pixels(result.images), expected)
