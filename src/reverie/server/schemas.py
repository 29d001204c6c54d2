"""Request bodies of the three dialects (pydantic) and the server's limits.

The models say what each field is; `Limits` says how much one request may ask for, and is checked after
parsing so one server can be configured tighter than another. Unknown fields are ignored (clients of the
OpenAI and A1111 APIs send many that reverie does not implement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from ..pipeline import MAX_SEED
from .job import FieldError, Request

Seed = Field(None, ge=-1, le=MAX_SEED, description="-1 or null: random; image i gets seed + i")
Size = Field(None, ge=1, description="pixels; null: the model's native size")
Scale = Field(7.5, ge=0, le=100, allow_inf_nan=False)


@dataclass(frozen=True)
class Limits:
    """The most one request may ask for; more is a 422 naming the field."""

    max_width: int = 1024
    max_height: int = 1024
    max_steps: int = 150
    max_images: int = 8  # per request (n, batch_size * n_iter)
    max_prompt_chars: int = 2000
    max_body_bytes: int = 16 * 2**20  # the whole request body (base64 images included)

    def check(self, request: Request) -> None:
        """Raise FieldError for the first field over its limit."""
        checks = (("prompt", len(request.prompt), self.max_prompt_chars, "characters"),
                  ("negative_prompt", len(request.negative_prompt), self.max_prompt_chars, "characters"),
                  ("steps", request.steps, self.max_steps, "steps"),
                  ("n", request.n, self.max_images, "images"),
                  ("width", request.width or 0, self.max_width, "pixels"),
                  ("height", request.height or 0, self.max_height, "pixels"))
        for name, value, limit, unit in checks:
            if value > limit:
                raise FieldError(name, f"must be at most {limit} {unit} on this server; got {value}")


class JobBody(BaseModel):
    """POST /v1/jobs: reverie's native request."""

    prompt: str
    negative_prompt: str = ""
    steps: int = Field(20, ge=1)
    guidance_scale: float = Scale
    sampler: str = Field("dpmpp_2m", description="any name reverie.samplers.resolve accepts (GET /sdapi/v1/samplers)")
    scheduler: str | None = Field(None, description="schedule type: karras, exponential, normal, automatic")
    seed: int | None = Seed
    width: int | None = Size
    height: int | None = Size
    n: int = Field(1, ge=1, description="number of images")
    model: str | None = Field(None, description="a model id from GET /v1/models; null: the default")
    image: str | None = Field(None, description="base64 PNG/JPEG to edit (img2img, inpainting)")
    mask: str | None = Field(None, description="base64 mask for inpainting: white is repainted")
    strength: float = Field(0.75, ge=0, le=1, allow_inf_nan=False)
    control_image: str | None = Field(None, description="base64 control image")
    control_type: str | None = Field(None, description="which ControlNet (GET /v1/models lists them)")
    controlnet_scale: float = Field(1.0, ge=0, le=10, allow_inf_nan=False)
    preview: bool = Field(False, description="stream decoded previews with the progress events")
    timeout_s: float | None = Field(None, gt=0, allow_inf_nan=False, description="deadline; the server caps it")


class JobAccepted(BaseModel):
    id: str
    position: int | None
    status: str


class OpenAIImageBody(BaseModel):
    """POST /v1/images/generations: OpenAI's fields, plus reverie's extras."""

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="WIDTHxHEIGHT, or auto / null for the model's native size")
    response_format: Literal["b64_json", "url"] = "b64_json"
    negative_prompt: str = ""
    steps: int = Field(20, ge=1)
    guidance_scale: float = Scale
    sampler: str = "dpmpp_2m"
    scheduler: str | None = None
    seed: int | None = Seed


class Txt2ImgBody(BaseModel):
    """POST /sdapi/v1/txt2img: the A1111 fields reverie implements (the others are accepted and ignored)."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = Field(20, ge=1)
    cfg_scale: float = Field(7.0, ge=0, le=100, allow_inf_nan=False)
    sampler_name: str | None = None
    sampler_index: str = "Euler"  # A1111's deprecated alias of sampler_name
    scheduler: str | None = None
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    width: int | None = Size
    height: int | None = Size
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    send_images: bool = True


class Img2ImgBody(Txt2ImgBody):
    """POST /sdapi/v1/img2img."""

    init_images: list[str] = Field(default_factory=list, description="base64 images; the first is used")
    mask: str | None = None
    denoising_strength: float = Field(0.75, ge=0, le=1, allow_inf_nan=False)
    include_init_images: bool = False


class PngInfoBody(BaseModel):
    image: str = Field(description="base64 PNG")
