"""The HTTP app in process: each dialect end to end on the shipped model (images equal the request run alone),
limits answered 422 naming the field, the API key, probes and metrics, and a schemathesis fuzz: no 5xx."""

import base64
import io
import json

import numpy as np
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from PIL import Image

from reverie.server import Limits, create_app
from reverie.server.cli import check_exposure

from test_server_support import STEPS, Gated, alone, engine, pixels, shapes, wait_for

LIMITS = Limits(max_width=128, max_height=128, max_steps=20, max_images=4, max_prompt_chars=200,
                max_body_bytes=200_000)
FUZZ_LIMITS = Limits(max_width=64, max_height=64, max_steps=3, max_images=2, max_prompt_chars=100,
                     max_body_bytes=50_000)  # whatever the fuzzer asks for stays cheap


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    e = engine(tmp_path_factory.mktemp("http"), max_queue=16, preview_interval_s=0.0)  # a preview every step
    yield e
    e.close()


@pytest.fixture(scope="module")
def client(server):
    return TestClient(create_app(server, limits=LIMITS))


def b64_pixels(data: str) -> np.ndarray:
    return pixels(base64.b64decode(data))


def close_to(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.abs(a - b).mean() <= 1.0


def test_openai_generations(client):
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "seed": 5, "steps": STEPS,
                                                    "size": "64x64", "guidance_scale": 6.0, "quality": "hd"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["created"], int) and [d["seed"] for d in body["data"]] == [5, 6]
    for i, item in enumerate(body["data"]):
        assert close_to(b64_pixels(item["b64_json"]), alone("a red circle", 5 + i, 6.0))
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "seed": 5, "steps": STEPS,
                                                    "guidance_scale": 6.0, "response_format": "url"})
    url = r.json()["data"][0]["url"]
    png = client.get(url.removeprefix("http://testserver"))
    assert png.headers["content-type"] == "image/png" and close_to(pixels(png.content), alone("a red circle", 5, 6.0))


def test_a1111_txt2img_img2img_and_png_info(client):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a blue square", "negative_prompt": "red", "seed": 3,
                                               "steps": STEPS, "cfg_scale": 5, "batch_size": 2,
                                               "restore_faces": False, "enable_hr": False})
    assert r.status_code == 200, r.text
    body = r.json()
    info = json.loads(body["info"])
    assert info["all_seeds"] == [3, 4] and "Seed: 3" in info["infotexts"][0] and body["parameters"]["cfg_scale"] == 5
    for i, image in enumerate(body["images"]):
        assert close_to(b64_pixels(image), alone("a blue square", 3 + i, 5.0, "red", sampler="Euler"))

    meta = client.post("/sdapi/v1/png-info", json={"image": body["images"][1]}).json()
    assert meta["parameters"]["Seed"] == "4" and meta["parameters"]["Negative prompt"] == "red"
    assert meta["info"].startswith("a blue square")

    init = body["images"][0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    for extra in ({}, {"mask": base64.b64encode(buf.getvalue()).decode()}):
        r = client.post("/sdapi/v1/img2img", json={"prompt": "a green circle", "init_images": [init], "seed": 9,
                                                   "steps": STEPS, "denoising_strength": 0.5, **extra})
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["info"])["denoising_strength"] == 0.5
        source = Image.open(io.BytesIO(base64.b64decode(init))).convert("RGB")
        kwargs = dict(mask_image=mask) if extra else {}
        expected = shapes()("a green circle", negative_prompt="", steps=STEPS, guidance_scale=7.0, sampler="Euler",
                            seed=[9], image=source, strength=0.5, progress=False, **kwargs).images[0]
        assert close_to(b64_pixels(r.json()["images"][0]), np.asarray(expected.convert("RGB"), dtype=np.float64))

    assert client.post("/sdapi/v1/img2img", json={"prompt": "x"}).json()["detail"][0]["loc"] == ["body", "init_images"]
    bad = client.post("/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, "init_images": ["bm90IGFuIGltYWdl"]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "init_images"]


def test_a1111_lists(client):
    samplers = {s["name"]: s for s in client.get("/sdapi/v1/samplers").json()}
    assert {"Euler a", "DPM++ 2M Karras", "dpmpp_2m", "ddim"} <= set(samplers)
    assert samplers["DPM++ 2M Karras"]["aliases"] == ["dpmpp_2m"]
    assert "euler_flow" not in samplers  # this model is not a flow model
    assert {"karras", "exponential"} <= {s["name"] for s in client.get("/sdapi/v1/schedulers").json()}
    assert client.get("/sdapi/v1/sd-models").json()[0]["model_name"] == "shapes"
    assert client.get("/v1/models").json()["data"][0]["id"] == "shapes"


def test_native_jobs_with_server_sent_events(client):
    r = client.post("/v1/jobs", json={"prompt": "a yellow circle", "seed": 21, "steps": STEPS, "n": 2, "preview": True})
    assert r.status_code == 202 and set(r.json()) == {"id", "position", "status"}
    job_id = r.json()["id"]
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((event, json.loads(line.removeprefix("data: "))))
    names = [e for e, _ in events]
    assert names[0] == "queued" and names[-1] == "done" and "progress" in names
    progress = [d for e, d in events if e == "progress"][-1]
    assert progress["steps"] == STEPS and progress["preview_x0"].startswith("data:image/png;base64,")
    done = events[-1][1]
    assert done["seeds"] == [21, 22] and len(done["images"]) == 2
    status = client.get(f"/v1/jobs/{job_id}").json()
    assert status["status"] == "done" and status["images"] == done["images"]
    for i, url in enumerate(done["images"]):
        png = client.get(url)
        assert close_to(pixels(png.content), alone("a yellow circle", 21 + i))
        assert "Seed: %d" % (21 + i) in Image.open(io.BytesIO(png.content)).text["parameters"]
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 409  # already done
    assert client.get(f"/v1/jobs/{job_id}/images/2.png").status_code == 404
    assert client.get("/v1/jobs/" + "0" * 32).status_code == 404
    assert client.delete("/v1/jobs/" + "0" * 32).status_code == 404
    for path in ("/v1/jobs/..%2F..%2Fjobs.sqlite3", "/v1/jobs/abc/images/0.png", "/v1/jobs/%2e%2e/events"):
        assert client.get(path).status_code in (404, 422)


@pytest.mark.parametrize("path,body,field", [
    ("/v1/jobs", {"prompt": "x", "width": 256}, "width"),
    ("/v1/jobs", {"prompt": "x", "height": 256}, "height"),
    ("/v1/jobs", {"prompt": "x", "steps": 21}, "steps"),
    ("/v1/jobs", {"prompt": "x", "n": 5}, "n"),
    ("/v1/jobs", {"prompt": "x" * 201}, "prompt"),
    ("/v1/jobs", {"prompt": "x", "negative_prompt": "x" * 201}, "negative_prompt"),
    ("/v1/jobs", {"prompt": "x", "width": 66}, "width"),
    ("/v1/jobs", {"prompt": "x", "sampler": "warp drive"}, "sampler"),
    ("/v1/jobs", {"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ("/v1/jobs", {"prompt": "x", "steps": 0}, "steps"),
    ("/v1/jobs", {"prompt": "x", "image": "%%%"}, "image"),
    ("/v1/jobs", {"steps": 4}, "prompt"),
    ("/v1/images/generations", {"prompt": "x", "size": "1024x1024"}, "size"),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, "size"),
    ("/v1/images/generations", {"prompt": "x", "response_format": "gif"}, "response_format"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 3, "n_iter": 2}, "batch_size"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": "lots"}, "cfg_scale"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "nope"}, "sampler_name"),
])
def test_limits_and_bad_fields_are_422_naming_the_field(client, path, body, field):
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][-1] == field


def test_request_size_limit(client):
    r = client.post("/v1/jobs", json={"prompt": "x", "image": "A" * 300_000})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"]
    chunks = (b"x" * 50_000 for _ in range(5))  # no Content-Length: counted as it arrives
    r = client.post("/v1/jobs", content=chunks, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"]


def test_api_key(server):
    client = TestClient(create_app(server, api_key="s3cret", limits=LIMITS))
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 401 and "authorization" in r.json()["detail"]
        assert client.post("/v1/jobs", json={"prompt": "x"}, headers=headers).status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_exposure_needs_a_key(monkeypatch, capsys):
    check_exposure("127.0.0.1", None)
    check_exposure("::1", None)
    check_exposure("localhost", None)
    check_exposure("0.0.0.0", "key")
    for host in ("0.0.0.0", "192.168.1.10", "example.com"):
        with pytest.raises(ValueError, match="API key"):
            check_exposure(host, None)
    from reverie.cli import main

    monkeypatch.delenv("REVERIE_API_KEY", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "1"]) == 2
    assert "--host 0.0.0.0" in capsys.readouterr().err


def test_probes_metrics_and_schema(client):
    assert client.get("/health/live").json() == {"status": "live"}
    assert client.get("/health/ready").json()["status"] == "ready"
    client.post("/v1/jobs", json={"prompt": "x", "steps": 100})
    text = client.get("/metrics").text
    for name in ("reverie_queue_depth", "reverie_batch_images_bucket", "reverie_step_seconds_count",
                 "reverie_images_total", "reverie_errors_total", 'reverie_rejections_total{reason="invalid"}',
                 'reverie_http_requests_total{code="422"}'):
        assert name in text
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}  # well-formed exposition
    assert families["reverie_batch_images"].type == "histogram" and families["reverie_queue_depth"].type == "gauge"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/images/generations", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/v1/jobs",
            "/v1/jobs/{job_id}/events", "/health/ready", "/metrics"} <= set(paths)


def test_http_queue_full_progress_and_not_ready(tmp_path):
    pipe = Gated(shapes())
    e = engine(tmp_path, pipe, max_queue=1, max_batch=1)
    client = TestClient(create_app(e, limits=LIMITS))
    try:
        first = client.post("/v1/jobs", json={"prompt": "a red circle", "steps": STEPS, "seed": 1}).json()
        wait_for(lambda: pipe.steps, what="the first job to start")
        progress = client.get("/sdapi/v1/progress").json()
        assert progress["state"]["job"] == first["id"] and progress["state"]["sampling_steps"] == STEPS
        assert client.post("/v1/jobs", json={"prompt": "b", "steps": STEPS}).json()["position"] == 0
        r = client.post("/v1/jobs", json={"prompt": "c", "steps": STEPS})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert client.post("/sdapi/v1/interrupt").json()["cancelled"] == [first["id"]]
        assert client.get(f"/v1/jobs/{first['id']}").json()["status"] == "cancelled"
        e.stop_accepting()
        assert client.get("/health/ready").status_code == 503
        r = client.post("/v1/jobs", json={"prompt": "d", "steps": STEPS})
        assert r.status_code == 503 and "retry-after" in r.headers
    finally:
        pipe.gate.set()
        e.close()


def test_playground_is_served_at_the_root(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]


# --- fuzzing the OpenAPI schema: whatever the request, never a 5xx -------------------------------------------
# (schemathesis' pytest plugin does not run under pytest 9, so its strategies drive hypothesis directly)


def test_fuzz_the_openapi_schema_finds_no_server_errors(server):
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(server, limits=FUZZ_LIMITS))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    seen = set()
    for operation in operations:
        for mode, examples in ((GenerationMode.POSITIVE, 10), (GenerationMode.NEGATIVE, 6)):
            @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=operation.as_strategy(generation_mode=mode))
            def call(case):
                response = case.call()
                seen.add(response.status_code)
                assert response.status_code < 500, (case.method, case.formatted_path, case.body,
                                                    response.status_code, response.text[:300])

            try:
                call()
            except Unsatisfiable:  # an operation without parameters has no invalid form
                assert mode == GenerationMode.NEGATIVE and not operation.path_parameters and not operation.body
    assert {200, 422} <= seen  # the fuzzer reached both the handlers and the validation
