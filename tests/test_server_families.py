"""The server with a model of every transformer family: a tiny DiT, SD3 and FLUX dev (tests/tiny_families.py) in one
engine. Each dialect generates with each family and gives the image the pipeline gives the same request alone;
merged batches equal their requests alone (SD3, DiT, FLUX); the model lists name each model's family; a field the
family cannot use is a 422 naming it; the PNG infotext carries the family, the flow shift and FLUX's distilled
guidance (as Forge writes them), and `reverie generate --from` regenerates a flow-model image exactly; the
playground's schedule views show flow times for flow models."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from reverie import Pipeline, metadata
from reverie.cli import main
from reverie.flow import FlowSchedule
from reverie.server import Engine, Limits, Request, create_app

from test_server_support import Gated, pixels, running, wait_for
from tiny_families import dit_folder, flux_folder, sd3_folder

diffusers = pytest.importorskip("diffusers")  # tiny_families saves its folders with diffusers

STEPS = 2
MSL = 48  # FLUX's T5 tokens in diffusers' tiny test (512 by default)
LIMITS = Limits(max_width=128, max_height=128, max_steps=60, max_images=4)  # the family defaults fit
# one request per family: DiT prompts are class ids; the tiny DiT folder's own DDIM clips x0, so give a sampler
CASES = {"sd3": dict(prompt="a photo of a cat", width=32, height=32),
         "dit": dict(prompt="3", sampler="DDIM", width=16, height=16),
         "flux": dict(prompt="a photo of a cat", width=8, height=8, max_sequence_length=MSL)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {"sd3": sd3_folder(root / "sd3"), "dit": dit_folder(root / "dit"),
            "flux": flux_folder(root / "flux", dev=True)}


@pytest.fixture(scope="module")
def pipes(folders):
    return {name: Pipeline.from_pretrained(path) for name, path in folders.items()}


@pytest.fixture(scope="module")
def server(pipes, tmp_path_factory):
    with running(pipes, tmp_path_factory.mktemp("store")) as e:  # sd3 is the default
        yield e


@pytest.fixture(scope="module")
def client(server):
    return TestClient(create_app(server, limits=LIMITS))


def alone(pipes, model, seed, prompt=None, **kwargs) -> np.ndarray:
    """The image a request gives run on its own, straight from the pipeline (one generator per image)."""
    case = {**CASES[model], **kwargs}
    case["prompt"] = prompt or case["prompt"]
    image = pipes[model](steps=STEPS, seed=[seed], progress=False, **case).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def close_to(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.abs(a - b).mean() <= 1.0


def b64_pixels(data: str) -> np.ndarray:
    return pixels(base64.b64decode(data))


def job_png(client, server, body) -> bytes:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    job = server.get(r.json()["id"])
    assert job.done.wait(60) and job.status == "done", job.error
    return client.get(f"/v1/jobs/{job.id}/images/0.png").content


# --- every dialect with every family -------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(CASES))
def test_each_dialect_generates_with_each_family(client, server, pipes, model):
    case = CASES[model]
    size = f"{case['width']}x{case['height']}"
    extra = {k: v for k, v in case.items() if k not in ("prompt", "width", "height")}

    png = job_png(client, server, {"model": model, "steps": STEPS, "seed": 5, **case})
    assert close_to(pixels(png), alone(pipes, model, 5))
    assert json.loads(Image.open(io.BytesIO(png)).text["reverie"])["family"] == model

    r = client.post("/v1/images/generations", json={"model": model, "prompt": case["prompt"], "size": size,
                                                    "steps": STEPS, "seed": 6, **extra})
    assert r.status_code == 200, r.text
    assert close_to(b64_pixels(r.json()["data"][0]["b64_json"]), alone(pipes, model, 6))

    a1111 = {"prompt": case["prompt"], "steps": STEPS, "seed": 7, "width": case["width"], "height": case["height"],
             "sampler_name": case.get("sampler"), "override_settings": {"sd_model_checkpoint": model},
             "max_sequence_length": case.get("max_sequence_length")}
    expected = {}
    if model == "flux":
        a1111["distilled_cfg_scale"] = expected["guidance_scale"] = 4.0  # Forge's name for the distilled guidance
    elif model == "dit":
        a1111["cfg_scale"] = expected["guidance_scale"] = 3.0
    r = client.post("/sdapi/v1/txt2img", json=a1111)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["family"] == model and info["sd_model_name"] == model
    assert close_to(b64_pixels(r.json()["images"][0]), alone(pipes, model, 7, **expected))


def test_img2img_with_flow_and_class_models(client, pipes):
    torch.manual_seed(0)
    for model in ("sd3", "dit"):
        case = CASES[model]
        source = Image.fromarray((torch.rand(case["height"], case["width"], 3).numpy() * 255).astype("uint8"))
        buf = io.BytesIO()
        source.save(buf, format="PNG")
        r = client.post("/sdapi/v1/img2img", json={"prompt": case["prompt"], "init_images": [
            base64.b64encode(buf.getvalue()).decode()], "denoising_strength": 0.5, "steps": STEPS, "seed": 8,
            "sampler_name": case.get("sampler"), "override_settings": {"sd_model_checkpoint": model}})
        assert r.status_code == 200, r.text
        expected = alone(pipes, model, 8, image=source, strength=0.5)  # cfg_scale unset: the family's default
        assert close_to(b64_pixels(r.json()["images"][0]), expected), model


# --- batching: a merged batch gives each request what it gives alone --------------------------------------


def test_merged_batches_equal_each_request_alone(pipes, tmp_path):
    """SD3 batches when max_sequence_length agrees (guidance scales and negatives are per row); DiT batches any class
    labels and scales; FLUX batches when the distilled guidance and true_cfg_scale agree (true CFG runs against
    "" without a negative prompt, as Forge's cfg_scale > 1 does)."""
    gated = {name: Gated(pipe) for name, pipe in pipes.items()}
    e = Engine(gated, tmp_path, max_batch=8, batch_window_s=0.0).start()
    assert e.wait_ready(120), e.load_error
    flux = dict(width=8, height=8, max_sequence_length=MSL)
    specs = [  # (model, request, call letter: jobs with the same letter share a pipeline call)
        ("sd3", Request("a red circle above a blue square", guidance_scale=5.0, seed=2), "a"),
        ("sd3", Request("a photo of a cat", negative_prompt="blurry", seed=3, n=2), "a"),
        ("sd3", Request("bad quality", guidance_scale=1.0, seed=5), "a"),
        ("sd3", Request("a photo of a cat", max_sequence_length=32, seed=6), "b"),  # another T5 length
        ("sd3", Request("a photo of a cat", skip_guidance_layers=[0], seed=16), "g"),  # skip-layer guidance
        ("sd3", Request("bad quality", skip_guidance_layers=[0], guidance_scale=4.0, seed=17), "g"),
        ("dit", Request("3", sampler="DDIM", seed=7), "c"),
        ("dit", Request("7", sampler="DDIM", guidance_scale=1.0, seed=8, n=2), "c"),
        ("dit", Request("1", sampler="DDIM", guidance_scale=2.0, seed=10), "c"),
        ("flux", Request("a photo of a cat", seed=11, **flux), "d"),
        ("flux", Request("a red circle above a blue square", seed=12, **flux), "d"),
        ("flux", Request("a photo of a cat", guidance_scale=5.0, seed=13, **flux), "e"),  # another distilled guidance
        ("flux", Request("a photo of a cat", negative_prompt="bad quality", true_cfg_scale=2.0, seed=14, **flux), "f"),
        ("flux", Request("a red circle above a blue square", true_cfg_scale=2.0, seed=15, **flux), "f"),
    ]
    try:
        head = e.submit(Request("a photo of a cat", model="sd3", steps=STEPS, seed=1))
        wait_for(lambda: gated["sd3"].steps, what="the first job to start")
        jobs = [e.submit(Request(**{**r.__dict__, "model": model, "steps": STEPS})) for model, r, _ in specs]
        for pipe in gated.values():
            pipe.gate.set()
        for job in [head, *jobs]:
            assert job.done.wait(60) and job.status == "done", job.error
        calls = {name: [len(c) for c in pipe.calls] for name, pipe in gated.items()}
        assert calls == {"sd3": [1, 4, 1, 2], "dit": [4], "flux": [2, 1, 2]}
        for job, (model, r, _) in zip(jobs, specs):
            kwargs = {k: v for k, v in dict(guidance_scale=r.guidance_scale, sampler=r.sampler,
                                            max_sequence_length=r.max_sequence_length,
                                            true_cfg_scale=r.true_cfg_scale,
                                            skip_guidance_layers=r.skip_guidance_layers).items() if v is not None}
            if r.negative_prompt or r.true_cfg_scale:
                kwargs["negative_prompt"] = r.negative_prompt
            for i in range(r.n):
                got = pixels(e.store.image_path(job.id, i).read_bytes())
                expected = alone(pipes, model, job.seeds[i], r.prompt, **kwargs)
                assert np.abs(got - expected).max() <= 1, (model, r.prompt, i, np.abs(got - expected).max())
    finally:
        for pipe in gated.values():
            pipe.gate.set()
        e.close()


# --- what the server says about its models --------------------------------------------------------------------


def test_model_lists_name_the_families(client, folders):
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert list(data) == ["sd3", "dit", "flux"] and data["sd3"]["default"]
    assert {k: m["family"] for k, m in data.items()} == {"sd3": "sd3", "dit": "dit", "flux": "flux"}
    assert [data[k]["schedule"] for k in data] == ["flow", "vp", "flow"]
    assert data["flux"]["variant"] == "dev" and data["flux"]["size_multiple"] == 2 and data["sd3"]["shift"] == 1.0
    assert data["flux"]["defaults"] == {"steps": 28, "guidance_scale": 3.5, "sampler": None}
    assert data["dit"]["prompt"] == "class" and not data["dit"]["negative_prompt"]
    assert "true_cfg_scale" in data["flux"]["options"] and "skip_guidance_layers" in data["sd3"]["options"]
    assert "ddim" not in data["sd3"]["samplers"] and "euler_flow" not in data["dit"]["samplers"]
    assert all(m["controlnets"] == [] for m in data.values())  # ControlNet is SD-only

    models = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models").json()}
    assert {k: m["family"] for k, m in models.items()} == {"sd3": "sd3", "dit": "dit", "flux": "flux"}
    digest = metadata.model_hash(folders["flux"])
    assert models["flux"]["title"] == f"flux [{digest}]" and models["flux"]["hash"] == digest


def test_a1111_options_pick_the_checkpoint(client):
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("sd3 [")
    assert "DDIM" not in {s["name"] for s in client.get("/sdapi/v1/samplers").json()}  # a flow model
    assert "simple" in {s["name"] for s in client.get("/sdapi/v1/schedulers").json()}
    title = next(m["title"] for m in client.get("/sdapi/v1/sd-models").json() if m["model_name"] == "dit")
    try:
        assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": title}).status_code == 200
        assert {"DDIM", "DDPM"} <= {s["name"] for s in client.get("/sdapi/v1/samplers").json()}
        assert "simple" not in {s["name"] for s in client.get("/sdapi/v1/schedulers").json()}
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "3", "steps": STEPS, "sampler_name": "DDIM"})
        assert r.status_code == 200 and json.loads(r.json()["info"])["family"] == "dit"
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd3"})
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "sd-v1-5"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "sd_model_checkpoint"


@pytest.mark.parametrize("path,body,field", [
    ("/v1/jobs", {"model": "dit", "prompt": "3", "sampler": "DDIM", "negative_prompt": "blurry"}, "negative_prompt"),
    ("/v1/jobs", {"model": "dit", "prompt": "a photo of a cat", "sampler": "DDIM"}, "prompt"),
    ("/v1/jobs", {"model": "dit", "prompt": "3", "sampler": "euler_flow"}, "sampler"),
    ("/v1/jobs", {"model": "dit", "prompt": "3", "sampler": "DDIM", "shift": 3.0}, "shift"),
    ("/v1/jobs", {"model": "dit", "prompt": "3", "sampler": "Euler", "scheduler": "simple"}, "scheduler"),
    ("/v1/jobs", {"model": "sd3", "prompt": "x", "sampler": "DDIM"}, "sampler"),
    ("/v1/jobs", {"model": "sd3", "prompt": "x", "true_cfg_scale": 2.0}, "true_cfg_scale"),
    ("/v1/jobs", {"model": "sd3", "prompt": "x", "skip_guidance_layers": [3]}, "skip_guidance_layers"),
    ("/v1/jobs", {"model": "sd3", "prompt": "x", "skip_layer_guidance_scale": 3.0}, "skip_layer_guidance_scale"),
    ("/v1/jobs", {"model": "sd3", "prompt": "x", "shift": 0}, "shift"),
    ("/v1/jobs", {"model": "sd3", "prompt": "x", "max_sequence_length": 513}, "max_sequence_length"),
    ("/v1/jobs", {"model": "sd3", "prompt": "x", "control_image": "iVBORw0KGgo=", "control_type": "canny"},
     "control_image"),
    ("/v1/jobs", {"model": "flux", "prompt": "x", "width": 9, "height": 8}, "width"),
    ("/v1/jobs", {"model": "flux", "prompt": "x", "skip_guidance_layers": [0]}, "skip_guidance_layers"),
    ("/v1/images/generations", {"model": "dit", "prompt": "3", "sampler": "DDIM", "negative_prompt": "x"},
     "negative_prompt"),
    ("/v1/images/generations", {"model": "flux", "prompt": "x", "size": "9x8"}, "size"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "DDIM"}, "sampler_name"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "flux"},
                           "distilled_cfg_scale": -1}, "distilled_cfg_scale"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}},
     "sd_model_checkpoint"),
])
def test_fields_a_family_cannot_use_are_422_naming_them(client, path, body, field):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][-1] == field, r.json()


def test_sampler_errors_name_the_allowed_samplers(client):
    detail = client.post("/v1/jobs", json={"model": "sd3", "prompt": "x", "sampler": "ddim"}).json()["detail"][0]
    assert "euler_flow" in detail["msg"] and "dpmpp_2m" in detail["msg"]
    detail = client.post("/v1/jobs", json={"model": "dit", "prompt": "3", "sampler": "euler_flow"}).json()["detail"][0]
    assert "ddim" in detail["msg"] and "dpmpp_2m" in detail["msg"]


# --- image metadata --------------------------------------------------------------------------------------------


def test_infotext_records_family_shift_and_distilled_guidance(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a photo of a cat", "steps": STEPS, "seed": 3, "width": 8,
                                               "height": 8, "distilled_cfg_scale": 4.0, "max_sequence_length": MSL,
                                               "override_settings": {"sd_model_checkpoint": "flux"}})
    text = json.loads(r.json()["info"])["infotexts"][0]
    assert "CFG scale: 1.0, Distilled CFG Scale: 4.0, Shift: 1.0" in text and "Family: flux" in text
    assert "Sampler: Euler, Schedule type: Simple" in text  # Forge's FLUX defaults, FluxPipeline's sigmas
    fields = client.post("/sdapi/v1/png-info", json={"image": r.json()["images"][0]}).json()["parameters"]
    assert (fields["Distilled CFG Scale"], fields["Shift"], fields["Family"]) == ("4.0", "1.0", "flux")
    request = metadata.request_from_infotext(fields)
    assert (request["guidance_scale"], request["shift"], request["family"]) == (4.0, 1.0, "flux")
    assert "true_cfg_scale" not in request  # CFG scale 1: no true CFG

    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a photo of a cat", "negative_prompt": "blurry",
                                               "cfg_scale": 2, "steps": STEPS, "seed": 3, "width": 8, "height": 8,
                                               "max_sequence_length": MSL,
                                               "override_settings": {"sd_model_checkpoint": "flux"}})
    text = json.loads(r.json()["info"])["infotexts"][0]
    assert "CFG scale: 2.0, Distilled CFG Scale: 3.5" in text  # Forge: cfg_scale is true CFG on FLUX
    assert metadata.request_from_infotext(text)["true_cfg_scale"] == 2.0


@pytest.mark.parametrize("model,extra", [("sd3", {"shift": 2.5, "guidance_scale": 5.0, "sampler": "Euler"}),
                                         ("flux", {"guidance_scale": 4.5}),
                                         ("dit", {})])
def test_generate_from_regenerates_a_served_image(client, server, folders, tmp_path, model, extra):
    png = job_png(client, server, {"model": model, "steps": STEPS, "seed": 9, **CASES[model], **extra})
    info = metadata.read_png_info(png)
    assert info["request"]["family"] == model and info["parameters"]["Family"] == model
    if "shift" in extra:
        assert info["request"]["shift"] == 2.5 and info["parameters"]["Shift"] == "2.5"
    (tmp_path / "served.png").write_bytes(png)
    out = tmp_path / "again.png"
    assert main(["generate", "--from", str(tmp_path / "served.png"), "--model", str(folders[model]),
                 "--out", str(out)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(io.BytesIO(png))))


def test_shift_applies_with_the_models_own_scheduler(pipes):
    kwargs = dict(steps=STEPS, seed=[9], progress=False, **CASES["sd3"])
    for sampler in ("Euler", None):  # an explicit sampler takes the shift; the model's own should too
        own, other = (pipes["sd3"](shift=s, sampler=sampler, **kwargs).latents for s in (1.0, 4.0))
        assert (own - other).abs().max() > 1e-3, sampler  # the tiny model's pixels barely see the schedule


# --- the playground's schedule views ---------------------------------------------------------------------------


def test_playground_shows_flow_times_for_flow_models(client):
    body = client.get("/playground/samplers", params={"model": "sd3"}).json()
    labels = [s["label"] for s in body["samplers"]]
    assert body["kind"] == "flow" and body["default"] in labels and "DDIM" not in labels and "DDPM" not in labels
    dit = client.get("/playground/samplers", params={"model": "dit"}).json()
    assert dit["kind"] == "vp" and "DDIM" in [s["label"] for s in dit["samplers"]]

    body = client.get("/playground/sigmas", params={"model": "sd3", "sampler": ["Euler", "DPM++ 2M"], "steps": 4,
                                                    "shift": 3.0}).json()
    assert body["kind"] == "flow" and body["shift"] == 3.0 and body["sigma_max"] == 1.0
    euler, dpm = body["samplers"]
    reference = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(4)
    np.testing.assert_allclose(euler["sigmas"], reference.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(euler["evaluations"], euler["sigmas"][:-1], rtol=1e-6)
    reference = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                                      flow_shift=3.0)
    reference.set_timesteps(4)
    np.testing.assert_allclose(dpm["sigmas"], reference.sigmas.numpy(), rtol=1e-5, atol=1e-6)

    flux = client.get("/playground/sigmas", params={"model": "flux", "sampler": "Euler", "steps": 4}).json()
    assert flux["samplers"][0]["schedule"] == "simple"  # FluxPipeline's linspace(1, 1/N, N)
    np.testing.assert_allclose(flux["samplers"][0]["sigmas"], [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-6)
    dit = client.get("/playground/sigmas", params={"model": "dit", "sampler": "DDIM", "steps": 4}).json()
    assert dit["kind"] == "vp" and dit["sigma_max"] > 1
    for params, field in [({"model": "sd3", "sampler": "DDIM"}, "sampler"), ({"model": "dit", "shift": 2}, "shift"),
                          ({"model": "nope"}, "model")]:
        r = client.get("/playground/sigmas", params=params)
        assert r.status_code == 422 and field in json.dumps(r.json()["detail"])

    curves = client.get("/playground/schedules", params={"points": 9, "model": "sd3", "shift": 3.0}).json()
    t = np.array(curves["flow"]["t"])
    assert curves["model_kind"] == "flow" and curves["flow"]["shift"] == 3.0 and 0 < t[0] < t[-1] < 1
    np.testing.assert_allclose(curves["flow"]["sigma"], 3 * t / (1 + 2 * t), rtol=1e-12)  # SD3 eq. 23
    own = client.get("/playground/schedules", params={"points": 9}).json()["flow"]
    assert own["shift"] == FlowSchedule().shift == 1.0 and own["sigma"] == own["t"]  # the tiny SD3's own shift
