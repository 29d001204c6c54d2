"""`reverie generate --fast`: the bundled shapes model's latent consistency distillation (bundled/shapes-lcm)."""

import json

import pytest
from PIL import Image

from reverie.cli import main
from reverie.formats import read_model_index
from reverie.loading import BUNDLED, fast_model_path, model_path


def test_fast_picks_the_bundled_lcm_sibling():
    assert fast_model_path(None) == fast_model_path("shapes") == BUNDLED / "shapes-lcm"
    assert read_model_index(fast_model_path(None))["_class_name"] == "LatentConsistencyModelPipeline"
    assert fast_model_path("shapes-lcm") == BUNDLED / "shapes-lcm"  # already the fast model
    assert fast_model_path(str(BUNDLED / "shapes-lcm")) == BUNDLED / "shapes-lcm"  # an LCM folder as a path
    assert model_path("shapes") == BUNDLED / "shapes"  # without --fast, the base


def test_fast_without_an_lcm_version_names_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--fast.*emoji.*shapes"):
        fast_model_path("emoji")
    assert main(["generate", "a red circle", "--model", "emoji", "--fast", "--out", str(tmp_path / "x.png")]) == 2
    assert not (tmp_path / "x.png").exists()


def test_generate_fast_runs_four_lcm_steps(tmp_path):
    out = tmp_path / "fast.png"
    assert main(["generate", "a red circle above a blue square", "--fast", "--seed", "0", "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    params = json.loads(image.info["reverie"])
    assert (params["steps"], params["sampler"], params["guidance_scale"]) == (4, "lcm", 8.5)
