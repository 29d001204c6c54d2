"""The whole pipeline against diffusers' StableDiffusionPipeline on a tiny random model saved by diffusers:
same seed, same images (mean abs pixel difference <= 1 on 0..255), and folder round trips both ways."""

import numpy as np
import pytest
import torch

from reverie import Pipeline
from reverie.formats import save_safetensors, to_ldm_checkpoint

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

CORPUS = ["a red circle above a blue square", "a small green triangle on the left", "a photo of a cat",
          "blurry, low quality", "a yellow square to the left of a blue circle"] * 20
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    steps_offset=1, clip_sample=False, set_alpha_to_one=False)


def tiny_diffusers_pipeline(tmp_path, prediction_type="epsilon", linear_projection=False):
    from reverie.models.text import train_bpe_tokenizer

    torch.manual_seed(0)
    tokenizer = train_bpe_tokenizer(CORPUS, 600, tmp_path / "bpe")
    # sizes follow the SD releases' conventions (32 norm groups, 64-wide heads except SD 1.x's 8 UNet heads), so
    # that a single-file checkpoint's configs can be inferred from its shapes as for the real models
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu" if linear_projection else "quick_gelu"))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=64,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        **(dict(block_out_channels=(64, 128), attention_head_dim=(1, 2), use_linear_projection=True)
           if linear_projection else dict(block_out_channels=(32, 64), attention_head_dim=8)))
    with torch.no_grad():  # eps of unit scale, like a trained model's (a random init gives about 0.3)
        unet.conv_out.weight.mul_(3)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    scheduler = diffusers.DDIMScheduler(**SD_SCHEDULER, prediction_type=prediction_type)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "sd", safe_serialization=True)
    # the oracle is diffusers reading the folder, exactly as reverie reads it
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "sd", safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


SAMPLERS = {  # reverie sampler name -> the diffusers scheduler it must reproduce
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddpm": ("DDPMScheduler", {}),  # ancestral: same noise draws, and it always ends on alphabar 1
}


def diffusers_images(pipe, sampler, prompt, negative, seed, steps=8, size=32, guidance=7.5):
    cls, flags = SAMPLERS[sampler]
    config = {k: v for k, v in pipe.scheduler.config.items() if k != "use_karras_sigmas"}  # from the last call
    pipe.scheduler = getattr(diffusers, cls).from_config(config, **flags)
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator("cpu").manual_seed(seed), height=size, width=size, output_type="np")
    return (out.images * 255).round()


def ours(pipe, sampler, prompt, negative, seed, steps=8, size=32, guidance=7.5):
    result = pipe(prompt, negative_prompt=negative, steps=steps, guidance_scale=guidance, sampler=sampler,
                  width=size, height=size, seed=seed, progress=False)
    return np.stack([np.asarray(im, dtype=np.float64) for im in result.images]), result


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def pipes(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    theirs = tiny_diffusers_pipeline(tmp, prediction_type=request.param, linear_projection=request.param != "epsilon")
    return theirs, Pipeline.from_pretrained(tmp / "sd"), tmp


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
def test_same_images_as_diffusers(pipes, sampler, negative):
    theirs, pipe, _ = pipes
    prompt = "a red circle above a blue square"
    a, result = ours(pipe, sampler, prompt, negative, seed=42)
    b = diffusers_images(theirs, sampler, prompt, negative, seed=42)
    assert a.shape == b.shape == (1, 32, 32, 3)
    assert np.abs(a - b).mean() <= 0.02  # a few pixels may round the other way; a schedule error moves many
    assert a.std() > 2  # not a flat image: the comparison means something
    assert result.params["seeds"] == [42] and result.params["steps"] == 8
    c, _ = ours(pipe, sampler, prompt, negative, seed=43)
    assert np.abs(a - c).mean() > 1  # another seed is another image


def test_seed_lists_and_batches(pipes):
    theirs, pipe, _ = pipes
    a, result = ours(pipe, "euler", ["a photo of a cat", "a small green triangle on the left"], None, seed=[1, 2])
    assert result.params["seeds"] == [1, 2] and a.shape[0] == 2
    alone, _ = ours(pipe, "euler", "a small green triangle on the left", None, seed=2)
    assert np.abs(a[1] - alone[0]).max() <= 1  # a batch with one generator per image equals the image alone
    # diffusers: one generator for the batch draws all latents from it
    b = diffusers_images(theirs, "euler", ["a photo of a cat"] * 2, None, seed=5)
    c, _ = ours(pipe, "euler", ["a photo of a cat"] * 2, None, seed=5)
    assert np.abs(b - c).mean() <= 1.0


def test_reverie_save_opens_in_diffusers(pipes, tmp_path):
    theirs, pipe, _ = pipes
    pipe.save_pretrained(tmp_path / "ours")
    reloaded = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "ours", safety_checker=None)
    reloaded.set_progress_bar_config(disable=True)
    a = diffusers_images(reloaded, "ddim", "a photo of a cat", None, seed=3)
    b = diffusers_images(theirs, "ddim", "a photo of a cat", None, seed=3)
    assert np.abs(a - b).mean() <= 1.0
    again = Pipeline.from_pretrained(tmp_path / "ours")
    assert np.abs(ours(again, "ddim", "a photo of a cat", None, 3)[0] - b).mean() <= 1.0


def test_single_file_checkpoint_matches_the_folder(pipes, tmp_path):
    theirs, pipe, tmp = pipes
    components = {"unet": theirs.unet.state_dict(), "vae": theirs.vae.state_dict(),
                  "text_encoder": theirs.text_encoder.state_dict()}
    sd2 = theirs.unet.config.use_linear_projection  # the SD 2.x layout, with an OpenCLIP text encoder
    save_safetensors(to_ldm_checkpoint(components, text_encoder_format="open_clip" if sd2 else "clip"),
                     tmp_path / "model.safetensors")
    prediction = theirs.scheduler.config.prediction_type
    single = Pipeline.from_pretrained(tmp_path / "model.safetensors", tokenizer=tmp / "sd" / "tokenizer",
                                      prediction_type=prediction)
    # ddim: the SD scheduler a single file implies spaces DDIM's timesteps as this folder does ("leading")
    a, _ = ours(single, "ddim", "a photo of a cat", None, 9)
    b, _ = ours(pipe, "ddim", "a photo of a cat", None, 9)
    assert np.abs(a - b).max() == 0


@pytest.mark.parametrize("kwargs,field", [
    (dict(width=33), "width"), (dict(height=21), "height"), (dict(height=0), "height"), (dict(steps=0), "steps"),
    (dict(guidance_scale=float("nan")), "guidance_scale"), (dict(sampler="nope"), "unknown sampler"),
    (dict(num_images=0), "num_images"), (dict(seed=-1), "seed"), (dict(seed=[1, 2]), "seed"),
    (dict(prompt=3), "prompt"), (dict(latents=torch.zeros(1, 4, 3, 3)), "latents"),
])
def test_bad_requests_name_the_field(pipes, kwargs, field):
    _, pipe, _ = pipes
    kwargs = {"prompt": "a photo of a cat", "width": 32, "height": 32, "steps": 2, **kwargs}
    with pytest.raises(ValueError, match=field):
        pipe(kwargs.pop("prompt"), progress=False, **kwargs)


def test_generate_command_writes_the_same_image(pipes, tmp_path, capsys):
    from PIL import Image

    from reverie.cli import main

    _, pipe, tmp = pipes
    out = tmp_path / "out.png"
    assert main(["generate", "a photo of a cat", "--model", str(tmp / "sd"), "--steps", "3", "--width", "32",
                 "--height", "32", "--seed", "7", "--sampler", "Euler a", "--out", str(out)]) == 0
    expected, _ = ours(pipe, "Euler a", "a photo of a cat", None, 7, steps=3)
    assert np.array_equal(np.asarray(Image.open(out), dtype=np.float64), expected[0])
    assert main(["generate", "x", "--model", str(tmp / "sd"), "--width", "31"]) == 2
    assert "width must be a multiple" in capsys.readouterr().err


def test_offload_and_bfloat16(pipes):
    _, pipe, tmp = pipes
    base, _ = ours(pipe, "euler", "a photo of a cat", None, 4)
    offloaded = Pipeline.from_pretrained(tmp / "sd", offload=True)
    assert np.array_equal(ours(offloaded, "euler", "a photo of a cat", None, 4)[0], base)
    half = Pipeline.from_pretrained(tmp / "sd", dtype=torch.bfloat16)
    assert next(half.unet.parameters()).dtype == torch.bfloat16
    low, _ = ours(half, "euler", "a photo of a cat", None, 4)
    assert np.abs(low - base).mean() < 12  # bf16 has 8 mantissa bits: close, not equal


def test_default_size_is_the_models_native_size(pipes):
    theirs, pipe, _ = pipes
    native = theirs.unet.config.sample_size * theirs.vae_scale_factor  # diffusers' default height and width
    assert pipe.default_size == native
    assert pipe("a photo of a cat", steps=1, progress=False).images[0].size == (native, native)


def test_fp16_save_stores_every_component_in_half_precision(pipes, tmp_path):
    from reverie.formats import load_safetensors

    _, pipe, _ = pipes
    pipe.save_pretrained(tmp_path / "half", dtype=torch.float16)
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        tensors = load_safetensors(tmp_path / "half" / f"{part}.safetensors")
        assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}, part
    a, _ = ours(Pipeline.from_pretrained(tmp_path / "half"), "euler", "a photo of a cat", None, 4)
    b, _ = ours(pipe, "euler", "a photo of a cat", None, 4)
    assert np.abs(a - b).mean() < 3  # fp16 weights: close to the fp32 images


def test_bundled_shapes_model_generates_by_default(tmp_path):
    """The newcomer's first command: no --model, the shipped shapes model, a 64x64 PNG."""
    from PIL import Image

    from reverie.cli import BUNDLED, main

    out = tmp_path / "first.png"
    assert main(["generate", "a red circle above a blue square", "--steps", "4", "--seed", "0", "--out",
                 str(out)]) == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    assert np.asarray(image).std() > 10  # a picture, not a flat field
    weights = [p for p in (BUNDLED / "shapes").rglob("*.safetensors")]
    assert len(weights) == 3 and all(p.stat().st_size < 40 * 2**20 for p in weights)
