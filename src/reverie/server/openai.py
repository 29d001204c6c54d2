"""OpenAI-compatible image generation: POST /v1/images/generations (and GET /v1/models)."""

from __future__ import annotations

import re
import time

from fastapi import APIRouter
from starlette.requests import Request as HTTPRequest

from . import family as families
from .common import images_b64, prepare, raise_for_job, run_sync
from .engine import Engine
from .job import FieldError, Request
from .schemas import Limits, OpenAIImageBody

_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """"512x768" -> (512, 768); "auto" or None -> the model's native size."""
    if size is None or size == "auto":
        return None, None
    match = _SIZE.match(size)
    if not match:
        raise FieldError("size", f"must be WIDTHxHEIGHT (e.g. 64x64) or auto; got {size!r}")
    return int(match[1]), int(match[2])


def router(engine: Engine, limits: Limits) -> APIRouter:
    api = APIRouter(tags=["openai"])

    @api.post("/v1/images/generations")
    async def generations(body: OpenAIImageBody, http: HTTPRequest) -> dict:
        """Generate images and answer with them (b64_json) or with links to them (url)."""
        width, height = parse_size(body.size)
        request = Request(prompt=str(body.prompt), negative_prompt=body.negative_prompt, steps=body.steps,
                          guidance_scale=body.guidance_scale, sampler=body.sampler, scheduler=body.scheduler,
                          seed=body.seed, width=width, height=height, n=body.n, model=body.model,
                          **body.family_fields())
        request = prepare(engine, limits, request, {"width": "size", "height": "size"}, images_only=True)
        job = await run_sync(engine, request, http)
        raise_for_job(job)
        if body.response_format == "url":
            base = str(http.base_url).rstrip("/")
            data = [{"url": f"{base}/v1/jobs/{job.id}/images/{i}.png"} for i in range(job.request.n)]
        else:
            data = [{"b64_json": b} for b in images_b64(engine, job)]
        for item, seed in zip(data, job.seeds):
            item.update(revised_prompt=body.prompt, seed=seed)
        return {"created": int(job.created), "data": data}

    @api.get("/v1/models")
    def models() -> dict:
        """The models this server holds (the first is the default): native size, family, schedule kind ("vp" or
        "flow"), size multiple, the defaults a request gets, the family options it takes, the samplers that run on
        it, its shift (flow models), and the ControlNets that fit it (SD and SDXL models)."""
        data = []
        for name, pipe in engine.models.items():
            controls = engine.controlnets_for(pipe)  # what control_type may name
            data.append(dict(id=name, object="model", owned_by="reverie", default=name == engine.default_model,
                             width=pipe.default_size, height=pipe.default_size, controlnets=controls,
                             **families.describe(pipe)))
        for name in engine.model_names():  # a shared queue's front end: the models its workers hold, by name
            if name not in engine.models:
                data.append(dict(id=name, object="model", owned_by="reverie", default=name == engine.default_model,
                                 held_by="workers"))
        return {"object": "list", "data": data, "created": int(time.time())}

    return api
