"""`reverie batch --ray`: the batch spread over the actors of a real local Ray instance gives the images the
single-process batch gives for the same seeds, and resumes after an interruption."""

import functools
import json

import numpy as np
import pytest
from PIL import Image

from reverie import Pipeline
from reverie.batch import read_requests, run_batch, run_batch_ray
from reverie.cli import main, model_path

ray = pytest.importorskip("ray", reason="the ray extra (pip install -e '.[ray]'); CI installs it with the tests")
PROMPTS = [{"prompt": "a red circle", "n": 2, "seed": 5}, {"prompt": "a blue square on the left"},
           {"prompt": "a green triangle"}, {"prompt": "a yellow circle above a red square", "guidance_scale": 4.0},
           {"prompt": "a small square"}]


def _write(path, lines):
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    return path


# what an actor calls: picklable by reference to reverie (a function of this test module is not importable there)
_load = functools.partial(Pipeline.from_pretrained, str(model_path("shapes")))


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_batch_equals_the_single_process_batch_and_resumes(tmp_path, local_ray):
    requests = read_requests(_write(tmp_path / "p.jsonl", PROMPTS), steps=3)
    alone = run_batch(_load(), requests, tmp_path / "alone", batch_size=2, progress=False)
    spread = run_batch_ray(_load, requests, tmp_path / "ray", batch_size=2, progress=False, actors=2)
    assert (spread["total"], spread["generated"], spread["skipped"]) == (6, 6, 0)
    names = sorted(p.name for p in (tmp_path / "alone").glob("*.png"))
    assert names == sorted(p.name for p in (tmp_path / "ray").glob("*.png")) and len(names) == 6
    for name in names:  # same chunks and seeds; the actors' thread count may round differently
        assert np.abs(_pixels(tmp_path / "alone" / name) - _pixels(tmp_path / "ray" / name)).mean() <= 0.5, name
    manifest = [json.loads(line) for line in (tmp_path / "ray" / "manifest.jsonl").read_text().splitlines()]
    assert manifest == [json.loads(line) for line in (tmp_path / "alone" / "manifest.jsonl").read_text().splitlines()]

    # interrupted: two images and a half-written temp file are all a killed run left
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in names[:2]:
        (resumed / name).write_bytes((tmp_path / "alone" / name).read_bytes())
    (resumed / f".{names[2]}.deadbeef.tmp").write_bytes(b"half a png")
    summary = run_batch_ray(_load, requests, resumed, batch_size=2, progress=False, actors=1)
    assert (summary["skipped"], summary["generated"]) == (2, 4)
    assert sorted(p.name for p in resumed.iterdir()) == names + ["manifest.jsonl"]
    for name in names:
        assert np.abs(_pixels(tmp_path / "alone" / name) - _pixels(resumed / name)).mean() <= 0.5, name


def test_cli_batch_ray(tmp_path, local_ray, capsys):
    prompts = _write(tmp_path / "prompts.txt", ["a red circle", "a blue square", "a green triangle"])
    main(["batch", str(prompts), "--out", str(tmp_path / "out"), "--steps", "2", "--ray", "--ray-actors", "1"])
    assert "3 images generated" in capsys.readouterr().out
    assert len(list((tmp_path / "out").glob("*.png"))) == 3
    with pytest.raises(ValueError, match="actors"):
        run_batch_ray(_load, read_requests(prompts), tmp_path / "x", actors=0)
