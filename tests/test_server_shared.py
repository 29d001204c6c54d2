"""Front ends and workers on one PostgreSQL queue, as separate processes (reverie.server.shared): a real
PostgreSQL from Debian's package on loopback (reverie.server.localpg), `reverie serve --store URL --no-engine`
front ends and `reverie worker` processes on the shipped model.

Proven here: 60 jobs submitted round-robin to two front ends all finish on three workers, each image equal to its
request run alone and readable from either front end; a cancellation through one front end stops the job on the
worker running it; a flood of clients gets 429 with Retry-After and never a 5xx; `kill -9` of a worker in the
middle of a batch loses and duplicates nothing (its jobs finish on the others once their leases expire); `kill -9`
of a front end loses nothing it accepted.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from reverie.server.localpg import local_postgres
from reverie.server.pgstore import PgStore

from test_server_support import alone, free_port, pixels, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
PROMPTS = ["a red circle", "a blue square on the left", "a green triangle above a yellow circle", "a small square"]
STEPS = 2
LEASE_S = 2.0


class Cluster:
    """The processes of one shared queue: front ends (name -> url) and workers (name -> url of its probes)."""

    def __init__(self, url: str, root):
        self.url, self.root, self.procs, self.urls = url, root, {}, {}
        self.store = PgStore(url)

    def start(self, name: str, *args: str) -> None:
        port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # five processes share two cores
        log = open(self.root / f"{name}.log", "wb")
        command = [sys.executable, "-m", "reverie.cli", *args, "--store", self.url, "--port", str(port),
                   "--out", str(self.root / name), "--worker-id", name, "--lease", str(LEASE_S), "--poll", "0.05",
                   "--log-level", "warning"]
        self.procs[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.urls[name] = f"http://127.0.0.1:{port}"

    def wait_ready(self, *names: str) -> None:
        for name in names:
            def ready():
                assert self.procs[name].poll() is None, (self.root / f"{name}.log").read_text()[-3000:]
                try:
                    return httpx.get(self.urls[name] + "/health/ready", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False
            wait_for(ready, timeout=180, what=f"{name} to be ready")

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(30)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.store.close()

    def metric(self, name: str, metric: str) -> float:
        """A metric's value (summed over its labelled series) from one process's /metrics."""
        total = 0.0
        for line in httpx.get(self.urls[name] + "/metrics", timeout=10).text.splitlines():
            if line.startswith(metric + "{") or line.startswith(metric + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    with local_postgres() as url:
        c = Cluster(url, root)
        try:
            for name in ("w1", "w2", "w3"):
                c.start(name, "worker", "--max-batch", "4")
            c.start("a", "serve", "--no-engine")
            c.start("b", "serve", "--no-engine")
            c.start("small", "serve", "--no-engine", "--max-queue", "3")
            c.wait_ready("w1", "w2", "w3", "a", "b", "small")
            yield c
        finally:
            c.stop()


def _submit(url: str, body: dict) -> str:
    r = httpx.post(url + "/v1/jobs", json=body, timeout=30)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _wait_done(url: str, job_ids, timeout: float = 180) -> dict:
    """Poll until every job is final; returns id -> job view."""
    views, end = {}, time.monotonic() + timeout
    with httpx.Client(base_url=url, timeout=30) as client:
        while len(views) < len(job_ids):
            assert time.monotonic() < end, f"{len(job_ids) - len(views)} jobs not final"
            for job_id in job_ids:
                if job_id not in views:
                    view = client.get(f"/v1/jobs/{job_id}").json()
                    if view["status"] in ("done", "failed", "cancelled"):
                        views[job_id] = view
            time.sleep(0.1)
    return views


def test_two_front_ends_three_workers_60_jobs(cluster):
    a, b = cluster.urls["a"], cluster.urls["b"]
    bodies = [{"prompt": PROMPTS[i % 4], "seed": 1000 + i, "steps": STEPS, "guidance_scale": [7.5, 4.0][i % 2]}
              for i in range(60)]
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: _submit([a, b][i % 2], bodies[i]), range(60)))
    views = _wait_done(b, ids[0::2]) | _wait_done(a, ids[1::2])  # each job read through the other front end
    assert {v["status"] for v in views.values()} == {"done"}
    for i, job_id in enumerate(ids):
        for url in (a, b):  # any front end serves any job's image
            png = httpx.get(f"{url}/v1/jobs/{job_id}/images/0.png", timeout=30)
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            expected = alone(bodies[i]["prompt"], 1000 + i, bodies[i]["guidance_scale"], steps=STEPS)
            assert np.abs(pixels(png.content) - expected).mean() <= 1.0, (i, url)
    rows = cluster.store.rows(ids)
    assert sum(1 for r in rows if r["attempt"] == 1) == 60  # none ran twice
    assert len({r["worker"] for r in rows}) >= 2  # the work spread over the workers
    batched = sum(cluster.metric(w, "reverie_batch_jobs_count") for w in ("w1", "w2", "w3"))
    assert batched < 60  # jobs shared forward passes


def test_cancel_through_one_front_end_stops_the_job_on_its_worker(cluster):
    a, b = cluster.urls["a"], cluster.urls["b"]
    job_id = _submit(a, {"prompt": "a red circle", "seed": 7, "steps": 150, "width": 128, "height": 128})
    view = wait_for(lambda: (v := httpx.get(f"{b}/v1/jobs/{job_id}").json())["progress"] and v,
                    timeout=60, what="the job to make progress")
    assert view["status"] == "running"
    worker = cluster.store.get(job_id)["worker"]
    r = httpx.delete(f"{b}/v1/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert httpx.get(f"{a}/v1/jobs/{job_id}").json()["status"] in ("running", "cancelled")  # a learns of it soon
    wait_for(lambda: httpx.get(f"{a}/v1/jobs/{job_id}").json()["status"] == "cancelled", what="a to see it")
    time.sleep(1.0)  # the worker stops at its next step
    steps = cluster.metric(worker, "reverie_step_seconds_count")
    time.sleep(1.5)
    assert cluster.metric(worker, "reverie_step_seconds_count") == steps  # no step since (150 were asked)
    assert cluster.store.get(job_id)["status"] == "cancelled"
    assert httpx.delete(f"{a}/v1/jobs/{job_id}").status_code == 409


def test_flood_gets_429_with_retry_after_never_5xx(cluster):
    small = cluster.urls["small"]  # --max-queue 3: the shared queue is full early

    def post(i):
        body = {"prompt": PROMPTS[i % 4], "seed": i, "steps": 12}
        with httpx.Client(base_url=small, timeout=180) as client:
            return client.post("/v1/images/generations", json=body)

    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(post, range(24)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert 429 in codes and 200 in codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["detail"]
        else:
            assert base64.b64decode(r.json()["data"][0]["b64_json"])[:8] == b"\x89PNG\r\n\x1a\n"


def test_kill_9_of_a_worker_mid_batch_loses_and_duplicates_nothing(cluster):
    a = cluster.urls["a"]
    bodies = [{"prompt": PROMPTS[i % 4], "seed": 5000 + i, "steps": 30, "n": 1 + i % 2} for i in range(12)]
    ids = [_submit(a, body) for body in bodies]
    victim = wait_for(lambda: [r for r in cluster.store.rows(ids) if r["status"] == "running" and r["worker"] == "w3"
                               and r["progress_seq"] >= 1], timeout=120, what="w3 to be mid-batch")
    cluster.kill("w3")
    views = _wait_done(a, ids)
    assert {v["status"] for v in views.values()} == {"done"}
    rows = {r["id"]: r for r in cluster.store.rows(ids)}
    for row in victim:  # w3's jobs: claimed again and finished by another worker
        assert rows[row["id"]]["attempt"] >= 2 and rows[row["id"]]["worker"] != "w3"
    for i, job_id in enumerate(ids):
        files = cluster.store._execute("SELECT name FROM job_files WHERE job_id = %s ORDER BY name",
                                       (job_id,)).fetchall()
        assert [f for (f,) in files] == [f"images/{k}.png" for k in range(bodies[i]["n"])]  # each once
        for k in range(bodies[i]["n"]):
            png = httpx.get(f"{a}/v1/jobs/{job_id}/images/{k}.png", timeout=30).content
            expected = alone(bodies[i]["prompt"], 5000 + i + k, steps=30)
            assert np.abs(pixels(png) - expected).mean() <= 1.0, (i, k)
    expiries = sum(cluster.metric(p, "reverie_lease_expiries_total") for p in ("w1", "w2", "a", "b", "small"))
    assert expiries >= len(victim)
    assert sum(cluster.metric(w, "reverie_reruns_total") for w in ("w1", "w2")) >= len(victim)


def test_kill_9_of_a_front_end_loses_nothing_it_accepted(cluster):
    b = cluster.urls["b"]
    ids = [_submit(b, {"prompt": PROMPTS[i % 4], "seed": 9000 + i, "steps": STEPS}) for i in range(10)]
    cluster.kill("b")
    views = _wait_done(cluster.urls["a"], ids)
    assert {v["status"] for v in views.values()} == {"done"}
    assert all(v["images"] == [f"/v1/jobs/{v['id']}/images/0.png"] for v in views.values())


def test_health_metrics_and_a_model_no_worker_holds(cluster):
    a = cluster.urls["a"]
    ready = httpx.get(a + "/health/ready").json()
    assert ready["status"] == "ready" and ready["models"] == ["shapes"]
    r = httpx.post(a + "/v1/jobs", json={"prompt": "x", "model": "emoji"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "model"]
    text = httpx.get(cluster.urls["w1"] + "/metrics").text
    assert 'role="worker"' in text and 'worker="w1"' in text and "reverie_claim_seconds" in text
    assert httpx.get(cluster.urls["w1"] + "/v1/jobs/" + "0" * 32).status_code == 404  # a worker has no API


def test_compose_file_runs_two_front_ends_and_two_workers_with_valid_commands():
    """compose.yaml (not started here: no container runtime) names PostgreSQL, 2 front ends and 2 workers, and
    every command it runs is one the reverie CLI accepts, on the compose network's store."""
    from pathlib import Path

    import yaml

    from reverie.cli import build_parser
    from reverie.train.cli import parse_args

    compose = yaml.safe_load((Path(__file__).parents[1] / "compose.yaml").read_text())
    services = compose["services"]
    roles = {}
    for name, service in services.items():
        if "command" not in service:
            continue
        args = parse_args(build_parser(), service["command"])
        roles[name] = "frontend" if service["command"][0] == "serve" and args.no_engine else service["command"][0]
        assert args.store == "postgresql://reverie:reverie@db:5432/reverie" and args.host == "0.0.0.0"
        assert service["environment"]["REVERIE_API_KEY"].startswith("${REVERIE_API_KEY")  # 0.0.0.0 needs the key
    assert sorted(roles.values()) == ["frontend", "frontend", "worker", "worker"]
    assert services["db"]["image"].startswith("postgres:")
