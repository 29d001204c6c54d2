"""reverie's own text-to-video model (reverie.families.spacetime, the train task "video"): a tiny run on moving
squares learns and exports a ReverieVideoPipeline folder that Pipeline.from_pretrained opens and samples with two
samplers (batch = singles, a seed fixes the frames), image-to-video pins the first latent frame to the image's
latents, resume is bit-exact, and the training loss is FlowDenoiser's loss on the family's conditioning."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from reverie import Pipeline
from reverie.data.shapes import PALETTE
from reverie.denoisers import FlowDenoiser
from reverie.train import load_config, train

COLORS = {name: tuple(c / 127.5 - 1 for c in rgb) for name, rgb in PALETTE.items()}  # the shapes data's, in [-1, 1]
MOTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}  # (dx, dy) per frame, in square sides


class MovingSquares(Dataset):
    """A colored square sliding across a white background by a quarter of its side per frame, captioned
    "a red square moving right"; item i has color i % 4 and motion (i // 4) % 4."""

    def __init__(self, n=8, frames=5, size=32, seed=0):
        rng = np.random.default_rng(seed)
        side, self.items = size // 4, []
        for i in range(n):
            color, motion = list(COLORS)[i % 4], list(MOTIONS)[(i // 4) % 4]
            (dx, dy), (x, y) = MOTIONS[motion], rng.integers(side, size - 2 * side, 2)
            video = np.ones((3, frames, size, size), dtype=np.float32)  # white, as the shapes data
            for f in range(frames):
                fx, fy = int(x + dx * f * side / 4), int(y + dy * f * side / 4)
                video[:, f, fy:fy + side, fx:fx + side] = np.array(COLORS[color], dtype=np.float32)[:, None, None]
            self.items.append({"video": torch.from_numpy(video), "caption": f"a {color} square moving {motion}"})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def video_config(out, *overrides):
    return load_config(None, ["--model.kind=video", "--model.vae_path=shapes", "--model.video_preset=tiny",
                              "--model.text_hidden_size=32", "--model.text_layers=1", "--model.text_heads=2",
                              "--model.text_max_length=12", "--model.vocab_size=600", f"--train.output_dir={out}",
                              "--train.batch_size=4", "--optim.lr=3e-3", "--optim.warmup_steps=2",
                              "--train.ema_decay=0.9", "--log.progress=false", "--log.sample_every=0",
                              "--log.sample_count=2", "--log.sample_steps=2", *overrides])


def assert_states_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 30-step tiny run on 8 clips of 5 frames at 32x32 (the shapes VAE: 3 x 5 x 8 x 8 latents, 80 tokens)."""
    out = tmp_path_factory.mktemp("video") / "run"
    return train(video_config(out, "--train.steps=30"), dataset=MovingSquares())


@pytest.fixture(scope="module")
def pipe(run):
    return Pipeline.from_pretrained(run.export)


def test_video_run_learns_and_exports_a_pipeline_folder(run, pipe):
    values = [loss for _, loss in run.losses]
    first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    index = json.loads((run.export / "model_index.json").read_text())
    assert index["_class_name"] == "ReverieVideoPipeline" and index["transformer"][1] == "WanTransformer3DModel"
    assert index["vae"][1] == "AutoencoderKL" and index["text_encoder"][1] == "CLIPTextModel"
    assert index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    assert pipe.family.name == "spacetime" and pipe.sampling.kind == "flow"
    c = pipe.transformer.config
    assert c.patch_size == (1, 2, 2) and c.in_channels == 3 and c.text_dim == 32 and c.rope_max_seq_len == 5
    assert_states_equal(pipe.transformer.state_dict(), {k.removeprefix("transformer."): v
                                                        for k, v in run.ema_state.items()
                                                        if k.startswith("transformer.")})
    assert (run.export.parent / "samples" / "step_00000030.png").is_file()


@pytest.mark.parametrize("sampler", [None, "dpmpp_2m"])  # the folder's FlowMatchEuler, and DPM++ 2M on the flow times
def test_videos_batch_equals_singles_and_a_seed_fixes_the_frames(pipe, sampler):
    prompts = ["a red square moving right", "a blue square moving up"]
    kw = dict(steps=3, guidance_scale=3.0, width=32, height=32, num_frames=5, sampler=sampler, progress=False)
    both = pipe(prompts, seed=[0, 1], **kw)
    assert both.videos.shape == (2, 5, 3, 32, 32) and [len(f) for f in both.frames] == [5, 5]
    assert both.latents.shape == (2, 3, 5, 8, 8) and both.params["num_frames"] == 5
    singles = [pipe(p, seed=s, **kw) for p, s in zip(prompts, [0, 1])]
    torch.testing.assert_close(both.latents, torch.cat([r.latents for r in singles]), rtol=0, atol=1e-5)
    again = pipe(prompts, seed=[0, 1], **kw)
    assert torch.equal(again.latents, both.latents) and torch.equal(again.videos, both.videos)
    # every frame is the image VAE's decoding of its latent frame
    with torch.no_grad():
        frame = pipe.vae.decode(both.latents[:, :, 3] / pipe.vae.scaling_factor + pipe.vae.shift_factor)
    torch.testing.assert_close(both.videos[:, 3], (frame / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


def test_image_to_video_pins_the_first_frame(pipe):
    image = MovingSquares(n=1)[0]["video"][:, 0]  # (3, 32, 32): a red square
    kw = dict(steps=3, guidance_scale=3.0, width=32, height=32, num_frames=5, seed=[0, 1], progress=False)
    for sampler in (None, "dpmpp_2m"):
        out = pipe(["a red square moving right"] * 2, image=image, sampler=sampler, **kw)
        known = pipe.encode_images(image[None])  # (1, 3, 8, 8): the posterior mode, scaled
        torch.testing.assert_close(out.latents[:, :, 0], known.expand(2, -1, -1, -1), rtol=0, atol=1e-5)
        assert out.params["image_to_video"] is True
        # the first frame decodes as the image's latents do, which is the image up to the VAE's error
        with torch.no_grad():
            roundtrip = (pipe.vae.decode(known / pipe.vae.scaling_factor + pipe.vae.shift_factor) / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(out.videos[:, 0], roundtrip.expand(2, -1, -1, -1), rtol=0, atol=1e-4)
        assert (out.videos[:, 0] - (image / 2 + 0.5)).abs().mean() < 0.08
    text_only = pipe(["a red square moving right"] * 2, **kw)
    assert not torch.allclose(text_only.latents[:, :, 0], out.latents[:, :, 0], atol=1e-2)
    with pytest.raises(ValueError, match="image"):
        pipe("a red square moving right", image=torch.zeros(3, 64, 64), **{**kw, "seed": 0})


def test_objective_is_the_flow_loss_on_the_pipelines_conditioning(run, tmp_path):
    """Text-to-video items: FlowDenoiser.loss of the pipeline's transformer on the family's conditioning. An
    image-to-video item's loss does not depend on the first frame's noise (that frame is given clean)."""
    from reverie.train.distributed import setup_distributed
    from reverie.train.tasks import VideoTask

    config = video_config(tmp_path / "run", "--train.steps=1", "--train.cond_dropout=0")
    task = VideoTask(config, MovingSquares(), setup_distributed("cpu"), tmp_path / "run", resume=False)
    items = [(0, 1), (1, 6), (2, 3)]
    inputs = task.inputs(5, items)
    assert inputs["latents"].shape == (3, 3, 5, 8, 8) and inputs["first"].dtype == torch.bool
    with torch.no_grad():
        t2v = dict(inputs, first=torch.zeros(3, dtype=torch.bool))
        loss = task.objective(**t2v)
        pipe = task.pipeline(task.objective)
        cond, _ = pipe.family.encode(pipe, [task.captions[i] for _, i in items], None, {})
        expected = FlowDenoiser(pipe.transformer).loss(inputs["latents"], sigma=inputs["t"], noise=inputs["noise"],
                                                       **cond)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
        i2v = dict(inputs, first=torch.ones(3, dtype=torch.bool))
        other = inputs["noise"].clone()
        other[:, :, 0] = torch.randn_like(other[:, :, 0])
        a, b = task.objective(**i2v), task.objective(**dict(i2v, noise=other))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.allclose(a, loss)
    one = task.inputs(5, items[1:2])  # an item's draws do not depend on its batch
    assert one["t"] == inputs["t"][1] and one["first"] == inputs["first"][1]


def test_video_resume_is_bit_exact(tmp_path):
    make = lambda out: video_config(out, "--train.steps=4", "--train.checkpoint_every=0",  # noqa: E731
                                    "--train.cond_dropout=0.5", "--data.cache_latents=false")
    data = MovingSquares(n=4, frames=3, size=16)
    whole = train(make(tmp_path / "whole"), dataset=data)
    first = train(make(tmp_path / "split"), dataset=data, stop_at_step=2)
    assert first.stopped and first.step == 2
    second = train(make(tmp_path / "split"), dataset=data, resume=True)
    assert second.losses == whole.losses[2:]
    assert_states_equal(second.ema_state, whole.ema_state)


def test_generate_cli_writes_a_video(run, tmp_path):
    from PIL import Image

    from reverie.cli import main

    out = tmp_path / "clip.gif"
    main(["generate", "a red circle moving left to right", "--model", str(run.export), "--frames", "5", "--steps",
          "2", "--width", "32", "--height", "32", "--seed", "0", "--out", str(out)])
    with Image.open(out) as im:
        assert im.n_frames == 5 and im.size == (32, 32)


def test_bad_video_settings_name_the_field(tmp_path, pipe):
    with pytest.raises(ValueError, match="model.video_preset"):
        train(video_config(tmp_path / "a", "--model.video_preset=huge", "--train.steps=1"),
              dataset=MovingSquares(n=2, frames=2, size=16))
    with pytest.raises(ValueError, match="'video'"):
        train(video_config(tmp_path / "b", "--train.steps=1"),
              dataset=[{"image": torch.zeros(3, 16, 16), "caption": "a square"}])
    with pytest.raises(ValueError, match="model.p_image"):
        video_config(tmp_path / "c", "--model.p_image=1.5")
    for frames in (0, 6):  # the model's RoPE covers its 5 training frames
        with pytest.raises(ValueError, match="num_frames"):
            pipe("a red square", num_frames=frames, steps=1, width=32, height=32, progress=False)
    with pytest.raises(ValueError, match="clip_skip"):
        pipe("a red square", num_frames=2, steps=1, clip_skip=1, width=32, height=32, progress=False)
