"""Serving throughput and latency with dynamic batching on and off: `reverie serve` on the shipped model, CPU.

Two servers run side by side as subprocesses (`reverie serve --max-batch 1`: one request per forward pass, in
arrival order; and `--max-batch 16`: batching on). From this process, N client threads each send `--requests`
requests to POST /v1/images/generations one after another (closed loop: a client sends its next request when
its previous answer arrives), each a different seed, one image, 20 steps. The measurements alternate off / on,
so load from other processes on a shared machine hits both alike; each row is the median of --repeats.
Printed per mode and client count: images/s, latency p50 / p95 (request sent -> answer read, queue wait
included), the forward passes used (from /metrics), and the throughput ratio on / off. First, the bare
pipeline's images/s at batch 1 and 8 in this process: how much a bigger batch saves on this machine.

    python bench/serve.py [--clients 1,4,8,16] [--requests 3] [--repeats 2] [--steps 20] [--threads 1]

With --workers 1,2,3 it measures the shared queue instead (reverie.server.shared): a throwaway local PostgreSQL,
one `reverie serve --store URL --no-engine` front end, and `reverie worker` processes added one by one (each with
--threads torch threads, default 1); for each worker count, the clients' images/s through the front end and the
ratio to one worker: how throughput scales with workers on this machine.

    python bench/serve.py --workers 1,2,3 [--clients 8] [--requests 3] [--steps 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from reverie.cli import model_path
from reverie.pipeline import Pipeline

PROMPTS = ["a red circle", "a blue square on the left", "a green triangle above a yellow circle",
           "a small yellow square", "a large blue circle to the right of a red triangle"]


def start_server(out: str, max_batch: int, threads: int | None, *extra: str,
                 command: str = "serve") -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    process = subprocess.Popen([sys.executable, "-m", "reverie.cli", command, "--port", str(port), "--out", out,
                                "--max-batch", str(max_batch), "--max-queue", "256", "--log-level", "warning", *extra],
                               env=env, stdout=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(url: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/health/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


def forward_passes(url: str) -> int:
    """Pipeline calls so far, from the server's Prometheus metrics."""
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("reverie_batch_images_count"):
            return int(float(line.split()[-1]))
    return 0


def run(url: str, clients: int, requests: int, steps: int) -> tuple[float, list[float]]:
    """All clients' requests; returns (wall seconds, latencies)."""
    def client(c: int) -> list[float]:
        latencies = []
        with httpx.Client(base_url=url, timeout=600) as http:
            for r in range(requests):
                i = c * requests + r
                body = {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": steps}
                start = time.perf_counter()
                response = http.post("/v1/images/generations", json=body)
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        return latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    return time.perf_counter() - start, [t for r in results for t in r]


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def bare_pipeline(steps: int, threads: int | None) -> dict[int, float]:
    """images/s of the pipeline itself at batch 1 and 8 (best of 2): what a bigger batch saves here."""
    if threads:
        torch.set_num_threads(threads)
    pipe = Pipeline.from_pretrained(model_path(None))
    pipe(PROMPTS[0], steps=1, progress=False)
    out = {}
    for batch in (1, 8):
        best = 0.0
        for _ in range(2):
            start = time.perf_counter()
            pipe(PROMPTS[:1] * batch, steps=steps, seed=list(range(batch)), progress=False)
            best = max(best, batch / (time.perf_counter() - start))
        out[batch] = best
    return out


def scale_workers(args, counts: list[int], clients: int) -> None:
    """images/s through one front end on a shared PostgreSQL queue, against the number of workers."""
    from reverie.server.localpg import local_postgres

    threads = args.threads or 1
    print(f"shared-queue benchmark: shapes 64x64, {args.steps} steps, {clients} clients x {args.requests} requests, "
          f"median of {args.repeats}, {threads} torch thread(s) per worker, max batch {args.max_batch}, CPU "
          f"({os.cpu_count()} cores), one --no-engine front end, local PostgreSQL", flush=True)
    rows, processes = {}, []
    with tempfile.TemporaryDirectory() as out, local_postgres() as url:
        try:
            front, front_url = start_server(os.path.join(out, "front"), args.max_batch, 1, "--store", url,
                                            "--no-engine")
            processes.append(front)
            wait_ready(front_url)
            for n in counts:
                while len(processes) - 1 < n:
                    k = len(processes)
                    worker, worker_url = start_server(os.path.join(out, f"w{k}"), args.max_batch, threads, "--store",
                                                      url, "--worker-id", f"w{k}", command="worker")
                    processes.append(worker)
                    wait_ready(worker_url)
                time.sleep(1.5)  # the front end reads the workers' heartbeats once a second
                run(front_url, 1, 1, args.steps)
                samples = []
                for _ in range(args.repeats):
                    wall, latencies = run(front_url, clients, args.requests, args.steps)
                    samples.append((clients * args.requests / wall, percentile(latencies, 50)))
                rows[n] = tuple(statistics.median(col) for col in zip(*samples))
                print(f"workers {n}  {rows[n][0]:6.2f} images/s  p50 {rows[n][1]:6.2f} s", flush=True)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(60)
    print(f"\n| workers | images/s | p50 s | vs {counts[0]} |")
    print("|---|---|---|---|")
    for n in counts:
        print(f"| {n} | {rows[n][0]:.2f} | {rows[n][1]:.2f} | {rows[n][0] / rows[counts[0]][0]:.2f}x |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,8,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=3, help="requests per client per measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per mode and client count (median)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per server (OMP_NUM_THREADS)")
    parser.add_argument("--max-batch", type=int, default=16, help="images per forward pass with batching on")
    parser.add_argument("--workers", default=None, help="comma-separated worker counts: the shared-queue mode")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    if args.workers:
        scale_workers(args, [int(n) for n in args.workers.split(",")], max(counts))
        return 0
    print(f"reverie serve benchmark: shapes 64x64, {args.steps} steps, dpmpp_2m, guidance 7.5, {args.requests} "
          f"requests per client, median of {args.repeats}, torch threads {args.threads or 'default'}, CPU "
          f"({os.cpu_count()} cores), POST /v1/images/generations over 127.0.0.1", flush=True)
    bare = bare_pipeline(args.steps, args.threads)
    print(f"bare pipeline: batch 1 {bare[1]:.2f} images/s, batch 8 {bare[8]:.2f} images/s "
          f"({bare[8] / bare[1]:.2f}x)", flush=True)
    samples = {}
    with tempfile.TemporaryDirectory() as out:
        servers = {mode: start_server(os.path.join(out, mode), max_batch, args.threads)
                   for mode, max_batch in (("off", 1), ("on", args.max_batch))}
        try:
            for _, url in servers.values():
                wait_ready(url)
                run(url, 1, 1, args.steps)  # warm the HTTP path
            for clients in counts:
                for _ in range(args.repeats):
                    for mode in ("off", "on"):
                        url = servers[mode][1]
                        calls = forward_passes(url)
                        wall, latencies = run(url, clients, args.requests, args.steps)
                        images = clients * args.requests
                        row = (images / wall, percentile(latencies, 50), percentile(latencies, 95))
                        samples.setdefault((mode, clients), []).append(row)
                        print(f"batching {mode:3s}  clients {clients:2d}  {row[0]:6.2f} images/s  p50 {row[1]:6.2f} s"
                              f"  p95 {row[2]:6.2f} s  ({images} images, {forward_passes(url) - calls} pipeline "
                              f"calls, {wall:.1f} s)", flush=True)
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(60)
    rows = {key: tuple(statistics.median(col) for col in zip(*values)) for key, values in samples.items()}
    print("\n| clients | off: images/s | p50 s | p95 s | on: images/s | p50 s | p95 s | on / off |")
    print("|---|---|---|---|---|---|---|---|")
    for clients in counts:
        off, on = rows["off", clients], rows["on", clients]
        print(f"| {clients} | {off[0]:.2f} | {off[1]:.2f} | {off[2]:.2f} | {on[0]:.2f} | {on[1]:.2f} | {on[2]:.2f} "
              f"| {on[0] / off[0]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
