"""LoRAs in the server (--lora-dir): <lora:name:w> tags in any dialect's prompt give the image the pipeline gives
with that LoRA merged, batches never mix LoRA sets, a plain request after a LoRA one gets the base model again,
A1111's /sdapi/v1/loras and refresh-loras, and unknown or unfit LoRAs are 422s naming the prompt."""

import base64
import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from test_lora import shapes_lora
from test_server_support import STEPS, alone, engine, pixels

from reverie import Pipeline
from reverie.loading import model_path
from reverie.server import Limits, Request, create_app


def fresh():
    """A shapes pipeline of its own: merging a LoRA must not reach the shared one that `alone` draws with."""
    return Pipeline.from_pretrained(model_path("shapes"))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    shapes_lora(folder / "wild.safetensors")
    shapes_lora(folder / "soft.safetensors", seed=9)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory, lora_dir):
    e = engine(tmp_path_factory.mktemp("store"), pipe=fresh(), lora_dir=lora_dir)
    yield e
    e.close()


@pytest.fixture(scope="module")
def client(server):
    return TestClient(create_app(server, limits=Limits(max_width=128, max_height=128, max_steps=20, max_images=4)))


def with_lora(prompt, seed, lora_file, strength, guidance=7.5, sampler="dpmpp_2m"):
    pipe = fresh()
    pipe.set_loras([(lora_file, strength)])
    result = pipe(prompt, steps=STEPS, guidance_scale=guidance, sampler=sampler, seed=[seed], progress=False)
    return np.asarray(result.images[0].convert("RGB"), dtype=np.float64)


def test_a1111_txt2img_with_a_lora_tag(client, lora_dir):
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle <lora:wild:0.8>", "seed": 5, "steps": STEPS,
                                               "cfg_scale": 6, "sampler_name": "Euler"})
    assert r.status_code == 200, r.text
    body = r.json()
    got = pixels(base64.b64decode(body["images"][0]))
    expected = with_lora("a red circle ", 5, lora_dir / "wild.safetensors", 0.8, 6.0, "Euler")
    assert np.abs(got - expected).mean() <= 1.0
    assert np.abs(got - alone("a red circle ", 5, 6.0, sampler="Euler")).mean() > 1  # the LoRA acted
    infotext = json.loads(body["info"])["infotexts"][0]
    assert "<lora:wild:0.8>" in infotext and "Lora hashes: \"wild: " in infotext
    # the next plain request gets the base model back (restored weights)
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle ", "seed": 5, "steps": STEPS, "cfg_scale": 6,
                                               "sampler_name": "Euler"})
    assert np.abs(pixels(base64.b64decode(r.json()["images"][0])) - alone("a red circle ", 5, 6.0, sampler="Euler")
                  ).mean() <= 1.0


def test_batches_do_not_mix_lora_sets(server):
    plain = server.prepare(Request(prompt="a red circle"))
    wild = server.prepare(Request(prompt="a red circle <lora:wild:1>"))
    wild_too = server.prepare(Request(prompt="a blue square <lora:wild:1.0>"))
    soft = server.prepare(Request(prompt="a red circle <lora:soft:1>"))
    assert wild.prompt == "a red circle " and wild.loras == [["wild", 1.0, 1.0]]
    assert server.prepare(wild) == wild  # preparing again changes nothing
    keys = [server._key(type("J", (), {"request": r, "key": None})()) for r in (plain, wild, wild_too, soft)]
    assert keys[1] == keys[2] and len({keys[0], keys[1], keys[3]}) == 3


def test_lora_listing_refresh_and_errors(client, lora_dir):
    names = [item["name"] for item in client.get("/sdapi/v1/loras").json()]
    assert names == ["soft", "wild"]
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle <lora:nope:1>", "steps": STEPS})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "prompt"
    assert "soft, wild" in r.json()["detail"][0]["msg"]
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 640),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 2)},
              str(lora_dir / "xl.safetensors"))
    assert client.post("/sdapi/v1/refresh-loras").status_code == 200
    assert "xl" in [item["name"] for item in client.get("/sdapi/v1/loras").json()]
    r = client.post("/v1/jobs", json={"prompt": "a red circle <lora:xl:1>", "steps": STEPS})
    assert r.status_code == 422 and "another architecture" in r.text
