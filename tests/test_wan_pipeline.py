"""Wan 2.1 text-to-video through reverie's one Pipeline equals diffusers' WanPipeline: diffusers' tiny test model
(tests/pipelines/wan/test_wan.py, built offline with a UMT5 encoder and a WordLevel tokenizer, weights moved off
their init), saved with save_pretrained and opened by Pipeline.from_pretrained, gives diffusers' frames and final
latents for FlowMatchEuler (shift 7) and UniPC in flow mode (shift 3), at sizes and frame counts that exercise
space and time, with batches and negative prompts."""

import numpy as np
import pytest
import torch

from reverie.pipeline import Pipeline
from reverie.text_conditioning import wan_conditioning, wan_prompt_clean

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler  # noqa: E402
from diffusers.pipelines.wan.pipeline_wan import prompt_clean  # noqa: E402
from tiny_families import wan_pipeline  # noqa: E402

UNIPC = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers' WanPipeline, {scheduler name: its saved folder})."""
    ref = wan_pipeline()
    folders = {}
    for name, scheduler in (("euler", FlowMatchEulerDiscreteScheduler(shift=7.0)),
                            ("unipc", UniPCMultistepScheduler(**UNIPC))):
        ref.scheduler = scheduler
        folders[name] = tmp_path_factory.mktemp(f"wan-{name}")
        ref.save_pretrained(folders[name])
    return ref, folders


def diffusers_video(ref, scheduler, prompt, *, seed, steps, **kwargs):
    """diffusers' (B, F, 3, H, W) frames in [0, 1] and final latents (the last step's, by callback)."""
    ref.scheduler = scheduler
    final = {}

    def keep(pipe, i, t, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    frames = ref(prompt, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=steps,
                 output_type="pt", callback_on_step_end=keep, **kwargs).frames
    return frames, final["latents"]


CASES = {  # name: (scheduler, prompt, negative_prompt, width, height, num_frames, steps, guidance_scale)
    "test-config": ("euler", "dance monkey", "negative", 16, 16, 9, 2, 6.0),
    "unipc-shift-3": ("unipc", "a cat and dog", None, 16, 16, 9, 3, 5.0),  # default negative ""; order 2 step
    "space-and-time": ("euler", ["dance monkey", "red fox baking   a &amp;amp; cake"], ["negative", ""],
                       64, 48, 17, 2, 5.0),  # latents 5 x 6 x 8: 60 tokens, rotary positions on all three axes
}


@pytest.mark.parametrize("case", CASES)
def test_video_matches_diffusers(tiny, case):
    ref, folders = tiny
    scheduler, prompt, negative, width, height, frames, steps, scale = CASES[case]
    pipe = Pipeline.from_pretrained(folders[scheduler])
    result = pipe(prompt, negative_prompt=negative, steps=steps, guidance_scale=scale, width=width, height=height,
                  seed=0, num_frames=frames, max_sequence_length=16, progress=False)
    theirs, latents = diffusers_video(ref, FlowMatchEulerDiscreteScheduler(shift=7.0) if scheduler == "euler" else
                                      UniPCMultistepScheduler(**UNIPC), prompt, seed=0, steps=steps,
                                      negative_prompt=negative, guidance_scale=scale, width=width, height=height,
                                      num_frames=frames, max_sequence_length=16)
    batch = 1 if isinstance(prompt, str) else len(prompt)
    assert result.videos.shape == theirs.shape == (batch, frames, 3, height, width)
    assert result.latents.shape == (batch, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    torch.testing.assert_close(result.latents, latents, rtol=0, atol=1e-5)
    per_frame = (result.videos - theirs).abs().mul(255).mean(dim=(2, 3, 4))  # (B, F) on 0..255
    assert per_frame.max() <= 0.02, per_frame
    torch.testing.assert_close(result.videos, theirs, rtol=0, atol=1e-5)
    assert theirs.std() > 0.05  # the perturbed tiny model draws something, not a flat grey
    # the PIL frames are the float frames rounded; the images are the videos' first frames
    assert len(result.frames) == len(result.images) == batch and all(len(f) == frames for f in result.frames)
    for b in range(batch):
        pil = torch.stack([torch.from_numpy(np.array(f)) for f in result.frames[b]])
        expected = (result.videos[b].permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
        assert torch.equal(pil, expected)
        assert result.images[b] is result.frames[b][0]
    assert result.params["family"] == "wan" and result.params["num_frames"] == frames
    assert result.params["sampler"] == ("euler_flow" if scheduler == "euler" else "unipc")


@pytest.mark.filterwarnings("ignore:prompt 1 has 14 UMT5 tokens")
def test_prompt_embeds_match_diffusers(tiny):
    """Cleaning, padding, the mask and the zeroed tail, at two lengths (one truncating)."""
    ref, _ = tiny
    prompts = ["dance  monkey\n", "red fox &amp;amp; a quick brown dog in the kitchen and a cake"]
    assert [wan_prompt_clean(p) for p in prompts] == [prompt_clean(p) for p in prompts]
    with pytest.warns(UserWarning, match="max_sequence_length=8, so 6 were dropped"):
        wan_conditioning(ref.text_encoder, ref.tokenizer, prompts, max_sequence_length=8)
    for length in (16, 8):
        ours = wan_conditioning(ref.text_encoder, ref.tokenizer, prompts, max_sequence_length=length)
        theirs = ref.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=length)[0]
        assert ours.shape == (2, length, 32)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        assert (ours[0, 3:] == 0).all() and (ours[0, :3] != 0).any()  # "dance monkey </s>", then zeros


def test_batch_rows_equal_single_runs(tiny):
    """A batch of two prompts with seeds [s0, s1] gives each prompt's video run alone."""
    _, folders = tiny
    pipe = Pipeline.from_pretrained(folders["euler"])
    kwargs = dict(steps=2, guidance_scale=4.0, width=16, height=32, num_frames=5, max_sequence_length=8,
                  progress=False)
    both = pipe(["dance monkey", "a cat"], negative_prompt=["negative", "dog"], seed=[3, 4], **kwargs)
    for i, (prompt, negative, seed) in enumerate((("dance monkey", "negative", 3), ("a cat", "dog", 4))):
        alone = pipe(prompt, negative_prompt=negative, seed=seed, **kwargs)
        torch.testing.assert_close(both.videos[i:i + 1], alone.videos, rtol=0, atol=1e-5)


def test_safety_replaces_a_flagged_video_whole(tiny):
    """The filter checks each video's first frame (also in previews) and blanks every frame of a flagged one."""
    _, folders = tiny
    seen = []
    pipe = Pipeline.from_pretrained(folders["euler"], safety_checker=lambda images: (seen.append(images),
                                                                                      [True, False])[1])
    previews = []
    result = pipe(["dance monkey", "a cat"], steps=2, width=16, height=16, num_frames=5, seed=0, progress=False,
                  callback=lambda step: previews.append(step.x))
    assert result.nsfw == [True, False] and len(seen) == 3  # two previews and the result, one frame per video
    assert all(im.size == (16, 16) for images in seen for im in images)
    assert (previews[0][0] == 0).all() and (previews[0][1] != 0).any()
    assert (result.videos[0] == 0).all() and (result.latents[0] == 0).all()
    assert all(not np.array(f).any() for f in result.frames[0]) and result.images[0] is result.frames[0][0]
    assert result.videos[1].std() > 0.05


@pytest.mark.parametrize("kwargs,field", [
    (dict(num_frames=8), "num_frames"),  # not 1 + 4k (diffusers would round down to 5)
    (dict(num_frames=0), "num_frames"),
    (dict(width=24), "width"),  # not a multiple of 16
    (dict(height=40), "height"),
    (dict(max_sequence_length=0), "max_sequence_length"),
    (dict(image=torch.zeros(1, 3, 16, 16)), "image"),
    (dict(denoising_end=0.5), "denoising_end"),
    (dict(clip_skip=1), "clip_skip"),
    (dict(prompt_2="x"), "prompt_2"),
])
def test_bad_input_names_the_field(tiny, kwargs, field):
    _, folders = tiny
    pipe = Pipeline.from_pretrained(folders["euler"])
    call = dict(steps=1, width=16, height=16, num_frames=5, progress=False) | kwargs
    with pytest.raises(ValueError, match=field):
        pipe("dance monkey", **call)


def test_wan22_folders_are_refused(tiny, tmp_path):
    import json
    import shutil

    _, folders = tiny
    shutil.copytree(folders["euler"], tmp_path / "wan22")
    index = json.loads((tmp_path / "wan22" / "model_index.json").read_text())
    (tmp_path / "wan22" / "model_index.json").write_text(json.dumps(index | {"boundary_ratio": 0.875}))
    with pytest.raises(ValueError, match="boundary_ratio"):
        Pipeline.from_pretrained(tmp_path / "wan22")
