"""What the dialects share: base64 images in, waiting for a job while watching the client, errors out."""

from __future__ import annotations

import asyncio
import base64
import binascii

from fastapi import HTTPException
from starlette.requests import Request as HTTPRequest

from . import family as families
from .engine import Engine
from .job import FINAL, FieldError, Job, Request
from .schemas import Limits


def decode_image(field: str, data: str | None) -> bytes | None:
    """base64 (optionally a data: URL) -> bytes; a FieldError naming the field when it is not base64."""
    if data is None or data == "":
        return None
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "must be base64 (or a data: URL) of a PNG or JPEG image") from None


def prepare(engine: Engine, limits: Limits, request: Request, names: dict | None = None,
            defaults: dict | None = None, *, images_only: bool = False) -> Request:
    """Defaults filled in and every check done (limits, then the model's, then the limits on the filled-in size),
    errors naming the fields as the dialect names them (names: engine field -> dialect field). defaults: the
    dialect's own steps / guidance_scale / sampler defaults for SD models (Engine.prepare). images_only: the
    dialect answers with images, so a video model is a 422 naming model."""
    try:
        limits.check(request)
        model = request.model or engine.default_model
        if images_only and model in engine.models and families.is_video(engine.models[model]):
            raise FieldError("model", f"{model!r} makes videos: use POST /v1/videos or /v1/jobs (image models here: "
                                      f"{[n for n, p in engine.models.items() if not families.is_video(p)]})")
        request = engine.prepare(request, defaults)
        limits.check(request)
    except FieldError as e:
        if names and e.field in names:
            raise FieldError(names[e.field], e.message) from None
        raise
    return request


async def run_sync(engine: Engine, request: Request, http: HTTPRequest) -> Job:
    """Submit a job for a client that waits for the answer; cancel it if the client goes away."""
    job = engine.submit(request, kind="sync")
    _, events = job.listen()
    try:
        while job.status not in FINAL:
            try:
                await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                pass
            if job.status not in FINAL and await http.is_disconnected():
                engine.cancel(job.id, "the client disconnected")
    except asyncio.CancelledError:  # the server is shutting the connection down
        engine.cancel(job.id, "the request was cancelled")
        raise
    finally:
        job.unlisten(events)
    return job


def raise_for_job(job: Job) -> None:
    """Turn a job that did not finish into the HTTP error a synchronous client gets."""
    if job.status == "done":
        return
    if job.status == "cancelled":
        raise HTTPException(409, f"the job was cancelled: {job.error}")
    error = job.error or "the job failed"
    if job.failure == "deadline":
        raise HTTPException(504, error)
    raise HTTPException(422 if job.failure == "invalid" else 500, error)


def images_b64(engine: Engine, job: Job) -> list[str]:
    """The PNG files of a finished job (with their metadata), base64-encoded."""
    return [base64.b64encode(engine.image_path(job.id, i).read_bytes()).decode() for i in range(job.request.n)]
