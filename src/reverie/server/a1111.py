"""AUTOMATIC1111-compatible routes: /sdapi/v1/txt2img, img2img, samplers, schedulers, progress, png-info, interrupt.

Field names and answer shapes follow A1111's modules/api/models.py; fields reverie does not implement
(restore_faces, enable_hr, styles, ...) are accepted and ignored. Unlike A1111, requests do not take a global
lock: they queue in the engine and share forward passes.
"""

from __future__ import annotations

import json
import time

from fastapi import APIRouter
from starlette.requests import Request as HTTPRequest

from ..metadata import SCHEDULE_TYPES, infotext, model_hash, read_png_info, sampler_label
from ..samplers import resolve, valid_names
from . import family as families
from .common import decode_image, images_b64, prepare, raise_for_job, run_sync
from .engine import Engine
from .job import FieldError, Request
from .schemas import Img2ImgBody, Limits, PngInfoBody, Txt2ImgBody

_NAMES = {"guidance_scale": "cfg_scale", "n": "batch_size", "sampler": "sampler_name", "strength": "denoising_strength",
          "image": "init_images", "refiner": "refiner_checkpoint", "hr_strength": "denoising_strength"}
_FLUX_NAMES = {**_NAMES, "guidance_scale": "distilled_cfg_scale", "true_cfg_scale": "cfg_scale"}  # Forge's fields
DEFAULTS = dict(steps=20, guidance_scale=7.0, sampler="Euler")  # A1111's API defaults (SD models)


def title(name: str, pipe) -> str:
    """A1111's checkpoint title, "name [short hash]" (the hash when the model has a source file or folder)."""
    digest = _hash(pipe)
    return f"{name} [{digest}]" if digest else name


def _hash(pipe) -> str | None:
    try:
        return model_hash(pipe.source) if pipe.source is not None else None
    except (OSError, ValueError):
        return None


def router(engine: Engine, limits: Limits) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", tags=["a1111"])
    current = {"model": engine.default_model}  # A1111's loaded checkpoint: POST /options sets it

    def checkpoint(value, field: str) -> str:
        """A model's name from an sd_model_checkpoint value: its name or its title (A1111 clients send either)."""
        for name, pipe in engine.models.items():
            if value in (name, title(name, pipe)) or str(value).split(" [")[0] == name:
                return name
        others = [name for name in engine.model_names() if name not in engine.models]  # a shared queue's workers'
        if str(value).split(" [")[0] in others:
            return str(value).split(" [")[0]
        raise FieldError(field, f"must be one of {[title(n, p) for n, p in engine.models.items()] + others}; got "
                                f"{value!r}")

    def model_of(body: Txt2ImgBody) -> str:
        chosen = body.override_settings.get("sd_model_checkpoint")
        return current["model"] if chosen is None else checkpoint(chosen, "sd_model_checkpoint")

    async def generate(body: Txt2ImgBody, http: HTTPRequest, **edit) -> dict:
        model = model_of(body)
        pipe = engine.models.get(model)
        flux = pipe is not None and pipe.family.name == "flux"
        options = body.family_fields()
        if flux:  # Forge: distilled_cfg_scale is the distilled guidance, cfg_scale true CFG
            guidance = body.distilled_cfg_scale if pipe.network.config.guidance_embeds else None
            if options["true_cfg_scale"] is None:
                options["true_cfg_scale"] = body.cfg_scale
        else:
            guidance = body.cfg_scale
        refiner = None  # A1111 clients send "" or "None" for no refiner, and a switch point that then goes unused
        if body.refiner_checkpoint not in (None, "", "None"):
            refiner = checkpoint(body.refiner_checkpoint, "refiner_checkpoint")
        if pipe is not None and "prompt_syntax" in pipe.family.options:  # A1111 reads (word:1.3) and BREAK
            options["prompt_syntax"] = "a1111"
        edit = dict(edit, refiner=refiner, refiner_switch_at=body.refiner_switch_at if refiner else None,
                    subseed=None if body.subseed == -1 else body.subseed, subseed_strength=body.subseed_strength,
                    tiling=body.tiling)
        if body.enable_hr and "image" not in edit:  # A1111: the hires fix is a txt2img option
            edit |= dict(hr_scale=body.hr_scale, hr_upscaler=body.hr_upscaler or "Latent",
                         hr_second_pass_steps=body.hr_second_pass_steps, hr_strength=body.denoising_strength,
                         hr_resize_x=body.hr_resize_x, hr_resize_y=body.hr_resize_y)
        request = Request(prompt=body.prompt, negative_prompt=body.negative_prompt, steps=body.steps,
                          guidance_scale=guidance, sampler=body.sampler_name or body.sampler_index,
                          scheduler=body.scheduler, seed=None if body.seed == -1 else body.seed, width=body.width,
                          height=body.height, n=body.batch_size * body.n_iter, model=model, **options, **edit)
        request = prepare(engine, limits, request, _FLUX_NAMES if flux else _NAMES, DEFAULTS, images_only=True)
        job = await run_sync(engine, request, http)
        raise_for_job(job)
        params = job.result["params"]
        recorded = params[0] if params else {}  # as the worker that ran it recorded it (a front end may not hold it)
        r = job.request
        sampler = sampler_label(params[0]["sampler"], params[0].get("schedule") or "default",
                                params[0].get("sampler_options"))[0] if params else r.sampler
        info = dict(prompt=body.prompt, all_prompts=[body.prompt] * r.n,
                    negative_prompt=body.negative_prompt, all_negative_prompts=[body.negative_prompt] * r.n,
                    seed=job.seeds[0], all_seeds=job.seeds, subseed=r.subseed if r.subseed_strength else -1,
                    all_subseeds=[(r.subseed or 0) + i if r.subseed_strength else -1 for i in range(r.n)],
                    subseed_strength=r.subseed_strength, width=r.width, height=r.height, sampler_name=sampler,
                    cfg_scale=(r.true_cfg_scale or 1.0) if flux else r.guidance_scale, steps=r.steps,
                    batch_size=body.batch_size, n_iter=body.n_iter, restore_faces=False,
                    sd_model_name=r.model, family=recorded.get("family"),
                    sd_model_hash=recorded.get("model_hash") if pipe is None else _hash(pipe),
                    denoising_strength=edit.get("strength"), infotexts=[infotext(p) for p in params],
                    index_of_first_image=0, job_id=job.id,
                    job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)))
        if flux and pipe.network.config.guidance_embeds:
            info["distilled_cfg_scale"] = r.guidance_scale
        parameters = body.model_dump(exclude={"init_images"})
        return dict(images=images_b64(engine, job) if body.send_images else [], parameters=parameters,
                    info=json.dumps(info))

    @api.post("/txt2img")
    async def txt2img(body: Txt2ImgBody, http: HTTPRequest) -> dict:
        """Text to image; answers with base64 PNGs (with A1111 infotext), the parameters and an info JSON."""
        return await generate(body, http)

    @api.post("/img2img")
    async def img2img(body: Img2ImgBody, http: HTTPRequest) -> dict:
        """Image to image (and inpainting with `mask`) from the first of `init_images`."""
        if not body.init_images:
            raise FieldError("init_images", "give at least one base64 image")
        out = await generate(body, http, image=decode_image("init_images", body.init_images[0]),
                             mask=decode_image("mask", body.mask), strength=body.denoising_strength)
        if body.include_init_images:
            out["images"] += body.init_images[:1]
        return out

    def kind() -> str:
        return engine.models[current["model"]].sampling.kind if current["model"] in engine.models else "vp"

    @api.get("/samplers")
    def samplers() -> list[dict]:
        """A1111's sampler labels and reverie's own names (aliases: what each resolves to) that run on the
        current model (flow-matching models: no DDIM / DDPM; DDPM models: no flow solvers)."""
        allowed = set(families.allowed_samplers(kind()))
        out = []
        for name in valid_names():
            choice = resolve(name)
            if choice.name in allowed:
                out.append(dict(name=name, aliases=[choice.name] if choice.name != name else [],
                                options={**choice.options, "scheduler": choice.schedule}))
        return out

    @api.get("/schedulers")
    def schedulers() -> list[dict]:
        """The schedule types of the current model's schedule kind (flow models also Simple, SGM Uniform, Beta)."""
        kinds = families.FLOW_KINDS if kind() == "flow" else families.VP_KINDS
        return [dict(name=name, label=label) for name, label in
                (("automatic", "Automatic"), *((k, v) for k, v in SCHEDULE_TYPES.items() if k in kinds))]

    @api.get("/sd-models")
    def sd_models() -> list[dict]:
        """The models this server holds, with their family (reverie's addition)."""
        held = [dict(title=title(name, pipe), model_name=name, hash=_hash(pipe), sha256=None,
                     filename=str(pipe.source) if pipe.source is not None else name, config=None,
                     family=pipe.family.name) for name, pipe in engine.models.items()]
        # on a shared queue (reverie.server.shared): the models only the cluster's workers hold, by name
        return held + [dict(title=name, model_name=name, hash=None, sha256=None, filename=name, config=None,
                            family=None) for name in engine.model_names() if name not in engine.models]

    @api.get("/loras")
    def loras() -> list[dict]:
        """The LoRAs of the server's --lora-dir (name, alias, path, metadata), for <lora:name:weight> tags."""
        return engine.loras.listing()

    @api.post("/refresh-loras")
    def refresh_loras() -> None:
        """Scan the LoRA folder again."""
        engine.loras.refresh()

    @api.get("/options")
    def options() -> dict:
        """The A1111 options reverie has: the current checkpoint."""
        name = current["model"]
        pipe = engine.models.get(name)
        return dict(sd_model_checkpoint=title(name, pipe) if pipe is not None else name,
                    sd_checkpoint_hash=_hash(pipe) if pipe is not None else None, samples_format="png",
                    CLIP_stop_at_last_layers=1)

    @api.post("/options")
    def set_options(body: dict) -> dict:
        """Set the current checkpoint (sd_model_checkpoint: a name or title from /sd-models) for this dialect's
        later requests; other options are accepted and ignored."""
        if "sd_model_checkpoint" in body:
            current["model"] = checkpoint(body["sd_model_checkpoint"], "sd_model_checkpoint")
        return {}

    @api.get("/progress")
    def progress(skip_current_image: bool = False) -> dict:
        """The progress of the running batch (A1111 has one global progress; so does this route)."""
        running = engine.running()
        state = dict(skipped=False, interrupted=False, job="", job_count=engine.queue_depth() + len(running),
                     job_timestamp="0", job_no=0, sampling_step=0, sampling_steps=0)
        if not running:
            return dict(progress=0.0, eta_relative=0.0, state=state, current_image=None, textinfo=None)
        job = running[0]
        p = job.progress or dict(step=0, steps=job.request.steps, elapsed_s=0.0)
        fraction = p["step"] / max(p["steps"], 1)
        eta = p["elapsed_s"] / fraction - p["elapsed_s"] if fraction > 0 else 0.0
        state.update(job=job.id, sampling_step=p["step"], sampling_steps=p["steps"],
                     job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)))
        image = None if skip_current_image else _last_preview(job)
        return dict(progress=round(fraction, 4), eta_relative=round(eta, 3), state=state, current_image=image,
                    textinfo=f"step {p['step']} of {p['steps']}")

    @api.post("/interrupt")
    def interrupt() -> dict:
        """Cancel the running batch's jobs (A1111's Interrupt)."""
        cancelled = [job.id for job in engine.running() if engine.cancel(job.id, "interrupted")]
        return dict(cancelled=cancelled)

    @api.post("/png-info")
    def png_info(body: PngInfoBody) -> dict:
        """The generation parameters a PNG carries: A1111's infotext, parsed, and the other text chunks."""
        data = decode_image("image", body.image)
        if data is None:
            raise FieldError("image", "give a base64 PNG")
        try:
            info = read_png_info(data)
        except ValueError as e:
            raise FieldError("image", str(e)) from None
        return dict(info=info["info"], items=info["items"], parameters=info["parameters"])

    return api


def _last_preview(job) -> str | None:
    for event, data in reversed(list(job._events)):
        if event == "progress" and "preview_x0" in data:
            return data["preview_x0"].partition(",")[2]
    return None

