"""Shared pieces of the server tests (no tests here): the shipped model loaded once per process, a pipeline
whose steps wait on a gate (so a test can hold a job mid-run), and uvicorn on a free port in a thread."""

from __future__ import annotations

import contextlib
import functools
import io
import socket
import threading
import time

import numpy as np
from PIL import Image

from reverie.cli import model_path
from reverie.pipeline import Pipeline
from reverie.server import Engine

STEPS = 4  # few steps keep every test fast; the shipped model still draws its shapes


@functools.lru_cache(maxsize=1)
def shapes() -> Pipeline:
    return Pipeline.from_pretrained(model_path("shapes"))


class Gated(Pipeline):
    """The shipped pipeline, but in calls with a callback (the engine's; not its warm-up) every sampler step
    first waits for `gate` (or a step allowed by `allow(n)`) and is counted in `steps`, and the prompts are
    recorded in `calls`."""

    def __init__(self, base: Pipeline):
        self.__dict__.update(base.__dict__)
        self.gate, self.steps, self.calls = threading.Event(), 0, []
        self.permits = threading.Semaphore(0)

    def allow(self, steps: int) -> None:
        """Let `steps` more steps through while the gate stays closed."""
        self.permits.release(steps)

    def __call__(self, prompt, *args, callback=None, **kwargs):
        if callback is None:
            return super().__call__(prompt, *args, **kwargs)
        self.calls.append(prompt)

        def gated(step):
            self.steps += 1
            end = time.monotonic() + 30
            while not self.gate.is_set() and not self.permits.acquire(timeout=0.01) and time.monotonic() < end:
                pass
            callback(step)

        return super().__call__(prompt, *args, callback=gated, **kwargs)


def engine(tmp_path, pipe=None, **options) -> Engine:
    """A started, ready engine on the shipped model (or `pipe`), its store in tmp_path."""
    e = Engine({"shapes": pipe or shapes()}, tmp_path, **options).start()
    assert e.wait_ready(120), e.load_error
    return e


@contextlib.contextmanager
def running(models: dict, store, **options):
    """A started, ready engine on `models` (name -> Pipeline; the first is the default), closed afterwards."""
    e = Engine(dict(models), store, **options).start()
    assert e.wait_ready(120), e.load_error
    try:
        yield e
    finally:
        e.close()


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := predicate():
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def alone(prompt: str, seed: int, guidance_scale: float = 7.5, negative_prompt: str = "", steps: int = STEPS,
          sampler: str = "dpmpp_2m") -> np.ndarray:
    """The image a request gives when it runs on its own, straight from the pipeline."""
    result = shapes()(prompt, negative_prompt=negative_prompt, steps=steps, guidance_scale=guidance_scale,
                      sampler=sampler, seed=[seed], progress=False)
    return np.asarray(result.images[0].convert("RGB"), dtype=np.float64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app):
    """uvicorn serving `app` on 127.0.0.1 in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="uvicorn to start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
