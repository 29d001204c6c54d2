"""The web playground: a page at `/` that makes diffusion visible, and the server-side math it draws.

The page (static/index.html, app.js, plot.js, style.css; shipped in the package, no CDN) shows

  * the forward process q(x_t | x_0) for a picked or uploaded image at any t or sigma, the curves of
    alphabar and SNR over t for the linear / scaled-linear / cosine schedules and the flow times of a
    rectified-flow schedule with its shift, and the sigmas each sampler visits (and where it evaluates the
    denoiser) for a number of steps on the served model's schedule: VE sigmas for DDPM models (SD, DiT),
    flow times t in [0, 1] for flow-matching models (SD3, FLUX), with the samplers that run on it;
  * the reverse process, streamed step by step from the native job API (`/v1/jobs`, reverie.server.app);
  * a guidance-scale and a sampler comparison, and image editing (img2img, inpainting, ControlNet), all
    through the same job API.

This module only does the math the page must not re-implement in JavaScript: every number comes from
reverie.schedules, reverie.flow and reverie.samplers. `router` is an APIRouter that create_app includes; the
served model is app.state.engine's default (or ?model=), and without an engine the shipped shapes model.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse, HTMLResponse
from PIL import Image
from pydantic import BaseModel, Field
from starlette.requests import Request as HTTPRequest

from ..data.folder import resize_center_crop, to_rgb, to_tensor
from ..flow import FlowSchedule
from ..samplers import resolve
from ..sampling import sampling_for
from ..schedules import DiscreteSchedule, add_noise
from . import family as families

STATIC = Path(__file__).parent / "static"
BUNDLED_SCHEDULER = Path(__file__).parent.parent / "bundled" / "shapes" / "scheduler" / "scheduler_config.json"

# The three classic training schedules, with the betas each was published with.
SCHEDULES = {
    "linear": DiscreteSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),  # DDPM (Ho et al. 2020)
    "scaled_linear": DiscreteSchedule(beta_schedule="scaled_linear"),  # Stable Diffusion, the shipped model
    "cosine": DiscreteSchedule(beta_schedule="squaredcos_cap_v2"),  # Nichol & Dhariwal 2021
}
ScheduleName = Literal["linear", "scaled_linear", "cosine"]

# The samplers the page offers, by the labels people know from A1111 (any name resolve() takes works in the
# API): every DDPM sampler in reverie.samplers.SAMPLERS, and the schedules that matter most.
PAGE_SAMPLERS = ("Euler", "Euler a", "Heun", "LMS", "LMS Karras", "DDIM", "DDPM", "DPM++ 2M", "DPM++ 2M Karras",
                 "DPM++ 2M Exponential", "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "DPM++ SDE Karras", "UniPC", "LCM")
DEFAULT_SAMPLER = "DPM++ 2M"  # the pipeline's default, dpmpp_2m
DEFAULT_FLOW_SAMPLER = "Euler"  # FlowMatchEulerDiscreteScheduler, SD3's and FLUX's own
DEFAULT_SHIFT = 3.0  # SD3's flow shift, for the flow curve when no flow model is served

MAX_IMAGE_BYTES = 8 * 2**20  # decoded upload size
MAX_IMAGE_PIXELS = 4096 * 4096  # checked before the pixels are decoded
NUM_SAMPLES = 8  # built-in pictures from the shapes data set
SIGMA_RANGE = (1e-4, 1e5)  # noise levels the forward view accepts: SNR from 1e8 down to 1e-10
NOISE_RANGE = 2.5  # the noise image maps eps in [-2.5, 2.5] (98.8% of a unit Gaussian) to black..white

router = APIRouter()


# --- the page ---------------------------------------------------------------------------------------------

_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})


@router.get("/playground/static/{name}", include_in_schema=False)
def static_file(name: str) -> FileResponse:
    """A file shipped in static/ (by exact name: nothing outside that folder can be reached)."""
    files = {p.name: p for p in STATIC.iterdir() if p.is_file() and p.suffix in _CONTENT_TYPES}
    if name not in files:
        raise HTTPException(404, f"no static file {name!r}")
    path = files[name]
    return FileResponse(path, media_type=_CONTENT_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})


# --- images in and out ----------------------------------------------------------------------------------


def decode_image(field: str, data: str) -> Image.Image:
    """A base64 PNG/JPEG/WebP (or a data: URL of one) -> RGB PIL image; ValueError naming `field` if not."""
    if not isinstance(data, str) or not data:
        raise ValueError(f"{field} must be a base64-encoded image (PNG, JPEG or WebP)")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ValueError(f"{field} is larger than {MAX_IMAGE_BYTES // 2**20} MB")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field} is not valid base64") from None
    unreadable = ValueError(f"{field} is not a readable image (PNG, JPEG or WebP)")
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only
    except Exception:  # PIL raises many types for a broken file
        raise unreadable from None
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise ValueError(f"{field} has {image.width}x{image.height} pixels; at most 4096x4096 are allowed")
    try:
        image.load()
    except Exception:
        raise unreadable from None
    return to_rgb(image)


def to_data_url(pixels: torch.Tensor) -> str:
    """(3, H, W) in [-1, 1] -> a PNG data: URL."""
    arr = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@lru_cache(maxsize=4)
def _shapes(size: int):
    from ..data.shapes import ShapesDataset

    return ShapesDataset(size=NUM_SAMPLES, seed=0, resolution=size, two_object_fraction=0.5, detail=1.0)


def sample_image(index: int, size: int) -> Image.Image:
    if not 0 <= index < NUM_SAMPLES:
        raise ValueError(f"sample must be in [0, {NUM_SAMPLES - 1}]; got {index}")
    return _shapes(size).image(index)


@router.get("/playground/samples")
def samples(size: int = Query(64, ge=16, le=256)) -> dict:
    """The built-in pictures (from the shapes data set) with their captions."""
    data = _shapes(size)
    return {"samples": [{"index": i, "caption": data.captions[i], "image": to_data_url(to_tensor(data.image(i)))}
                        for i in range(NUM_SAMPLES)]}


# --- the forward process --------------------------------------------------------------------------------


def forward_process(x0: torch.Tensor, schedule: DiscreteSchedule, *, t: int | None = None,
                    sigma: float | None = None, seed: int = 0) -> dict:
    """Noise x0 (3, H, W) in [-1, 1] to level t (a training timestep) or sigma (VE noise level).

    x_t = sqrt(alphabar) x0 + sqrt(1 - alphabar) eps (DDPM eq. 4), with alphabar = 1 / (1 + sigma^2);
    the same seed gives the same eps at every level, so sliding t shows one noise growing."""
    T = schedule.num_train_timesteps
    if (t is None) == (sigma is None):
        raise ValueError("give exactly one of t and sigma")
    if t is not None:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < T:
            raise ValueError(f"t must be an integer in [0, {T - 1}]; got {t!r}")
        alphabar = schedule.alphas_cumprod[t].double()
        sigma_value = ((1 - alphabar) / alphabar).sqrt().item()
        t_value = float(t)
    else:
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and SIGMA_RANGE[0] <= sigma <= SIGMA_RANGE[1]):
            raise ValueError(f"sigma must be a number in [{SIGMA_RANGE[0]}, {SIGMA_RANGE[1]}]; got {sigma!r}")
        sigma_value = float(sigma)
        alphabar = torch.tensor(1 / (1 + sigma_value**2), dtype=torch.float64)
        t_value = schedule.sigma_to_t(torch.tensor([sigma_value], dtype=torch.float64), "log").item()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))  # (3, H, W)
    x_t = add_noise(x0, noise, alphabar.float())
    snr = (alphabar / (1 - alphabar)).item()
    return {
        "t": t_value, "sigma": sigma_value, "alphabar": alphabar.item(), "snr": snr, "snr_db": 10 * math.log10(snr),
        "signal_scale": alphabar.sqrt().item(), "noise_scale": (1 - alphabar).sqrt().item(),
        "x0": to_data_url(x0), "x_t": to_data_url(x_t), "noise": to_data_url(noise / NOISE_RANGE),
    }


class ForwardRequest(BaseModel):
    image: str | None = Field(None, description="base64 image or data: URL; default: a built-in sample")
    sample: int = Field(0, ge=0, lt=NUM_SAMPLES, description="built-in sample used when no image is given")
    t: int | None = Field(None, ge=0, le=999, description="training timestep; default 500 when sigma is absent")
    sigma: float | None = Field(None, ge=SIGMA_RANGE[0], le=SIGMA_RANGE[1], description="VE noise level instead of t")
    schedule: ScheduleName = "scaled_linear"
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the noise")
    size: int = Field(64, ge=16, le=256, description="the image is resized and centre-cropped to size x size")


@router.post("/playground/forward")
def forward(request: ForwardRequest) -> dict:
    """x_t, the noise and the SNR for an image at t or sigma on one of SCHEDULES."""
    t = request.t if request.t is not None or request.sigma is not None else 500
    if t is not None and request.sigma is not None:
        raise HTTPException(422, "give either t or sigma, not both")
    try:
        image = (decode_image("image", request.image) if request.image is not None
                 else sample_image(request.sample, request.size))
        x0 = to_tensor(resize_center_crop(image, request.size))  # (3, size, size)
        result = forward_process(x0, SCHEDULES[request.schedule], t=t, sigma=request.sigma, seed=request.seed)
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    return {"schedule": request.schedule, "seed": request.seed, **result}


# --- schedule curves ------------------------------------------------------------------------------------


def served(http: HTTPRequest, model: str | None = None):
    """(name, Pipeline) of the served model (`model`, else the engine's default); None without an engine."""
    engine = getattr(http.app.state, "engine", None)
    models = engine.models if engine is not None else {}
    if model is None and (engine is None or engine.default_model not in models):
        return None  # no server, or its models are still loading: the shipped model's schedule
    name = model or engine.default_model
    if name not in models:
        raise HTTPException(422, f"model: must be one of {sorted(models)}; got {name!r}")
    return name, models[name]


def _mu(pipe) -> float | None:
    """The dynamic shift of a flow model at its default size (FLUX), None for a static shift."""
    size = pipe.default_size // pipe.downsample_factor
    return pipe.family.mu(pipe, (1, pipe.family.latent_channels(pipe), size, size))


def flow_curves(schedule: FlowSchedule, points: int, mu: float | None = None) -> dict:
    """The flow time sigma(t) (the shifted t, Esser et al. 2024 eq. 23; FLUX: by mu) over t in (0, 1), with the
    signal and noise scales of x_t = (1 - sigma) x0 + sigma eps and the SNR ((1 - sigma) / sigma)^2."""
    t = torch.linspace(0, 1, points + 2, dtype=torch.float64)[1:-1]  # (0, 1): the SNR is finite inside
    sigma = schedule.time_shift(t, mu)
    return {"t": t.tolist(), "sigma": sigma.tolist(), "signal_scale": (1 - sigma).tolist(),
            "snr": ((1 - sigma) / sigma).square().tolist(),
            "shift": math.exp(mu) if mu is not None and schedule.time_shift_type == "exponential"
            else (mu if mu is not None else schedule.shift), "dynamic": mu is not None}


@router.get("/playground/schedules")
def schedules(http: HTTPRequest, points: int = Query(200, ge=2, le=1000),
              shift: float | None = Query(None, gt=0, le=100, description="the flow curve's shift; default: the "
                                                                          "served flow model's, else 3 (SD3)"),
              model: str | None = Query(None, description="a served model; default: the server's default")) -> dict:
    """alphabar, sigma and SNR at `points` timesteps spread over [0, T - 1], for each of SCHEDULES; and `flow`:
    the flow times a rectified-flow schedule with `shift` visits over t in (0, 1) (the served flow model's own
    schedule when no shift is given)."""
    found = served(http, model)
    pipe = found[1] if found else None
    if shift is not None:
        flow = flow_curves(FlowSchedule(shift=shift), points)
    elif pipe is not None and pipe.sampling.kind == "flow":
        flow = flow_curves(pipe.schedule, points, _mu(pipe) if pipe.schedule.use_dynamic_shifting else None)
    else:
        flow = flow_curves(FlowSchedule(shift=DEFAULT_SHIFT), points)
    kind = pipe.sampling.kind if pipe is not None else "vp"
    out = {}
    for name, schedule in SCHEDULES.items():
        T = schedule.num_train_timesteps
        t = torch.linspace(0, T - 1, points).round().long()
        alphabar = schedule.alphas_cumprod.double()[t]
        out[name] = {"alphabar": alphabar.tolist(), "sigma": ((1 - alphabar) / alphabar).sqrt().tolist(),
                     "snr": (alphabar / (1 - alphabar)).tolist(),
                     "betas": [schedule.beta_schedule, schedule.beta_start, schedule.beta_end]}
    model_beta = (pipe.schedule.beta_schedule if kind == "vp" else None) if pipe is not None \
        else model_schedule().beta_schedule
    return {"t": t.tolist(), "num_train_timesteps": T, "model_schedule": model_beta, "model_kind": kind,
            "model": found[0] if found else None, "schedules": out, "flow": flow}


# --- the sigmas a sampler visits --------------------------------------------------------------------------


@lru_cache(maxsize=1)
def model_schedule() -> DiscreteSchedule:
    """The training schedule of the shipped shapes model."""
    return DiscreteSchedule.from_config(json.loads(BUNDLED_SCHEDULER.read_text()))


def sampler_sigmas(sampler: str, steps: int, schedule: DiscreteSchedule, scheduler: str | None = None) -> dict:
    """The sigmas `sampler` steps through for `steps` steps on `schedule`, and the sigmas at which it calls
    the denoiser (Heun and DPM++ SDE call it twice a step): found by running the sampler on a one-pixel
    image with a denoiser that records its noise levels."""
    choice = resolve(sampler, scheduler)
    if choice.family == "flow":
        raise ValueError(f"sampler {sampler!r} is for flow-matching models; the shipped model is a DDPM model")
    sigmas = schedule.sampling_sigmas(steps, choice.schedule, choice.family)
    evaluations = []

    def recording_denoiser(x, sigma):
        evaluations.append(sigma[0].item())
        return torch.zeros_like(x)

    x = torch.ones(1, 1, 1, 1) * schedule.initial_noise_scale(sigmas[0].item(), choice.family)
    choice(recording_denoiser, x, sigmas, generator=torch.Generator().manual_seed(0))
    return {"sampler": sampler, "name": choice.name, "schedule": choice.schedule, "family": choice.family,
            "steps": steps, "sigmas": sigmas.tolist(), "evaluations": evaluations}


def flow_sampler_sigmas(pipe, sampler: str, steps: int, scheduler: str | None = None,
                        shift: float | None = None) -> dict:
    """The flow times t in [0, 1] `sampler` steps through on a flow model's schedule (with another `shift` if
    given), exactly as the pipeline spaces them (FLUX: dynamic shift at the default size), and the times at
    which it calls the denoiser: found by running reverie.flow.sample on a one-pixel image."""
    choice = families.sampler_choice(pipe, sampler, scheduler)  # a FieldError (ValueError) names the field
    schedule = pipe.schedule if shift is None else dataclasses.replace(pipe.schedule, shift=float(shift))
    sampling = sampling_for(schedule)
    sigmas = sampling.sigmas(steps, choice, mu=_mu(pipe))
    evaluations = []

    def recording_denoiser(x, t):
        evaluations.append(float(t.reshape(-1)[0]))
        return torch.zeros_like(x)

    sampling.run(choice, recording_denoiser, torch.ones(1, 1, 1, 1), sigmas, generator=torch.Generator().manual_seed(0))
    return {"sampler": sampler, "name": choice.name, "schedule": choice.schedule, "family": choice.family,
            "steps": steps, "sigmas": sigmas.tolist(), "evaluations": evaluations}


def _page_samplers(kind: str) -> list[str]:
    """PAGE_SAMPLERS that run on a model of schedule `kind` (no DDIM / DDPM on flow models)."""
    if kind == "vp":
        return list(PAGE_SAMPLERS)
    return [label for label in PAGE_SAMPLERS if resolve(label).flow_family is not None]


@router.get("/playground/samplers")
def samplers(http: HTTPRequest, model: str | None = Query(None, description="a served model; default: the "
                                                                             "server's default")) -> dict:
    """The samplers the page offers for the served model's schedule kind, each with the reverie sampler and
    sigma schedule it resolves to."""
    found = served(http, model)
    kind = found[1].sampling.kind if found else "vp"
    choices = [(label, resolve(label)) for label in _page_samplers(kind)]
    out = {"default": DEFAULT_SAMPLER if kind == "vp" else DEFAULT_FLOW_SAMPLER, "kind": kind,
           "model": found[0] if found else None,
           "samplers": [{"label": label, "name": c.name, "schedule": c.schedule, "family": c.family}
                        for label, c in choices]}
    if kind == "flow":
        out["shift"] = found[1].schedule.shift
    return out


@router.get("/playground/sigmas")
def sigmas(http: HTTPRequest, sampler: list[str] | None = Query(None, description="sampler names (repeat for several)"),
           steps: int = Query(20, ge=1, le=200), scheduler: str | None = Query(None),
           shift: float | None = Query(None, gt=0, le=100, description="flow models: another shift"),
           model: str | None = Query(None, description="a served model; default: the server's default")) -> dict:
    """For each sampler (default: the page's for the model), the noise levels it visits on the served model's
    schedule (the shipped model's without a server): VE sigmas on DDPM models, flow times t in [0, 1] on flow
    models (kind "flow", with the shift used)."""
    found = served(http, model)
    pipe = found[1] if found else None
    kind = pipe.sampling.kind if pipe is not None else "vp"
    names = sampler or _page_samplers(kind)
    if len(names) > 20:
        raise HTTPException(422, f"sampler: at most 20 samplers per request; got {len(names)}")
    if shift is not None and kind != "flow":
        raise HTTPException(422, "shift: only flow-matching models (SD3, FLUX) have a schedule shift")
    try:
        if kind == "flow":
            results = [flow_sampler_sigmas(pipe, name, steps, scheduler, shift) for name in names]
        else:
            schedule = pipe.schedule if pipe is not None else model_schedule()
            results = []
            for name in names:
                try:
                    results.append(sampler_sigmas(name, steps, schedule, scheduler))
                except ValueError:
                    if sampler is not None:  # a sampler asked for by name says why; the page's own list
                        raise  # drops those that cannot take this many steps (LCM: original_inference_steps)
    except ValueError as e:
        raise HTTPException(422, str(e)) from None
    out = {"steps": steps, "kind": kind, "model": found[0] if found else None, "samplers": results}
    if kind == "flow":
        used = pipe.schedule.shift if shift is None else shift
        return out | {"sigma_min": 0.0, "sigma_max": 1.0, "shift": used,
                      "dynamic_shift": pipe.schedule.use_dynamic_shifting}
    schedule = pipe.schedule if pipe is not None else model_schedule()
    return out | {"sigma_min": schedule.sigma_min, "sigma_max": schedule.sigma_max}
