"""A request, whatever dialect it came in, and a job: its state, its events and who listens to them."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field

from ..pipeline import MAX_SEED

FINAL = ("done", "failed", "cancelled")
BYTES_FIELDS = ("image", "mask", "control_image")


class FieldError(ValueError):
    """A request field the engine cannot run; HTTP answers 422 naming `field`."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class Rejected(Exception):
    """The engine cannot take the job now: `status` 429 (queue full) or 503 (not ready, shutting down)."""

    def __init__(self, status: int, reason: str, retry_after: int):
        super().__init__(reason)
        self.status, self.reason, self.retry_after = status, reason, retry_after


class Cancelled(Exception):
    """Raised from the sampler callback to stop a pipeline call between steps."""


@dataclass
class Request:
    """One generation request, whatever dialect it came in. Images are encoded bytes (PNG, JPEG, ...)."""

    prompt: str  # DiT: a class id or label name
    negative_prompt: str = ""
    steps: int | None = None  # None: the model's default (Engine.prepare fills it in)
    guidance_scale: float | None = None  # None: the model's default; FLUX: the distilled guidance
    sampler: str | None = None  # any name reverie.samplers.resolve accepts; None: the model's default
    scheduler: str | None = None  # schedule type: karras, exponential, ...; flow models also simple, sgm_uniform, beta
    seed: int | None = None  # image i gets seed + i; None draws one at submission
    width: int | None = None  # None: the model's native size
    height: int | None = None
    n: int = 1  # images
    model: str | None = None  # None: the engine's default model
    image: bytes | None = None  # img2img / inpainting source
    mask: bytes | None = None  # inpainting mask (white = repaint)
    strength: float = 0.75  # img2img: how much of the schedule to run
    control_image: bytes | None = None
    control_type: str | None = None  # a ControlNet the engine holds, by name
    controlnet_scale: float = 1.0
    refiner: str | None = None  # a model this server holds that finishes from the first model's latents (SDXL)
    refiner_switch_at: float | None = None  # in (0, 1): the schedule fraction the first model runs (0.8 with a refiner)
    shift: float | None = None  # flow models (SD3, FLUX): the schedule's shift instead of the model's
    num_frames: int | None = None  # video models (Wan: 1 + 4k); None: the family's default (Engine.prepare fills it)
    fps: float | None = None  # video models: frames per second of the stored clip; None: family.VIDEO_FPS
    max_sequence_length: int | None = None  # SD3, FLUX: T5 tokens (None: SD3 256, FLUX 512)
    true_cfg_scale: float | None = None  # FLUX: classifier-free guidance against the negative prompt when > 1
    skip_guidance_layers: list[int] | None = None  # SD3.5: skip-layer guidance on these transformer blocks
    skip_layer_guidance_scale: float | None = None  # SD3.5: its scale (None: 2.8, diffusers' default)
    prompt_syntax: str | None = None  # SD: "a1111" reads (word:1.3) emphasis and BREAK (the A1111 dialect's default)
    hr_scale: float | None = None  # A1111's hires fix: a second, img2img pass at this scale (None: off)
    hr_upscaler: str = "Latent"  # reverie.hires.UPSCALERS
    hr_second_pass_steps: int = 0  # 0: the first pass's steps
    hr_strength: float = 0.7  # the hires pass's denoising strength
    hr_resize_x: int = 0  # the hires pass's width instead of hr_scale (0: by hr_scale; one given keeps the aspect)
    hr_resize_y: int = 0
    subseed: int | None = None  # A1111's variation seed (image i: subseed + i); None draws one when used
    subseed_strength: float = 0.0
    tiling: bool = False  # seamless images (circular padding)
    loras: list | None = None  # [[name, text strength, unet strength], ...] from the server's --lora-dir; the
    # prompt's <lora:name:te:unet> tags are read into it (and removed from the prompt) when the request is prepared
    defaults: dict | None = None  # the dialect's steps / guidance_scale / sampler defaults for SD models, kept for
    # a worker that prepares the request (reverie.server.shared); None: family.SD_DEFAULTS
    preview: bool = False  # stream decoded previews with the progress events
    timeout_s: float | None = None  # the job's deadline (queue wait + run); the engine's default caps it

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for name in BYTES_FIELDS:
            if d[name] is not None:
                d[name] = base64.b64encode(d[name]).decode()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Request":
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        for name in BYTES_FIELDS:
            if d.get(name) is not None:
                d[name] = base64.b64decode(d[name])
        return cls(**d)


@dataclass(eq=False)
class Job:
    """A request in the engine: its state, its event history and the async listeners of its events."""

    id: str
    request: Request
    kind: str = "job"  # "job" (native API: survives restarts) or "sync" (an HTTP client is waiting)
    status: str = "queued"
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    failure: str | None = None  # why it failed: "invalid" (the request), "deadline", "internal"
    result: dict | None = None  # {images, seeds, params, elapsed_s} when done; videos: + videos, video_format, fps
    progress: dict | None = None  # the last progress event's data, previews left out
    deadline: float = math.inf  # time.monotonic() after which the job fails
    enqueued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    key: tuple | None = None  # batching key, computed by the worker
    _events: list = field(default_factory=list)
    _listeners: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _last_preview: float = -math.inf

    @property
    def seeds(self) -> list[int]:
        return [(self.request.seed + i) % (MAX_SEED + 1) for i in range(self.request.n)]

    def emit(self, event: str, data: dict) -> None:
        """Record an event (only the latest progress is kept) and hand it to every listener's loop."""
        with self._lock:
            if event == "progress" and self._events and self._events[-1][0] == "progress":
                self._events[-1] = (event, data)
            else:
                self._events.append((event, data))
            for loop, queue in list(self._listeners):
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (event, data))
                except RuntimeError:  # that loop is closed
                    self._listeners.remove((loop, queue))

    def listen(self) -> tuple[list, asyncio.Queue]:
        """From inside an event loop: (events so far, a queue that receives every later event)."""
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self._listeners.append((asyncio.get_running_loop(), queue))
            return list(self._events), queue

    def unlisten(self, queue: asyncio.Queue) -> None:
        with self._lock:
            self._listeners[:] = [(lp, q) for lp, q in self._listeners if q is not queue]

    def view(self) -> dict:
        """The job as the native API shows it."""
        return dict(id=self.id, status=self.status, created=self.created, started=self.started,
                    finished=self.finished, error=self.error, progress=self.progress,
                    seeds=self.seeds, n=self.request.n, result=self.result)


def result_urls(job: Job) -> dict:
    """Where a finished job's files are: {"images": PNG urls} (a video's PNG is its poster, the middle frame),
    and for a video job "videos": its MP4 (or GIF) urls. Empty lists until the job is done."""
    done = job.status == "done"
    out = {"images": [f"/v1/jobs/{job.id}/images/{i}.png" for i in range(job.request.n)] if done else []}
    kind = (job.result or {}).get("video_format")
    if kind is not None:
        out["videos"] = [f"/v1/jobs/{job.id}/videos/{i}.{kind}" for i in range(job.request.n)] if done else []
    return out


def final_data(job: Job) -> dict:
    """The data of a job's final event (done, failed, cancelled)."""
    if job.status == "done":
        return dict(result_urls(job), seeds=job.seeds, elapsed_s=(job.result or {}).get("elapsed_s"))
    return dict(error=job.error or job.status)
