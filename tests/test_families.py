"""DiT, SD3 and FLUX through reverie's one pipeline, image for image against diffusers' own pipelines on tiny random
models that diffusers builds and saves (tests/tiny_families.py): same seed, same images (mean absolute pixel
difference <= 0.02 on 0..255), for several samplers, negatives, guidance variants and img2img; saved folders open
in diffusers; bad input gets a ValueError naming the field."""

import numpy as np
import pytest
import torch

from reverie import Pipeline

from tiny_families import (assert_same_images, dit_folder, flux_folder, pixels, sd3_folder, source_image,
                           theirs_pixels)

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["A painting of a squirrel eating a burger", "a red circle above a blue square"]





def gen(seed=0):
    return torch.Generator("cpu").manual_seed(seed)


# --- DiT -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    path = dit_folder(tmp_path_factory.mktemp("dit"))
    theirs = diffusers.DiTPipeline.from_pretrained(path)
    theirs.set_progress_bar_config(disable=True)
    return theirs, Pipeline.from_pretrained(path), path


@pytest.mark.parametrize("sampler,cls", [("ddim", "DDIMScheduler"), ("dpmpp_2m", "DPMSolverMultistepScheduler")])
def test_dit_matches_diffusers(dit, sampler, cls):
    theirs, ours, _ = dit
    # as the real DiT folders (diffusers' conversion script); the tiny test's DDIMScheduler() clips x0
    theirs.scheduler = getattr(diffusers, cls).from_config(theirs.scheduler.config, clip_sample=False)
    expected = theirs_pixels(theirs(class_labels=[1, 7], num_inference_steps=4, guidance_scale=4.0,
                                    generator=gen(0), output_type="np"))
    result = ours([1, 7], steps=4, guidance_scale=4.0, sampler=sampler, seed=0, progress=False)
    assert_same_images(pixels(result.images), expected)
    assert result.params["family"] == "dit"


def test_dit_refuses_bad_labels_and_negatives(dit):
    _, ours, _ = dit
    with pytest.raises(ValueError, match="prompt"):
        ours([1000], steps=1, progress=False)
    with pytest.raises(ValueError, match="prompt"):
        ours(["no such class"], steps=1, progress=False)
    with pytest.raises(ValueError, match="negative_prompt"):
        ours([1], negative_prompt="blurry", steps=1, sampler="ddim", progress=False)
    with pytest.raises(ValueError, match="flow"):
        ours([1], steps=1, sampler="euler_flow", progress=False)


# --- SD3 -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[False, True], ids=["sd3", "sd35"])
def sd3(request, tmp_path_factory):
    path = sd3_folder(tmp_path_factory.mktemp("sd3"), sd35=request.param)
    theirs = diffusers.StableDiffusion3Pipeline.from_pretrained(path)
    theirs.set_progress_bar_config(disable=True)
    return theirs, Pipeline.from_pretrained(path), path


SD3_SAMPLERS = {"euler_flow": ("FlowMatchEulerDiscreteScheduler", {}),
                "dpmpp_2m": ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                                 flow_shift=3.0))}


@pytest.mark.parametrize("sampler", list(SD3_SAMPLERS))
@pytest.mark.parametrize("negative", [None, "bad quality"])
def test_sd3_matches_diffusers(sd3, sampler, negative):
    theirs, ours, _ = sd3
    cls, flags = SD3_SAMPLERS[sampler]
    theirs.scheduler = getattr(diffusers, cls).from_config(theirs.scheduler.config, **flags)
    expected = theirs_pixels(theirs(PROMPTS, negative_prompt=negative, num_inference_steps=3, guidance_scale=5.0,
                                    generator=gen(0), height=32, width=32, output_type="np"))
    kwargs = {"sampler": "DPMSolverMultistepScheduler", "shift": 3.0} if sampler == "dpmpp_2m" else {}
    result = ours(PROMPTS, negative_prompt=negative, steps=3, guidance_scale=5.0, seed=0, width=32, height=32,
                  progress=False, **kwargs)
    assert_same_images(pixels(result.images), expected)
    assert result.params["family"] == "sd3"


# --- FLUX ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def flux(request, tmp_path_factory):
    path = flux_folder(tmp_path_factory.mktemp("flux"), dev=request.param)
    theirs = diffusers.FluxPipeline.from_pretrained(path)
    theirs.set_progress_bar_config(disable=True)
    return theirs, Pipeline.from_pretrained(path), path


@pytest.mark.parametrize("size", [(8, 8), (16, 8)])
def test_flux_matches_diffusers(flux, size):
    theirs, ours, _ = flux
    width, height = size
    dev = ours.transformer.config.guidance_embeds
    guidance = 5.0 if dev else 0.0
    expected = theirs_pixels(theirs(PROMPTS, num_inference_steps=3, guidance_scale=guidance, generator=gen(0),
                                    height=height, width=width, max_sequence_length=48, output_type="np"))
    result = ours(PROMPTS, steps=3, guidance_scale=guidance, seed=0, width=width, height=height,
                  max_sequence_length=48, progress=False)
    assert_same_images(pixels(result.images), expected)
    assert result.params["family"] == "flux" and result.params["variant"] == ("dev" if dev else "schnell")


def test_flux_true_cfg_with_a_negative_prompt(flux):
    theirs, ours, _ = flux
    expected = theirs_pixels(theirs(PROMPTS, negative_prompt="bad quality", true_cfg_scale=2.0, num_inference_steps=2,
                                    guidance_scale=3.5, generator=gen(1), height=8, width=8, max_sequence_length=48,
                                    output_type="np"))
    result = ours(PROMPTS, negative_prompt="bad quality", true_cfg_scale=2.0, steps=2, guidance_scale=3.5, seed=1,
                  width=8, height=8, max_sequence_length=48, progress=False)
    assert_same_images(pixels(result.images), expected)


def test_flux_refuses_bad_sizes_and_samplers(flux):
    _, ours, _ = flux
    with pytest.raises(ValueError, match="width"):
        ours("a cat", width=9, height=8, steps=1, progress=False)
    with pytest.raises(ValueError, match="sampler"):
        ours("a cat", width=8, height=8, steps=1, sampler="ddim", progress=False)
    with pytest.raises(ValueError, match="clip_skip"):
        ours("a cat", width=8, height=8, steps=1, clip_skip=1, progress=False)
    with pytest.raises(ValueError, match="max_sequence_length"):
        ours("a cat", width=8, height=8, steps=1, max_sequence_length=513, progress=False)


# --- img2img on flow models ----------------------------------------------------------------------------------



@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_sd3_img2img_matches_diffusers(sd3, strength):
    theirs, ours, _ = sd3
    i2i = diffusers.StableDiffusion3Img2ImgPipeline(**theirs.components)
    i2i.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(theirs.scheduler.config)
    i2i.set_progress_bar_config(disable=True)
    image = source_image((32, 32))
    expected = theirs_pixels(i2i(PROMPTS[:1], image=image, strength=strength, num_inference_steps=5, guidance_scale=5.0,
                                 generator=gen(2), output_type="np"))
    result = ours(PROMPTS[:1], image=image, strength=strength, steps=5, guidance_scale=5.0, seed=2, progress=False)
    assert_same_images(pixels(result.images), expected)


def test_flux_img2img_matches_diffusers(flux):
    theirs, ours, _ = flux
    i2i = diffusers.FluxImg2ImgPipeline(**theirs.components)
    i2i.set_progress_bar_config(disable=True)
    image = source_image((16, 8))
    guidance = 3.5 if ours.transformer.config.guidance_embeds else 0.0
    expected = theirs_pixels(i2i(PROMPTS, image=image, strength=0.7, num_inference_steps=5, guidance_scale=guidance,
                                 generator=gen(4), height=8, width=16, max_sequence_length=48, output_type="np"))
    result = ours(PROMPTS, image=image, strength=0.7, steps=5, guidance_scale=guidance, seed=4,
                  max_sequence_length=48, progress=False)
    assert_same_images(pixels(result.images), expected)


def test_flow_inpainting_keeps_the_known_region(sd3):
    _, ours, _ = sd3
    image = source_image((32, 32))
    mask = np.zeros((32, 32), dtype="uint8")
    mask[8:24, 8:24] = 255
    from PIL import Image

    result = ours(PROMPTS[0], image=image, mask_image=Image.fromarray(mask), steps=4, guidance_scale=5.0, seed=0,
                  mask_blur=0, progress=False)
    out, src = pixels(result.images)[0], np.asarray(image, dtype=np.float64)
    keep = np.ones((32, 32), bool)
    keep[6:26, 6:26] = False  # away from the mask edge
    assert np.abs(out[keep] - src[keep]).max() == 0  # pasted back exactly
    assert np.abs(out[12:20, 12:20] - src[12:20, 12:20]).mean() > 5  # the hole was repainted


# --- SD3 options, saving, bad input ----------------------------------------------------------------------------


def test_sd3_skip_layer_guidance_matches_diffusers(sd3):
    theirs, ours, _ = sd3
    theirs.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(theirs.scheduler.config)
    kwargs = dict(skip_guidance_layers=[0], skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.0,
                  skip_layer_guidance_stop=0.6)
    expected = theirs_pixels(theirs(PROMPTS[:1], num_inference_steps=6, guidance_scale=5.0, generator=gen(5), height=32,
                                    width=32, output_type="np", **kwargs))
    result = ours(PROMPTS[:1], steps=6, guidance_scale=5.0, seed=5, width=32, height=32, progress=False, **kwargs)
    assert_same_images(pixels(result.images), expected)
    plain = ours(PROMPTS[:1], steps=6, guidance_scale=5.0, seed=5, width=32, height=32, progress=False)
    assert np.abs(pixels(plain.images) - pixels(result.images)).mean() > 0.5  # the guidance did something
    with pytest.raises(ValueError, match="skip_guidance_layers"):
        ours(PROMPTS[:1], steps=2, seed=5, width=32, height=32, skip_guidance_layers=[5], progress=False)


def test_sd3_long_t5_prompt_is_truncated_with_a_warning(sd3):
    _, ours, _ = sd3
    with pytest.warns(UserWarning, match="max_sequence_length"):
        ours("a red circle " * 20, steps=1, seed=0, width=32, height=32, max_sequence_length=8, progress=False)


def test_unknown_family_options_are_refused(sd3, dit):
    with pytest.raises(ValueError, match="true_cfg_scale"):
        sd3[1]("a cat", steps=1, width=32, height=32, true_cfg_scale=2.0, progress=False)
    with pytest.raises(ValueError, match="shift"):
        dit[1]([1], steps=1, sampler="ddim", shift=3.0, progress=False)
    with pytest.raises(ValueError, match="controlnet"):
        sd3[1]("a cat", steps=1, width=32, height=32, controlnet="shapes-segmentation", progress=False)


@pytest.mark.parametrize("which", ["dit", "sd3", "flux"])
def test_saved_folders_open_in_diffusers(which, dit, sd3, flux, tmp_path):
    theirs, ours, _ = {"dit": dit, "sd3": sd3, "flux": flux}[which]
    ours.save_pretrained(tmp_path / which)
    cls = type(theirs)
    reloaded = cls.from_pretrained(tmp_path / which)
    for name, module in theirs.components.items():
        if isinstance(module, torch.nn.Module):
            mine = reloaded.components[name].state_dict()
            assert mine.keys() == module.state_dict().keys(), name
            assert all(torch.equal(mine[k], v) for k, v in module.state_dict().items()), name
    again = Pipeline.from_pretrained(tmp_path / which)
    assert again.family.name == ours.family.name
    prompt = [3] if which == "dit" else "a cat"
    size = dict(width=8, height=8) if which == "flux" else {}
    a = ours(prompt, steps=2, seed=0, progress=False, **({"sampler": "ddim"} if which == "dit" else {}), **size)
    b = again(prompt, steps=2, seed=0, progress=False, **({"sampler": "ddim"} if which == "dit" else {}), **size)
    assert np.array_equal(pixels(a.images), pixels(b.images))


@pytest.mark.parametrize("which", ["dit", "sd3"])
def test_vae_option_replaces_the_folders_vae(which, dit, sd3, tmp_path):
    from reverie.loading import save_network

    _, ours, path = {"dit": dit, "sd3": sd3}[which]
    other = Pipeline.from_pretrained(path).vae
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)
    save_network(other, tmp_path / "vae")
    pipe = Pipeline.from_pretrained(path, vae=tmp_path / "vae")
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), other.state_dict().values()))
    assert not torch.equal(next(pipe.vae.parameters()), next(ours.vae.parameters()))


def test_fp8_transformer_folder_stays_fp8_and_equals_its_upcast_weights(flux, tmp_path):
    """A folder whose transformer is stored float8_e4m3fn loads with fp8 weights (per-layer upcast) and gives the
    images of the same weights upcast to bf16 up front."""
    import shutil

    from reverie.formats import load_weights, save_safetensors
    from reverie.models.quant import FP8_DTYPES, Fp8Linear, quantize_fp8

    _, ours, path = flux
    fp8, upcast = tmp_path / "fp8", tmp_path / "upcast"
    for folder in (fp8, upcast):
        shutil.copytree(path, folder)
    weights = quantize_fp8(Pipeline.from_pretrained(path).transformer)
    save_safetensors(weights, fp8 / "transformer" / "diffusion_pytorch_model.safetensors")
    save_safetensors({k: v.to(torch.bfloat16) for k, v in weights.items()},
                     upcast / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(v.dtype in FP8_DTYPES for v in load_weights(fp8 / "transformer").values())
    kwargs = dict(steps=2, seed=0, width=8, height=8, max_sequence_length=48, progress=False)
    stored = Pipeline.from_pretrained(fp8, dtype=torch.bfloat16)
    assert any(isinstance(m, Fp8Linear) for m in stored.transformer.modules())
    assert any(p.dtype in FP8_DTYPES for p in stored.transformer.parameters())
    reference = Pipeline.from_pretrained(upcast, dtype=torch.bfloat16)
    assert np.array_equal(pixels(stored(PROMPTS, **kwargs).images), pixels(reference(PROMPTS, **kwargs).images))


def test_dit_label_names_from_id2label(dit, tmp_path):
    """Label names (any comma-separated name of the folder's id2label) give the images of their class ids."""
    import json
    import shutil

    _, _, path = dit
    shutil.copytree(path, tmp_path / "dit")
    index = json.loads((tmp_path / "dit" / "model_index.json").read_text())
    index["id2label"] = {"1": "goldfish, Carassius auratus", "7": "cock"}
    (tmp_path / "dit" / "model_index.json").write_text(json.dumps(index))
    pipe = Pipeline.from_pretrained(tmp_path / "dit")
    assert pipe.labels == {"Carassius auratus": 1, "cock": 7, "goldfish": 1}
    by_name = pipe(["goldfish", "cock", "Carassius auratus"], steps=2, sampler="ddim", seed=[0, 1, 2], progress=False)
    by_id = pipe([1, 7, 1], steps=2, sampler="ddim", seed=[0, 1, 2], progress=False)
    assert np.array_equal(pixels(by_name.images), pixels(by_id.images))
    with pytest.raises(ValueError, match="gold"):  # a near miss lists candidates
        pipe(["gold"], steps=1, sampler="ddim", progress=False)
    pipe.save_pretrained(tmp_path / "saved")
    assert Pipeline.from_pretrained(tmp_path / "saved").labels == pipe.labels


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_variant_folders_load(which, sd3, flux, tmp_path):
    """A folder diffusers saved with variant="fp16" (every component's weights as *.fp16.safetensors) opens with
    variant="fp16" and gives the same images."""
    theirs, ours, path = {"sd3": sd3, "flux": flux}[which]
    type(theirs).from_pretrained(path).save_pretrained(tmp_path / which, variant="fp16")  # (theirs' scheduler may
    # have been swapped by another test)
    assert (tmp_path / which / "text_encoder" / "model.fp16.safetensors").is_file()
    with pytest.raises(ValueError):
        Pipeline.from_pretrained(tmp_path / which)  # no plain weights: the variant must be asked for
    pipe = Pipeline.from_pretrained(tmp_path / which, variant="fp16")
    size = dict(width=8, height=8, max_sequence_length=48) if which == "flux" else dict(width=32, height=32)
    a, b = (p("a cat", steps=2, seed=0, progress=False, **size) for p in (ours, pipe))
    assert np.array_equal(pixels(a.images), pixels(b.images))
