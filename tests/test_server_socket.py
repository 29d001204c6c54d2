"""The server over a real socket: 32 concurrent clients (no 5xx, every image equal to its request run alone),
a client that disconnects cancels its job (queued or running), a full queue answers 429, and `reverie serve`
drains its running job on SIGTERM and keeps the queued one for the next start."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from reverie.server import create_app
from reverie.server.store import JobStore

from test_server_support import STEPS, Gated, alone, engine, free_port, pixels, serving, shapes, wait_for

PROMPTS = ["a red circle", "a blue square on the left", "a green triangle above a yellow circle", "a small square"]


def test_32_concurrent_clients_get_their_own_images(tmp_path):
    steps = 2  # 64 generations in this test (32 served, 32 references alone): keep each short
    e = engine(tmp_path, max_batch=8, max_queue=64)
    try:
        with serving(create_app(e)) as url:
            def request(i):
                body = {"prompt": PROMPTS[i % 4], "seed": 100 + i, "steps": steps, "guidance_scale": [7.5, 4.0][i % 2]}
                with httpx.Client(base_url=url, timeout=120) as client:
                    return client.post("/v1/images/generations", json=body)

            with ThreadPoolExecutor(32) as pool:
                responses = list(pool.map(request, range(32)))
        assert [r.status_code for r in responses] == [200] * 32
        for i, r in enumerate(responses):
            item = r.json()["data"][0]
            assert item["seed"] == 100 + i
            got = pixels(base64.b64decode(item["b64_json"]))
            diff = np.abs(got - alone(PROMPTS[i % 4], 100 + i, [7.5, 4.0][i % 2], steps=steps)).mean()
            assert diff <= 1.0, (i, diff)
        calls, images = e.metrics.value("batch_images"), e.metrics.value("images_total")
        assert images == 32 and calls < 32  # requests shared forward passes
    finally:
        e.close()


def _raw_post(url: str, path: str, body: dict) -> socket.socket:
    """Send a POST and leave the socket open without reading: a client that can hang up mid-request."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_disconnect_cancels_running_and_queued_work_and_full_queue_is_429(tmp_path):
    pipe = Gated(shapes())
    e = engine(tmp_path, pipe, max_batch=1, max_queue=2)
    try:
        with serving(create_app(e)) as url:
            running = _raw_post(url, "/v1/images/generations", {"prompt": "a red circle", "steps": 20, "seed": 1})
            job = wait_for(lambda: e.running() and e.running()[0], what="the request to run")
            queued_sock = _raw_post(url, "/sdapi/v1/txt2img", {"prompt": "a blue square", "steps": STEPS, "seed": 2})
            queued = wait_for(lambda: e.queued() and e.queued()[0], what="the second request to queue")
            with httpx.Client(base_url=url) as client:
                assert client.post("/v1/jobs", json={"prompt": "c", "steps": STEPS}).status_code == 202
                full = client.post("/v1/jobs", json={"prompt": "d", "steps": STEPS})
                assert full.status_code == 429 and int(full.headers["retry-after"]) >= 1

            queued_sock.close()
            wait_for(lambda: queued.status == "cancelled", what="the queued request to be cancelled")
            assert queued.error == "the client disconnected"
            running.close()
            wait_for(lambda: job.status == "cancelled", what="the running request to be cancelled")
            assert job.error == "the client disconnected"
            pipe.gate.set()
            wait_for(lambda: not e.running() and not e.queued(), what="the queue to drain")
        assert pipe.calls == [["a red circle"], ["c"]]  # the queued request never ran
        assert pipe.steps == 1 + STEPS  # the running one stopped after the step it was in
    finally:
        pipe.gate.set()
        e.close()


def test_serve_drains_on_sigterm_and_keeps_queued_jobs(tmp_path):
    port = free_port()
    env = dict(os.environ, REVERIE_API_KEY="k3y", OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "reverie.cli", "serve", "--port", str(port), "--out",
                                str(tmp_path), "--max-batch", "1", "--log-level", "warning"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer k3y"}, timeout=30)

        def ready():
            try:
                return client.get("/health/ready").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=120, what="the server to load its model")
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401  # no key
        first = client.post("/v1/jobs", json={"prompt": "a red circle", "steps": 40, "seed": 1}).json()["id"]
        second = client.post("/v1/jobs", json={"prompt": "a blue square", "steps": 40, "seed": 2}).json()["id"]
        wait_for(lambda: client.get(f"/v1/jobs/{first}").json()["status"] == "running", what="the first job to run")
        process.send_signal(signal.SIGTERM)
        process.wait(120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode in (0, -signal.SIGTERM), process.stderr.read().decode()[-2000:]
    store = JobStore(tmp_path)
    assert store.get(first)["status"] == "done"  # the running job finished before the exit
    assert store.image_path(first, 0).is_file()
    assert store.get(second)["status"] == "queued"  # the next start runs it
    store.close()
