"""`reverie generate --model FOLDER` for each transformer family: the CLI's image equals the Python API's for the
same settings, its PNG records the family, and family options reach the pipeline."""

import numpy as np
import pytest
from PIL import Image

from reverie import Pipeline
from reverie.cli import main

from tiny_families import dit_folder, flux_folder, sd3_folder

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    return {"dit": dit_folder(tmp / "dit"), "sd3": sd3_folder(tmp / "sd3"), "flux": flux_folder(tmp / "flux", dev=True)}


CASES = {
    "dit": (["3", "--sampler", "ddim", "--steps", "3"], dict(prompt=[3], sampler="ddim", steps=3)),
    "sd3": (["a red circle", "--steps", "3", "--negative", "bad quality", "--shift", "3", "--max-sequence-length", "16"],
            dict(prompt="a red circle", steps=3, negative_prompt="bad quality", shift=3.0, max_sequence_length=16)),
    "flux": (["a red circle", "--steps", "3", "--guidance", "4", "--width", "16", "--height", "8",
              "--max-sequence-length", "48"],
             dict(prompt="a red circle", steps=3, guidance_scale=4.0, width=16, height=8, max_sequence_length=48)),
}


@pytest.mark.parametrize("family", list(CASES))
def test_generate_matches_the_python_api(folders, family, tmp_path):
    args, kwargs = CASES[family]
    out = tmp_path / f"{family}.png"
    assert main(["generate", *args, "--model", str(folders[family]), "--seed", "7", "--out", str(out),
                 "--safety-checker", "none"]) in (0, None)
    pipe = Pipeline.from_pretrained(folders[family], safety_checker=None)
    expected = pipe(**kwargs, seed=7, progress=False).images[0]
    image = Image.open(out)
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))
    assert family in image.info.get("reverie", "") or family in image.info.get("parameters", "")
