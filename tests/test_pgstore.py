"""The shared job store on a real PostgreSQL (reverie.server.pgstore): claims skip each other's rows and batch by
the caller's choice, every write about a claimed job is conditional on the claim, an expired lease puts the job
back for another worker whose results alone are kept, the queue bound holds across front ends, and the schema
is created once and refused when it is newer than this reverie. Plus a SharedEngine pair in one process:
events over SSE from a job a worker runs, and deadlines."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from reverie.server.job import Request
from reverie.server.localpg import local_postgres
from reverie.server.pgstore import MIGRATIONS, PgStore, QueueFull


@pytest.fixture(scope="module")
def url():
    with local_postgres() as url:
        yield url


@pytest.fixture
def store(url):
    s = PgStore(url)
    s._execute("TRUNCATE jobs, job_files, workers")
    yield s
    s.close()


def _add(store, n=1, model="shapes", timeout_s=60.0, max_queue=100) -> str:
    job_id = uuid.uuid4().hex
    store.enqueue(job_id, "job", model, {"prompt": "x", "n": n}, timeout_s, max_queue)
    return job_id


def _take(rows):
    return [(row, row["request"]) for row in rows], []


def test_claims_are_exclusive_and_ordered(store, url):
    ids = [_add(store) for _ in range(6)] + [_add(store, model="other")]
    other = PgStore(url)
    first = store.claim("w1", ["shapes"], lambda rows: _take(rows[:2]), lease_s=30, limit=3)
    second = other.claim("w2", ["shapes"], _take, lease_s=30, limit=10)
    assert [r["id"] for r in first] == ids[:2]  # the oldest; the third candidate stays queued
    assert [r["id"] for r in second] == ids[2:6]  # never the other model's job, never w1's
    assert {r["attempt"] for r in first + second} == {1}
    assert store.get(ids[6])["status"] == "queued" and store.depth() == 1

    # two workers claiming at once never share a job
    for _ in range(20):
        _add(store)
    got = {"a": [], "b": []}

    def claim(name, s):
        while rows := s.claim(name, ["shapes"], lambda rows: _take(rows[:1]), lease_s=30, limit=2):
            got[name] += [r["id"] for r in rows]

    threads = [threading.Thread(target=claim, args=(n, s)) for n, s in (("a", store), ("b", other))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(got["a"]) + len(got["b"]) == 20 and not set(got["a"]) & set(got["b"])
    other.close()


def test_writes_are_conditional_on_the_claim_and_expired_leases_requeue(store):
    job_id = _add(store, n=2)
    (row,) = store.claim("w1", ["shapes"], _take, lease_s=0.2, limit=4)
    assert store.progress("w1", [(job_id, 1, {"step": 1})], 0.2) == {job_id}
    assert store.progress("w2", [(job_id, 1, {"step": 1})], 0.2) == set()  # not w2's
    time.sleep(0.3)
    assert store.requeue_expired() == [job_id]  # w1 stalled past its lease
    (again,) = store.claim("w2", ["shapes"], _take, lease_s=30, limit=4)
    assert again["attempt"] == 2
    # the stalled worker wakes up and delivers: nothing of it lands
    store.write_image(job_id, 0, b"stale")
    assert not store.finish("w1", job_id, 1, "done", result={"by": "w1"})
    assert store.progress("w1", [(job_id, 1, {"step": 2})], 30) == set()
    store.write_image(job_id, 0, b"png0")
    store.write_image(job_id, 1, b"png1")
    assert store.finish("w2", job_id, 2, "done", result={"by": "w2"})
    assert not store.finish("w2", job_id, 2, "done", result={"by": "w2 again"})  # final once
    row = store.get(job_id)
    assert (row["status"], row["result"], row["worker"]) == ("done", {"by": "w2"}, "w2")
    assert store.read_file(job_id, "images/0.png") == b"png0" and store.read_file(job_id, "images/1.png") == b"png1"
    files = store._execute("SELECT count(*) FROM job_files WHERE job_id = %s", (job_id,)).fetchone()[0]
    assert files == 2


def test_cancel_deadlines_and_the_queue_bound(store, url):
    running, queued = _add(store), _add(store)
    store.claim("w1", ["shapes"], lambda rows: _take(rows[:1]), lease_s=30, limit=1)
    assert store.cancel(running, "stop") and store.cancel(queued, "stop")
    assert not store.cancel(running, "again")
    assert store.progress("w1", [(running, 1, {"step": 3})], 30) == set()  # the worker learns at its next step
    late = _add(store, timeout_s=0.05)
    time.sleep(0.1)
    assert store.expire_deadlines("too late") == [late]
    assert (store.get(late)["status"], store.get(late)["failure"]) == ("failed", "deadline")

    # front ends racing for the last places never exceed max_queue
    fronts = [PgStore(url) for _ in range(4)]
    accepted, refused = [], []

    def submit(s):
        for _ in range(10):
            try:
                accepted.append(_add(s, max_queue=7))
            except QueueFull:
                refused.append(1)

    threads = [threading.Thread(target=submit, args=(s,)) for s in fronts]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(accepted) == 7 and store.depth() == 7 and len(refused) == 33
    for s in fronts:
        s.close()


def test_schema_is_created_once_and_a_newer_one_is_refused(store, url):
    assert PgStore(url).migrate() == len(MIGRATIONS)  # again: nothing to do
    assert store._execute("SELECT version FROM reverie_schema").fetchall() == [(len(MIGRATIONS),)]
    store._execute("UPDATE reverie_schema SET version = %s", (len(MIGRATIONS) + 1,))
    try:
        with pytest.raises(RuntimeError, match="newer"):
            PgStore(url)
    finally:
        store._execute("UPDATE reverie_schema SET version = %s", (len(MIGRATIONS),))


def test_shared_engine_events_and_deadlines_across_engines(url, tmp_path):
    import httpx

    from reverie.server import create_app
    from reverie.server.shared import SharedEngine

    from test_server_support import serving, shapes

    from reverie import Pipeline
    from reverie.cli import model_path

    PgStore(url)._execute("TRUNCATE jobs, job_files, workers")
    worker = SharedEngine({"shapes": shapes()}, url, role="worker", out_dir=tmp_path / "w", lease_s=5,
                          worker_id="shapes-worker").start()
    emoji = SharedEngine({"emoji": Pipeline.from_pretrained(model_path("emoji"))}, url, role="worker",
                         out_dir=tmp_path / "e", worker_id="emoji-worker").start()
    front = SharedEngine({}, url, role="frontend", out_dir=tmp_path / "f", default_model="shapes").start()
    try:
        assert worker.wait_ready(120) and emoji.wait_ready(120), (worker.load_error, emoji.load_error)
        with serving(create_app(front)) as base:
            r = httpx.post(base + "/v1/jobs", json={"prompt": "a red circle", "steps": 6, "seed": 3})
            assert r.status_code == 202
            job_id = r.json()["id"]
            events = []
            with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", timeout=60) as stream:
                for line in stream.iter_lines():
                    if line.startswith("event: "):
                        events.append(line.removeprefix("event: "))
                    elif line.startswith("data: ") and events[-1] == "done":
                        done = json.loads(line.removeprefix("data: "))
                        break
            assert events[0] == "queued" and events[-1] == "done" and "started" in events
            assert done["images"] == [f"/v1/jobs/{job_id}/images/0.png"] and done["seeds"] == [3]
            view = httpx.get(f"{base}/v1/jobs/{job_id}").json()
            assert view["result"]["params"][0]["steps"] == 6 and view["result"]["params"][0]["sampler"] == "dpmpp_2m"
            assert PgStore(url).get(job_id)["worker"] == "shapes-worker"

            # each job goes to a worker holding its model; the A1111 dialect's defaults travel with the job
            r = httpx.post(base + "/sdapi/v1/txt2img", json={"prompt": "grinning face", "steps": 3,
                                                             "override_settings": {}, "seed": 4}, timeout=120)
            assert r.status_code == 200, r.text
            r = httpx.post(base + "/v1/jobs", json={"prompt": "grinning face", "model": "emoji", "steps": 3})
            job_id = r.json()["id"]
            deadline = time.monotonic() + 60
            while httpx.get(f"{base}/v1/jobs/{job_id}").json()["status"] != "done":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert PgStore(url).get(job_id)["worker"] == "emoji-worker"
            assert sorted(httpx.get(base + "/health/ready").json()["models"]) == ["emoji", "shapes"]
            listed = httpx.get(base + "/v1/models").json()["data"]  # a front end lists what its workers hold
            assert sorted(m["id"] for m in listed) == ["emoji", "shapes"]
            assert [m["id"] for m in listed if m["default"]] == ["shapes"]
            assert sorted(m["model_name"] for m in httpx.get(base + "/sdapi/v1/sd-models").json()) == ["emoji", "shapes"]
            r = httpx.post(base + "/sdapi/v1/txt2img", json={"prompt": "grinning face", "steps": 2, "seed": 1,
                                                             "override_settings": {"sd_model_checkpoint": "emoji"}},
                           timeout=120)  # A1111's model switch, to a model only a worker holds
            assert r.status_code == 200 and r.json()["parameters"]["override_settings"] == {"sd_model_checkpoint":
                                                                                            "emoji"}
            assert json.loads(r.json()["info"])["sd_model_name"] == "emoji"

            # a deadline the job cannot meet: it fails on its worker, seen through the front end
            r = httpx.post(base + "/v1/jobs", json={"prompt": "a blue square", "steps": 150, "width": 256,
                                                    "height": 256, "timeout_s": 1.0})
            job_id = r.json()["id"]
            deadline = time.monotonic() + 60
            while (view := httpx.get(f"{base}/v1/jobs/{job_id}").json())["status"] not in ("failed", "done"):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert view["status"] == "failed" and "deadline exceeded" in view["error"]
            assert PgStore(url).get(job_id)["failure"] == "deadline"
    finally:
        front.close()
        worker.close()
        emoji.close()


def test_store_errors_name_the_store_and_hide_the_password():
    with pytest.raises(ValueError, match="postgresql:// URL"):
        PgStore("mysql://user@host/db")
    with pytest.raises(ValueError, match="cannot reach the database at 127.0.0.1:1/db") as e:
        PgStore("postgresql://user:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in str(e.value)


def test_a_video_job_on_the_shared_queue_stores_its_clip_and_poster(url, tmp_path):
    """A worker holding a video model (diffusers' tiny Wan): the clip and its PNG poster are written with the job's
    final status and served by a front end that holds no model."""
    import httpx

    from reverie import Pipeline
    from reverie.server import create_app
    from reverie.server.shared import SharedEngine
    from reverie.video_io import read_video

    from test_server_support import serving
    from tiny_families import wan_folder

    PgStore(url)._execute("TRUNCATE jobs, job_files, workers")
    worker = SharedEngine({"wan": Pipeline.from_pretrained(wan_folder(tmp_path / "wan"))}, url, role="worker",
                          out_dir=tmp_path / "w").start()
    front = SharedEngine({}, url, role="frontend", out_dir=tmp_path / "f", default_model="wan").start()
    try:
        assert worker.wait_ready(120), worker.load_error
        with serving(create_app(front)) as base:
            r = httpx.post(base + "/v1/jobs", json={"prompt": "dance monkey", "steps": 2, "width": 32, "height": 32,
                                                    "num_frames": 5, "seed": 2})
            job_id = r.json()["id"]
            deadline = time.monotonic() + 120
            while (view := httpx.get(f"{base}/v1/jobs/{job_id}").json())["status"] != "done":
                assert view["status"] in ("queued", "running") and time.monotonic() < deadline, view
                time.sleep(0.05)
            (video,) = view["videos"]
            clip = httpx.get(base + video)
            assert clip.status_code == 200 and len(clip.content) > 0
            path = tmp_path / ("clip." + video.rsplit(".", 1)[1])
            path.write_bytes(clip.content)
            assert len(read_video(path)) == 5
            poster = httpx.get(f"{base}/v1/jobs/{job_id}/images/0.png")
            assert poster.status_code == 200 and poster.content[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        front.close()
        worker.close()
