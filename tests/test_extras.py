"""A1111's generation extras (reverie.hires, Pipeline.set_tiling): the hires fix's two passes, variation seeds and
seamless tiling, in Python, on the command line and in the infotext."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reverie import Pipeline
from reverie.cli import main
from reverie.hires import hires_fix, slerp, variation_noise
from reverie.loading import model_path
from reverie.metadata import read_png_info
from reverie.pipeline import to_pil


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(model_path("shapes"))


def arrays(result):
    return np.stack([np.asarray(im, dtype=np.float64) for im in result.images])


# ---------------------------------------------------------------- variation seeds


def test_slerp_is_a1111s():
    g = torch.Generator().manual_seed(0)
    low, high = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, 8, generator=g)
    assert torch.allclose(slerp(0.0, low, high), low, atol=1e-5)
    assert torch.allclose(slerp(1.0, low, high), high, atol=1e-5)
    # by hand: along dim 1 (the rows) for each channel and column, the spherical interpolation of the two vectors
    out = slerp(0.3, low, high)
    for c in range(3):
        for w in range(8):
            a, b = low[c, :, w], high[c, :, w]
            omega = torch.acos(torch.dot(a / a.norm(), b / b.norm()))
            expected = (torch.sin(0.7 * omega) * a + torch.sin(0.3 * omega) * b) / torch.sin(omega)
            assert torch.allclose(out[c, :, w], expected, atol=1e-5)
    assert torch.equal(slerp(0.3, low, low * 2), low * 0.3 + low * 2 * 0.7)  # A1111's parallel case, as it is


def test_variation_seeds(pipe):
    common = dict(steps=4, sampler="dpmpp_2m", progress=False)
    base = pipe("a red circle", seed=[3], **common)
    assert np.array_equal(arrays(pipe("a red circle", seed=[3], subseed=[9], subseed_strength=0.0, **common)),
                          arrays(base))
    # strength 1 starts from the subseed's noise: a deterministic sampler then draws the subseed's image
    full = pipe("a red circle", seed=[3], subseed=[9], subseed_strength=1.0, **common)
    assert np.abs(arrays(full) - arrays(pipe("a red circle", seed=[9], **common))).mean() < 0.5
    half = pipe("a red circle", seed=[3], subseed=[9], subseed_strength=0.5, **common)
    assert half.params["subseed"] == 9 and half.params["subseed_strength"] == 0.5
    drawn = pipe("a red circle", seed=[3], subseed_strength=0.5, **common)  # no subseed: one is drawn, and recorded
    again = pipe("a red circle", seed=[3], subseed=[drawn.params["subseed"]], subseed_strength=0.5, **common)
    assert np.array_equal(arrays(drawn), arrays(again))
    assert np.abs(arrays(half) - arrays(base)).mean() > 1
    with pytest.raises(ValueError, match="subseed_strength must be a number in"):
        variation_noise((1, 3, 4, 4), None, None, 1.5)


# ---------------------------------------------------------------- tiling


def test_tiling_makes_the_network_and_decoder_roll_equivariant(pipe):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 3, 16, 16, generator=g), torch.tensor([500])
    ctx = pipe.text_encoder.encode(["a red circle"])
    roll = lambda z, k: torch.roll(z, shifts=(k, -k), dims=(-2, -1))  # noqa: E731
    with torch.no_grad():
        plain = pipe.unet(x, t, ctx)
        assert (pipe.unet(roll(x, 4), t, ctx) - roll(plain, 4)).abs().max() > 1e-2  # zero padding: not equivariant
        pipe.set_tiling(True)
        try:
            assert torch.allclose(pipe.unet(roll(x, 4), t, ctx), roll(pipe.unet(x, t, ctx), 4), atol=1e-4)
            f = pipe.downsample_factor
            assert torch.allclose(pipe.vae.decode(roll(x, 2)), roll(pipe.vae.decode(x), 2 * f), atol=1e-4)
        finally:
            pipe.set_tiling(False)
        assert torch.equal(pipe.unet(x, t, ctx), plain)  # off again: as before
    result = pipe("a red circle", steps=2, seed=1, progress=False, tiling=True)
    assert result.params["tiling"] is True and not pipe.tiling


# ---------------------------------------------------------------- hires fix


def test_hires_fix_latent_and_lanczos(pipe):
    common = dict(steps=4, seed=[2, 3], sampler="dpmpp_2m", progress=False)
    first = pipe(["a red circle", "a blue square"], **common)
    # strength 0: the second pass keeps the upscaled latents, so the image is their decoding
    still = hires_fix(pipe, ["a red circle", "a blue square"], hr_scale=2, denoising_strength=0.0, **common)
    up = F.interpolate(first.latents, scale_factor=2, mode="bilinear")
    expected = np.stack([np.asarray(im, dtype=np.float64) for im in to_pil(pipe.decode_latents(up))])
    assert still.images[0].size == (128, 128) and np.abs(arrays(still) - expected).mean() < 0.5
    done = hires_fix(pipe, ["a red circle", "a blue square"], hr_scale=1.5, hr_upscaler="Lanczos",
                     hr_second_pass_steps=3, denoising_strength=0.6, **common)
    assert done.images[0].size == (96, 96)
    p = done.params
    assert (p["hr_scale"], p["hr_upscaler"], p["hr_first_size"], p["strength"]) == (1.5, "Lanczos", [64, 64], 0.6)
    with pytest.raises(ValueError, match="hr_upscaler must be one of"):
        hires_fix(pipe, "a red circle", hr_upscaler="ESRGAN_4x", **common)


def test_cli_hires_variation_and_tiling(tmp_path):
    out = tmp_path / "hr.png"
    assert main(["generate", "a red circle", "--steps", "3", "--seed", "4", "--hires-scale", "2",
                 "--hires-strength", "0.5", "--out", str(out)]) == 0
    info = read_png_info(out)["parameters"]
    assert Image.open(out).size == (128, 128)
    assert (info["Size-1"], info["Hires upscale"], info["Hires upscaler"], info["Denoising strength"]) == \
        ("64", "2.0", "Latent", "0.5")
    var = tmp_path / "var.png"
    assert main(["generate", "a red circle", "--steps", "3", "--seed", "4", "--subseed", "11",
                 "--subseed-strength", "0.4", "--tiling", "--out", str(var)]) == 0
    info = read_png_info(var)["parameters"]
    assert (info["Variation seed"], info["Variation seed strength"], info["Tiling"]) == ("11", "0.4", "True")
    assert main(["generate", "--from", str(var), "--out", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(var)), np.asarray(Image.open(tmp_path / "again.png")))


def test_a1111_txt2img_hires_variation_and_tiling(tmp_path):
    """The A1111 dialect's enable_hr / hr_scale / hr_upscaler / denoising_strength, subseed / subseed_strength,
    tiling and prompt weighting give the images the Python calls give."""
    import base64
    import json

    from fastapi.testclient import TestClient
    from test_server_support import engine, pixels

    from reverie.server import create_app

    server = engine(tmp_path, pipe=Pipeline.from_pretrained(model_path("shapes")))
    try:
        client = TestClient(create_app(server))
        body = dict(prompt="a red circle", seed=5, steps=3, cfg_scale=6, sampler_name="Euler")
        r = client.post("/sdapi/v1/txt2img", json=body | dict(enable_hr=True, hr_scale=2, denoising_strength=0.5,
                                                              hr_upscaler="Latent (nearest)"))
        assert r.status_code == 200, r.text
        got = pixels(base64.b64decode(r.json()["images"][0]))
        alone = Pipeline.from_pretrained(model_path("shapes"))
        want = hires_fix(alone, ["a red circle"], hr_scale=2, hr_upscaler="Latent (nearest)", denoising_strength=0.5,
                         steps=3, guidance_scale=6.0, sampler="Euler", seed=[5], progress=False)
        assert got.shape == (128, 128, 3) and np.abs(got - arrays(want)[0]).mean() <= 1.0
        assert "Hires upscale: 2.0" in json.loads(r.json()["info"])["infotexts"][0]
        r = client.post("/sdapi/v1/txt2img", json=body | dict(enable_hr=True, hr_resize_x=96, denoising_strength=0.3))
        assert pixels(base64.b64decode(r.json()["images"][0])).shape == (96, 96, 3)  # the aspect kept
        infotext = json.loads(r.json()["info"])["infotexts"][0]
        assert "Hires resize: 96x0" in infotext and "Hires upscale:" not in infotext  # as A1111 writes them

        r = client.post("/sdapi/v1/txt2img", json=body | dict(subseed=9, subseed_strength=0.4, tiling=True))
        info = json.loads(r.json()["info"])
        assert (info["subseed"], info["subseed_strength"]) == (9, 0.4)
        want = alone("a red circle", steps=3, guidance_scale=6.0, sampler="Euler", seed=[5], subseed=[9],
                     subseed_strength=0.4, tiling=True, progress=False)
        assert np.abs(pixels(base64.b64decode(r.json()["images"][0])) - arrays(want)[0]).mean() <= 1.0
        r = client.post("/sdapi/v1/txt2img", json=body | dict(prompt="a (red:1.4) circle, [blue]"))  # A1111's syntax
        want = alone("a (red:1.4) circle, [blue]", steps=3, guidance_scale=6.0, sampler="Euler", seed=[5],
                     prompt_syntax="a1111", progress=False)
        assert np.abs(pixels(base64.b64decode(r.json()["images"][0])) - arrays(want)[0]).mean() <= 1.0
        r = client.post("/sdapi/v1/txt2img", json=body | dict(enable_hr=True, hr_upscaler="ESRGAN"))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][-1] == "hr_upscaler"
    finally:
        server.close()


# ---------------------------------------------------------------- FreeU


def test_freeu_equals_diffusers_and_is_the_identity_at_one(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from tiny_families import sd_folder

    folder = sd_folder(tmp_path / "sd")
    ours = Pipeline.from_pretrained(folder).unet
    theirs = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([20, 700]), torch.randn(2, 7, 32, generator=g)
    with torch.no_grad():
        plain = ours(x, t, ctx)
        ours.enable_freeu(s1=1.0, s2=1.0, b1=1.0, b2=1.0)
        assert torch.allclose(ours(x, t, ctx), plain, atol=1e-5)  # identity at 1
        ours.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
        theirs.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
        got, want = ours(x, t, ctx), theirs(x, t, ctx).sample
        assert torch.allclose(got, want, atol=1e-5) and (got - plain).abs().max() > 1e-2
        ours.disable_freeu()
        assert torch.equal(ours(x, t, ctx), plain)
    with pytest.raises(ValueError, match="freeu b1"):
        ours.enable_freeu(s1=0.9, s2=0.2, b1=-1, b2=1.6)
    assert main(["generate", "a red circle", "--steps", "2", "--freeu", "0.9,0.2,1.5,1.6",
                 "--out", str(tmp_path / "f.png")]) == 0
    assert read_png_info(tmp_path / "f.png")["request"]["freeu"] == [0.9, 0.2, 1.5, 1.6]
    assert main(["generate", "a red circle", "--freeu", "0.9,0.2", "--out", str(tmp_path / "g.png")]) == 2
