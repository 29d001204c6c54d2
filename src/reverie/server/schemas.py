"""Request bodies of the three dialects (pydantic) and the server's limits.

The models say what each field is; `Limits` says how much one request may ask for, and is checked after
parsing so one server can be configured tighter than another. Unknown fields are ignored (clients of the
OpenAI and A1111 APIs send many that reverie does not implement).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from ..models.t5 import MAX_SEQUENCE_LENGTH
from ..pipeline import MAX_SEED
from .job import FieldError, Request

Seed = Field(None, ge=-1, le=MAX_SEED, description="-1 or null: random; image i gets seed + i")
Size = Field(None, ge=1, description="pixels; null: the model's native size")
Steps = Field(None, ge=1, description="null: the model's default (SD: 20; SD3 and FLUX dev 28, FLUX schnell 4, DiT 50)")
Scale = Field(None, ge=0, le=100, allow_inf_nan=False,
              description="null: the model's default (SD 7.5, SD3 7, DiT 4); FLUX: the distilled guidance (dev 3.5)")
Sampler = Field(None, description="any name reverie.samplers.resolve accepts (GET /sdapi/v1/samplers); null: the "
                                  "model's default (SD: dpmpp_2m; others: the model folder's own scheduler)")
SwitchAt = Field(None, gt=0, lt=1, allow_inf_nan=False,
                 description="with a refiner: the fraction of the schedule the first model runs; null: 0.8")
Prompt = Field(description="text; DiT models: an ImageNet class id or one of the model's label names")
Frames = Field(None, ge=1, description="video models: frames per video (Wan: 1 + 4k); null: the model's default (81)")
Fps = Field(None, gt=0, le=120, allow_inf_nan=False, description="video models: frames per second of the clip; "
                                                                 "null: 16 (Wan 2.1's)")


@dataclass(frozen=True)
class Limits:
    """The most one request may ask for; more is a 422 naming the field."""

    max_width: int = 1024
    max_height: int = 1024
    max_steps: int = 150
    max_images: int = 8  # per request (n, batch_size * n_iter)
    max_frames: int = 161  # per video (num_frames; Wan 2.1 makes 81 by default, 10 s at 16 fps is 161)
    max_prompt_chars: int = 2000
    max_body_bytes: int = 16 * 2**20  # the whole request body (base64 images included)

    def check(self, request: Request) -> None:
        """Raise FieldError for the first field over its limit."""
        checks = (("prompt", len(request.prompt), self.max_prompt_chars, "characters"),
                  ("negative_prompt", len(request.negative_prompt), self.max_prompt_chars, "characters"),
                  ("steps", request.steps or 0, self.max_steps, "steps"),
                  ("n", request.n, self.max_images, "images"),
                  ("num_frames", request.num_frames or 0, self.max_frames, "frames"),
                  ("width", request.width or 0, self.max_width, "pixels"),
                  ("height", request.height or 0, self.max_height, "pixels"))
        for name, value, limit, unit in checks:
            if value > limit:
                raise FieldError(name, f"must be at most {limit} {unit} on this server; got {value}")


class FamilyOptions(BaseModel):
    """Fields for one model family or another (GET /v1/models lists the ones each model takes); a field the
    model's family does not take is a 422 naming it."""

    shift: float | None = Field(None, gt=0, le=100, allow_inf_nan=False,
                                description="flow models (SD3, FLUX): the schedule's shift; null: the model's")
    max_sequence_length: int | None = Field(None, ge=1, le=MAX_SEQUENCE_LENGTH,
                                            description="SD3, FLUX: T5 tokens; null: SD3 256, FLUX 512")
    true_cfg_scale: float | None = Field(None, ge=0, le=100, allow_inf_nan=False,
                                         description="FLUX: classifier-free guidance against the negative prompt "
                                                     "(\"\" when none) when > 1; two network calls a step")
    skip_guidance_layers: list[int] | None = Field(None, max_length=64,
                                                   description="SD3.5: skip-layer guidance blocks, e.g. [7, 8, 9]")
    skip_layer_guidance_scale: float | None = Field(None, ge=0, le=100, allow_inf_nan=False,
                                                    description="SD3.5: skip-layer guidance scale; null: 2.8")

    def family_fields(self) -> dict:
        """These fields as Request keyword arguments."""
        return {name: getattr(self, name) for name in FamilyOptions.model_fields}


class JobBody(FamilyOptions):
    """POST /v1/jobs: reverie's native request."""

    prompt: str | int = Prompt
    negative_prompt: str = ""
    steps: int | None = Steps
    guidance_scale: float | None = Scale
    sampler: str | None = Sampler
    scheduler: str | None = Field(None, description="schedule type: karras, exponential, normal, automatic; flow "
                                                    "models also simple, sgm_uniform, beta")
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
    refiner: str | None = Field(None, description="a model id (GET /v1/models) that finishes the image from the "
                                                  "first model's latents (SDXL's refiner; SD / SDXL models only)")
    refiner_switch_at: float | None = SwitchAt
    preview: bool = Field(False, description="stream decoded previews with the progress events")
    timeout_s: float | None = Field(None, gt=0, allow_inf_nan=False, description="deadline; the server caps it")
    num_frames: int | None = Frames
    fps: float | None = Fps


class JobAccepted(BaseModel):
    id: str
    position: int | None
    status: str


class OpenAIImageBody(FamilyOptions):
    """POST /v1/images/generations: OpenAI's fields, plus reverie's extras."""

    prompt: str | int = Prompt
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="WIDTHxHEIGHT, or auto / null for the model's native size")
    response_format: Literal["b64_json", "url"] = "b64_json"
    negative_prompt: str = ""
    steps: int | None = Steps
    guidance_scale: float | None = Scale
    sampler: str | None = Sampler
    scheduler: str | None = None
    seed: int | None = Seed


class OpenAIVideoBody(BaseModel):
    """POST /v1/videos (JSON or form fields): OpenAI's Videos API fields, plus reverie's extras. seconds and size
    come as strings ("4", "480x832") as OpenAI sends them; numbers are accepted too."""

    prompt: str = Field(min_length=1)
    model: str | None = None
    seconds: str | float | None = Field(None, description="clip length; frames = seconds * fps rounded to the "
                                                          "model's rule (Wan: 1 + 4k); null: the model's default")
    size: str | None = Field(None, description="WIDTHxHEIGHT; null: the model's default (Wan: 832x480)")
    input_reference: str | None = Field(None, description="the first frame, an uploaded file (image-to-video models)")
    negative_prompt: str = ""
    steps: int | None = Steps
    guidance_scale: float | None = Scale
    sampler: str | None = Sampler
    scheduler: str | None = None
    seed: int | None = Seed
    fps: float | None = Fps
    num_frames: int | None = Field(None, ge=1, description="instead of seconds: the frame count itself")
    shift: float | None = Field(None, gt=0, le=100, allow_inf_nan=False, description="the flow schedule's shift")
    max_sequence_length: int | None = Field(None, ge=1, le=MAX_SEQUENCE_LENGTH, description="UMT5 tokens; null: 512")


class Txt2ImgBody(FamilyOptions):
    """POST /sdapi/v1/txt2img: the A1111 fields reverie implements (the others are accepted and ignored).

    Unset fields get A1111's defaults on SD models (20 steps, CFG 7, Euler) and the model family's otherwise.
    FLUX follows Forge: distilled_cfg_scale is the distilled guidance (guidance_scale; default 3.5 on dev,
    ignored on schnell, as Forge does) and cfg_scale is true classifier-free guidance against the negative
    prompt when above 1 (default 1: none). On other families distilled_cfg_scale is ignored, as Forge does
    (Forge Neo reuses it as the shift of some flow models; here `shift` is the shift)."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int | None = Field(None, ge=1, description="null: 20 on SD models, else the model family's default")
    cfg_scale: float | None = Field(None, ge=0, le=100, allow_inf_nan=False,
                                    description="null: 7 on SD models, else the family's; FLUX: true CFG (Forge)")
    distilled_cfg_scale: float | None = Field(None, ge=0, le=100, allow_inf_nan=False,
                                              description="FLUX dev: the distilled guidance (Forge); null: 3.5")
    sampler_name: str | None = None
    sampler_index: str | None = None  # A1111's deprecated alias of sampler_name (A1111 default: Euler)
    scheduler: str | None = None
    override_settings: dict = Field(default_factory=dict, description="sd_model_checkpoint picks the model")
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    width: int | None = Size
    height: int | None = Size
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    send_images: bool = True
    refiner_checkpoint: str | None = Field(None, description="a name or title from /sd-models that finishes the "
                                                             "image (SDXL's refiner); null, \"\" or \"None\": none")
    refiner_switch_at: float | None = SwitchAt
    enable_hr: bool = Field(False, description="the hires fix: a second, img2img pass at hr_scale times the size")
    hr_scale: float = Field(2.0, ge=1, le=4, allow_inf_nan=False)
    hr_upscaler: str | None = Field("Latent", description="Latent, Latent (antialiased), Latent (bicubic), Latent "
                                                        "(bicubic antialiased), Latent (nearest), Latent "
                                                        "(nearest-exact), Lanczos or Nearest")
    hr_second_pass_steps: int = Field(0, ge=0, description="0: the first pass's steps")
    hr_resize_x: int = Field(0, ge=0, le=2048, description="the hires width instead of hr_scale (0: by hr_scale)")
    hr_resize_y: int = Field(0, ge=0, le=2048, description="the hires height instead of hr_scale (0: by hr_scale)")
    denoising_strength: float = Field(0.7, ge=0, le=1, allow_inf_nan=False,
                                      description="txt2img: the hires pass's strength; img2img: the edit's")
    subseed: int = Field(-1, ge=-1, le=MAX_SEED, description="the variation seed; -1: random")
    subseed_strength: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    tiling: bool = Field(False, description="seamless, tileable images")


class Img2ImgBody(Txt2ImgBody):
    """POST /sdapi/v1/img2img."""

    init_images: list[str] = Field(default_factory=list, description="base64 images; the first is used")
    mask: str | None = None
    denoising_strength: float = Field(0.75, ge=0, le=1, allow_inf_nan=False)
    include_init_images: bool = False


class PngInfoBody(BaseModel):
    image: str = Field(description="base64 PNG")
