"""A1111's SDXL refiner on the server: a request with `refiner` (native jobs) or `refiner_checkpoint` (A1111
txt2img) runs its model to the switch point (denoising_end) and the refiner from those latents on
(denoising_start), and gives the image of the same hand-off done in Python. The engine holds the tiny SDXL base
under two names (diffusers' own test_stable_diffusion_two_xl_mixture_of_denoiser_fast reuses the base as the
refiner too). The PNG infotext records the refiner and the switch point; a refiner the model cannot hand off to,
an unknown one, a bad switch point and a refiner with img2img are 422s naming the field; cancelling between the
two calls stops the batch before the refiner runs."""

import base64
import io
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from reverie import Pipeline
from reverie.server import Limits, Request, create_app
from reverie.server import family as families
from reverie.server.job import FieldError

from test_server_support import pixels, running
from tiny_families import sd3_folder, sdxl_folder

diffusers = pytest.importorskip("diffusers")  # tiny_families saves its folders with diffusers

STEPS = 4
PROMPT = "A painting of a squirrel eating a burger"
LIMITS = Limits(max_width=128, max_height=128, max_steps=60, max_images=4)


class Recording(Pipeline):
    """A served pipeline (weights shared with `base`) that records its engine calls' hand-off arguments and can
    run a hook after a denoising_end call returns."""

    def __init__(self, base: Pipeline):
        self.__dict__.update(base.__dict__)
        self.calls, self.after_first = [], None

    def __call__(self, prompt, *args, callback=None, **kwargs):
        result = super().__call__(prompt, *args, callback=callback, **kwargs)
        if callback is not None:
            self.calls.append({k: kwargs.get(k) for k in ("denoising_end", "denoising_start")})
            if kwargs.get("denoising_end") is not None and self.after_first is not None:
                self.after_first()
        return result


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("refiner")
    base = Pipeline.from_pretrained(sdxl_folder(root / "sdxl"))
    return {"base": Recording(base), "refiner": Recording(base),
            "sd3": Pipeline.from_pretrained(sd3_folder(root / "sd3"))}


@pytest.fixture(scope="module")
def server(pipes, tmp_path_factory):
    with running(pipes, tmp_path_factory.mktemp("store")) as e:  # base is the default
        yield e


@pytest.fixture(scope="module")
def client(server):
    return TestClient(create_app(server, limits=LIMITS))


def handoff(pipes, seed: int, switch: float, guidance_scale: float = 5.0) -> np.ndarray:
    """The Python hand-off (as reverie generate --refiner does it): the base to `switch`, the refiner on."""
    common = dict(negative_prompt=[""], steps=STEPS, guidance_scale=guidance_scale, seed=[seed], progress=False)
    first = pipes["base"]([PROMPT], denoising_end=switch, **common)
    second = pipes["refiner"]([PROMPT], image=first.latents, denoising_start=switch, sampler=first.params["sampler"],
                              scheduler=first.params["schedule"], **common)
    return np.asarray(second.images[0].convert("RGB"), dtype=np.float64)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.abs(a - b).max() <= 1


def job(client, server, body):
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    j = server.get(r.json()["id"])
    assert j.done.wait(60), j.status
    return j


def test_native_job_with_refiner_equals_the_python_handoff(client, server, pipes):
    pipes["base"].calls.clear()
    pipes["refiner"].calls.clear()
    j = job(client, server, {"prompt": PROMPT, "steps": STEPS, "guidance_scale": 5.0, "seed": 3,
                             "refiner": "refiner", "refiner_switch_at": 0.5})
    assert j.status == "done", j.error
    png = client.get(f"/v1/jobs/{j.id}/images/0.png").content
    assert same(pixels(png), handoff(pipes, 3, 0.5))
    assert pipes["base"].calls == [dict(denoising_end=0.5, denoising_start=None)]
    assert pipes["refiner"].calls == [dict(denoising_end=None, denoising_start=0.5)]
    assert j.progress["step"] == STEPS  # the refiner's steps count on from the base's
    info = Image.open(io.BytesIO(png)).info
    assert "Refiner: refiner, Refiner switch at: 0.5" in info["parameters"]
    params = json.loads(info["reverie"])
    assert params["refiner"] == "refiner" and params["refiner_switch_at"] == 0.5
    assert "denoising_end" not in params and "latent_sigma" not in params


def test_default_switch_point_and_batching_key(server):
    r = server.prepare(Request(prompt=PROMPT, steps=STEPS, refiner="refiner"))
    assert r.refiner_switch_at == 0.8 and server.prepare(r) == r
    plain = server.prepare(Request(prompt=PROMPT, steps=STEPS, seed=r.seed))
    assert plain.refiner_switch_at is None
    keys = {server._key(SimpleNamespace(request=x, key=None)) for x in
            (r, plain, server.prepare(Request(prompt=PROMPT, steps=STEPS, refiner="refiner", refiner_switch_at=0.6)))}
    assert len(keys) == 3


def test_a1111_txt2img_with_refiner_checkpoint(client, pipes):
    titles = {m["model_name"]: m["title"] for m in client.get("/sdapi/v1/sd-models").json()}
    body = {"prompt": PROMPT, "steps": STEPS, "cfg_scale": 5.0, "seed": 4, "width": 64, "height": 64,
            "refiner_checkpoint": titles["refiner"], "refiner_switch_at": 0.75}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    image = r.json()["images"][0]
    assert same(pixels(base64.b64decode(image)), handoff(pipes, 4, 0.75))
    assert "Refiner switch at: 0.75" in json.loads(r.json()["info"])["infotexts"][0]
    # A1111 clients send "" / "None" for no refiner, with a switch point that then goes unused
    r = client.post("/sdapi/v1/txt2img", json=body | {"refiner_checkpoint": "None"})
    assert r.status_code == 200, r.text
    assert "Refiner" not in json.loads(r.json()["info"])["infotexts"][0]


@pytest.mark.parametrize("body, field", [
    ({"refiner": "nope"}, "refiner"),
    ({"refiner": "sd3"}, "refiner"),  # a flow model: its latents are not the base's
    ({"model": "sd3", "refiner": "base", "width": 32, "height": 32}, "refiner"),
    ({"refiner": "refiner", "refiner_switch_at": 1.0}, "refiner_switch_at"),
    ({"refiner_switch_at": 0.5}, "refiner_switch_at"),  # no refiner
    ({"refiner": "refiner", "image": "IMAGE"}, "refiner"),  # img2img: not yet
])
def test_bad_refiner_fields_are_422(client, body, field):
    if body.get("image") == "IMAGE":
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), "red").save(buf, format="PNG")
        body = body | {"image": base64.b64encode(buf.getvalue()).decode()}
    r = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": STEPS, **body})
    assert r.status_code == 422, r.text
    assert field in r.text


def test_a1111_bad_refiner_checkpoint_is_422(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": STEPS, "refiner_checkpoint": "nope"})
    assert r.status_code == 422 and "refiner_checkpoint" in r.text, r.text
    r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": STEPS, "refiner_checkpoint": "sd3"})
    assert r.status_code == 422 and "refiner_checkpoint" in r.text, r.text


def test_latent_layouts_must_agree():
    def model(name="sdxl", channels=4, factor=8, kind="vp"):
        return SimpleNamespace(family=SimpleNamespace(name=name, latent_channels=lambda m: channels),
                               sampling=SimpleNamespace(kind=kind), downsample_factor=factor)

    families.check_refiner(model(), model("sd"), "ok")
    for other in (model(factor=16), model(channels=16), model("flux", 16, 8, "flow"), model("dit")):
        with pytest.raises(FieldError) as e:
            families.check_refiner(model(), other, "other")
        assert e.value.field == "refiner"


def test_cancelling_between_the_two_calls_stops_the_batch(client, server, pipes):
    pipes["refiner"].calls.clear()
    pipes["base"].after_first = lambda: [server.cancel(j.id) for j in server.running()]
    try:
        r = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": STEPS, "seed": 1, "refiner": "refiner"})
        j = server.get(r.json()["id"])
        assert j.done.wait(60) and j.status == "cancelled", j.status
        end = time.monotonic() + 30
        while server.running() and time.monotonic() < end:  # the batch ends (Cancelled) before the refiner
            time.sleep(0.01)
    finally:
        pipes["base"].after_first = None
    assert pipes["refiner"].calls == []
