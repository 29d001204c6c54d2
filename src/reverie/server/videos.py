"""OpenAI-compatible video generation, the Videos API of Sora 2 (OpenAI API reference, 2025), over reverie's video
models (Wan):

    POST   /v1/videos               form or JSON fields model, prompt, seconds, size "WxH", input_reference (an
                                    uploaded first frame, for image-to-video models: wan_i2v, spacetime)
                                    -> a video object {id, object: "video", status, progress, created_at, model,
                                    seconds, size, ...}
    GET    /v1/videos/{id}          the video object; status queued | in_progress | completed | failed
    GET    /v1/videos/{id}/content  the MP4 (variant=video, the default; a GIF where the server lacks PyAV), or
                                    the poster, its middle frame (variant=thumbnail, PNG)
    DELETE /v1/videos/{id}          cancels a queued or running video -> {id, object: "video.deleted", deleted}

A video is a native job (reverie.server.jobs) under the same id: /v1/jobs/{id}/events streams its steps. seconds
become frames at fps (16 unless given) by family.frames_for: the count the model's VAE takes nearest seconds * fps
(Wan: 1 + 4k; 4 s -> 65 frames); the object's seconds is the clip's real length, frames / fps ("4.0625").
OpenAI's ids look like "video_..."; reverie's are its job ids. Finished videos stay (reverie keeps results), so
DELETE answers 409 for them.
"""

from __future__ import annotations

import json
import math
from urllib.parse import parse_qsl

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import ValidationError
from starlette.requests import Request as HTTPRequest

from . import family as families
from .common import prepare
from .engine import Engine
from .job import FieldError, Job, Request
from .openai import parse_size
from .schemas import Limits, OpenAIVideoBody
from .store import VIDEO_FORMATS

VideoId = Path(pattern=r"^[0-9a-f]{32}$", description="a video id from POST /v1/videos")
STATUS = {"queued": "queued", "running": "in_progress", "done": "completed", "failed": "failed",
          "cancelled": "failed"}  # reverie's job status -> OpenAI's (which has no "cancelled")


def video_object(job: Job) -> dict:
    """A job as OpenAI's video object; progress is the percentage of denoising steps done."""
    r, status = job.request, STATUS[job.status]
    step = (job.progress or {}).get("step", 0)
    progress = 100 if status == "completed" else (math.floor(100 * step / r.steps) if status == "in_progress" else 0)
    error = None
    if status == "failed":
        error = {"code": "cancelled" if job.status == "cancelled" else job.failure or "failed",
                 "message": job.error or job.status}
    return dict(id=job.id, object="video", model=r.model, status=status, progress=progress,
                created_at=int(job.created), completed_at=int(job.finished) if status == "completed" else None,
                expires_at=None, error=error, size=f"{r.width}x{r.height}", seconds=f"{r.num_frames / r.fps:g}",
                remixed_from_video_id=None, num_frames=r.num_frames, fps=r.fps, seed=r.seed)


def request_for(engine: Engine, body: OpenAIVideoBody, reference: bytes | None = None) -> tuple[Request, dict]:
    """The engine Request for a video body and the names its errors take (engine field -> this API's field);
    `reference`: the uploaded input_reference image, an image-to-video model's first frame."""
    model = body.model or engine.default_model
    pipe = engine.models.get(model)
    if pipe is not None and not families.is_video(pipe):
        videos = [name for name, p in engine.models.items() if families.is_video(p)]
        raise FieldError("model", f"{model!r} makes images; video models here: {videos}")
    if body.input_reference is not None and reference is None:
        raise FieldError("input_reference", "upload the first frame as a file (multipart/form-data)")
    if reference is not None and pipe is not None and not pipe.family.first_frame:
        starts = [name for name, p in engine.models.items() if p.family.first_frame]
        raise FieldError("input_reference", f"{model!r} is text-to-video: no image to start from (image-to-video "
                                            f"models here: {starts})")
    width, height = parse_size(body.size)
    names = {"width": "size", "height": "size"}
    frames = body.num_frames
    if body.seconds is not None:
        if frames is not None:
            raise FieldError("seconds", "give seconds or num_frames, not both")
        try:
            seconds = float(body.seconds)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise FieldError("seconds", f"must be a number of seconds > 0 (e.g. \"4\"); got {body.seconds!r}")
        if pipe is not None:
            frames = families.frames_for(pipe, seconds, body.fps or families.VIDEO_FPS)
        names["num_frames"] = "seconds"
    request = Request(prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps,
                      guidance_scale=body.guidance_scale, sampler=body.sampler, scheduler=body.scheduler,
                      seed=body.seed, width=width, height=height, model=body.model, num_frames=frames, fps=body.fps,
                      shift=body.shift, max_sequence_length=body.max_sequence_length, image=reference)
    names["image"] = "input_reference"
    return request, names


async def read_fields(http: HTTPRequest) -> dict:
    """The request's fields from JSON, multipart/form-data (what OpenAI's SDKs send) or a urlencoded form; an
    uploaded file's field holds its bytes."""
    kind = http.headers.get("content-type", "")
    body = await http.body()
    try:
        if kind.startswith("multipart/form-data"):
            return _multipart(body, kind)
        if kind.startswith("application/x-www-form-urlencoded"):
            return dict(parse_qsl(body.decode(), keep_blank_values=True))
        fields = json.loads(body or b"{}")
    except (UnicodeDecodeError, ValueError) as e:
        raise FieldError("body", f"must be JSON, multipart/form-data or a urlencoded form ({e})") from None
    if not isinstance(fields, dict):
        raise FieldError("body", "must be a JSON object of fields")
    return fields


def _multipart(body: bytes, content_type: str) -> dict:
    """multipart/form-data (RFC 7578) through the standard library's MIME parser: field name -> text, or bytes
    for a file."""
    from email.parser import BytesParser
    from email.policy import HTTP

    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    if not message.is_multipart():
        raise ValueError("no parts found")
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        fields[name] = data if part.get_filename() is not None else data.decode()
    return fields


def router(engine: Engine, limits: Limits) -> APIRouter:
    api = APIRouter(tags=["openai"])

    def find(video_id: str) -> Job:
        job = engine.get(video_id)
        if job is None or job.request.num_frames is None:  # video requests always have their frame count
            raise HTTPException(404, f"video_id: no video {video_id}")
        return job

    @api.post("/v1/videos", openapi_extra={"requestBody": {"content": {
        "application/json": {"schema": OpenAIVideoBody.model_json_schema()},
        "multipart/form-data": {"schema": OpenAIVideoBody.model_json_schema()}}}})
    async def create(http: HTTPRequest) -> dict:
        """Queue a video; answers at once with the video object (status queued). Poll GET /v1/videos/{id}."""
        fields = await read_fields(http)
        reference = fields.get("input_reference")
        reference = reference if isinstance(reference, bytes) else None
        if reference is not None:
            fields["input_reference"] = "(an uploaded file)"
        try:
            body = OpenAIVideoBody.model_validate(fields)
        except ValidationError as e:
            raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
        request, names = request_for(engine, body, reference)
        job = engine.submit(prepare(engine, limits, request, names), kind="job")
        return video_object(job)

    @api.get("/v1/videos/{video_id}")
    def retrieve(video_id: str = VideoId) -> dict:
        """The video object: status, progress (percent of the denoising steps), and its size and length."""
        return video_object(find(video_id))

    @api.get("/v1/videos/{video_id}/content", response_class=FileResponse,
             responses={200: {"content": {"video/mp4": {}, "image/gif": {}, "image/png": {}}}})
    def content(video_id: str = VideoId, variant: str = Query("video", description="video, or thumbnail (PNG)")):
        """The finished video (MP4 with its parameters), or its poster (variant=thumbnail)."""
        job = find(video_id)
        if variant not in ("video", "thumbnail"):
            raise FieldError("variant", f"must be video or thumbnail (reverie makes no spritesheet); got {variant!r}")
        if job.status != "done":
            raise HTTPException(409, f"video_id: video {video_id} is {STATUS[job.status]}, not completed")
        if variant == "thumbnail":
            return FileResponse(engine.image_path(job.id, 0), media_type="image/png")
        kind = job.result["video_format"]
        path = engine.video_path(job.id, 0, kind)
        if path is None:
            raise HTTPException(404, f"video_id: the file of video {video_id} is gone")
        return FileResponse(path, media_type=VIDEO_FORMATS[kind])

    @api.delete("/v1/videos/{video_id}")
    def delete(video_id: str = VideoId) -> dict:
        """Cancel a queued or running video (a running one stops at its next denoising step)."""
        job = find(video_id)
        if not engine.cancel(job.id):
            raise HTTPException(409, f"video_id: video {job.id} is already {STATUS[job.status]}; reverie keeps "
                                     "finished videos")
        return {"id": job.id, "object": "video.deleted", "deleted": True}

    return api
