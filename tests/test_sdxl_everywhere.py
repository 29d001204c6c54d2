"""SDXL in every feature beside the pipeline: outpainting, ControlNet with inpainting, the fp16 VAE rule
(force_upcast), `reverie cost`, `reverie batch`, and the server — each dialect, merged batches, the model list (the
ControlNets that fit each model), a ControlNet made for another UNet refused by name, and the playground's sigmas on
SDXL's own schedule. The model is diffusers' tiny SDXL (tests/tiny_families.sdxl_folder); the shipped SD shapes
model stands beside it in the server."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from reverie import Pipeline, cost, metadata
from reverie.batch import read_requests, run_batch
from reverie.cli import model_path
from reverie.models.controlnet import ControlNet
from reverie.server import Engine, Limits, Request, create_app

from test_server_support import Gated, pixels, running, wait_for
from tiny_families import sdxl_folder, source_image

diffusers = pytest.importorskip("diffusers")  # tiny_families saves its folders with diffusers

STEPS = 3
SIZE = 32
PROMPT = "A painting of a squirrel eating a burger"
LIMITS = Limits(max_width=128, max_height=128, max_steps=60, max_images=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return sdxl_folder(tmp_path_factory.mktemp("sdxl") / "sdxl")


@pytest.fixture(scope="module")
def sdxl(folder):
    return Pipeline.from_pretrained(folder)


def randomized_controlnet(pipe, seed: int) -> ControlNet:
    """ControlNet.from_unet of the model's UNet with its zero convolutions made non-zero (so it changes images)."""
    net = ControlNet.from_unet(pipe.unet, downsample_factor=pipe.downsample_factor)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "zero" in name or "mid_block_out" in name or "controlnet_down" in name or "conv_out" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def box_mask(box, size=(SIZE, SIZE)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


def array(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


# --- editing ----------------------------------------------------------------------------------------------------


def test_outpainting_keeps_the_image_and_paints_the_border(sdxl):
    image = source_image((SIZE, SIZE))
    out = sdxl.outpaint(PROMPT, image, left=8, top=5, steps=STEPS, seed=1, mask_blur=0, progress=False)
    got = array(out.images[0])
    assert got.shape == (SIZE + 6, SIZE + 8, 3)  # 32 + 5 rows: only the top is extended, so it grows to 6 (VAE factor 2)
    assert (out.params["width"], out.params["height"]) == (SIZE + 8, SIZE + 6)
    assert np.array_equal(got[6:, 8:], array(image))  # the input at (left, top) = (8, 6), pasted back exactly
    again = sdxl.outpaint(PROMPT, image, left=8, top=5, steps=STEPS, seed=2, mask_blur=0, progress=False)
    border = np.ones(got.shape[:2], bool)
    border[6:, 8:] = False
    assert np.abs(got[border] - array(again.images[0])[border]).mean() > 1  # the border is painted (by the seed)


def test_controlnet_with_inpainting(sdxl):
    """ControlNet and a mask together (diffusers' StableDiffusionXLControlNetInpaintPipeline's use): the input
    stays outside the mask, and the ControlNet changes what is painted inside it."""
    image, mask = source_image((SIZE, SIZE)), box_mask((8, 8, 24, 24))
    common = dict(image=image, mask_image=mask, mask_blur=0, strength=0.8, steps=STEPS, seed=1, progress=False)
    net = randomized_controlnet(sdxl, seed=4)
    controlled = array(sdxl(PROMPT, controlnet=net, control_image=source_image((SIZE, SIZE), seed=9),
                            **common).images[0])
    plain = array(sdxl(PROMPT, **common).images[0])
    inside = np.asarray(mask, bool)
    assert np.array_equal(controlled[~inside], array(image)[~inside])
    assert np.abs(controlled[inside] - plain[inside]).mean() > 1


# --- fp16: SDXL's VAE overflows in half precision ------------------------------------------------------------------


def test_fp16_pipeline_decodes_in_float32_unless_the_vae_is_fixed(sdxl, folder, tmp_path):
    half = Pipeline.from_pretrained(folder, dtype=torch.float16)
    assert next(half.unet.parameters()).dtype == torch.float16 and half.vae_dtype == torch.float32  # force_upcast: true
    assert next(half.vae.parameters()).dtype == torch.float32
    # a fixed VAE (madebyollin/sdxl-vae-fp16-fix ships force_upcast: false) runs in fp16 when given with --vae
    fixed = tmp_path / "vae-fp16-fix"
    config = json.loads((folder / "vae" / "config.json").read_text())
    fixed.mkdir(exist_ok=True)
    (fixed / "config.json").write_text(json.dumps({**config, "force_upcast": False}))
    for f in (folder / "vae").glob("*.safetensors"):
        (fixed / f.name).write_bytes(f.read_bytes())
    half_fixed = Pipeline.from_pretrained(folder, dtype=torch.float16, vae=fixed)
    assert half_fixed.vae_dtype == torch.float16 and next(half_fixed.vae.parameters()).dtype == torch.float16
    kwargs = dict(steps=STEPS, seed=3, width=SIZE, height=SIZE, progress=False)
    full = array(sdxl(PROMPT, **kwargs).images[0])
    for pipe in (half, half_fixed):  # half precision changes rounding, not the picture
        assert np.abs(array(pipe(PROMPT, **kwargs).images[0]) - full).mean() < 2


# --- reverie cost and reverie batch --------------------------------------------------------------------------------


def test_cost_counts_and_calibrates_sdxl(sdxl, folder):
    schedule = cost.schedule_of(folder)
    assert (schedule.timestep_spacing, schedule.steps_offset) == ("leading", 1)  # SDXL's scheduler config
    assert cost.count_evaluations("heun", 10, schedule) == 19
    calibration = cost.calibrate(sdxl, steps=(1, 2), repeats=1, width=SIZE, height=SIZE)
    assert calibration.fixed_s >= 0 and calibration.eval_s > 0
    rows = {r["sampler"]: r for r in cost.table(calibration, schedule, steps=[4])}
    assert {"euler", "ddim", "dpmpp_2m"} <= set(rows) and "euler_flow" not in rows
    assert rows["heun"]["evaluations"] == 7 and rows["heun"]["latency_s"] > rows["euler"]["latency_s"]


def test_batch_shares_forward_passes_and_matches_singles(sdxl, tmp_path):
    """Requests batch as far as SDXL allows: no negative prompt (zero embeddings, force_zeros_for_empty_prompt)
    and a given one ("" included) are different conditionings, so they run in different calls; each image equals
    its request alone, and its metadata regenerates it."""
    lines = [{"prompt": PROMPT, "n": 2, "seed": 5}, {"prompt": "a photo of a cat", "negative_prompt": "blurry",
                                                     "seed": 7}, {"prompt": "a cat", "negative_prompt": "", "seed": 9},
             {"prompt": "a dog", "seed": 8, "steps": 2}]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    requests = read_requests(tmp_path / "p.jsonl", steps=STEPS, width=SIZE, height=SIZE)
    forwards = []
    hook = sdxl.unet.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape[0]))
    try:
        summary = run_batch(sdxl, requests, tmp_path / "out", batch_size=4, progress=False)
    finally:
        hook.remove()
    assert summary["generated"] == summary["total"] == 5
    assert forwards == [4] * STEPS + [4] * STEPS + [2] * 2  # (cond + uncond) x (2 without, 2 with negatives), 1
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [m["negative_prompt"] for m in manifest] == [None, None, "blurry", "", None]
    for m in manifest:
        alone = sdxl(m["prompt"], negative_prompt=m["negative_prompt"], steps=m["steps"], seed=m["seed"],
                     width=SIZE, height=SIZE, progress=False).images[0]
        batched = np.asarray(Image.open(tmp_path / "out" / m["file"]), dtype=np.float64)
        assert np.abs(batched - array(alone)).mean() < 0.5, m
    kwargs, index, _ = metadata.generation_kwargs(metadata.read_png_info(tmp_path / "out" / manifest[4]["file"])[
        "request"])
    again = sdxl(**kwargs, progress=False).images[index]
    assert np.array_equal(array(again), array(Image.open(tmp_path / "out" / manifest[4]["file"])))
    empty = sdxl("a dog", negative_prompt="", steps=2, seed=8, width=SIZE, height=SIZE, progress=False).images[0]
    assert np.abs(array(again) - array(empty)).mean() > 1  # the regenerated image is not the "" one


# --- the server ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(sdxl):
    shapes = Pipeline.from_pretrained(model_path("shapes"))
    nets = {"xl": randomized_controlnet(sdxl, seed=5), "sd": ControlNet.from_unet(shapes.unet, downsample_factor=shapes.downsample_factor)}
    return {"sdxl": sdxl, "shapes": shapes}, nets


@pytest.fixture(scope="module")
def server(served, tmp_path_factory):
    pipes, nets = served
    with running(pipes, tmp_path_factory.mktemp("store"), controlnets=nets) as e:  # sdxl is the default
        yield e


@pytest.fixture(scope="module")
def client(server):
    return TestClient(create_app(server, limits=LIMITS))


def png_of(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def alone(sdxl, seed: int, **kwargs) -> np.ndarray:
    """A request's image from the pipeline alone; the server's requests have a negative prompt ("" by default)."""
    kwargs = {"prompt": PROMPT, "negative_prompt": "", "steps": STEPS, "width": SIZE, "height": SIZE, **kwargs}
    return array(sdxl(seed=[seed], progress=False, **kwargs).images[0])


def close_to(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.abs(a - b).mean() <= 1.0


def test_each_dialect_generates_with_sdxl(client, server, sdxl):
    settings = dict(guidance_scale=5.0, sampler=None)  # the family's defaults: diffusers' guidance, the folder's Euler
    r = client.post("/v1/jobs", json={"prompt": PROMPT, "steps": STEPS, "seed": 5, "width": SIZE, "height": SIZE})
    assert r.status_code == 202, r.text
    job = server.get(r.json()["id"])
    assert job.done.wait(60) and job.status == "done", job.error
    png = client.get(f"/v1/jobs/{job.id}/images/0.png").content
    assert json.loads(Image.open(io.BytesIO(png)).text["reverie"])["family"] == "sdxl"
    assert close_to(pixels(png), alone(sdxl, 5, **settings))

    r = client.post("/v1/images/generations", json={"prompt": PROMPT, "size": f"{SIZE}x{SIZE}", "steps": STEPS,
                                                    "seed": 6})
    assert r.status_code == 200, r.text
    got = pixels(base64.b64decode(r.json()["data"][0]["b64_json"]))
    assert close_to(got, alone(sdxl, 6, **settings))

    r = client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "negative_prompt": "blurry", "steps": STEPS,
                                               "seed": 7, "width": SIZE, "height": SIZE, "cfg_scale": 4,
                                               "sampler_name": "DPM++ 2M"})
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["family"] == "sdxl" and "Family: sdxl" in info["infotexts"][0]
    got = pixels(base64.b64decode(r.json()["images"][0]))
    assert close_to(got, alone(sdxl, 7, negative_prompt="blurry", guidance_scale=4.0, sampler="dpmpp_2m"))

    source = source_image((SIZE, SIZE))
    r = client.post("/sdapi/v1/img2img", json={"prompt": PROMPT, "init_images": [png_of(source)], "steps": STEPS,
                                               "denoising_strength": 0.6, "seed": 8, "sampler_name": "Euler",
                                               "cfg_scale": 6})
    assert r.status_code == 200, r.text
    got = pixels(base64.b64decode(r.json()["images"][0]))
    assert close_to(got, alone(sdxl, 8, image=source, strength=0.6, sampler="euler", guidance_scale=6.0))


def test_merged_sdxl_batches_equal_each_request_alone(served, tmp_path):
    """Requests with the same size (so the same size conditioning) and chunk counts share one call, whatever their
    prompts, negatives, guidance scales and seeds; another size runs apart."""
    pipes, _ = served
    gated = Gated(pipes["sdxl"])
    e = Engine({"sdxl": gated}, tmp_path, max_batch=8, batch_window_s=0.0).start()
    assert e.wait_ready(120), e.load_error
    size = dict(width=SIZE, height=SIZE)
    specs = [Request(PROMPT, seed=2, guidance_scale=5.0, **size),
             Request("a photo of a cat", negative_prompt="blurry", seed=3, n=2, guidance_scale=3.0, **size),
             Request("bad quality", seed=4, guidance_scale=1.0, **size), Request(PROMPT, seed=6, width=48, height=SIZE)]
    try:
        head = e.submit(Request(PROMPT, steps=STEPS, seed=1, width=SIZE, height=SIZE))
        wait_for(lambda: gated.steps, what="the first job to start")
        jobs = [e.submit(Request(**{**r.__dict__, "steps": STEPS, "sampler": "euler"})) for r in specs]
        gated.gate.set()
        for job in [head, *jobs]:
            assert job.done.wait(60) and job.status == "done", job.error
        assert [len(c) for c in gated.calls] == [1, 4, 1]
        for job, r in zip(jobs, specs):
            for i in range(r.n):
                got = pixels(e.store.image_path(job.id, i).read_bytes())
                expected = alone(pipes["sdxl"], job.seeds[i], prompt=r.prompt, negative_prompt=r.negative_prompt,
                                 guidance_scale=r.guidance_scale, sampler="euler", width=r.width)
                assert np.abs(got - expected).max() <= 1, (r.prompt, i)
    finally:
        gated.gate.set()
        e.close()


def test_model_list_names_the_controlnets_that_fit(client):
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert data["sdxl"]["family"] == "sdxl" and data["sdxl"]["default"] and data["shapes"]["family"] == "sd"
    assert data["sdxl"]["controlnets"] == ["xl"] and data["shapes"]["controlnets"] == ["sd"]
    models = {m["model_name"]: m for m in client.get("/sdapi/v1/sd-models").json()}
    assert models["sdxl"]["family"] == "sdxl"


def test_controlnet_jobs_take_the_models_own_controlnets(client, server, served):
    control = source_image((SIZE, SIZE), seed=9)
    body = {"prompt": PROMPT, "steps": STEPS, "seed": 4, "width": SIZE, "height": SIZE, "sampler": "euler",
            "control_image": png_of(control), "control_type": "sd"}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "control_type", r.text
    assert "['xl']" in r.json()["detail"][0]["msg"] and "another UNet" in r.json()["detail"][0]["msg"]
    r = client.post("/v1/jobs", json={**body, "control_type": "xl", "controlnet_scale": 0.8})
    assert r.status_code == 202, r.text
    job = server.get(r.json()["id"])
    assert job.done.wait(60) and job.status == "done", job.error
    got = pixels(client.get(f"/v1/jobs/{job.id}/images/0.png").content)
    pipes, nets = served
    expected = alone(pipes["sdxl"], 4, sampler="euler", guidance_scale=5.0, controlnet=nets["xl"],
                     control_image=control, controlnet_conditioning_scale=0.8)
    assert close_to(got, expected)
    assert np.abs(expected - alone(pipes["sdxl"], 4, sampler="euler", guidance_scale=5.0)).mean() > 1


def test_playground_sigmas_follow_the_sdxl_schedule(client, folder):
    body = client.get("/playground/sigmas", params={"model": "sdxl", "sampler": "Euler", "steps": 7}).json()
    assert body["kind"] == "vp" and body["model"] == "sdxl"
    theirs = diffusers.EulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    theirs.set_timesteps(7)
    np.testing.assert_allclose(body["samplers"][0]["sigmas"], theirs.sigmas.numpy(), rtol=1e-5, atol=1e-6)
    curves = client.get("/playground/schedules", params={"points": 5, "model": "sdxl"}).json()
    assert curves["model_kind"] == "vp" and curves["model_schedule"] == "scaled_linear"
