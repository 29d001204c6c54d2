"""Cheaper weights (reverie.quantize): fp8 storage and torchao's int8 modes on the shipped model keep its images
close to the full-precision ones and its network's weights smaller, are recorded in the image parameters, and are
refused where they cannot apply."""

import numpy as np
import pytest

from reverie import Pipeline
from reverie.cli import main, model_path
from reverie.quantize import MODES, weight_bytes

pytest.importorskip("torchao", reason="the quant extra (pip install -e '.[quant]'); CI installs it with the tests")
PROMPTS = ["a red circle above a blue square", "a green triangle"]
BOUND = {"fp8": 2.0, "int8-weight": 1.0, "int8-dynamic": 1.0}  # mean |difference| on 0..255; measured 0.28, 0.01, 0.05


def _images(pipe):
    result = pipe(PROMPTS, steps=8, seed=[0, 1], progress=False)
    return np.stack([np.asarray(i, dtype=np.float64) for i in result.images]), result.params


@pytest.fixture(scope="module")
def reference():
    pipe = Pipeline.from_pretrained(model_path("shapes"))
    return _images(pipe)[0], weight_bytes(pipe.network)


@pytest.mark.parametrize("mode", MODES)
def test_quantized_network_is_smaller_and_draws_nearly_the_same_images(reference, mode):
    base, base_bytes = reference
    pipe = Pipeline.from_pretrained(model_path("shapes"))
    pipe.quantize(mode)
    images, params = _images(pipe)
    assert params["quantize"] == mode and pipe.quantized == mode
    diff = np.abs(images - base).mean()
    assert 0 < diff <= BOUND[mode], diff
    assert weight_bytes(pipe.network) < (0.3 if mode == "fp8" else 0.9) * base_bytes
    with pytest.raises(ValueError, match="already quantized"):
        pipe.quantize(mode)
    with pytest.raises(ValueError, match="loras"):
        pipe.set_loras(["shapes-star"])


def test_bad_mode_and_cli(tmp_path):
    pipe = Pipeline.from_pretrained(model_path("shapes"))
    with pytest.raises(ValueError, match="quantize must be one of"):
        pipe.quantize("int4")
    from reverie.metadata import read_png_info

    out = tmp_path / "q.png"
    assert main(["generate", "a red circle", "--steps", "4", "--quantize", "int8-weight", "--out", str(out)]) == 0
    assert read_png_info(out)["request"]["quantize"] == "int8-weight"
