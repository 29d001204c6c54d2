"""PNG metadata: A1111 infotext written in A1111's order and parsed back (also A1111's own strings), the JSON
request round trip, `reverie info`, and `reverie generate --from` reproducing images bit for bit."""

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from reverie import Pipeline, metadata
from reverie.cli import main, model_path
from reverie.samplers import resolve

A1111_TEXT = """a photo of an astronaut riding a horse on mars, (highly detailed:1.2) <lora:add_detail:0.6>
Negative prompt: blurry, lowres, watermark
Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 1234567890, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Clip skip: 2, Hires upscale: 2, \
Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1"""


@pytest.fixture(scope="module")
def shapes():
    return Pipeline.from_pretrained(model_path("shapes"))


def test_parse_a1111_infotext():
    fields = metadata.parse_infotext(A1111_TEXT)
    assert fields["Prompt"].startswith("a photo of an astronaut") and fields["Prompt"].endswith("<lora:add_detail:0.6>")
    assert fields["Negative prompt"] == "blurry, lowres, watermark"
    assert (fields["Steps"], fields["Sampler"], fields["Schedule type"], fields["CFG scale"]) == \
        ("20", "DPM++ 2M", "Karras", "7.0")
    assert (fields["Size-1"], fields["Size-2"], fields["Seed"]) == ("512", "768", "1234567890")
    assert fields["Lora hashes"] == "add_detail: 7c6bad76eb54"  # quoted value, unquoted
    assert fields["Hires upscaler"] == "Latent" and fields["Version"] == "v1.10.1"
    request = metadata.request_from_infotext(A1111_TEXT)
    assert request["steps"] == 20 and request["guidance_scale"] == 7.0 and request["seed"] == 1234567890
    assert (request["width"], request["height"], request["clip_skip"], request["strength"]) == (512, 768, 1, 0.7)
    assert request["model_hash"] == "6ce0161689"
    choice = resolve(request["sampler"], request["scheduler"])
    assert (choice.name, choice.schedule) == ("dpmpp_2m", "karras")


def test_parse_prompt_only_and_multiline():
    assert metadata.parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}
    text = "line one\nline two\nNegative prompt: bad\nworse\nSteps: 5, Sampler: Euler a, Seed: 3, Size: 64x64"
    fields = metadata.parse_infotext(text)
    assert fields["Prompt"] == "line one\nline two" and fields["Negative prompt"] == "bad\nworse"
    assert fields["Sampler"] == "Euler a" and metadata.request_from_infotext(fields)["clip_skip"] is None
    with pytest.raises(ValueError, match="infotext"):
        metadata.parse_infotext("")
    with pytest.raises(ValueError, match="'Steps'"):
        metadata.request_from_infotext("p\nSteps: many, Sampler: Euler, Seed: 1")


def params(**overrides):
    return {"prompt": "a red circle, big", "negative_prompt": "blurry", "steps": 20, "guidance_scale": 7.0,
            "guidance_rescale": 0.0, "sampler": "dpmpp_2m", "schedule": "karras", "sampler_options": {},
            "width": 512, "height": 768, "seed": 42, "clip_skip": 1, "model": "my, model",
            "model_hash": "0123456789", "nsfw": False} | overrides


def test_infotext_in_a1111_order():
    text = metadata.infotext(params())
    prompt, negative, line = text.split("\n")
    assert prompt == "a red circle, big" and negative == "Negative prompt: blurry"
    keys = [k for k, _ in metadata._PARAM.findall(line)]
    assert keys == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Model",
                    "Clip skip", "Version"]
    assert line.startswith("Steps: 20, Sampler: DPM++ 2M, Schedule type: Automatic, CFG scale: 7.0, Seed: 42, "
                           "Size: 512x768, Model hash: 0123456789, Model: \"my, model\", Clip skip: 2, ")
    fields = metadata.parse_infotext(text)
    assert fields["Model"] == "my, model" and fields["Prompt"] == "a red circle, big"
    assert "Negative prompt" not in metadata.infotext(params(negative_prompt=None))


@pytest.mark.parametrize("label", ["Euler", "Euler a", "Heun", "LMS", "LMS Karras", "DDIM", "DDPM", "UniPC",
                                   "DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M Exponential", "DPM++ 2M SDE Karras",
                                   "DPM++ SDE", "DPM++ SDE Karras"])
def test_sampler_names_round_trip(label):
    choice = resolve(label)
    text = metadata.infotext(params(sampler=choice.name, schedule=choice.schedule))
    request = metadata.request_from_infotext(text)
    assert "Karras" not in request["sampler"]  # A1111 1.9+ writes the schedule on its own
    assert resolve(request["sampler"], request["scheduler"]) == choice


def test_png_round_trip_and_unicode(shapes):
    result = shapes(["ein Würfel ☃", "a green triangle"], steps=3, seed=[7, 8], progress=False)
    for i, image in enumerate(result.images):
        one = metadata.image_params(result.params, i)
        data = metadata.png_bytes(image, one)
        info = metadata.read_png_info(data)
        request = {k: v for k, v in info["request"].items() if k != "reverie_version"}
        assert request == json.loads(json.dumps(one))  # every field survives
        assert info["parameters"]["Prompt"] == result.params["prompt"][i]
        assert info["parameters"]["Seed"] == str(result.params["seeds"][i])
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), np.asarray(image))
    with pytest.raises(ValueError, match="index"):
        metadata.png_bytes(result.images[0], result.params)  # a batch: which image?
    with pytest.raises(ValueError, match="image"):
        metadata.read_png_info(b"not a png")


def test_model_hash(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"weights")
    assert metadata.model_hash(tmp_path / "m.safetensors") == hashlib.sha256(b"weights").hexdigest()[:10]
    (tmp_path / "folder" / "unet").mkdir(parents=True)
    (tmp_path / "folder" / "unet" / "w.safetensors").write_bytes(b"a")
    before = metadata.model_hash(tmp_path / "folder")
    (tmp_path / "folder" / "unet" / "w.safetensors").write_bytes(b"bb")
    assert metadata.model_hash(tmp_path / "folder") != before


def test_generate_writes_metadata_and_from_reproduces(tmp_path, capsys):
    out = tmp_path / "a.png"
    assert main(["generate", "a red circle above a blue square", "--negative", "blurry", "--steps", "4",
                 "--seed", "11", "--num-images", "3", "--sampler", "DPM++ SDE Karras", "--out", str(out)]) == 0
    written = [tmp_path / f"a-{i}.png" for i in range(3)]
    requests = [metadata.read_png_info(p)["request"] for p in written]
    assert [r["seed"] for r in requests] == [11, 12, 13]  # one seed per image
    assert requests[1]["sampler"] == "dpmpp_sde" and requests[1]["schedule"] == "karras"
    assert main(["info", str(written[1])]) == 0
    shown = capsys.readouterr().out
    assert "Sampler: DPM++ SDE, Schedule type: Automatic" in shown and '"seed": 12' in shown
    again = tmp_path / "again.png"
    assert main(["generate", "--from", str(written[1]), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(written[1])))
    assert not np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(written[0])))
    assert metadata.read_png_info(again)["request"]["seed"] == 12


def test_from_an_a1111_image(tmp_path, shapes):
    info = PngInfo()
    info.add_text("parameters", "a green triangle\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M, "
                                "Schedule type: Karras, CFG scale: 5, Seed: 9, Size: 64x64, Model: shapes")
    Image.new("RGB", (64, 64)).save(tmp_path / "a1111.png", pnginfo=info)
    assert main(["generate", "--from", str(tmp_path / "a1111.png"), "--out", str(tmp_path / "b.png")]) == 0
    request = metadata.read_png_info(tmp_path / "b.png")["request"]
    assert (request["sampler"], request["schedule"], request["seed"], request["steps"]) == ("dpmpp_2m", "karras", 9, 3)
    assert request["guidance_scale"] == 5.0 and request["negative_prompt"] == "blurry"
    expected = shapes("a green triangle", negative_prompt="blurry", steps=3, guidance_scale=5.0,
                      sampler="DPM++ 2M Karras", seed=9, progress=False).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), np.asarray(expected))


def test_bad_input(tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    for argv, field in [(["--from", str(tmp_path / "missing.png")], "--from"), (["a cat", "--out", "x.jpg"], "--out"),
                        ([], "prompt"), (["--from", str(tmp_path / "plain.png")], "--from")]:
        assert main(["generate", "--out", str(tmp_path / "x.png"), *argv]) == 2
        assert f"error: {field}" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match="schedule"):
        metadata.sampler_label("euler", "quadratic")
