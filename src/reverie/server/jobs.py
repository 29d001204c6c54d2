"""The native async job API: submit, poll, stream events (SSE), cancel, fetch results by id (images as PNG,
videos as MP4, or GIF where PyAV is missing, each with a PNG poster under images/)."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, HTTPException, Path
from fastapi.responses import FileResponse, StreamingResponse

from .common import decode_image, prepare
from .engine import Engine
from .job import FINAL, Job, Request, result_urls
from .schemas import JobAccepted, JobBody, Limits
from .store import VIDEO_FORMATS

JobId = Path(pattern=r"^[0-9a-f]{32}$", description="a job id from POST /v1/jobs")
HEARTBEAT_S = 15.0  # an SSE comment this often keeps proxies from closing a quiet stream


def router(engine: Engine, limits: Limits) -> APIRouter:
    api = APIRouter(tags=["jobs"])

    def find(job_id: str) -> Job:
        job = engine.get(job_id)
        if job is None:
            raise HTTPException(404, f"job_id: no job {job_id}")
        return job

    @api.post("/v1/jobs", status_code=202, response_model=JobAccepted)
    def submit(body: JobBody) -> dict:
        """Queue a generation; answers at once with the job id and its queue position."""
        request = Request(prompt=str(body.prompt), negative_prompt=body.negative_prompt, steps=body.steps,
                          guidance_scale=body.guidance_scale, sampler=body.sampler, scheduler=body.scheduler,
                          seed=body.seed, width=body.width, height=body.height, n=body.n, model=body.model,
                          image=decode_image("image", body.image), mask=decode_image("mask", body.mask),
                          strength=body.strength, control_image=decode_image("control_image", body.control_image),
                          control_type=body.control_type, controlnet_scale=body.controlnet_scale,
                          refiner=body.refiner, refiner_switch_at=body.refiner_switch_at,
                          preview=body.preview, timeout_s=body.timeout_s, num_frames=body.num_frames, fps=body.fps,
                          **body.family_fields())
        job = engine.submit(prepare(engine, limits, request), kind="job")
        return dict(id=job.id, position=engine.position(job), status=job.status)

    @api.get("/v1/jobs/{job_id}")
    def status(job_id: str = JobId) -> dict:
        """A job's state: status, queue position, progress, and its images (and videos) once done."""
        job = find(job_id)
        view = job.view()
        view["position"] = engine.position(job) if job.status == "queued" else None
        return view | result_urls(job)

    @api.delete("/v1/jobs/{job_id}")
    def cancel(job_id: str = JobId) -> dict:
        """Cancel a queued or running job (a running one stops at its next denoising step)."""
        job = find(job_id)
        if not engine.cancel(job.id):
            raise HTTPException(409, f"job_id: job {job.id} is already {job.status}")
        return dict(id=job.id, status=job.status)

    @api.get("/v1/jobs/{job_id}/images/{index}.png", response_class=FileResponse,
             responses={200: {"content": {"image/png": {}}}})
    def image(index: int, job_id: str = JobId) -> FileResponse:
        """Image `index` of a finished job, a PNG with its generation parameters."""
        path = engine.image_path(find(job_id).id, index)
        if path is None:
            raise HTTPException(404, f"index: job {job_id} has no finished image {index}")
        return FileResponse(path, media_type="image/png")

    def video(job_id: str, index: int, kind: str) -> FileResponse:
        path = engine.video_path(find(job_id).id, index, kind)
        if path is None:
            raise HTTPException(404, f"index: job {job_id} has no finished {kind} video {index}")
        return FileResponse(path, media_type=VIDEO_FORMATS[kind])

    @api.get("/v1/jobs/{job_id}/videos/{index}.mp4", response_class=FileResponse,
             responses={200: {"content": {"video/mp4": {}}}})
    def video_mp4(index: int, job_id: str = JobId) -> FileResponse:
        """Video `index` of a finished video job, H.264 MP4 with its parameters (where the server has PyAV)."""
        return video(job_id, index, "mp4")

    @api.get("/v1/jobs/{job_id}/videos/{index}.gif", response_class=FileResponse,
             responses={200: {"content": {"image/gif": {}}}})
    def video_gif(index: int, job_id: str = JobId) -> FileResponse:
        """Video `index` of a finished video job as a GIF (the server's format without PyAV)."""
        return video(job_id, index, "gif")

    @api.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def events(job_id: str = JobId) -> StreamingResponse:
        """Server-sent events: queued, started, progress (step, steps, sigma, elapsed_s, previews), then one of
        done, failed, cancelled. Past events are replayed first (only the latest progress)."""
        job = find(job_id)
        return StreamingResponse(_stream(job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return api


async def _stream(job: Job):
    history, queue = job.listen()
    try:
        for event, data in history:
            yield _sse(event, data)
            if event in FINAL:
                return
        while True:
            try:
                event, data = await asyncio.wait_for(queue.get(), HEARTBEAT_S)
            except asyncio.TimeoutError:
                yield ": keep-alive\n\n"
                continue
            yield _sse(event, data)
            if event in FINAL:
                return
    finally:
        job.unlisten(queue)


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"
