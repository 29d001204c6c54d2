"""The engine behind the server: loaded models, a bounded FIFO queue, and a batcher thread.

One Engine object owns everything (no module globals). HTTP handlers call `submit`, `get`, `cancel` and
listen to a job's events; a single worker thread takes the oldest queued job plus every queued job that can
share its forward passes (same model, size, sampler, schedule, steps and shift, the conditioning shape the
model's family decides — reverie.server.family — and for img2img, inpainting and ControlNet the same strength,
source size and ControlNet: guidance scales may differ, CFGDenoiser takes one per row; source, mask and
control images are per row) and runs them as one Pipeline call, one seed per image, so a batched image equals
the same request run alone up to float rounding. Models of every family (SD 1/2, DiT, SD3, FLUX, Wan video)
are served; a request's missing steps, guidance scale and sampler (and a video's num_frames and fps) are the
model family's defaults. A video job's result is an MP4 per video (GIF without PyAV) with its middle frame as a
PNG poster; its previews decode the middle latent frame. A request with a refiner
(SD / SDXL, A1111's SDXL refiner) runs its model to the switch point and the refiner from its latents on.

Between denoising steps the sampler callback drops rows whose job was cancelled or ran past its deadline (the
job is final at once; its row runs on, unseen, until the batch ends) and stops the call when no row is left.
Jobs are written to the JobStore before they are acknowledged: a restart runs the queued ones again.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import hashlib
import io
import logging
import math
import random
import threading
import time
import uuid
from collections import OrderedDict, deque
from pathlib import Path

import torch
from PIL import Image

from .. import control
from ..hires import hires_fix
from ..loading import load_controlnet
from ..metadata import image_params, png_bytes
from ..pipeline import MAX_SEED, Pipeline, to_pil
from ..video_io import has_pyav
from . import family as families
from .job import BYTES_FIELDS, FINAL, Cancelled, FieldError, Job, Rejected, Request, final_data
from .loras import LoraLibrary
from .metrics import BATCH_BUCKETS, Metrics
from .store import JOB_ID, JobStore

log = logging.getLogger("reverie.server")

MAX_IMAGE_PIXELS = 4096 * 4096  # uploaded images (img2img, masks, control images)
REFINER_SWITCH_AT = 0.8  # A1111's default: the refiner runs the last 20% of the schedule


class Engine:
    """Models (loaded once, kept warm), a bounded queue and the batcher thread that runs it.

    models: name -> Pipeline, or a callable returning one (loaded by `start()` in the worker thread; ready
    once all are loaded and a one-step warm-up has run). The first is the default. controlnets: name ->
    ControlNet (or a folder), chosen by a request's control_type. max_queue bounds queued
    jobs (more is 429); max_batch bounds images per forward pass (1 turns batching off); batch_window_s is how
    long the oldest job may wait for the clients of the batch that just ended to send their next requests
    (a job arriving at an idle engine starts at once); timeout_s the default and largest deadline;
    preview_interval_s the least time between two previews of a job that asks for them (0: every step, which
    the playground shows; each preview is a VAE decode, so raise it for large models)."""

    def __init__(self, models: dict, out_dir, *, controlnets: dict | None = None, max_queue: int = 64, max_batch: int = 8,
                 batch_window_s: float = 0.1, timeout_s: float = 600.0, preview_interval_s: float = 0.0,
                 finished_in_memory: int = 1000, lora_dir=None, store=None, default_model: str | None = None,
                 metric_labels: dict | None = None):
        if not models and default_model is None:
            raise ValueError("models: give at least one model (name -> Pipeline or loader)")
        for name, value in (("max_queue", max_queue), ("max_batch", max_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        self._sources, self.models = dict(models), {}
        self.default_model = default_model or next(iter(models))
        self.controlnets = dict(controlnets or {})
        self.loras = LoraLibrary(lora_dir)
        self.store = store if store is not None else JobStore(out_dir)  # reverie.server.pgstore: shared
        self.max_queue, self.max_batch, self.batch_window_s = max_queue, max_batch, batch_window_s
        self.timeout_s, self.preview_interval_s = timeout_s, preview_interval_s
        self.video_format = "mp4" if has_pyav() else "gif"  # how video results are stored (store.VIDEO_FORMATS)
        self._queue: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}  # queued and running
        self._finished: OrderedDict[str, Job] = OrderedDict()  # recent final jobs (the store has all)
        self._finished_cap = finished_in_memory
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._ready = self._accepting = self._stopping = self._abort = self._closed = False
        self.load_error: str | None = None
        self._batch_seconds = 1.0  # running mean of one pipeline call, for Retry-After
        self._last_batch = (1, -math.inf)  # (images, time.monotonic() when it ended)
        self.metrics = self._make_metrics(metric_labels)

    # --- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._work, name="reverie-engine", daemon=True)
        self._thread.start()
        threading.Thread(target=self._reap, name="reverie-deadlines", daemon=True).start()
        return self

    def wait_ready(self, timeout: float | None = None) -> bool:
        end = time.monotonic() + (timeout if timeout is not None else math.inf)
        while not self._ready and self.load_error is None and time.monotonic() < end:
            time.sleep(0.01)
        return self._ready

    @property
    def ready(self) -> bool:
        return self._ready and self._accepting

    def stop_accepting(self) -> None:
        """Readiness goes false and new jobs are refused (503); queued and running work continues."""
        with self._cond:
            self._accepting = False

    def close(self, grace_s: float | None = None) -> None:
        """Stop accepting, let the running batch finish (cancelled after grace_s), leave queued native jobs
        in the store for the next start, and stop the worker. Closing twice does nothing."""
        with self._cond:
            if self._closed:
                return
            self._accepting, self._stopping, self._closed = False, True, True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(grace_s)
            if self._thread.is_alive():
                self._abort = True
                self._thread.join()
        with self._cond:
            for job in list(self._queue):  # a waiting HTTP client cannot get its answer after a restart
                if job.kind == "sync":
                    self._queue.remove(job)
                    self._finish(job, "cancelled", error="the server shut down before the job ran")
        self.store.close()

    # --- what HTTP handlers call ---------------------------------------------------------------------

    def submit(self, request: Request, *, kind: str = "job") -> Job:
        """Validate, store and queue a job. Raises FieldError (422) or Rejected (429 / 503)."""
        job, timeout = self._accept(request, kind)
        job.deadline = job.enqueued + timeout
        with self._cond:
            if not self._accepting:  # again, now holding the lock close() takes
                raise Rejected(503, "the server is shutting down", 5)
            if len(self._queue) >= self.max_queue:
                self.metrics.inc("rejections_total", reason="queue_full")
                raise Rejected(429, f"the queue is full ({self.max_queue} jobs)", self.retry_after())
            self.store.add(job.id, kind, request.to_json(), job.created)
            self._enqueue(job)
        log.info("job queued", extra={"job": job.id, "kind": kind, "images": request.n, "position": self.position(job)})
        return job

    def _accept(self, request: Request, kind: str) -> tuple[Job, float]:
        """A new job for a request (prepared: defaults filled in, checked) and its time limit in seconds.
        Raises FieldError, or Rejected (503) when the engine is not ready or is shutting down."""
        if not self.ready:
            self.metrics.inc("rejections_total", reason="not_ready")
            raise Rejected(503, "the server is not ready (loading models, shutting down, or its job store is "
                                "unreachable)", 5)
        job = Job(uuid.uuid4().hex, self.prepare(request), kind=kind)
        with self._cond:
            if not self._accepting:
                raise Rejected(503, "the server is shutting down", 5)
        return job, min(self.timeout_s, job.request.timeout_s or math.inf)

    def get(self, job_id: str) -> Job | None:
        """A job by id: from memory, or rebuilt from the store (finished long ago, or before a restart)."""
        with self._cond:
            job = self._jobs.get(job_id) or self._finished.get(job_id)
        if job is not None or not JOB_ID.match(job_id):
            return job
        row = self.store.get(job_id)
        if row is None:
            return None
        job = Job(row["id"], Request.from_json(row["request"]), kind=row["kind"], status=row["status"],
                  created=row["created"], started=row["started"], finished=row["finished"], error=row["error"],
                  result=row["result"])
        if job.status in FINAL:
            job.done.set()
            job.emit(job.status, final_data(job))
        return job

    def cancel(self, job_id: str, reason: str = "cancelled by the client") -> bool:
        """Cancel a queued or running job. A running job is final at once; its row stops at the next step."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.status in FINAL:
                return False
            if job.status == "queued":
                self._queue.remove(job)
            return self._finish(job, "cancelled", error=reason)

    def position(self, job: Job) -> int | None:
        """Jobs ahead of a queued job (0: it runs next); None once it runs."""
        with self._cond:
            try:
                return self._queue.index(job)
            except ValueError:
                return None

    def model_names(self) -> list[str]:
        """The models requests may name (the first is the default)."""
        return list(self.models)

    def running(self) -> list[Job]:
        with self._cond:
            return list(self._running)

    def queued(self) -> list[Job]:
        with self._cond:
            return list(self._queue)

    def queue_depth(self) -> int:
        return len(self._queue)

    def retry_after(self) -> int:
        """Seconds until the queue has room, roughly: the queued images at max_batch per call."""
        images = sum(job.request.n for job in list(self._queue))
        return max(1, math.ceil(self._batch_seconds * (images / self.max_batch + 1)))

    def image_path(self, job_id: str, index: int):
        """The PNG of a finished job's image `index`, or None (ids are checked: no request names a path)."""
        job = self.get(job_id)
        if job is None or job.status != "done" or not 0 <= index < job.request.n:
            return None
        path = self.store.image_path(job_id, index)
        return path if path.is_file() else None

    def video_path(self, job_id: str, index: int, kind: str):
        """The MP4 (or GIF) of a finished video job's video `index` stored as `kind`, or None."""
        job = self.get(job_id)
        if job is None or job.status != "done" or not 0 <= index < job.request.n \
                or (job.result or {}).get("video_format") != kind:
            return None
        path = self.store.video_path(job_id, index, kind)
        return path if path.is_file() else None

    # --- validation ----------------------------------------------------------------------------------

    def prepare(self, request: Request, defaults: dict | None = None) -> Request:
        """Fill defaults (model; steps, guidance scale and sampler: the model family's, for SD models `defaults`,
        the dialect's, or family.SD_DEFAULTS; size: the source image's, else the model's; seed) and check what
        depends on the model. Raises FieldError. Preparing a prepared request changes nothing."""
        if not self._ready:
            raise Rejected(503, "the server is not ready (loading models)", 5)
        return self._prepare(request, defaults)

    def _prepare(self, request: Request, defaults: dict | None = None) -> Request:
        model = request.model or self.default_model
        if model not in self.models:
            raise FieldError("model", f"must be one of {sorted(self.models)}; got {model!r}")
        pipe = self.models[model]
        settings = families.settings(pipe, defaults if defaults is not None else request.defaults)
        request = dataclasses.replace(request, **{k: v for k, v in settings.items() if getattr(request, k) is None},
                                      **families.video_defaults(pipe, request))
        factor, size = pipe.size_multiple, pipe.family.default_dims(pipe)  # Wan: 832 x 480
        source = request.image if request.image is not None else request.control_image
        if source is not None and (request.width is None or request.height is None):
            w, h = _open_image("image" if request.image is not None else "control_image", source).size
            size = (max(factor, w - w % factor), max(factor, h - h % factor))
        width = request.width or size[0]
        height = request.height or size[1]
        for name, value in (("width", width), ("height", height)):
            if value % factor:
                raise FieldError(name, f"must be a multiple of {factor} for this {pipe.family.name} model; got {value}")
        families.sampler_choice(pipe, request.sampler, request.scheduler)
        families.check(pipe, request, self.video_format)
        _check_extras(request)
        if request.subseed_strength and request.subseed is None:
            request = dataclasses.replace(request, subseed=random.randint(0, MAX_SEED))
        prompt, negative, loras = self.loras.read_prompt(pipe, request.prompt, request.negative_prompt, request.loras)
        request = dataclasses.replace(request, prompt=prompt, negative_prompt=negative, loras=loras or None)
        if request.steps > pipe.schedule.num_train_timesteps:
            raise FieldError("steps", f"must be <= {pipe.schedule.num_train_timesteps}; got {request.steps}")
        for name in BYTES_FIELDS:
            data = getattr(request, name)
            if data is not None:
                _open_image(name, data)
        if request.mask is not None and request.image is None:
            raise FieldError("mask", "a mask needs an image to inpaint")
        if request.image is not None and not _accepts(pipe, "image"):
            raise FieldError("image", "this server's pipeline cannot do img2img or inpainting yet")
        if request.control_image is not None and request.control_type not in self.controlnets_for(pipe):
            held = "" if request.control_type not in self.controlnets else (
                f"; {request.control_type!r} is made for another UNet (an SD ControlNet for SD models, an SDXL one "
                "for SDXL)")
            raise FieldError("control_type", f"must be one of {self.controlnets_for(pipe)} (the ControlNets this "
                                             f"server holds for {model!r}); got {request.control_type!r}{held}")
        switch = self._check_refiner(pipe, request)
        seed = request.seed if request.seed is not None and request.seed >= 0 else random.randint(0, MAX_SEED)
        return dataclasses.replace(request, model=model, width=width, height=height, seed=seed,
                                   refiner_switch_at=switch)

    def controlnets_for(self, pipe) -> list[str]:
        """The names of the held ControlNets whose residuals fit the model's UNet (what its requests'
        control_type may name); a ControlNet still loading counts as fitting until it is loaded."""
        if not pipe.family.controlnet:
            return []
        return sorted(name for name, net in self.controlnets.items()
                      if isinstance(net, (str, Path)) or control.fits(net, pipe.unet, pipe.downsample_factor))

    def _check_refiner(self, pipe, r: Request) -> float | None:
        """The refiner's switch point (default REFINER_SWITCH_AT), after checking that the refiner is held, takes
        the model's latents and the request's settings; None without a refiner. Raises FieldError."""
        if r.refiner is None:
            if r.refiner_switch_at is not None:
                raise FieldError("refiner_switch_at", "needs a refiner")
            return None
        if r.refiner not in self.models:
            raise FieldError("refiner", f"must be one of {sorted(self.models)}; got {r.refiner!r}")
        switch = REFINER_SWITCH_AT if r.refiner_switch_at is None else r.refiner_switch_at
        if isinstance(switch, bool) or not isinstance(switch, (int, float)) or not 0 < switch < 1:
            raise FieldError("refiner_switch_at", f"must be a number in (0, 1) (the fraction of the schedule the "
                                                  f"first model runs); got {switch!r}")
        for name in ("image", "control_image"):
            if getattr(r, name) is not None:
                raise FieldError("refiner", f"does not go with {name} yet (img2img, inpainting and ControlNet run "
                                            "without a refiner)")
        refiner = self.models[r.refiner]
        families.check_refiner(pipe, refiner, r.refiner)
        families.sampler_choice(refiner, r.sampler, r.scheduler)
        families.check(refiner, r)
        if r.steps > refiner.schedule.num_train_timesteps:
            raise FieldError("steps", f"must be <= {refiner.schedule.num_train_timesteps} (the refiner's "
                                      f"schedule); got {r.steps}")
        return float(switch)

    # --- the worker ----------------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            for name, source in self._sources.items():
                self.models[name] = source if isinstance(source, Pipeline) else source()
            for name, net in self.controlnets.items():
                if isinstance(net, (str, Path)):
                    self.controlnets[name] = load_controlnet(net)
            for pipe in self.models.values():  # warm-up: the first call pays for lazy initialisation
                pipe(**families.warm_up_call(pipe))
        except Exception as e:  # the process stays up, not ready, and says why
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("model loading failed")
            return
        self._resume()
        with self._cond:
            self._ready = self._accepting = not self._stopping
        log.info("engine ready", extra={"models": list(self.models), "queued": len(self._queue)})
        while (batch := self._next_batch()) is not None:
            try:
                self._run(batch)
            except Exception as e:  # never lose the worker: fail what is left of the batch
                log.exception("engine error", extra={"jobs": [j.id for j in batch]})
                for job in batch:
                    self._finish(job, "failed", error=_plain(e), failure="internal")

    def _reap(self) -> None:
        """Expire queued jobs on time even while the worker is inside a long step."""
        with self._cond:
            while not self._closed:
                self._expire_queued()
                self._cond.wait(0.1)

    def _resume(self) -> None:
        """Queue again the native jobs the last process accepted but did not finish."""
        for row in self.store.unfinished():
            if row["kind"] != "job":
                self.store.update(row["id"], status="cancelled", finished=time.time(),
                                  error="the server restarted; the waiting client was gone")
                continue
            try:  # the models may have changed since it was accepted
                request = self._prepare(Request.from_json(row["request"]))
            except FieldError as e:
                self.store.update(row["id"], status="failed", finished=time.time(), error=str(e))
                continue
            job = Job(row["id"], request, kind="job", created=row["created"])
            job.deadline = job.enqueued + min(self.timeout_s, job.request.timeout_s or math.inf)
            self.store.update(job.id, status="queued", started=None)
            with self._cond:
                self._enqueue(job)
            log.info("job resumed", extra={"job": job.id})

    def _enqueue(self, job: Job) -> None:  # holding self._cond
        self._queue.append(job)
        self._jobs[job.id] = job
        job.emit("queued", {"position": len(self._queue) - 1})
        self._cond.notify_all()

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and the queued jobs that can share its forward passes; None when stopping."""
        with self._cond:
            while True:
                self._expire_queued()
                if self._stopping:
                    return None
                if self._queue:
                    head = self._queue[0]
                    # the window opens when the head arrives, or when the last batch ended if it came during
                    # it: clients of that batch send their next requests now, and would otherwise run a batch
                    # behind the head's forever (two cohorts alternating, each half the size)
                    opened = max(head.enqueued, self._last_batch[1])
                    wait = opened + self.batch_window_s - time.monotonic()
                    if self.max_batch == 1 or wait <= 0 or self._batch_images(head) >= self._expected_images():
                        break
                    self._cond.wait(wait)
                else:
                    self._cond.wait(0.5)  # wake now and then to expire deadlines
            head = self._queue[0]
            batch, images = [head], head.request.n
            for job in list(self._queue)[1:]:
                if images + job.request.n <= self.max_batch and self._key(job) == self._key(head):
                    batch.append(job)
                    images += job.request.n
            now = time.time()
            for job in batch:
                self._queue.remove(job)
                job.status, job.started = "running", now
                self.metrics.observe("queue_wait_seconds", time.monotonic() - job.enqueued)
        for job in batch:
            self.store.update(job.id, status="running", started=now)
            job.emit("started", {"batch_jobs": len(batch), "batch_images": images})
        return batch

    def _expected_images(self) -> int:
        """How many images to wait for (up to batch_window_s): as many as the last batch had when it ended just
        now, since its clients are likely sending their next requests; otherwise none beyond the first."""
        recent = time.monotonic() - self._last_batch[1] < 1.0
        return min(self.max_batch, self._last_batch[0] if recent else 1)

    def _batch_images(self, head: Job) -> int:
        key = self._key(head)
        return sum(job.request.n for job in self._queue if self._key(job) == key)

    def _key(self, job: Job) -> tuple:
        """Jobs with equal keys share forward passes: same model, size, sampler, schedule, steps and shift, the
        same conditioning shape and call-wide family settings (family.conditioning_key: SD's prompt chunk count,
        SD3's and FLUX's max_sequence_length, FLUX's distilled guidance and true_cfg_scale), for edits the
        same edit settings (_edit_key), the same refiner, switch point and refiner conditioning shape, and the same
        LoRAs (they are merged into the weights: reverie.lora)."""
        if job.key is None:
            r = job.request
            pipe = self.models[r.model]
            refiner = () if r.refiner is None else (
                r.refiner, r.refiner_switch_at, families.conditioning_key(self.models[r.refiner], r))
            job.key = (r.model, r.width, r.height, families.sampler_choice(pipe, r.sampler, r.scheduler), r.steps,
                       r.shift, families.conditioning_key(pipe, r), _edit_key(r), refiner,
                       tuple(tuple(item) for item in r.loras or ()), r.tiling, r.subseed_strength, r.prompt_syntax,
                       (r.hr_scale, r.hr_upscaler, r.hr_second_pass_steps, r.hr_strength, r.hr_resize_x,
                        r.hr_resize_y) if r.hr_scale else None)
        return job.key

    def _expire_queued(self) -> None:  # holding self._cond
        now = time.monotonic()
        for job in [j for j in self._queue if now > j.deadline]:
            self._queue.remove(job)
            self._finish(job, "failed", error=_deadline_message(job), failure="deadline")

    def _run(self, batch: list[Job]) -> None:
        """One pipeline call for a batch; on an error with several jobs, each runs again alone."""
        start = time.monotonic()
        active = list(batch)
        with self._cond:
            self._running = list(batch)
        try:
            result = self._generate(batch, active)
        except Cancelled:
            result = None
        except Exception as e:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # an OOM fails the request, not the server
            self.metrics.inc("errors_total", kind=type(e).__name__)
            log.exception("generation failed", extra={"jobs": [j.id for j in active]})
            alive = [j for j in active if j.status not in FINAL]
            if len(alive) > 1:
                for job in alive:
                    self._run([job])
            elif alive:
                self._finish(alive[0], "failed", error=_plain(e),
                             failure="invalid" if isinstance(e, ValueError) else "internal")
            return
        finally:
            with self._cond:
                self._running = []
        elapsed = time.monotonic() - start
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
        self.metrics.observe("run_seconds", elapsed)
        try:
            self._finish_batch(batch, result, elapsed)
        finally:  # after delivery: the batch's clients send their next requests only once they have their answers
            self._last_batch = (sum(job.request.n for job in batch), time.monotonic())

    def _finish_batch(self, batch: list[Job], result, elapsed: float) -> None:
        if result is None:
            if self._abort:  # shutdown past its grace period: native jobs run again after the restart
                for job in batch:
                    if job.status not in FINAL and job.kind == "sync":
                        self._finish(job, "cancelled", error="the server shut down during the job")
                    elif job.status not in FINAL:
                        self._requeue(job)
            return
        row = 0
        for job in batch:
            rows = range(row, row + job.request.n)
            row += job.request.n
            if job.status not in FINAL:
                self._deliver(job, result, rows, elapsed)

    def _requeue(self, job: Job) -> None:
        """A running native job the shutdown interrupted: queued again in the store for the next start."""
        self.store.update(job.id, status="queued", started=None)

    def _publish(self, progress: dict) -> None:
        """Hand each running job's progress event (job -> data) to its listeners."""
        for job, data in progress.items():
            job.emit("progress", data)

    def _generate(self, batch: list[Job], active: list[Job]):
        """Run the pipeline on all rows of a batch, with the per-step callback. With a refiner: the model stops at
        the switch point and the refiner finishes from its latents with the same prompts, steps, sampler,
        schedule, guidance scales and seeds (the CLI's --refiner); cancelling between the two calls stops it."""
        r0 = batch[0].request
        pipe = self.models[r0.model]
        prompts, negatives, scales, seeds, subseeds = [], [], [], [], []
        for job in batch:
            r = job.request
            prompts += [r.prompt] * r.n
            negatives += [r.negative_prompt if families.uses_cfg(pipe, r) else ""] * r.n
            scales += [r.guidance_scale] * r.n
            seeds += job.seeds
            subseeds += [((r.subseed or 0) + i) % (MAX_SEED + 1) for i in range(r.n)]
        if not any(families.uses_cfg(pipe, job.request) for job in batch):
            negatives = None  # DiT has none; FLUX warns about one it would not use
        images = len(prompts)
        self.metrics.observe("batch_images", images)
        self.metrics.observe("batch_jobs", len(batch))
        log.info("batch started", extra={"jobs": [j.id for j in batch], "images": images})
        callback = _StepCallback(self, pipe, batch, active)
        if pipe.family.first_frame and r0.image is not None:  # image-to-video: the first frame, not an edit
            kwargs = {"image": _open_image("image", r0.image).convert("RGB")} | families.call_options(r0)
        else:
            kwargs = _edit_kwargs(batch, self.controlnets) | families.call_options(r0)  # equal for the batch (_key)
        common = dict(negative_prompt=negatives, steps=r0.steps, seed=seeds, callback=callback, progress=False,
                      guidance_scale=scales if len(set(scales)) > 1 else scales[0])
        if r0.refiner is not None:
            kwargs["denoising_end"] = r0.refiner_switch_at
        wanted = self.loras.uses(r0.loras)  # equal for the batch (_key); merged only when the set changes
        if [(id(u.lora), u.text, u.unet) for u in wanted] != [(id(u.lora), u.text, u.unet) for u in pipe.loras]:
            pipe.set_loras(wanted)
        if r0.subseed_strength:
            kwargs |= dict(subseed=subseeds, subseed_strength=r0.subseed_strength)
        if r0.tiling:
            kwargs["tiling"] = True
        call = pipe
        if r0.hr_scale:
            call = functools.partial(hires_fix, pipe, hr_scale=r0.hr_scale, hr_upscaler=r0.hr_upscaler,
                                     hr_second_pass_steps=r0.hr_second_pass_steps, denoising_strength=r0.hr_strength,
                                     hr_resize_x=r0.hr_resize_x, hr_resize_y=r0.hr_resize_y)
        result = call(prompts, sampler=r0.sampler, scheduler=r0.scheduler, width=r0.width, height=r0.height,
                      **common, **kwargs)
        if r0.refiner is not None:
            result = self._refine(r0, prompts, common, callback, result)
        self.metrics.inc("images_total", images)
        return result

    def _refine(self, r0: Request, prompts: list, common: dict, callback: "_StepCallback", first):
        """The refiner's share of a batch (denoising_start = the switch point) from the first call's latents,
        with the sampler and schedule that call resolved; params are the first call's (the model that drew the
        image), with refiner and refiner_switch_at as A1111's infotext records them."""
        callback.drop()  # a job cancelled during the last step of the first call stops here
        refiner = self.models[r0.refiner]
        callback.pipe, callback.offset = refiner, callback.count  # previews decode with the refiner's VAE
        p = first.params
        sampler = (r0.sampler, r0.scheduler) if r0.sampler is not None else (p["sampler"], p["schedule"])
        result = refiner(prompts, image=first.latents, denoising_start=r0.refiner_switch_at, sampler=sampler[0],
                         scheduler=sampler[1], **common)
        handoff = ("denoising_end", "denoising_start", "latent_sigma", "nsfw")
        result.params = ({k: v for k, v in p.items() if k not in handoff}
                         | dict(nsfw=result.params["nsfw"], refiner=r0.refiner, refiner_switch_at=r0.refiner_switch_at))
        return result

    def _deliver(self, job: Job, result, rows: range, elapsed: float) -> None:
        """Write a job's images (PNG with its parameters), or its videos (MP4 or GIF with their parameters, and the
        middle frame as a PNG poster), then mark it done."""
        r = job.request
        uses_cfg = families.uses_cfg(self.models[r.model], r)
        params = []
        for i, row in enumerate(rows):
            p = image_params(result.params, row)
            if not uses_cfg:  # as if alone: no negative prompt without guidance
                p["negative_prompt"] = None
            p |= {k: v for k, v in families.call_options(r).items() if k not in p}  # all it takes to regenerate
            image = result.images[row]
            if result.frames is not None:
                frames = result.frames[row]
                self.store.write_video(job.id, i, frames, fps=r.fps, params=p, kind=self.video_format)
                image = frames[len(frames) // 2]  # the poster
            self.store.write_image(job.id, i, png_bytes(image, p))
            params.append(p)
        video = dict(videos=r.n, video_format=self.video_format, fps=r.fps, num_frames=r.num_frames) \
            if result.frames is not None else {}
        self._finish(job, "done", result=dict(images=r.n, seeds=job.seeds, params=params, elapsed_s=round(elapsed, 3),
                                              **video))

    def _finish(self, job: Job, status: str, *, error: str | None = None, result: dict | None = None,
                failure: str | None = None) -> bool:
        """Make a job final exactly once: store first, then memory, then the event."""
        with job._lock:
            if job.status in FINAL:
                return False
            job.status, job.finished, job.error, job.result = status, time.time(), error, result
            job.failure = failure
        self.store.update(job.id, status=status, finished=job.finished, error=error, result=result)
        with self._cond:
            self._jobs.pop(job.id, None)
            self._finished[job.id] = job
            while len(self._finished) > self._finished_cap:
                self._finished.popitem(last=False)
        self.metrics.inc("jobs_total", status=status)
        job.done.set()
        job.emit(status, final_data(job))
        log.info(f"job {status}", extra={"job": job.id, "error": error,
                                          "elapsed_s": round(job.finished - job.created, 3)})
        return True

    def _make_metrics(self, labels: dict | None) -> Metrics:
        m = Metrics(labels=labels)
        m.gauge("queue_depth", "Jobs waiting in the queue.", self.queue_depth)
        m.gauge("inflight_jobs", "Jobs in the running batch.", lambda: len(self._running))
        m.gauge("ready", "1 when models are loaded and the engine accepts jobs.", lambda: int(self.ready))
        m.counter("jobs_total", "Jobs finished, by status.", ("status",))
        m.counter("images_total", "Images generated.")
        m.counter("errors_total", "Failed pipeline calls, by exception type.", ("kind",))
        m.counter("rejections_total", "Requests refused, by reason (queue_full, not_ready, invalid).", ("reason",))
        m.counter("http_requests_total", "HTTP responses, by status code.", ("code",))
        m.histogram("batch_images", "Images per forward pass.", BATCH_BUCKETS)
        m.histogram("batch_jobs", "Jobs merged into one pipeline call.", BATCH_BUCKETS)
        m.histogram("step_seconds", "Wall time of one denoising step (whole batch).")
        m.histogram("queue_wait_seconds", "Time from submission to the start of a job.")
        m.histogram("run_seconds", "Wall time of one pipeline call.")
        return m


class _StepCallback:
    """Per sampler step: drop cancelled and expired rows, stop when none is left, emit progress and previews."""

    def __init__(self, engine: Engine, pipe, batch: list[Job], active: list[Job]):
        self.engine, self.pipe, self.batch, self.active = engine, pipe, batch, active
        self.start = self.last = time.monotonic()
        self.count = self.offset = 0  # steps seen; steps of the earlier calls (a refiner's call counts on)
        self.rows, row = {}, 0
        for job in batch:
            self.rows[job.id] = row
            row += job.request.n

    def __call__(self, step) -> None:
        engine, now = self.engine, time.monotonic()
        engine.metrics.observe("step_seconds", now - self.last)
        self.last, self.count = now, self.count + 1
        self.drop(now)
        with engine._cond:
            engine._expire_queued()
        previews = [j for j in self.active if j.request.preview and now - j._last_preview >= engine.preview_interval_s]
        decoded = self._previews(step, previews) if previews else {}
        progress = {}
        for job in self.active:
            data = dict(step=self.offset + step.i + 1, steps=job.request.steps, sigma=round(float(step.sigma), 5),
                        elapsed_s=round(now - self.start, 3))
            job.progress = data
            if job in decoded:
                job._last_preview = now
                data = dict(data, preview_x=decoded[job][0], preview_x0=decoded[job][1])
            progress[job] = data
        engine._publish(progress)

    def drop(self, now: float | None = None) -> None:
        """Drop cancelled and expired rows; raise Cancelled when none is left (or the engine is aborting)."""
        engine, now = self.engine, time.monotonic() if now is None else now
        for job in list(self.active):
            if job.status in FINAL:  # cancelled by the client
                self.active.remove(job)
            elif now > job.deadline:
                self.active.remove(job)
                engine._finish(job, "failed", error=_deadline_message(job), failure="deadline")
        if not self.active or engine._abort:
            raise Cancelled

    def _previews(self, step, jobs: list[Job]) -> dict:
        """Decode x_t (VP: scaled to unit variance; flow samples already are) and the denoised estimate of each
        job's first image; of a video, its middle latent frame (B, C, 1, h, w), decoded as a one-frame video."""
        vae = self.pipe.vae
        rows = [self.rows[job.id] for job in jobs]
        x = step.x[rows]
        if self.pipe.sampling.kind == "vp":
            x = x / (1 + float(step.sigma) ** 2) ** 0.5
        z = torch.cat([x, step.denoised[rows]])  # (2n, C, h, w); video: (2n, C, F, h, w)
        if z.ndim == 5:
            middle = z.shape[2] // 2
            z = z[:, :, middle:middle + 1]
        param = next(vae.parameters())
        with torch.inference_mode():
            pixels = self.pipe.family.decode(vae, z.to(param.device, param.dtype))  # the VAE's scale and shift undone
        images = to_pil(pixels[:, :, 0] if pixels.ndim == 5 else pixels)
        n = len(jobs)
        return {job: (_data_url(images[i]), _data_url(images[n + i])) for i, job in enumerate(jobs)}


# --- helpers ---------------------------------------------------------------------------------------------


def _check_extras(r: Request) -> None:
    """The hires fix, variation seed and tiling fields (reverie.hires)."""
    from ..hires import UPSCALERS

    if r.hr_scale is not None:
        if not 1 <= r.hr_scale <= 4:
            raise FieldError("hr_scale", f"must be in [1, 4]; got {r.hr_scale}")
        if r.hr_upscaler not in UPSCALERS:
            raise FieldError("hr_upscaler", f"must be one of {list(UPSCALERS)}; got {r.hr_upscaler!r}")
        if not 0 <= r.hr_strength <= 1:
            raise FieldError("denoising_strength", f"must be in [0, 1]; got {r.hr_strength}")
        if r.hr_second_pass_steps < 0:
            raise FieldError("hr_second_pass_steps", f"must be >= 0; got {r.hr_second_pass_steps}")
        for name in ("hr_resize_x", "hr_resize_y"):
            if not 0 <= getattr(r, name) <= 2048:
                raise FieldError(name, f"must be in [0, 2048] (0: by hr_scale); got {getattr(r, name)}")
        if r.image is not None or r.refiner is not None or r.control_image is not None:
            raise FieldError("enable_hr", "the hires fix is for text-to-image without a refiner or ControlNet")
    if not 0 <= r.subseed_strength <= 1:
        raise FieldError("subseed_strength", f"must be in [0, 1]; got {r.subseed_strength}")
    if r.subseed_strength and r.image is not None:
        raise FieldError("subseed_strength", "variation seeds are for text-to-image")


def _accepts(pipe, name: str) -> bool:
    """Whether the pipeline's __call__ takes the argument `name` (by name, or through **kwargs)."""
    import inspect

    parameters = inspect.signature(pipe.__call__).parameters
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _open_image(name: str, data: bytes) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Exception:
        raise FieldError(name, "is not a readable image (send a base64 PNG or JPEG)") from None
    if image.width * image.height > MAX_IMAGE_PIXELS:  # checked before the pixels are decompressed
        raise FieldError(name, f"has {image.width}x{image.height} pixels; at most {MAX_IMAGE_PIXELS} are accepted")
    try:
        image.load()
    except Exception:
        raise FieldError(name, "is not a readable image (send a base64 PNG or JPEG)") from None
    return image


def _image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's header; None if unreadable (the run then fails the job, not the worker)."""
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:
        return None


def _edit_key(r: Request) -> tuple:
    """What edit jobs (img2img, inpainting, ControlNet) must share to run in one pipeline call: the settings
    that apply to the whole call, and the source image's size (a call stacks its source images and masks
    before resizing them; control images are resized one by one). () for plain text-to-image."""
    key = ()
    if r.image is not None and r.num_frames is not None:  # a video's first frame: one per call, shared
        return ("first_frame", hashlib.sha256(r.image).hexdigest())
    if r.image is not None:
        mask = None if r.mask is None else _image_size(r.mask)
        key += ("image", _image_size(r.image), mask, r.strength)
    if r.control_image is not None:
        key += ("control", r.control_type, r.controlnet_scale)
    return key


def _edit_kwargs(batch: list[Job], controlnets: dict) -> dict:
    """img2img / inpainting / ControlNet arguments for a batch of jobs with equal _edit_key: one source image,
    mask and control image per row of the call."""
    r0 = batch[0].request

    def per_row(name: str, mode: str) -> list[Image.Image]:
        rows = []
        for job in batch:
            rows += [_open_image(name, getattr(job.request, name)).convert(mode)] * job.request.n
        return rows

    kwargs = {}
    if r0.image is not None:
        kwargs.update(image=per_row("image", "RGB"), strength=r0.strength)
    if r0.mask is not None:
        kwargs["mask_image"] = per_row("mask", "L")
    if r0.control_image is not None:
        kwargs.update(controlnet=controlnets[r0.control_type], control_image=per_row("control_image", "RGB"),
                      controlnet_conditioning_scale=r0.controlnet_scale)
    return kwargs


def _data_url(image: Image.Image, size: int = 256) -> str:
    image.thumbnail((size, size))  # a preview, not a result: small whatever the model's size
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _deadline_message(job: Job) -> str:
    waited = "in the queue" if job.status == "queued" else "while running"
    return f"deadline exceeded {waited}: the job did not finish within its time limit"


def _plain(e: Exception) -> str:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "the device ran out of memory for this request; try fewer images or a smaller size"
    if isinstance(e, ValueError):
        return str(e)
    return f"the generation failed ({type(e).__name__}: {e})"
