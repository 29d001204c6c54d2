"""Videos as files (reverie.video_io) and `reverie generate` for video models: GIF, lossless WebP and PNG frames
read back equal to what was written (GIF within its palette), delays of 1000 / fps ms that do not drift, MP4
read back by PyAV as H.264 yuv420p of the right size and count, parameters in the side-car (and GIF comment, MP4
tags, PNG chunks), writes that leave nothing behind when they fail, and the CLI's video equal to the pipeline's."""

import json
import math
import os
import sys

import numpy as np
import pytest
from PIL import Image

from reverie import video_io
from reverie.metadata import read_png_info
from reverie.video_io import durations, read_video, save_video

PARAMS = {"prompt": "a red fox", "seed": 3, "steps": 2, "sampler": "euler_flow", "family": "wan", "num_frames": 5}


def clip(n=5, width=48, height=32):
    """n smooth, distinct RGB frames: gradients sliding a little each frame (what a codec sees in a video)."""
    y, x = np.mgrid[0:height, 0:width]
    return [Image.fromarray(np.stack([2 * x + 9 * i, 3 * y + 3 * i, 64 + 0 * x + 20 * i], -1).astype(np.uint8))
            for i in range(n)]


def array(frames) -> np.ndarray:
    return np.stack([np.asarray(f.convert("RGB"), dtype=np.int16) for f in frames])  # (F, H, W, 3)


@pytest.mark.parametrize("name", ["clip.webp", "clip", "frames/f_%03d.png"])
def test_lossless_round_trip(tmp_path, name):
    frames = clip()
    save_video(frames, tmp_path / name, fps=16, params=PARAMS)
    back = read_video(tmp_path / name)
    assert len(back) == 5 and back[0].size == (48, 32)
    assert np.array_equal(array(back), array(frames))


def test_gif_round_trip_within_its_palette(tmp_path):
    frames = clip()
    save_video(frames, tmp_path / "clip.gif", fps=16, params=PARAMS)
    back = read_video(tmp_path / "clip.gif")
    assert len(back) == 5 and back[0].size == (48, 32)
    error = np.abs(array(back) - array(frames))
    assert error.mean() < 3 and error.max() < 40, (error.mean(), error.max())  # 256 colours per frame
    assert not np.array_equal(array(back[1:2]), array(back[0:1]))  # the frames stay distinct frames


@pytest.mark.parametrize("fps", [16, 24, 7.5, 30])
@pytest.mark.parametrize("suffix,tick", [(".webp", 1), (".gif", 10)])
def test_delays_are_1000_over_fps(tmp_path, fps, suffix, tick):
    """Each delay within one tick (WebP 1 ms, GIF 10 ms) of 1000 / fps, and n delays within one tick of n / fps:
    the clip plays at fps however long it runs."""
    n = 9
    save_video(clip(n), tmp_path / f"clip{suffix}", fps=fps)
    delays = [f.info["duration"] for f in read_video(tmp_path / f"clip{suffix}")]
    assert len(delays) == n
    assert all(abs(d - 1000 / fps) < tick for d in delays), delays
    assert abs(sum(delays) - n * 1000 / fps) <= tick / 2, delays
    with Image.open(tmp_path / f"clip{suffix}") as im:
        assert im.info["loop"] == 0


def test_durations_do_not_drift():
    for fps, ticks in ((16, 1000), (24, 1000), (30, 100), (29.97, 1000)):
        for n in (1, 5, 81):
            d = durations(n, fps, ticks)
            assert len(d) == n and sum(d) == round(n * ticks / fps)
            assert max(d) - min(d) <= 1


mp4 = pytest.mark.skipif(not video_io.has_pyav(), reason='PyAV missing: pip install -e ".[video]"')


@mp4
@pytest.mark.parametrize("fps,size", [(16, (48, 32)), (24, (64, 16))])
def test_mp4_is_h264_yuv420p(tmp_path, fps, size):
    import av

    frames = clip(9, *size)
    save_video(frames, tmp_path / "clip.mp4", fps=fps, params=PARAMS)
    with av.open(str(tmp_path / "clip.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert (stream.width, stream.height) == size and stream.average_rate == fps
        assert json.loads(container.metadata["comment"]) == json.loads(container.metadata["description"])
        assert json.loads(container.metadata["comment"])["prompt"] == "a red fox"
    back = read_video(tmp_path / "clip.mp4")
    assert len(back) == 9 and back[0].size == size
    error = np.abs(array(back) - array(frames)).mean(axis=(1, 2, 3))  # per frame, on 0..255
    assert error.max() < 3, error
    data = (tmp_path / "clip.mp4").read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # faststart: playable while it downloads


@mp4
def test_mp4_refuses_odd_sizes(tmp_path):
    with pytest.raises(ValueError, match="frames: H.264 in yuv420p needs an even width and height; got 47x32"):
        save_video(clip(3, 47, 32), tmp_path / "clip.mp4", fps=16)
    assert not list(tmp_path.iterdir())


def test_mp4_without_pyav_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    assert not video_io.has_pyav()
    with pytest.raises(ImportError, match=r'pip install -e "\.\[video\]"'):
        save_video(clip(2), tmp_path / "clip.mp4", fps=16)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("suffix", [".gif", ".webp", pytest.param(".mp4", marks=mp4)])
def test_side_car_holds_the_params(tmp_path, suffix):
    save_video(clip(), tmp_path / f"clip{suffix}", fps=16, params=PARAMS)
    record = json.loads((tmp_path / f"clip{suffix}.json").read_text())
    assert {k: record[k] for k in PARAMS} == PARAMS
    assert record["fps"] == 16 and record["num_frames"] == 5 and "reverie_version" in record
    if suffix == ".gif":
        with Image.open(tmp_path / "clip.gif") as im:
            assert json.loads(im.info["comment"]) == record
    save_video(clip(), tmp_path / f"bare{suffix}", fps=16)  # no params: no side-car
    assert not (tmp_path / f"bare{suffix}.json").exists()


def test_png_frames_carry_the_params(tmp_path):
    save_video(clip(), tmp_path / "clip", fps=16, params=PARAMS)
    names = sorted(p.name for p in (tmp_path / "clip").iterdir())
    assert names == [f"frame_{i:04d}.png" for i in range(5)]
    for i, name in enumerate(names):
        info = read_png_info(tmp_path / "clip" / name)
        assert info["request"]["prompt"] == "a red fox" and info["request"]["frame"] == i
        assert info["request"]["fps"] == 16 and info["parameters"]["Seed"] == "3"


def test_a_shorter_clip_replaces_the_frames_of_a_longer_one(tmp_path):
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "notes.txt").write_text("mine")
    save_video(clip(5), tmp_path / "clip", fps=16)
    save_video(clip(3)[::-1], tmp_path / "clip", fps=16)
    assert np.array_equal(array(read_video(tmp_path / "clip")), array(clip(3)[::-1]))
    assert (tmp_path / "clip" / "notes.txt").read_text() == "mine"  # what is not a frame stays


@pytest.mark.parametrize("name", ["clip.gif", "clip.webp", "clip", pytest.param("clip.mp4", marks=mp4)])
def test_an_interrupted_write_leaves_nothing(tmp_path, monkeypatch, name):
    """os.replace failing (the last step) leaves no file, no temp file and the old video as it was."""
    path = tmp_path / "out" / name
    save_video(clip(3), path, fps=16, params=PARAMS)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    old = array(read_video(path))

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(video_io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_video(clip(5)[::-1], path, fps=16, params=PARAMS)
    monkeypatch.undo()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert np.array_equal(array(read_video(path)), old)
    with pytest.raises(OSError, match="disk full"):  # and a new path is not created at all
        monkeypatch.setattr(video_io.os, "replace", fail)
        save_video(clip(5), tmp_path / "new" / name, fps=16, params=PARAMS)
    assert not [p for p in (tmp_path / "new").rglob("*")]


def test_a_failing_encoder_leaves_nothing(tmp_path, monkeypatch):
    def half_then_fail(frames, tmp, fps, record):
        open(tmp, "wb").write(b"GIF89a half")
        raise RuntimeError("encoder died")

    monkeypatch.setitem(video_io.ENCODERS, "gif", half_then_fail)
    with pytest.raises(RuntimeError, match="encoder died"):
        save_video(clip(), tmp_path / "clip.gif", fps=16, params=PARAMS)
    assert not list(tmp_path.iterdir())
    frames = clip()
    frames[3] = "not an image"
    with pytest.raises(ValueError, match="frames"):
        save_video(frames, tmp_path / "clip", fps=16)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fps", [0, -16, math.nan, math.inf, "16", True, None])
def test_bad_fps_names_the_field(tmp_path, fps):
    with pytest.raises(ValueError, match="fps must be a number > 0"):
        save_video(clip(2), tmp_path / "clip.webp", fps=fps)
    assert not list(tmp_path.iterdir())


def test_gif_refuses_what_it_cannot_play(tmp_path):
    with pytest.raises(ValueError, match="fps: a GIF plays at most 50 fps"):
        save_video(clip(2), tmp_path / "clip.gif", fps=60)


@pytest.mark.parametrize("name", ["clip.avi", "clip.png", "clip.jpg"])
def test_bad_suffix_names_the_field(tmp_path, name):
    with pytest.raises(ValueError, match=r"path: a video is written as \.mp4, \.gif, \.webp"):
        save_video(clip(2), tmp_path / name, fps=16)
    with pytest.raises(ValueError, match="path"):
        read_video(tmp_path / name)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("frames", [[], [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 6))], "x"])
def test_bad_frames_name_the_field(tmp_path, frames):
    with pytest.raises(ValueError, match="frames"):
        save_video(frames, tmp_path / "clip.webp", fps=16)


# --- reverie generate for a video model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tiny_families import wan_folder

    return wan_folder(tmp_path_factory.mktemp("wan"))


def generate(folder, out, *extra):
    from reverie.cli import main

    return main(["generate", "dance monkey", "--model", str(folder), "--steps", "2", "--width", "16", "--height",
                 "16", "--seed", "5", "--max-sequence-length", "16", "--safety-checker", "none", "--out", str(out),
                 *extra])


def test_generate_writes_the_pipelines_video(wan, tmp_path, capsys):
    from reverie import Pipeline

    assert generate(wan, tmp_path / "clip.gif", "--frames", "5") == 0
    assert generate(wan, tmp_path / "clip", "--frames", "5", "--fps", "8") == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'clip.gif'} (5 frames at 16 fps, seed 5)" in printed
    pipe = Pipeline.from_pretrained(wan, safety_checker=None)
    ours = pipe("dance monkey", steps=2, width=16, height=16, seed=5, num_frames=5, max_sequence_length=16,
                progress=False).frames[0]
    assert np.array_equal(array(read_video(tmp_path / "clip")), array(ours))  # PNG frames: exactly
    gif = read_video(tmp_path / "clip.gif")
    save_video(ours, tmp_path / "ours.gif", fps=16)
    assert np.array_equal(array(gif), array(read_video(tmp_path / "ours.gif")))  # the same GIF
    assert len(gif) == 5 and np.abs(array(gif) - array(ours)).mean() < 3
    assert all(f.info["duration"] in (60, 70) for f in gif)  # 1000 / 16 = 62.5 ms in GIF's 10 ms ticks
    record = json.loads((tmp_path / "clip.gif.json").read_text())
    assert record["prompt"] == "dance monkey" and record["seed"] == 5 and record["steps"] == 2
    assert record["num_frames"] == 5 and record["fps"] == 16 and record["family"] == "wan"
    assert read_png_info(tmp_path / "clip" / "frame_0004.png")["request"]["fps"] == 8


def test_generate_default_out_for_a_video_model(wan, tmp_path, monkeypatch, capsys):
    """out.png (the default) becomes out.gif without PyAV (and out.mp4 with it), and says so."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(video_io, "has_pyav", lambda: False)
    from reverie.cli import main

    assert main(["generate", "a cat", "--model", str(wan), "--steps", "1", "--width", "16", "--height", "16",
                 "--frames", "1", "--safety-checker", "none"]) == 0
    assert 'writing out.gif (MP4 needs PyAV: pip install -e ".[video]"' in capsys.readouterr().err
    assert len(read_video(tmp_path / "out.gif")) == 1
    assert generate(wan, tmp_path / "x.mp4", "--frames", "1") == 2  # asked for MP4 without PyAV: refused
    assert '--out: MP4 needs PyAV: pip install -e ".[video]"' in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--fps", "0"], "--fps must be a number > 0"),
    (["--out", "clip.avi"], "--out: images are written as PNG files with their parameters, videos as .mp4"),
    (["--fps", "60", "--out", "clip.gif"], "--fps: a GIF plays at most 50 fps"),
])
def test_generate_refuses_bad_video_options(wan, tmp_path, capsys, extra, message):
    assert generate(wan, tmp_path / "clip.webp", "--frames", "1", *extra) == 2
    assert message in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_generate_refuses_frames_for_an_image_model(tmp_path, capsys):
    from reverie.cli import main

    for flag in ("--frames", "--fps"):
        assert main(["generate", "a red circle", "--model", "shapes", "--steps", "1", "--out",
                     str(tmp_path / "x.png"), flag, "5"]) == 2
        assert f"{flag}: " in capsys.readouterr().err
    assert not os.listdir(tmp_path)
