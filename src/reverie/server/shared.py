"""Many front ends and workers on one shared job store (reverie.server.pgstore): the engine across machines.

A SharedEngine is an Engine whose queue is the store's jobs table instead of a list in memory; everything that
runs a batch (batching by key, the pipeline call, the step callback, delivering images and videos) is the
Engine's own. Three roles:

    serve      HTTP front end and engine in one process (`reverie serve --store URL`)
    frontend   HTTP only (`reverie serve --store URL --no-engine`): holds no model
    worker     engine only (`reverie worker --store URL`), with /health and /metrics on a local port

Front ends write each accepted job to the store before answering, so no accepted job is lost with a front end;
a front end that holds the request's model checks it completely at once (422 naming the field), one that does
not checks what needs no model (the model is held by a live worker, the seed is drawn) and the worker that
claims the job checks the rest (a request it cannot run fails as "invalid"). Front ends follow the jobs their
clients watch by polling their rows and turn what changed into the same events (queued, started, progress,
done / failed / cancelled) an embedded engine emits, so every dialect, SSE stream and synchronous wait works
unchanged on any front end, for a job any worker runs.

Workers claim the oldest queued jobs of the models they hold, as one batch of jobs that can share forward
passes (Engine._key), and renew the batch's lease with every progress event and every lease_s / 3 seconds
besides. Every write about a claimed job is conditional on the claim, so a job cancelled through any front end
stops at its worker's next step, and a job whose worker died goes back to the queue when its lease expires and
is finished once, by another worker. Queued jobs past their deadline fail; every process checks both once a
second. The queue-full 429 counts the shared queue.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

from ..pipeline import MAX_SEED
from .engine import Engine
from .job import FINAL, FieldError, Job, Rejected, Request, final_data
from .pgstore import PgStore, QueueFull

log = logging.getLogger("reverie.server")

ROLES = ("serve", "frontend", "worker")
PREVIEW_KEYS = ("preview_x", "preview_x0")
QUEUED_TOO_LONG = "deadline exceeded in the queue: the job did not finish within its time limit"


class SharedEngine(Engine):
    """An Engine on a shared store. store: a PgStore (or its postgresql:// URL). role: one of ROLES; a frontend
    holds no models (models {} and default_model: the model requests without one get). lease_s: how long a
    claim holds without renewal; poll_s: how often idle workers look for jobs and front ends for changes;
    alive_s: a worker whose last heartbeat is older is taken for gone. Other options: Engine's."""

    def __init__(self, models: dict, store, *, role: str, out_dir, worker_id: str | None = None,
                 lease_s: float = 30.0, poll_s: float = 0.1, alive_s: float = 10.0, **options):
        if role not in ROLES:
            raise ValueError(f"role must be one of {list(ROLES)}; got {role!r}")
        if (role == "frontend") != (not models):
            raise ValueError("models: a frontend holds none; serve and worker roles hold at least one")
        for name, value in (("lease_s", lease_s), ("poll_s", poll_s), ("alive_s", alive_s)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0; got {value!r}")
        self.role, self.lease_s, self.poll_s, self.alive_s = role, float(lease_s), float(poll_s), float(alive_s)
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        store = PgStore(store) if isinstance(store, str) else store
        super().__init__(models, out_dir, store=store, metric_labels={"role": role, "worker": self.worker_id},
                         **options)
        self.cache = Path(out_dir) / "cache"  # result files fetched from the store, served from here
        self.cache.mkdir(parents=True, exist_ok=True)
        self._watched: dict[str, Job] = {}  # unfinished jobs this front end's clients look at
        self._seen: dict[str, int] = {}  # job id -> the progress_seq last turned into an event
        self._claims: dict[str, int] = {}  # job id -> attempt, of the batch this worker runs
        self._live: tuple[float, list] = (-math.inf, [])  # (time.monotonic() when read, live workers)
        self._store_ok = False
        self._renewed = self._checked = -math.inf  # time.monotonic() of the last lease renewal, of the last checks

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> "SharedEngine":
        self._maintain_once()  # the store answers (or this raises) before the port opens
        threading.Thread(target=self._maintain, name="reverie-shared", daemon=True).start()
        if self.role == "frontend":
            with self._cond:
                self._ready = self._accepting = True
            return self
        return super().start()

    @property
    def ready(self) -> bool:
        return self._ready and self._accepting and self._store_ok

    def close(self, grace_s: float | None = None) -> None:
        with self._cond:
            closed = self._closed
        super().close(grace_s)  # closes the store's connections; it reconnects for the last words below
        if not closed:
            try:
                self.store.leave(self.worker_id)
            except Exception:
                log.exception("could not leave the workers table", extra={"worker": self.worker_id})
            self.store.close()

    def _resume(self) -> None:
        """Called once the models are loaded, before the engine is ready: join the workers table, so front ends
        see this worker's models the moment it answers ready. (Nothing to resume: a stopped worker's jobs go back
        to the queue when their leases expire.)"""
        self._heartbeat()

    def _heartbeat(self) -> None:
        self.store.heartbeat(self.worker_id, self.role, socket.gethostname(), list(self.models))

    # --- the front end ------------------------------------------------------------------------------------

    def model_names(self, fresh: bool = False) -> list[str]:
        """The models requests may name: this process's and those of the live workers (fresh: read now)."""
        names = dict.fromkeys(self.models)
        for worker in self._workers(fresh):
            names.update(dict.fromkeys(worker["models"]))
        return list(names)

    def prepare(self, request: Request, defaults: dict | None = None) -> Request:
        if not self.ready:
            raise Rejected(503, "the server is not ready (loading models, or the job store is unreachable)", 5)
        model = request.model or self.default_model
        if model in self.models:
            return self._prepare(request, defaults)
        held = self.model_names()
        if model not in held:  # a worker may have joined in the last second
            held = self.model_names(fresh=True)
        if not held:
            raise Rejected(503, "no worker is connected to the job store", 5)
        if model not in held:
            raise FieldError("model", f"must be one of {sorted(held)} (the models this cluster's workers hold); "
                                      f"got {model!r}")
        # the worker that claims it fills in the rest (Engine._prepare), with the dialect's defaults
        seed = request.seed if request.seed is not None and request.seed >= 0 else random.randint(0, MAX_SEED)
        subseed = request.subseed
        if request.subseed_strength and subseed is None:
            subseed = random.randint(0, MAX_SEED)
        return dataclasses.replace(request, model=model, seed=seed, subseed=subseed,
                                   defaults=defaults if defaults is not None else request.defaults)

    def submit(self, request: Request, *, kind: str = "job") -> Job:
        """Validate and store a job (then acknowledged: it survives this process). Raises FieldError or
        Rejected (429 when the shared queue is full, 503)."""
        job, timeout = self._accept(request, kind)
        request = job.request
        try:
            row = self.store.enqueue(job.id, kind, request.model, request.to_json(), timeout, self.max_queue)
        except QueueFull as e:
            self.metrics.inc("rejections_total", reason="queue_full")
            raise Rejected(429, f"the queue is full ({e.depth} jobs)", self.retry_after()) from None
        job.created = row["created"]
        self._watch(job)
        job.emit("queued", {"position": self.store.position(job.id)})
        log.info("job queued", extra={"job": job.id, "kind": kind, "images": request.n, "worker": self.worker_id})
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            job = self._watched.get(job_id) or self._finished.get(job_id)
        if job is not None:
            return job
        row = self.store.get(job_id)
        if row is None:
            return None
        job = Job(row["id"], Request.from_json(row["request"]), kind=row["kind"], status="queued",
                  created=row["created"])
        self._watch(job)
        self._follow(job, row)
        return job

    def cancel(self, job_id: str, reason: str = "cancelled by the client") -> bool:
        """Cancel a queued or running job wherever it runs (its worker stops it at its next step)."""
        job = self.get(job_id)
        if job is None or job.status in FINAL:
            return False
        changed = self.store.cancel(job_id, reason)
        row = self.store.get(job_id)
        if row is not None:
            self._follow(job, row)
        return changed

    def position(self, job: Job) -> int | None:
        return self.store.position(job.id) if job.status == "queued" else None

    def queue_depth(self) -> int:
        return self.store.depth()

    def queued(self) -> list[Job]:
        with self._cond:
            return [job for job in self._watched.values() if job.status == "queued"]

    def running(self) -> list[Job]:
        with self._cond:
            watched = [job for job in self._watched.values() if job.status == "running"]
            return list(self._running) + [job for job in watched if job.id not in self._claims]

    def retry_after(self) -> int:
        """Seconds until the shared queue has room, roughly: its images at max_batch per call per live worker."""
        workers = max(1, len(self._workers()))
        return max(1, math.ceil(self._batch_seconds * (self.store.queued_images() / (self.max_batch * workers) + 1)))

    def image_path(self, job_id: str, index: int):
        return self._cached(job_id, index, f"images/{index}.png", f"{job_id}-{index}.png")

    def video_path(self, job_id: str, index: int, kind: str):
        job = self.get(job_id)
        if job is None or (job.result or {}).get("video_format") != kind:
            return None
        return self._cached(job_id, index, f"videos/{index}.{kind}", f"{job_id}-{index}.{kind}")

    def _cached(self, job_id: str, index: int, name: str, local: str):
        """A finished job's file from the store, kept in the cache folder (files never change once written)."""
        job = self.get(job_id)
        if job is None or job.status != "done" or not 0 <= index < job.request.n:
            return None
        path = self.cache / local
        if not path.is_file():
            data = self.store.read_file(job_id, name)
            if data is None:
                return None
            fd, tmp = tempfile.mkstemp(dir=self.cache, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return path

    def _watch(self, job: Job) -> None:
        with self._cond:
            if job.status in FINAL:
                self._remember(job)
            else:
                self._watched[job.id] = job

    def _remember(self, job: Job) -> None:  # holding self._cond
        self._watched.pop(job.id, None)
        self._seen.pop(job.id, None)
        self._finished[job.id] = job
        while len(self._finished) > self._finished_cap:
            self._finished.popitem(last=False)

    def _poll(self) -> None:
        """Turn what changed in the rows of the watched jobs into their events."""
        with self._cond:
            jobs = dict(self._watched)
        if jobs:
            for row in self.store.rows(list(jobs)):
                self._follow(jobs[row["id"]], row)

    def _follow(self, job: Job, row: dict) -> None:
        """Bring a front end's Job up to its row, emitting the events in between."""
        status = row["status"]
        if status != "queued" and job.status == "queued":  # claimed: the request as its worker prepared it
            job.request = Request.from_json(row["request"])  # (defaults filled in)
        if status == "queued" and job.status == "running":  # its worker died; it waits for another
            job.status, job.started, job.progress = "queued", None, None
            job.emit("queued", {"position": self.store.position(job.id), "requeued": True})
        if status in ("running", *FINAL) and job.status == "queued" and row["started"] is not None:
            job.status, job.started = "running", row["started"]
            job.emit("started", row["batch"] or {})
        if row["progress"] is not None and row["progress_seq"] > self._seen.get(job.id, 0) and status == "running":
            self._seen[job.id] = row["progress_seq"]
            job.progress = {k: v for k, v in row["progress"].items() if k not in PREVIEW_KEYS}
            job.emit("progress", row["progress"])
        if status in FINAL and job.status not in FINAL:
            with job._lock:
                job.status, job.finished, job.error = status, row["finished"], row["error"]
                job.failure, job.result = row["failure"], row["result"]
            with self._cond:
                self._remember(job)
            job.done.set()
            job.emit(status, final_data(job))

    def _workers(self, fresh: bool = False) -> list[dict]:
        """The live workers (read at most once a second, unless fresh)."""
        read, workers = self._live
        if fresh or time.monotonic() - read > 1.0:
            workers = self.store.workers(self.alive_s)
            self._live = (time.monotonic(), workers)
        return workers

    # --- the worker ---------------------------------------------------------------------------------------

    def _next_batch(self) -> list[Job] | None:
        """Claim the next batch from the store (polling every poll_s while there is none); None when stopping."""
        while True:
            with self._cond:
                if self._stopping:
                    return None
            start = time.monotonic()
            try:
                rows = self.store.claim(self.worker_id, list(self.models), self._choose, lease_s=self.lease_s,
                                        limit=4 * self.max_batch)
            except Exception:
                log.exception("claim failed", extra={"worker": self.worker_id})
                rows = []
            if rows:
                break
            with self._cond:
                self._cond.wait(self.poll_s)
        self.metrics.observe("claim_seconds", time.monotonic() - start)
        batch, claims = [], {}
        for row in rows:
            job = Job(row["id"], Request.from_json(row["request"]), kind=row["kind"], status="running",
                      created=row["created"], started=row["started"])
            job.deadline = time.monotonic() + row["remaining"]
            claims[job.id] = row["attempt"]
            if row["attempt"] > 1:
                self.metrics.inc("reruns_total")
            self.metrics.observe("queue_wait_seconds", max(0.0, row["started"] - row["created"]))
            batch.append(job)
        with self._cond:
            self._claims = claims
        log.info("batch claimed", extra={"jobs": list(claims), "worker": self.worker_id,
                                         "attempts": list(claims.values())})
        return batch

    def _choose(self, rows: list[dict]) -> tuple[list, list]:
        """Of the oldest queued jobs (rows, oldest first): the oldest that this worker can run, and those after
        it that can share its forward passes, up to max_batch images; and the ones it cannot run, with why."""
        picked, invalid, key, images = [], [], None, 0
        for row in rows:
            try:
                request = self._prepare(Request.from_json(row["request"]))
            except FieldError as e:
                invalid.append((row, str(e)))
                continue
            except Exception as e:  # an unreadable request: fail it, not the worker
                invalid.append((row, f"the request cannot be read ({type(e).__name__}: {e})"))
                continue
            job_key = self._key(Job(row["id"], request))
            if key is None:
                key = job_key
            elif job_key != key or images + request.n > self.max_batch:
                continue
            picked.append((row, request.to_json()))
            images += request.n
        return picked, invalid

    def _publish(self, progress: dict) -> None:
        """Write each running job's progress to its row (renewing the lease); a job that is no longer this
        worker's (cancelled, or claimed again after its lease expired) is dropped at the next step."""
        updates = [(job.id, self._claims[job.id], data) for job, data in progress.items() if job.id in self._claims]
        self._lost(progress, self.store.progress(self.worker_id, updates, self.lease_s))

    def _renew(self) -> None:
        with self._cond:
            running = [job for job in self._running if job.id in self._claims]
            claims = [(job.id, self._claims[job.id]) for job in running]
        if claims:
            self._lost(running, self.store.renew(self.worker_id, claims, self.lease_s))

    def _lost(self, jobs, kept: set[str]) -> None:
        for job in jobs:
            if job.id not in kept and job.status not in FINAL:
                with job._lock:
                    job.status = "cancelled"  # in this process only: the row says what really happened
                log.info("job no longer ours", extra={"job": job.id, "worker": self.worker_id})

    def _finish(self, job: Job, status: str, *, error: str | None = None, result: dict | None = None,
                failure: str | None = None) -> bool:
        """Make a claimed job final in the store, if the claim still holds (then its files are written with it)."""
        with job._lock:
            if job.status in FINAL:
                self.store.discard(job.id)
                return False
            job.status, job.finished, job.error, job.result, job.failure = status, time.time(), error, result, failure
        attempt = self._claims.get(job.id)
        changed = self.store.finish(self.worker_id if attempt is not None else None, job.id, attempt, status,
                                    error=error, failure=failure, result=result)
        if changed:
            self.metrics.inc("jobs_total", status=status)
            log.info(f"job {status}", extra={"job": job.id, "error": error, "worker": self.worker_id})
        job.done.set()
        return changed

    def _finish_batch(self, batch: list[Job], result, elapsed: float) -> None:
        if result is None and self._abort:  # shut down past the grace period: back to the queue, for another worker
            for job in batch:
                if job.status not in FINAL:
                    self._requeue(job)
            return
        super()._finish_batch(batch, result, elapsed)

    def _requeue(self, job: Job) -> None:
        if job.id in self._claims:
            self.store.release(self.worker_id, job.id, self._claims[job.id])

    # --- what every role does in the background -----------------------------------------------------------

    def _maintain(self) -> None:
        while not self._closed:
            time.sleep(self.poll_s)
            try:
                self._maintain_once()
            except Exception:
                if self._closed:
                    return
                self._store_ok = False
                self.metrics.inc("store_errors_total")
                log.exception("job store unreachable", extra={"worker": self.worker_id})

    def _maintain_once(self) -> None:
        """Follow the watched jobs; every lease_s / 3 renew the running batch's lease; once a second re-queue
        expired leases, fail queued jobs past their deadline and (a worker, once ready) send a heartbeat."""
        now = time.monotonic()
        self._poll()
        if self.role != "frontend" and now - self._renewed >= self.lease_s / 3:
            self._renewed = now
            self._renew()
        if now - self._checked >= 1.0:
            self._checked = now
            for job_id in self.store.requeue_expired():
                self.metrics.inc("lease_expiries_total")
                log.warning("lease expired: job re-queued", extra={"job": job_id, "worker": self.worker_id})
            for job_id in self.store.expire_deadlines(QUEUED_TOO_LONG):
                log.info("job failed: deadline", extra={"job": job_id, "worker": self.worker_id})
            if self.role != "frontend" and self._ready:
                self._heartbeat()
        self._store_ok = True

    def _make_metrics(self, labels):
        m = super()._make_metrics(labels)
        m.histogram("claim_seconds", "Time a worker took to claim its next batch from the shared queue.")
        m.counter("lease_expiries_total", "Running jobs whose lease expired (their worker died or stalled), "
                                          "re-queued by this process.")
        m.counter("reruns_total", "Jobs this worker claimed again after an earlier attempt's lease expired.")
        m.counter("store_errors_total", "Failed maintenance rounds against the job store.")
        m.gauge("workers", "Live workers on the shared queue.", lambda: len(self._workers()))
        return m
