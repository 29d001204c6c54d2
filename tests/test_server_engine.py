"""The engine on the shipped model: batching (a merged batch gives each request's images exactly as alone),
cancellation of queued and running jobs, deadlines, the bounded queue, events, restart from the job store."""

import dataclasses
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from reverie.server import FieldError, Rejected, Request
from reverie.server.store import JobStore

from test_server_support import STEPS, Gated, alone, engine, pixels, shapes, wait_for


@pytest.fixture
def gated(tmp_path):
    """An engine whose steps wait for pipe.gate: jobs can be held queued or mid-run."""
    pipe = Gated(shapes())
    e = engine(tmp_path / "gated", pipe, max_batch=8, batch_window_s=0.0)
    yield e, pipe
    pipe.gate.set()
    e.close()


def image(e, job, i=0):
    return pixels(e.store.image_path(job.id, i).read_bytes())


def test_mixed_guidance_batch_equals_each_row_alone():
    """Pipeline with one guidance scale per prompt (<= 1 means no guidance, as alone) = each prompt alone."""
    pipe = shapes()
    prompts = ["a red circle", "a blue square on the left", "a green triangle"]
    scales, seeds = [7.5, 1.0, 3.0], [11, 12, 13]
    batch = pipe(prompts, negative_prompt=["", "", "blurry"], guidance_scale=scales, steps=STEPS, seed=seeds,
                 progress=False)
    for i in range(3):
        single = alone(prompts[i], seeds[i], scales[i], negative_prompt=["", "", "blurry"][i])
        assert np.abs(np.asarray(batch.images[i], dtype=np.float64) - single).mean() <= 1.0
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(prompts, guidance_scale=[7.5, 2.0], steps=1, progress=False)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(prompts[0], guidance_scale=[float("nan")], steps=1, progress=False)


def test_compatible_jobs_share_one_call_and_match_alone(gated):
    e, pipe = gated
    head = e.submit(Request("a red circle", steps=STEPS, seed=1))
    wait_for(lambda: pipe.steps, what="the first job to start")
    specs = [("a blue square", 2, 7.5), ("a green triangle on the left", 3, 1.0), ("a red circle", 4, 4.0),
             ("a yellow square above a blue circle", 5, 7.5)]
    jobs = [e.submit(Request(p, steps=STEPS, seed=s, guidance_scale=g, n=2 if s == 5 else 1)) for p, s, g in specs]
    other = e.submit(Request("a red circle", steps=STEPS + 1, seed=6))  # another step count: not merged
    assert [e.position(j) for j in jobs] == [0, 1, 2, 3]
    pipe.gate.set()
    for job in [head, *jobs, other]:
        assert job.done.wait(60) and job.status == "done", job.error
    assert len(pipe.calls) == 3 and len(pipe.calls[1]) == 5  # head, the four merged (five images), the other
    for job, (prompt, seed, scale) in zip(jobs, specs):
        for i in range(job.request.n):
            diff = np.abs(image(e, job, i) - alone(prompt, seed + i, scale)).mean()
            assert diff <= 1.0, (prompt, i, diff)
    assert jobs[3].seeds == [5, 6]
    assert e.metrics.value("batch_images") == 3


def test_cancel_a_queued_job(gated):
    e, pipe = gated
    running = e.submit(Request("a red circle", steps=STEPS, seed=1))
    wait_for(lambda: pipe.steps, what="the first job to start")
    queued = e.submit(Request("a blue square", steps=STEPS + 1, seed=2))
    assert e.cancel(queued.id) and queued.status == "cancelled"
    assert not e.cancel(queued.id)  # already final
    pipe.gate.set()
    assert running.done.wait(60) and running.status == "done"
    assert len(pipe.calls) == 1  # the cancelled job never ran
    assert e.store.get(queued.id)["status"] == "cancelled"
    assert [ev for ev, _ in queued._events] == ["queued", "cancelled"]


def test_cancel_a_running_job_stops_between_steps(gated):
    e, pipe = gated
    job = e.submit(Request("a red circle", steps=20, seed=1))
    wait_for(lambda: pipe.steps, what="the job to start")
    assert e.cancel(job.id) and job.status == "cancelled"
    pipe.gate.set()
    next_job = e.submit(Request("a blue square", steps=STEPS, seed=2))
    assert next_job.done.wait(60) and next_job.status == "done"
    assert pipe.steps == 1 + STEPS  # the cancelled job stopped after the step it was in
    assert not e.store.image_path(job.id, 0).exists()


def test_cancel_inside_a_merged_batch_drops_only_that_request(gated):
    e, pipe = gated
    head = e.submit(Request("a red circle", steps=STEPS, seed=1))
    wait_for(lambda: pipe.steps, what="the first job to start")
    keep = e.submit(Request("a blue square", steps=STEPS, seed=2))
    drop = e.submit(Request("a green triangle", steps=STEPS, seed=3))
    pipe.allow(STEPS)  # the first job finishes; the merged batch stops at its first step
    wait_for(lambda: pipe.steps == STEPS + 1, what="the merged batch to start")
    assert head.status == "done" and pipe.calls[1] == ["a blue square", "a green triangle"]
    assert e.cancel(drop.id)
    pipe.gate.set()
    assert keep.done.wait(60) and keep.status == "done" and drop.status == "cancelled"
    assert np.abs(image(e, keep) - alone("a blue square", 2)).mean() <= 1.0
    assert pipe.steps == 2 * STEPS and not e.store.image_path(drop.id, 0).exists()


def test_deadlines_expire_queued_and_running_jobs(gated):
    e, pipe = gated
    running = e.submit(Request("a red circle", steps=STEPS, seed=1, timeout_s=0.5))
    wait_for(lambda: pipe.steps, what="the job to start")
    queued = e.submit(Request("a blue square", steps=STEPS + 1, seed=2, timeout_s=0.3))
    assert queued.done.wait(10) and queued.status == "failed" and "deadline" in queued.error
    assert queued.failure == "deadline" and len(pipe.calls) == 1  # expired in the queue, never ran
    wait_for(lambda: time.monotonic() > running.deadline, what="the running job's deadline")
    pipe.gate.set()  # the running job is past its deadline at its next step
    assert running.done.wait(30) and running.status == "failed" and running.failure == "deadline"
    assert pipe.steps == 1


def test_full_queue_is_rejected_with_retry_after(tmp_path):
    pipe = Gated(shapes())
    e = engine(tmp_path, pipe, max_queue=2, max_batch=1)
    try:
        e.submit(Request("a", steps=STEPS, seed=1))
        wait_for(lambda: pipe.steps, what="the first job to start")  # > 1: after the warm-up's step
        e.submit(Request("b", steps=STEPS, seed=2))
        e.submit(Request("c", steps=STEPS, seed=3))
        with pytest.raises(Rejected) as info:
            e.submit(Request("d", steps=STEPS, seed=4))
        assert info.value.status == 429 and info.value.retry_after >= 1
        assert e.metrics.value("rejections_total", reason="queue_full") == 1
    finally:
        pipe.gate.set()
        e.close()


def test_events_progress_and_previews(tmp_path):
    e = engine(tmp_path, preview_interval_s=0.0)
    try:
        job = e.submit(Request("a red circle", steps=STEPS, seed=7, preview=True))
        assert job.done.wait(60) and job.status == "done"
        events = [ev for ev, _ in job._events]
        assert events == ["queued", "started", "progress", "done"]  # the history keeps the last progress
        progress = job._events[2][1]
        assert progress["step"] == STEPS and progress["steps"] == STEPS and progress["sigma"] > 0
        for key in ("preview_x", "preview_x0"):
            head, _, data = progress[key].partition(",")
            assert head == "data:image/png;base64"
            import base64

            assert Image.open(io.BytesIO(base64.b64decode(data))).size == (64, 64)
        done = job._events[3][1]
        assert done["images"] == [f"/v1/jobs/{job.id}/images/0.png"] and done["seeds"] == [7]
        info = Image.open(e.store.image_path(job.id, 0))
        assert "Seed: 7" in info.text["parameters"]  # the result carries its parameters (reverie.metadata)
    finally:
        e.close()


def test_requests_are_checked_against_the_model(tmp_path):
    e = engine(tmp_path)
    try:
        for request, field in [(Request("x", width=66), "width"), (Request("x", sampler="nope"), "sampler"),
                               (Request("x", scheduler="nope"), "scheduler"), (Request("x", model="sd"), "model"),
                               (Request("x", steps=5000), "steps"), (Request("x", image=b"not a png"), "image"),
                               (Request("x", control_image=_png(), control_type="canny"), "control_type")]:
            with pytest.raises(FieldError) as info:
                e.submit(request)
            assert info.value.field == field
        prepared = e.prepare(Request("x", image=_png((40, 24))))
        assert (prepared.width, prepared.height) == (40, 24) and 0 <= prepared.seed < 2**32
        assert e.prepare(prepared) == prepared
    finally:
        e.close()


def test_restart_resumes_queued_jobs_and_serves_finished_ones(tmp_path):
    pipe = Gated(shapes())
    first = engine(tmp_path, pipe, max_batch=1)
    done = first.submit(Request("a red circle", steps=STEPS, seed=1))
    wait_for(lambda: pipe.steps, what="the first job to start")
    queued = [first.submit(Request(f"a blue square {i}", steps=STEPS, seed=10 + i)) for i in range(2)]
    waiting = first.submit(Request("a green triangle", steps=STEPS, seed=3), kind="sync")
    closing = threading.Thread(target=first.close)
    closing.start()  # stops accepting; the running job finishes
    wait_for(lambda: not first.ready, what="the engine to stop accepting")
    with pytest.raises(Rejected):
        first.submit(Request("late", steps=STEPS))
    pipe.gate.set()
    closing.join(60)
    assert done.status == "done" and all(j.status == "queued" for j in queued)
    assert waiting.status == "cancelled"  # its client cannot get an answer after a restart
    rows = JobStore(tmp_path).unfinished()
    assert [r["id"] for r in rows] == [j.id for j in queued]

    second = engine(tmp_path)
    try:
        resumed = [second.get(j.id) for j in queued]
        for job in resumed:
            assert job.done.wait(60) and job.status == "done"
        for i, job in enumerate(resumed):
            assert np.abs(image(second, job) - alone(f"a blue square {i}", 10 + i)).mean() <= 1.0
        old = second.get(done.id)
        assert old.status == "done" and second.image_path(done.id, 0) is not None
        assert second.get(waiting.id).status == "cancelled"
        assert second.get("0" * 32) is None and second.get("../../etc/passwd") is None
    finally:
        second.close()


def test_a_failing_batch_retries_each_job_alone(tmp_path):
    class Flaky(Gated):
        def __call__(self, prompt, *args, **kwargs):
            if isinstance(prompt, list) and "boom" in prompt:
                raise RuntimeError("simulated device error")
            return super().__call__(prompt, *args, **kwargs)

    pipe = Flaky(shapes())
    e = engine(tmp_path, pipe, batch_window_s=0.0)
    try:
        head = e.submit(Request("a red circle", steps=STEPS, seed=1))
        wait_for(lambda: pipe.steps, what="the first job to start")
        bad = e.submit(Request("boom", steps=STEPS, seed=2))
        good = e.submit(Request("a blue square", steps=STEPS, seed=3))
        pipe.gate.set()
        for job in (head, bad, good):
            assert job.done.wait(60)
        assert good.status == "done" and bad.status == "failed" and bad.failure == "internal"
        assert "simulated device error" in bad.error
        assert e.metrics.value("errors_total", kind="RuntimeError") == 2  # the batch, then the job alone
    finally:
        e.close()


def _png(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((torch.rand(size[1], size[0], 3).numpy() * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def test_compatible_edits_share_one_call_and_match_alone(tmp_path):
    """img2img, inpainting and ControlNet jobs batch like text-to-image ones when their call-wide settings
    (strength, source size, mask or not, ControlNet and its scale) agree; each image equals its request alone."""
    from reverie.loading import load_controlnet

    controlnet = load_controlnet("shapes-segmentation")
    pipe = Gated(shapes())
    e = engine(tmp_path, pipe, max_batch=8, batch_window_s=0.0, controlnets={"segmentation": controlnet})
    try:
        torch.manual_seed(0)
        src = [_png() for _ in range(3)]
        mask = _png()
        head = e.submit(Request("a red circle", steps=STEPS, seed=1))
        wait_for(lambda: pipe.steps, what="the first job to start")
        edits = [  # (request, what it is merged with: jobs with the same letter share a call)
            (Request("a blue square", image=src[0], strength=0.6, seed=2), "a"),
            (Request("a green circle", image=src[1], strength=0.6, seed=3, n=2, guidance_scale=4.0), "a"),
            (Request("a red square", image=src[2], strength=0.8, seed=5), "b"),  # another strength
            (Request("a red square", image=_png((72, 64)), strength=0.6, seed=6), "c"),  # another source size
            (Request("a yellow circle", image=src[0], mask=mask, seed=7), "d"),  # inpainting
            (Request("a blue circle", image=src[1], mask=mask, seed=8), "d"),
            (Request("a red triangle", control_image=src[0], control_type="segmentation", seed=9), "e"),
            (Request("a green square", control_image=src[2], control_type="segmentation", seed=10), "e"),
        ]
        jobs = [e.submit(dataclasses.replace(r, steps=STEPS)) for r, _ in edits]
        pipe.gate.set()
        for job in [head, *jobs]:
            assert job.done.wait(120) and job.status == "done", job.error
        expected = {}  # images per call, in queue order: one call per letter
        for r, letter in edits:
            expected[letter] = expected.get(letter, 0) + r.n
        assert [len(c) for c in pipe.calls[1:]] == list(expected.values()) == [3, 1, 1, 2, 2]
        for job in jobs:
            r = job.request
            kwargs = dict(image=None if r.image is None else Image.open(io.BytesIO(r.image)).convert("RGB"),
                          mask_image=None if r.mask is None else Image.open(io.BytesIO(r.mask)).convert("L"))
            if r.image is not None:
                kwargs["strength"] = r.strength
            if r.control_image is not None:
                kwargs.update(controlnet=controlnet, control_image=Image.open(io.BytesIO(r.control_image)))
            ref = shapes()(r.prompt, steps=STEPS, guidance_scale=r.guidance_scale, seed=job.seeds, num_images=r.n,
                           width=r.width, height=r.height, progress=False, **kwargs)
            for i in range(r.n):
                diff = np.abs(image(e, job, i) - np.asarray(ref.images[i], dtype=np.float64)).mean()
                assert diff <= 1.0, (r.prompt, i, diff)
    finally:
        pipe.gate.set()
        e.close()


def test_the_batch_window_opens_after_the_results_are_delivered(tmp_path):
    """The batcher waits for the last batch's clients from when they have their answers (the images written
    and the jobs marked done), not from when the forward pass ended: slow deliveries must not eat the window."""
    e = engine(tmp_path, batch_window_s=0.1)
    written = []
    write = e.store.write_image

    def slow_write(*args):
        time.sleep(0.3)
        path = write(*args)
        written.append(time.monotonic())
        return path

    e.store.write_image = slow_write
    try:
        job = e.submit(Request("a red circle", steps=STEPS, seed=1, n=2))
        assert job.done.wait(60) and job.status == "done", job.error
        wait_for(lambda: e._last_batch[1] >= written[-1], what="the window to open after the last write")
        assert e._last_batch[0] == 2
    finally:
        e.close()
