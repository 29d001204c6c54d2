"""Batch generation: reading prompt files, seeds and names, compatible requests sharing a forward pass, and
resuming after a crash without partial files."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from reverie import Pipeline, metadata
from reverie.batch import chunks, plan, read_requests, run_batch
from reverie.cli import main, model_path


@pytest.fixture(scope="module")
def shapes():
    return Pipeline.from_pretrained(model_path("shapes"))


class Recording:
    """A pipeline stand-in that records each call's prompts and seeds, and can crash on the n-th call."""

    def __init__(self, pipe, crash_on: int | None = None):
        self.pipe, self.crash_on, self.calls = pipe, crash_on, []

    def __getattr__(self, name):  # family, settings, ...: the pipeline's
        return getattr(self.pipe, name)

    def __call__(self, prompts, **kwargs):
        self.calls.append((list(prompts), list(kwargs["seed"])))
        if len(self.calls) == self.crash_on:
            raise RuntimeError("simulated crash")
        return self.pipe(prompts, **kwargs)


def write(path, lines):
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    return path


def test_read_requests(tmp_path):
    txt = write(tmp_path / "p.txt", ["a red circle", "", "# a comment", "  a blue square  "])
    requests = read_requests(txt, steps=5)
    assert [r["prompt"] for r in requests] == ["a red circle", "a blue square"]
    assert all(r["steps"] == 5 and r["n"] == 1 and r["seed"] is None for r in requests)
    jsonl = write(tmp_path / "p.jsonl", [{"prompt": "a", "n": 2, "seed": 10, "guidance_scale": 3}, {"prompt": "b"}])
    a, b = read_requests(jsonl, steps=7)
    assert (a["n"], a["seed"], a["guidance_scale"], a["steps"]) == (2, 10, 3, 7) and b["n"] == 1
    for line, field in [({"prompt": "a", "stpes": 3}, "'stpes'"), ({"prompt": "a", "steps": "3"}, "'steps'"),
                        ({"negative_prompt": "x"}, "'prompt'"), ({"prompt": "a", "n": 0}, "'n'"),
                        ({"prompt": "a", "seed": -1}, "'seed'"), ("[1, 2]", "JSON object")]:
        with pytest.raises(ValueError, match=field) as e:
            read_requests(write(tmp_path / "bad.jsonl", [{"prompt": "ok"}, line]))
        assert "line 2" in str(e.value)
    with pytest.raises(ValueError, match="txt or .jsonl"):
        read_requests(write(tmp_path / "p.csv", ["a"]))


def test_plan_and_chunks():
    requests = [{"prompt": "a", "n": 3, "seed": 100, "steps": 4}, {"prompt": "b", "n": 1, "seed": None, "steps": 8},
                {"prompt": "c", "n": 2, "seed": None, "steps": 4}]
    requests = [{**r, **{k: None for k in ("width", "height", "sampler", "scheduler", "clip_skip")},
                 "guidance_scale": 7.5, "guidance_rescale": 0.0} for r in requests]
    jobs = plan(requests, base_seed=50)
    assert [(j.index, j.seed) for j in jobs] == [(0, 100), (1, 101), (2, 102), (3, 53), (4, 54), (5, 55)]
    assert [j.name for j in jobs][:2] == ["00000-100.png", "00001-101.png"]
    assert plan(requests, base_seed=50) == jobs  # deterministic: a rerun names the same files
    groups = chunks(jobs, 2)
    assert [[j.index for j in g] for g in groups] == [[0, 1], [2, 4], [5], [3]]  # steps 4 together, 8 alone
    with pytest.raises(ValueError, match="batch_size"):
        chunks(jobs, 0)
    with pytest.raises(ValueError, match="seed"):
        plan(requests, base_seed=-1)


PROMPTS = [{"prompt": "a red circle", "n": 2, "seed": 5}, {"prompt": "a blue square"},
           {"prompt": "a green triangle", "negative_prompt": "blurry"}, {"prompt": "a yellow circle", "steps": 2}]


def test_batch_shares_forward_passes_and_matches_singles(shapes, tmp_path):
    requests = read_requests(write(tmp_path / "p.jsonl", PROMPTS), steps=3)
    forwards = []
    hook = shapes.unet.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape[0]))
    try:
        recording = Recording(shapes)
        summary = run_batch(recording, requests, tmp_path / "out", batch_size=3, progress=False)
    finally:
        hook.remove()
    assert summary["generated"] == summary["total"] == 5 and summary["skipped"] == 0
    assert [len(p) for p, _ in recording.calls] == [3, 1, 1]  # 3-step requests share, the 2-step one cannot
    assert forwards[:3] == [6, 6, 6]  # 3 images, cond and uncond, in one forward pass per step
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == ["00000-5.png", "00001-6.png", "00002-2.png", "00003-3.png", "00004-4.png"]
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [m["file"] for m in manifest] == names and manifest[3]["negative_prompt"] == "blurry"
    for m in manifest:  # each image is the same request made alone (batching changes float rounding only)
        alone = shapes(m["prompt"], negative_prompt=m["negative_prompt"], steps=m["steps"], seed=m["seed"],
                       progress=False).images[0]
        batched = np.asarray(Image.open(tmp_path / "out" / m["file"]), dtype=float)
        assert np.abs(batched - np.asarray(alone, dtype=float)).mean() < 0.5
    # and its metadata regenerates it exactly
    kwargs, index, _ = metadata.generation_kwargs(metadata.read_png_info(tmp_path / "out" / names[2])["request"])
    again = shapes(**kwargs, progress=False).images[index]
    assert np.array_equal(np.asarray(again), np.asarray(Image.open(tmp_path / "out" / names[2])))


def test_resume_after_a_crash(shapes, tmp_path, monkeypatch):
    requests = read_requests(write(tmp_path / "p.jsonl", PROMPTS), steps=3)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated"):
        run_batch(Recording(shapes, crash_on=2), requests, out, batch_size=2, progress=False)
    first = sorted(p.name for p in out.iterdir())
    assert first == ["00000-5.png", "00001-6.png"]  # the first chunk, whole; nothing else, no manifest

    # a crash in the middle of writing a file leaves no partial file
    real_replace = os.replace

    def dying_replace(src, dst):
        if str(dst).endswith("00003-3.png"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        run_batch(shapes, requests, out, batch_size=2, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == first + ["00002-2.png"]  # written before 3 failed; no temp
    (out / ".00004-4.png.deadbeef.tmp").write_bytes(b"half a png")  # what a killed process leaves

    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    recording = Recording(shapes)
    summary = run_batch(recording, requests, out, batch_size=2, progress=False)
    assert sorted(seed for _, seeds in recording.calls for seed in seeds) == [3, 4]  # only the missing ones
    assert (summary["skipped"], summary["generated"]) == (3, 2)
    assert all((out / name).read_bytes() == data for name, data in before.items())
    assert sorted(p.name for p in out.iterdir()) == ["00000-5.png", "00001-6.png", "00002-2.png", "00003-3.png",
                                                     "00004-4.png", "manifest.jsonl"]
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 5
    # a rerun with everything there generates nothing
    recording = Recording(shapes)
    assert run_batch(recording, requests, out, batch_size=2, progress=False)["generated"] == 0 and not recording.calls
    # a changed prompts file does not silently mix with old outputs
    changed = read_requests(write(tmp_path / "q.jsonl", [{"prompt": "something else", "n": 2, "seed": 5}]))
    with pytest.raises(ValueError, match="out"):
        run_batch(shapes, changed, out, progress=False)


def test_cli_batch(tmp_path, capsys):
    prompts = write(tmp_path / "prompts.txt", ["a red circle", "a blue square", "a green triangle"])
    assert main(["batch", str(prompts), "--out", str(tmp_path / "out"), "--steps", "2", "--batch-size", "2",
                 "--seed", "40"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["00000-40.png", "00001-41.png", "00002-42.png"]
    assert "3 images generated, 0 already there" in capsys.readouterr().out
    bad = write(tmp_path / "bad.jsonl", [{"prompt": "a", "size": 3}])
    assert main(["batch", str(bad), "--out", str(tmp_path / "o2")]) == 2
    assert "'size'" in capsys.readouterr().err and not (tmp_path / "o2").exists()
