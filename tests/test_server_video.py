"""Video in the server, with diffusers' tiny Wan 2.1 (tests/tiny_families.py) beside the shipped image model: a native
video job streams a progress event per step with previews of the middle latent frame and stores an MP4 whose
frames are the pipeline's own for the same seed (through the same encoder) and the middle frame as a lossless PNG
poster; GIF where the server has no PyAV; cancel stops a video job; image-only and video-only fields are 422s
naming them; OpenAI's Videos API (POST /v1/videos, poll, content, delete) runs the same jobs; the playground has
its video tab."""

import base64
import io
import json
import re
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from reverie import Pipeline
from reverie.server import Limits, create_app
from reverie.server.family import frames_for
from reverie.video_io import read_video, save_video

from test_server_support import Gated, running, shapes, wait_for

pytest.importorskip("diffusers")  # tiny_families saves the Wan folder with diffusers
av = pytest.importorskip("av")
from tiny_families import source_image, wan_folder  # noqa: E402

STEPS = 2
CASE = dict(model="wan", prompt="dance monkey", steps=STEPS, width=32, height=32, num_frames=9)
LIMITS = Limits(max_width=128, max_height=128, max_steps=20)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return Gated(Pipeline.from_pretrained(wan_folder(tmp_path_factory.mktemp("wan"))))


@pytest.fixture(scope="module")
def server(wan, tmp_path_factory):
    wan.gate.set()
    with running({"wan": wan, "shapes": shapes()}, tmp_path_factory.mktemp("store"), preview_interval_s=0.0) as e:
        yield e


@pytest.fixture(scope="module")
def client(server):
    return TestClient(create_app(server, limits=LIMITS))


@pytest.fixture
def held(wan):
    """The Wan pipeline's steps wait until a test lets them through; open again afterwards."""
    wan.gate.clear()
    yield wan
    wan.gate.set()


def alone(wan, seed: int) -> list[Image.Image]:
    """The frames the pipeline gives for CASE on its own (one generator per video, as the engine seeds)."""
    return Pipeline.__call__(wan, CASE["prompt"], steps=STEPS, seed=[seed], width=CASE["width"],
                             height=CASE["height"], num_frames=CASE["num_frames"], progress=False).frames[0]


def as_array(frames) -> np.ndarray:
    return np.stack([np.asarray(f.convert("RGB"), dtype=np.float64) for f in frames])  # (F, H, W, 3) on 0..255


def sse(client, path: str) -> list[tuple[str, dict]]:
    events, name = [], None
    with client.stream("GET", path) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def field_of(response) -> str:
    assert response.status_code == 422, response.text
    return response.json()["detail"][0]["loc"][-1]


def test_video_job_streams_steps_and_stores_the_pipelines_video(client, server, held, tmp_path):
    r = client.post("/v1/jobs", json={**CASE, "seed": 3, "fps": 8, "preview": True})
    assert r.status_code == 202, r.text
    job = server.get(r.json()["id"])
    # the steps wait until the event stream below listens, so it sees every progress event live
    threading.Thread(target=lambda: (wait_for(lambda: job._listeners, what="a listener"), held.gate.set())).start()
    events = sse(client, f"/v1/jobs/{job.id}/events")
    assert events[-1][0] == "done", events[-1]
    progress = [data for name, data in events if name == "progress"]
    assert [p["step"] for p in progress] == list(range(1, STEPS + 1)) and {p["steps"] for p in progress} == {STEPS}
    for p in progress:  # the middle latent frame, decoded: one picture of the video's size
        preview = Image.open(io.BytesIO(base64.b64decode(p["preview_x0"].partition(",")[2])))
        assert preview.size == (CASE["width"], CASE["height"])

    done = events[-1][1]
    assert done["videos"] == [f"/v1/jobs/{job.id}/videos/0.mp4"]
    assert done["images"] == [f"/v1/jobs/{job.id}/images/0.png"]  # the poster
    assert client.get(f"/v1/jobs/{job.id}").json()["videos"] == done["videos"]
    mp4 = client.get(done["videos"][0])
    assert mp4.status_code == 200 and mp4.headers["content-type"] == "video/mp4"
    assert client.get(f"/v1/jobs/{job.id}/videos/0.gif").status_code == 404  # stored as MP4
    with av.open(io.BytesIO(mp4.content)) as container:
        assert container.streams.video[0].average_rate == 8
        served = as_array([frame.to_image() for frame in container.decode(video=0)])

    ours = alone(held, 3)
    assert served.shape == (CASE["num_frames"], CASE["height"], CASE["width"], 3)
    save_video(ours, tmp_path / "alone.mp4", fps=8)  # the same encoder on the pipeline's own frames
    reencoded = as_array(read_video(tmp_path / "alone.mp4"))
    raw = as_array(ours)
    assert np.abs(served - reencoded).mean() <= 1.0
    assert np.abs(served - raw).mean() < np.abs(raw - raw.mean(axis=0)).mean()  # H.264 keeps the frames apart
    poster = client.get(done["images"][0])
    assert poster.headers["content-type"] == "image/png"
    assert np.abs(as_array([Image.open(io.BytesIO(poster.content))]) - raw[len(raw) // 2]).mean() <= 1.0
    assert raw.std() > 10  # the tiny model draws something: the comparisons mean something


def test_gif_without_pyav(client, server):
    server.video_format = "gif"  # what the engine picks when `av` is not importable
    try:
        r = client.post("/v1/jobs", json={**CASE, "steps": 1, "width": 16, "height": 16, "num_frames": 5, "seed": 1})
        job = server.get(r.json()["id"])
        assert job.done.wait(60) and job.status == "done", job.error
    finally:
        server.video_format = "mp4"
    gif = client.get(f"/v1/jobs/{job.id}/videos/0.gif")
    assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
    with Image.open(io.BytesIO(gif.content)) as im:
        assert im.size == (16, 16) and im.n_frames <= 5  # GIF merges identical frames
    assert client.get(f"/v1/jobs/{job.id}/videos/0.mp4").status_code == 404


def test_cancel_a_running_video_job(client, server, held):
    r = client.post("/v1/jobs", json={**CASE, "seed": 4})
    job = server.get(r.json()["id"])
    held.allow(1)
    wait_for(lambda: job.progress, what="the first step")
    assert client.delete(f"/v1/jobs/{job.id}").json()["status"] == "cancelled"
    held.gate.set()
    wait_for(lambda: not server.running(), what="the batch to stop")
    assert job.status == "cancelled" and job.progress["step"] == 1
    assert client.get(f"/v1/jobs/{job.id}/videos/0.mp4").status_code == 404
    assert not list(Path(server.store.videos).glob(f"{job.id}*"))


def test_fields_that_do_not_apply_are_422s_naming_them(client):
    png = io.BytesIO()
    source_image((32, 32)).save(png, format="PNG")
    image = base64.b64encode(png.getvalue()).decode()
    cases = {  # body -> the field the 422 names
        "num_frames": {"model": "shapes", "prompt": "a circle", "num_frames": 9},
        "fps": {"model": "shapes", "prompt": "a circle", "fps": 8},
        "image": {**CASE, "image": image},
        "refiner": {**CASE, "refiner": "shapes"},
        "control_image": {**CASE, "control_image": image},
    }
    for field, body in cases.items():
        assert field_of(client.post("/v1/jobs", json=body)) == field
    r = client.post("/v1/jobs", json={**CASE, "num_frames": 8})
    assert field_of(r) == "num_frames" and "1 + 4k" in r.json()["detail"][0]["msg"]
    assert field_of(client.post("/v1/jobs", json={**CASE, "num_frames": 400})) == "num_frames"  # over Limits
    # the image dialects answer with images: a video model is a 422 naming the model
    assert field_of(client.post("/v1/images/generations", json={"model": "wan", "prompt": "x"})) == "model"
    assert field_of(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "override_settings":
                                                            {"sd_model_checkpoint": "wan"}})) == "model"
    videos = {"model": {"model": "shapes", "prompt": "x"}, "size": {"model": "wan", "prompt": "x", "size": "big"},
              "seconds": {"model": "wan", "prompt": "x", "seconds": "4s"}}
    for field, body in videos.items():
        assert field_of(client.post("/v1/videos", json=body)) == field
    assert field_of(client.post("/v1/videos", json={"model": "wan", "prompt": "x", "seconds": "4",
                                                    "num_frames": 9})) == "seconds"
    assert field_of(client.post("/v1/videos", json={"model": "wan", "prompt": "x", "seconds": "60"})) == "seconds"
    upload = {"model": (None, "wan"), "prompt": (None, "x"),
              "input_reference": ("ref.png", png.getvalue(), "image/png")}  # multipart, a file part
    assert field_of(client.post("/v1/videos", files=upload)) == "input_reference"
    assert field_of(client.post("/v1/videos", json={"model": "wan"})) == "prompt"


def test_seconds_become_the_frame_count_the_vae_takes():
    pipe = SimpleNamespace(family=SimpleNamespace(temporal_compression=lambda pipe: 4))  # Wan 2.1's VAE
    # the 1 + 4k nearest seconds * fps, halves up: 64 -> 65, 81 -> 81, 8 -> 9 (7 / 4 = 1.75), 7 -> 9 (1.5 up)
    assert [frames_for(pipe, s, 16) for s in (4, 81 / 16, 0.5, 7 / 16, 0.01)] == [65, 81, 9, 9, 1]
    assert frames_for(pipe, 5, 24) == 121
    per_frame = SimpleNamespace(family=SimpleNamespace(temporal_compression=lambda pipe: 1))  # spacetime: any count
    assert [frames_for(per_frame, s, 16) for s in (1, 0.5, 17 / 32)] == [16, 8, 9]


def test_openai_videos_create_poll_content_delete(client, server):
    form = {"model": (None, "wan"), "prompt": (None, "dance monkey"), "seconds": (None, "0.5"),
            "size": (None, "48x32"), "steps": (None, str(STEPS)), "seed": (None, "5")}  # multipart, as OpenAI's SDK
    r = client.post("/v1/videos", files=form)
    assert r.status_code == 200, r.text
    video = r.json()
    assert video["object"] == "video" and video["status"] in ("queued", "in_progress") and video["progress"] == 0
    assert (video["model"], video["size"], video["num_frames"], video["seconds"]) == ("wan", "48x32", 9, "0.5625")
    seen = []

    def completed():
        seen.append(client.get(f"/v1/videos/{video['id']}").json())
        return seen[-1]["status"] in ("completed", "failed")

    wait_for(completed, timeout=60, what="the video")
    assert seen[-1]["status"] == "completed" and seen[-1]["progress"] == 100, seen[-1]
    assert [s["progress"] for s in seen] == sorted(s["progress"] for s in seen)
    content = client.get(f"/v1/videos/{video['id']}/content")
    assert content.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(content.content)) as container:
        frames = [frame.to_image() for frame in container.decode(video=0)]
    assert len(frames) == 9 and frames[0].size == (48, 32)
    thumbnail = client.get(f"/v1/videos/{video['id']}/content", params={"variant": "thumbnail"})
    assert thumbnail.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(thumbnail.content)).size == (48, 32)
    assert field_of(client.get(f"/v1/videos/{video['id']}/content", params={"variant": "spritesheet"})) == "variant"
    assert client.delete(f"/v1/videos/{video['id']}").status_code == 409  # finished videos are kept
    assert client.get("/v1/videos/" + "0" * 32).status_code == 404


def test_delete_cancels_a_running_video(client, server, held):
    r = client.post("/v1/videos", json={"model": "wan", "prompt": "dance monkey", "num_frames": 5, "size": "16x16",
                                        "steps": STEPS})
    video = r.json()
    held.allow(1)
    wait_for(lambda: client.get(f"/v1/videos/{video['id']}").json()["progress"] == 50, what="the first step")
    assert client.delete(f"/v1/videos/{video['id']}").json() == {"id": video["id"], "object": "video.deleted",
                                                                  "deleted": True}
    held.gate.set()
    after = client.get(f"/v1/videos/{video['id']}").json()
    assert after["status"] == "failed" and after["error"]["code"] == "cancelled"
    assert client.get(f"/v1/videos/{video['id']}/content").status_code == 409


def test_playground_has_a_video_tab(client):
    page = client.get("/").text
    tab = ('id="tab-video"', 'id="panel-video"', '<video id="vid-player"', '<input type="range" id="vid-scrub"')
    for element in tab:
        assert element in page
    script = client.get("/playground/static/app.js").text
    section = script[script.index("// --- 5. video"):script.index("// --- start")]
    # the tab submits a video job through runJob (POST /v1/jobs, its events), plays the result's video and lists
    # the video models from /v1/models; each of those endpoints is served
    assert "runJob(" in section and "num_frames" in section and "r.videos[0]" in section and "m.video" in section
    assert '"/v1/jobs"' in script and "`/v1/jobs/${encodeURIComponent(id)}/events`" in script
    assert '"/v1/models"' in script
    paths = set(client.get("/openapi.json").json()["paths"])
    assert {"/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/videos/{index}.mp4",
            "/v1/jobs/{job_id}/videos/{index}.gif", "/v1/models"} <= paths
    wan = next(m for m in client.get("/v1/models").json()["data"] if m["id"] == "wan")
    assert wan["video"] and wan["defaults"]["fps"] == 16 and "num_frames" in wan["options"]


def test_image_to_video_jobs_animate_the_first_frame(tmp_path):
    """A wan_i2v model takes the first frame as the job's image: the served MP4 is the pipeline's video for that
    image (through the same encoder); jobs with different first frames never share a call; no image is a 422."""
    from tiny_families import wan_i2v_folder

    i2v = Pipeline.from_pretrained(wan_i2v_folder(tmp_path / "i2v"))
    case = dict(model="i2v", prompt="dance monkey", steps=STEPS, width=32, height=32, num_frames=5)
    frames = {}
    with running({"i2v": i2v}, tmp_path / "store") as e:
        client = TestClient(create_app(e, limits=LIMITS))
        assert field_of(client.post("/v1/jobs", json=case)) == "image"
        for seed in (3, 4):  # two first frames
            png = io.BytesIO()
            source_image((40, 56), seed=seed).save(png, format="PNG")
            body = {**case, "seed": seed, "fps": 8, "image": base64.b64encode(png.getvalue()).decode()}
            r = client.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            frames[seed] = (r.json()["id"], png.getvalue())
        upload = {"model": (None, "i2v"), "prompt": (None, "dance monkey"), "seconds": (None, "0.5"),
                  "steps": (None, "2"),
                  "size": (None, "32x32"), "input_reference": ("first.png", frames[3][1], "image/png")}
        r = client.post("/v1/videos", files=upload)  # OpenAI's Videos API: the first frame as input_reference
        assert r.status_code == 200, r.text
        assert e.get(r.json()["id"]).request.image == frames[3][1]
        keys = {e._key(e.get(job_id)) for job_id, _ in frames.values()}
        assert len(keys) == 2
        for seed, (job_id, data) in frames.items():
            wait_for(lambda: e.get(job_id).status == "done", what="the job")
            with av.open(io.BytesIO(client.get(f"/v1/jobs/{job_id}/videos/0.mp4").content)) as container:
                served = as_array([frame.to_image() for frame in container.decode(video=0)])
            ours = Pipeline.__call__(i2v, case["prompt"], steps=STEPS, seed=[seed], width=32, height=32, num_frames=5,
                                     image=Image.open(io.BytesIO(data)).convert("RGB"), progress=False).frames[0]
            save_video(ours, tmp_path / f"alone{seed}.mp4", fps=8)
            assert np.abs(served - as_array(read_video(tmp_path / f"alone{seed}.mp4"))).mean() <= 1.0
