"""The playground's own endpoints (reverie.server.playground): forward process, schedule curves, sampler sigmas,
checked against diffusers' schedulers and closed-form math; the static page is self-contained (offline)."""

import base64
import fnmatch
import io
import json
import math
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from reverie.samplers import SAMPLERS, resolve
from reverie.server import playground

ROOT = Path(__file__).resolve().parents[1]
SHAPES_SCHEDULER = json.loads((ROOT / "src/reverie/bundled/shapes/scheduler/scheduler_config.json").read_text())


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    app.include_router(playground.router)
    return TestClient(app)


def pixels(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"), dtype=np.int16)


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def gradient(w=80, h=48) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.concatenate([x + 0 * y, y + 0 * x, 255 - (x + y) / 2 + 0 * x], axis=2).astype(np.uint8))


# --- the forward process ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,betas", [("linear", dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
                                        ("scaled_linear", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                               beta_end=0.012)),
                                        ("cosine", dict(beta_schedule="squaredcos_cap_v2"))])
def test_forward_equals_diffusers_add_noise(client, name, betas):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, **betas)
    image = gradient()
    for t in (0, 250, 999):
        r = client.post("/playground/forward", json={"image": png_b64(image), "t": t, "schedule": name, "seed": 7,
                                                     "size": 48})
        assert r.status_code == 200, r.text
        body = r.json()
        ab = scheduler.alphas_cumprod[t].item()
        assert body["alphabar"] == pytest.approx(ab, rel=1e-6)
        assert body["snr"] == pytest.approx(ab / (1 - ab), rel=1e-5)
        assert body["sigma"] == pytest.approx(((1 - ab) / ab) ** 0.5, rel=1e-5)
        assert body["signal_scale"] ** 2 + body["noise_scale"] ** 2 == pytest.approx(1)
        # the image, its noise (the documented seed contract) and diffusers' q(x_t | x_0)
        x0 = torch.from_numpy(pixels(body["x0"]).astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
        noise = torch.randn((3, 48, 48), generator=torch.Generator().manual_seed(7))[None]
        expected = scheduler.add_noise(x0, noise, torch.tensor([t]))[0].clamp(-1, 1)
        expected = ((expected + 1) * 127.5).round().permute(1, 2, 0).numpy()
        assert np.abs(pixels(body["x_t"]) - expected).max() <= 1
        assert pixels(body["x0"]).shape == (48, 48, 3)


def test_forward_image_is_center_cropped_and_resized(client):
    from reverie.data.folder import resize_center_crop

    image = gradient(120, 60)
    r = client.post("/playground/forward", json={"image": png_b64(image), "t": 10, "size": 32})
    expected = np.asarray(resize_center_crop(image, 32), dtype=np.int16)
    assert np.abs(pixels(r.json()["x0"]) - expected).max() <= 1
    # a data: URL and raw base64 are the same upload
    r2 = client.post("/playground/forward", json={"image": "data:image/png;base64," + png_b64(image), "t": 10, "size": 32})
    assert r2.json()["x_t"] == r.json()["x_t"]


def test_forward_noise_grows_with_t_and_the_seed_fixes_it(client):
    distances, noises = [], set()
    for t in (0, 100, 300, 600, 999):
        body = client.post("/playground/forward", json={"sample": 3, "t": t, "seed": 1}).json()
        distances.append(np.abs(pixels(body["x_t"]) - pixels(body["x0"])).mean())
        noises.add(body["noise"])
    assert distances == sorted(distances) and distances[0] < 5 and distances[-1] > 40
    assert len(noises) == 1  # one seed, one noise, at every level
    other = client.post("/playground/forward", json={"sample": 3, "t": 999, "seed": 2}).json()
    assert other["noise"] not in noises
    # the noise image is eps / 2.5 mapped to 0..255: its mean is mid-grey and its spread is 255 / 5 per unit
    eps = (pixels(other["noise"]) / 127.5 - 1) * playground.NOISE_RANGE
    assert abs(eps.mean()) < 0.05 and eps.std() == pytest.approx(1.0, abs=0.06)


def test_forward_at_sigma_matches_forward_at_t(client):
    at_t = client.post("/playground/forward", json={"sample": 1, "t": 400, "schedule": "cosine"}).json()
    at_sigma = client.post("/playground/forward", json={"sample": 1, "sigma": at_t["sigma"], "schedule": "cosine"}).json()
    assert at_sigma["t"] == pytest.approx(400, abs=0.01)
    assert at_sigma["alphabar"] == pytest.approx(at_t["alphabar"], rel=1e-6)
    assert np.abs(pixels(at_sigma["x_t"]) - pixels(at_t["x_t"])).max() <= 1
    # closed form: alphabar = 1 / (1 + sigma^2), SNR = 1 / sigma^2, in dB 10 log10
    body = client.post("/playground/forward", json={"sigma": 2.0}).json()
    assert body["alphabar"] == pytest.approx(0.2) and body["snr"] == pytest.approx(0.25)
    assert body["snr_db"] == pytest.approx(10 * math.log10(0.25))


def test_forward_defaults_to_a_builtin_sample_at_t_500(client):
    body = client.post("/playground/forward", json={}).json()
    assert body["t"] == 500 and body["schedule"] == "scaled_linear"
    assert pixels(body["x0"]).shape == (64, 64, 3)


@pytest.mark.parametrize("payload,field", [
    ({"t": 1000}, "t"), ({"t": -1}, "t"), ({"sigma": 0}, "sigma"), ({"sigma": 1e-300}, "sigma"), ({"sigma": 1e6}, "sigma"),
    ({"t": 3, "sigma": 1.0}, "sigma"), ({"schedule": "quadratic"}, "schedule"), ({"seed": -1}, "seed"),
    ({"sample": 99}, "sample"), ({"size": 4}, "size"), ({"image": "not base64!"}, "image"),
    ({"image": base64.b64encode(b"hello, not an image").decode()}, "image"),
])
def test_forward_rejects_bad_input_naming_the_field(client, payload, field):
    r = client.post("/playground/forward", json=payload)
    assert r.status_code == 422
    assert field in json.dumps(r.json()["detail"])


def test_forward_rejects_huge_images_before_decoding_them(client):
    huge = Image.new("1", (5000, 4000))
    r = client.post("/playground/forward", json={"image": png_b64(huge)})
    assert r.status_code == 422 and "4096x4096" in r.json()["detail"]


def test_schedule_names_are_listed_when_wrong(client):
    detail = json.dumps(client.post("/playground/forward", json={"schedule": "nope"}).json()["detail"])
    for name in ("linear", "scaled_linear", "cosine"):
        assert name in detail


# --- schedule curves ----------------------------------------------------------------------------------------


def test_schedule_curves_equal_diffusers(client):
    from diffusers import DDPMScheduler

    body = client.get("/playground/schedules", params={"points": 101}).json()
    t = body["t"]
    assert t[0] == 0 and t[-1] == 999 and len(t) == 101 and t == sorted(t)
    assert body["model_schedule"] == SHAPES_SCHEDULER["beta_schedule"]
    configs = {"linear": dict(beta_schedule="linear"), "scaled_linear": dict(beta_schedule="scaled_linear",
               beta_start=0.00085, beta_end=0.012), "cosine": dict(beta_schedule="squaredcos_cap_v2")}
    for name, config in configs.items():
        reference = DDPMScheduler(num_train_timesteps=1000, **config).alphas_cumprod.double()[t].numpy()
        curve = body["schedules"][name]
        np.testing.assert_allclose(curve["alphabar"], reference, rtol=1e-6)
        np.testing.assert_allclose(curve["snr"], reference / (1 - reference), rtol=1e-6)
        np.testing.assert_allclose(curve["sigma"], ((1 - reference) / reference) ** 0.5, rtol=1e-6)
        assert np.all(np.diff(curve["snr"]) < 0)  # SNR strictly decreases with t


def test_schedule_points_are_bounded(client):
    assert client.get("/playground/schedules", params={"points": 1}).status_code == 422
    assert client.get("/playground/schedules", params={"points": 1001}).status_code == 422


# --- the sigmas each sampler visits ---------------------------------------------------------------------


@pytest.mark.parametrize("label,scheduler_class,flags", [
    ("Euler", "EulerDiscreteScheduler", {}),
    ("LMS Karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("UniPC", "UniPCMultistepScheduler", {}),
])
def test_sampler_sigmas_equal_diffusers_on_the_shipped_schedule(client, label, scheduler_class, flags):
    import diffusers

    scheduler = getattr(diffusers, scheduler_class).from_config(SHAPES_SCHEDULER, **flags)
    scheduler.set_timesteps(12)
    body = client.get("/playground/sigmas", params={"sampler": label, "steps": 12}).json()
    (result,) = body["samplers"]
    assert result["sampler"] == label and result["steps"] == 12
    np.testing.assert_allclose(result["sigmas"], scheduler.sigmas.double().numpy(), rtol=1e-5, atol=1e-6)


def test_ddim_sigmas_follow_diffusers_timesteps(client):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(SHAPES_SCHEDULER)
    scheduler.set_timesteps(10)
    ab = scheduler.alphas_cumprod.double()
    expected = ((1 - ab[scheduler.timesteps]) / ab[scheduler.timesteps]).sqrt().tolist()
    (result,) = client.get("/playground/sigmas", params={"sampler": "DDIM", "steps": 10}).json()["samplers"]
    np.testing.assert_allclose(result["sigmas"][:-1], expected, rtol=1e-5)
    # set_alpha_to_one is false in the shipped config: DDIM ends on sigma(t=0), not 0
    assert result["sigmas"][-1] == pytest.approx(((1 - ab[0]) / ab[0]).sqrt().item(), rel=1e-5)


def test_evaluations_count_the_denoiser_calls(client):
    steps = 9
    body = client.get("/playground/sigmas", params={"steps": steps}).json()
    by_name = {s["sampler"]: s for s in body["samplers"]}
    assert list(by_name) == list(playground.PAGE_SAMPLERS)
    for s in body["samplers"]:
        second_order = s["name"] in ("heun", "dpmpp_sde")
        # two calls a step, except the last step (to sigma 0), which is a plain Euler step
        assert len(s["evaluations"]) == (2 * steps - 1 if second_order else steps), s["sampler"]
        assert len(s["sigmas"]) == steps + 1
        assert all(a >= b for a, b in zip(s["sigmas"], s["sigmas"][1:]))
        assert all(s["sigmas"][-1] <= e <= s["sigmas"][0] + 1e-6 for e in s["evaluations"])
        if not second_order:
            np.testing.assert_allclose(s["evaluations"], s["sigmas"][:-1], rtol=1e-6)
    assert body["sigma_max"] > body["sigma_min"] > 0


@pytest.mark.parametrize("params,field", [
    ({"sampler": "nope"}, "unknown sampler"), ({"sampler": "Euler flow"}, "flow"), ({"steps": 0}, "steps"),
    ({"steps": 201}, "steps"), ({"sampler": "euler", "scheduler": "quadratic"}, "scheduler"),
])
def test_sigmas_reject_bad_input(client, params, field):
    r = client.get("/playground/sigmas", params=params)
    assert r.status_code == 422
    assert field in json.dumps(r.json()["detail"])


def test_page_samplers_cover_every_ddpm_sampler(client):
    body = client.get("/playground/samplers").json()
    labels = [s["label"] for s in body["samplers"]]
    assert body["default"] in labels
    for s in body["samplers"]:
        choice = resolve(s["label"])
        assert (s["name"], s["schedule"], s["family"]) == (choice.name, choice.schedule, choice.family)
    ddpm_samplers = {name for name, fn in SAMPLERS.items() if fn.family != "flow"}
    assert {s["name"] for s in body["samplers"]} == ddpm_samplers


# --- built-in pictures and the page itself ------------------------------------------------------------------


def test_samples_are_shapes_with_their_captions(client):
    from reverie.data.shapes import ShapesDataset

    body = client.get("/playground/samples", params={"size": 32}).json()
    data = ShapesDataset(size=playground.NUM_SAMPLES, seed=0, resolution=32, detail=1.0)
    assert [s["caption"] for s in body["samples"]] == data.captions
    for i, s in enumerate(body["samples"]):
        assert np.array_equal(pixels(s["image"]), np.asarray(data.image(i), dtype=np.int16))


def test_page_and_its_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    local = [a for a in assets if not a.startswith(("data:", "#"))]
    assert local and all(a.startswith("/playground/static/") for a in local)
    types = {".js": "text/javascript", ".css": "text/css"}
    for asset in local:
        r = client.get(asset)
        assert r.status_code == 200, asset
        assert r.headers["content-type"].startswith(types[Path(asset).suffix])
    for bad in ("../playground.py", "..%2Fplayground.py", "nope.js", "%2e%2e%2f__init__.py"):
        assert client.get(f"/playground/static/{bad}").status_code == 404


def test_static_files_work_offline():
    """No file of the page loads anything from another origin (no CDN, no web fonts)."""
    for path in playground.STATIC.iterdir():
        text = path.read_text(encoding="utf-8")
        urls = re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}[^\s\"')]*", text, flags=re.IGNORECASE)
        assert all(u == "http://www.w3.org/2000/svg" for u in urls), (path.name, urls)
        assert "@import" not in text and "url(http" not in text


def test_static_files_are_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["reverie"]
    package = ROOT / "src" / "reverie"
    files = [p.relative_to(package).as_posix() for p in playground.STATIC.iterdir() if p.is_file()]
    assert {"index.html", "app.js", "plot.js", "style.css"} <= {Path(f).name for f in files}
    for f in files:
        assert any(fnmatch.fnmatch(f, pattern) for pattern in patterns), f
