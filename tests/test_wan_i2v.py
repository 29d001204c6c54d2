"""Wan 2.1 image-to-video through reverie's one Pipeline equals diffusers' WanImageToVideoPipeline: a tiny I2V model
(tiny_families.wan_i2v_pipeline: a 36-channel transformer with CLIP image tokens), saved with save_pretrained and
opened by Pipeline.from_pretrained, gives diffusers' frames and final latents for FlowMatchEuler (shift 7) and UniPC
in flow mode (shift 3) at 64 x 48 and 9 frames (3 latent frames of 6 x 8 tokens), two prompts and CFG, from a first
frame of another size (resized as diffusers resizes it).

diffusers 0.42.1's I2V prompt_clean calls ftfy unconditionally (WanPipeline's only when ftfy is installed); it is not
installed here, so the oracle gets WanPipeline's prompt_clean, which reverie's wan_prompt_clean already equals
(tests/test_wan_pipeline.py). The text states stay at diffusers' 512 tokens: its I2V attention splits the image
tokens off the text by that hard-coded length."""

import numpy as np
import pytest
import torch

from reverie.families.wan import first_frame_condition, image_tokens
from reverie.pipeline import Pipeline

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler  # noqa: E402
from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v  # noqa: E402
from tiny_families import source_image, wan_i2v_pipeline  # noqa: E402

UNIPC = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
SCHEDULERS = {"euler": lambda: FlowMatchEulerDiscreteScheduler(shift=7.0),
              "unipc": lambda: UniPCMultistepScheduler(**UNIPC)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers' WanImageToVideoPipeline, {scheduler name: its saved folder})."""
    patch = pytest.MonkeyPatch()
    patch.setattr(pipeline_wan_i2v, "prompt_clean", pipeline_wan.prompt_clean)  # see the module docstring
    ref, folders = wan_i2v_pipeline(), {}
    for name, scheduler in SCHEDULERS.items():
        ref.scheduler = scheduler()
        folders[name] = tmp_path_factory.mktemp(f"wan-i2v-{name}")
        ref.save_pretrained(folders[name])
    yield ref, folders
    patch.undo()


def diffusers_video(ref, scheduler: str, image, prompt, *, seed, steps, **kwargs):
    """diffusers' (B, F, 3, H, W) frames in [0, 1] and final latents (the last step's, by callback)."""
    ref.scheduler = SCHEDULERS[scheduler]()
    final = {}

    def keep(pipe, i, t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    frames = ref(image=image, prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed),
                 num_inference_steps=steps, output_type="pt", callback_on_step_end=keep, **kwargs).frames
    return frames, final["latents"]


def assert_same_video(result, theirs, latents=None):
    assert result.videos.shape == theirs.shape
    if latents is not None:
        torch.testing.assert_close(result.latents, latents, rtol=0, atol=1e-5)
    per_frame = (result.videos - theirs).abs().mul(255).mean(dim=(2, 3, 4))  # (B, F) on 0..255
    assert per_frame.max() <= 0.02, per_frame
    torch.testing.assert_close(result.videos, theirs, rtol=0, atol=1e-5)
    assert theirs.std() > 0.05  # the perturbed tiny model draws something, not a flat grey


CASES = {  # name: (scheduler, negative_prompt, steps, guidance_scale)
    "euler": ("euler", ["negative", ""], 2, 5.0),
    "unipc": ("unipc", None, 3, 4.0),  # default negative ""; UniPC's order-2 steps
}


@pytest.mark.parametrize("case", CASES)
def test_video_matches_diffusers(tiny, case):
    ref, folders = tiny
    scheduler, negative, steps, scale = CASES[case]
    image, prompts = source_image((40, 56)), ["dance monkey", "red fox baking a cake"]
    size = dict(width=64, height=48, num_frames=9)
    pipe = Pipeline.from_pretrained(folders[scheduler])
    result = pipe(prompts, image=image, negative_prompt=negative, steps=steps, guidance_scale=scale, seed=0,
                  progress=False, **size)
    theirs, latents = diffusers_video(ref, scheduler, image, prompts, seed=0, steps=steps, negative_prompt=negative,
                                      guidance_scale=scale, **size)
    assert result.videos.shape == (2, 9, 3, 48, 64) and result.latents.shape == (2, 16, 3, 6, 8)
    assert_same_video(result, theirs, latents)
    assert result.params["family"] == "wan_i2v" and result.params["num_frames"] == 9
    assert result.params["sampler"] == ("euler_flow" if scheduler == "euler" else "unipc")
    # the first frame conditions the video: another image gives another one, from the same noise
    other = pipe(prompts, image=source_image((64, 48), seed=5), negative_prompt=negative, steps=steps,
                 guidance_scale=scale, seed=0, progress=False, **size)
    assert (other.videos - result.videos).abs().mean() > 0.01


def test_first_frame_inputs_match_diffusers(tiny):
    """The CLIP tokens and the VAE condition (mask, then normalised latents) equal diffusers' encode_image and
    prepare_latents, for an image that is resized and one that is not, at two frame counts."""
    ref, folders = tiny
    pipe = Pipeline.from_pretrained(folders["euler"])
    for image, (width, height), frames in ((source_image((40, 56)), (64, 48), 9), (source_image((32, 16)), (32, 16),
                                                                                  5)):
        theirs_tokens = ref.encode_image(image, torch.device("cpu"))
        ours_tokens = image_tokens(pipe, image)
        assert ours_tokens.shape == theirs_tokens.shape == (1, 65, 4)  # class token + 8 x 8 patches, CLIP width
        torch.testing.assert_close(ours_tokens, theirs_tokens, rtol=0, atol=1e-6)

        pixels = ref.video_processor.preprocess(image, height=height, width=width).float()
        _, condition = ref.prepare_latents(pixels, 1, 16, height, width, frames, torch.float32, torch.device("cpu"),
                                           torch.Generator().manual_seed(0))
        ours = first_frame_condition(pipe, image, width, height, frames)
        latent_frames = (frames - 1) // 4 + 1
        assert ours.shape == condition.shape == (1, 20, latent_frames, height // 8, width // 8)
        torch.testing.assert_close(ours, condition, rtol=0, atol=1e-6)
        assert (ours[:, :4, 0] == 1).all() and (ours[:, :4, 1:] == 0).all()  # the mask: latent frame 0 known


def test_num_images_equals_repeated_prompts(tiny):
    """num_images=2 gives diffusers' video for each prompt listed twice (diffusers' own num_videos_per_prompt > 1
    fails in 0.42.1: it repeats the image tokens per prompt, not per video)."""
    ref, folders = tiny
    pipe = Pipeline.from_pretrained(folders["euler"])
    image, kwargs = source_image((32, 32)), dict(guidance_scale=3.0, width=32, height=32, num_frames=5)
    result = pipe(["dance monkey", "a cat"], image=image, num_images=2, steps=2, seed=1, progress=False, **kwargs)
    theirs, latents = diffusers_video(ref, "euler", image, ["dance monkey"] * 2 + ["a cat"] * 2, seed=1, steps=2,
                                      **kwargs)
    assert_same_video(result, theirs, latents)


@pytest.mark.parametrize("image", [None, torch.zeros(1, 3, 16, 16), "list", "missing.png"])
def test_bad_image_names_image(tiny, image, tmp_path):
    _, folders = tiny
    pipe = Pipeline.from_pretrained(folders["euler"])
    image = [source_image((16, 16))] * 2 if image == "list" else tmp_path / image if image == "missing.png" else image
    with pytest.raises(ValueError, match="image"):
        pipe("dance monkey", image=image, steps=1, width=16, height=16, num_frames=5, progress=False)


def test_edit_arguments_are_refused(tiny):
    _, folders = tiny
    pipe = Pipeline.from_pretrained(folders["euler"])
    with pytest.raises(ValueError, match="strength"):
        pipe("dance monkey", image=source_image((16, 16)), strength=0.5, steps=1, width=16, height=16, num_frames=5,
             progress=False)


def test_cli_generates_a_clip(tiny, tmp_path, capsys):
    """generate --image first.png --frames 9 --out clip.mp4; the same command writing PNG frames gives exactly the
    API's frames (the MP4's H.264 is lossy on this noise-like tiny video)."""
    from reverie.cli import main
    from reverie.video_io import read_video

    _, folders = tiny
    source_image((48, 40)).save(tmp_path / "first.png")
    args = ["generate", "dance monkey", "--model", str(folders["euler"]), "--frames", "9", "--width", "32",
            "--height", "32", "--steps", "2", "--seed", "3"]
    assert main([*args, "--image", str(tmp_path / "first.png"), "--out", str(tmp_path / "clip.mp4")]) == 0
    frames = read_video(tmp_path / "clip.mp4")
    assert len(frames) == 9 and frames[0].size == (32, 32)
    pattern = tmp_path / "clip" / "frame_%04d.png"
    assert main([*args, "--image", str(tmp_path / "first.png"), "--out", str(pattern)]) == 0
    expected = Pipeline.from_pretrained(folders["euler"])("dance monkey", image=tmp_path / "first.png", steps=2,
                                                          seed=3, width=32, height=32, num_frames=9, progress=False)
    assert [np.asarray(f).tolist() for f in read_video(pattern)] == [np.asarray(f).tolist()
                                                                     for f in expected.frames[0]]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "none.mp4")]) == 2  # no --image
    assert "image" in capsys.readouterr().err
