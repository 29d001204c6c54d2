"""How a request meets a served model of each family (reverie.families): the defaults a request gets, the checks
that depend on the family, the part of the batching key that the family's conditioning decides, and the family's
arguments to Pipeline.__call__.

    SD 1/2   text prompts as CLIP chunks of 77 tokens: requests batch when their chunk counts agree
    DiT      a class id or label name as the prompt, no negative prompt: any labels batch
    SD3      CLIP + T5 states of a fixed length: requests batch when max_sequence_length and skip-layer
             guidance agree
    mmdit    reverie's own MMDiT: one CLIP's states of a fixed length; requests batch when skip-layer guidance
             agrees
    FLUX     as SD3; the distilled guidance (guidance_scale) and true_cfg_scale are one value per call, so
             they must agree too. true_cfg_scale > 1 runs classifier-free guidance against the negative prompt
             ("" when none is given, as Forge does with cfg_scale > 1)
    Wan      text-to-video: UMT5 states of a fixed length; requests batch when num_frames and
             max_sequence_length agree (the latents' frame count is the call's). Video models take num_frames
             and fps, and refuse the image-only fields (img2img, inpainting, ControlNet, refiner)

A batched row must give exactly what its request gives alone, so every setting that a pipeline call applies to
all rows is in the key; per-row settings (prompt, negative prompt, seed, SD/SD3/DiT guidance scale) are not.
"""

from __future__ import annotations

import math

from ..flow import FLOW_KINDS, flow_samplers
from ..samplers import SAMPLERS
from ..video_io import check_fps
from .job import FieldError, Request

SD_DEFAULTS = dict(steps=20, guidance_scale=7.5, sampler="dpmpp_2m")  # the native and OpenAI dialects' SD defaults
VP_KINDS = ("default", "karras", "exponential")  # the schedule kinds a DiscreteSchedule spaces
# Request fields that are family options of Pipeline.__call__ (each family takes those in its `options`)
OPTIONS = ("num_frames", "max_sequence_length", "true_cfg_scale", "skip_guidance_layers", "skip_layer_guidance_scale",
           "prompt_syntax")
HANDOFF_FAMILIES = ("sd", "sdxl")  # the families whose latents a refiner can finish (same layout, DDPM schedule)
SEQUENCE_DEFAULTS = {"sd3": 256, "flux": 512, "wan": 512}  # diffusers' max_sequence_length defaults
VIDEO_FPS = 16  # a video request's default frame rate: Wan 2.1's (its examples export at 16 fps)
IMAGE_ONLY = ("image", "mask", "control_image", "refiner")  # request fields a text-to-video model refuses


def settings(pipe, dialect: dict | None = None) -> dict:
    """steps, guidance_scale and sampler for a request that gives none: for SD models the dialect's documented
    defaults (SD_DEFAULTS, or the dialect's own, as A1111's), for the other families the family's (sampler None:
    the model folder's own scheduler)."""
    if pipe.family.name == "sd" and pipe.family.settings(pipe) == pipe.family.defaults:  # not an LCM
        return {**SD_DEFAULTS, **(dialect or {})}
    return pipe.family.settings(pipe)


def allowed_samplers(kind: str) -> list[str]:
    """reverie's samplers that run on a model whose schedule is of `kind` ("vp" or "flow")."""
    if kind == "flow":
        return flow_samplers()
    return [name for name, fn in SAMPLERS.items() if fn.family != "flow"]


def sampler_choice(pipe, sampler: str | None, scheduler: str | None):
    """The SamplerChoice a request runs (as Pipeline.__call__ resolves it: None is the model's own scheduler),
    checked against the model's schedule kind. Raises FieldError naming sampler or scheduler."""
    own = f"this model's own scheduler ({pipe.scheduler_config.get('_class_name', 'DDIMScheduler')})"
    try:
        pipe.sampler_choice(sampler, None)
    except ValueError as e:
        hint = "" if sampler is not None else f"; give a sampler: {', '.join(allowed_samplers(pipe.sampling.kind))}"
        raise FieldError("sampler", (_message(e, "sampler") if sampler is not None else
                                     f"{own} cannot be used: {e}") + hint) from None
    try:
        choice = pipe.sampler_choice(sampler, scheduler)
    except ValueError as e:
        raise FieldError("scheduler", _message(e, "scheduler")) from None
    kind = pipe.sampling.kind
    if (choice.flow_family is None) if kind == "flow" else (choice.family == "flow"):
        what = "a flow-matching model" if kind == "flow" else "a DDPM model"
        raise FieldError("sampler", f"{sampler if sampler is not None else own!r} does not run on this "
                                    f"{pipe.family.name} model ({what}); use one of "
                                    f"{', '.join(allowed_samplers(kind))} (or their A1111 names)")
    kinds = FLOW_KINDS if kind == "flow" else VP_KINDS
    if choice.schedule not in kinds:
        raise FieldError("scheduler", f"{scheduler!r} is a schedule for flow-matching models; this "
                                      f"{pipe.family.name} model takes {', '.join(kinds)} (or automatic)")
    return choice


def is_video(pipe) -> bool:
    """Whether the model makes videos (its family takes num_frames: Wan)."""
    return "num_frames" in pipe.family.options


def video_defaults(pipe, r: Request) -> dict:
    """num_frames and fps for a video model's request that gives none: the family's frame count (Wan: 81) and
    VIDEO_FPS; {} for image models (their requests keep None, and check refuses either field)."""
    if not is_video(pipe):
        return {}
    return dict(num_frames=pipe.family.default_frames if r.num_frames is None else r.num_frames,
                fps=VIDEO_FPS if r.fps is None else r.fps)


def frames_for(pipe, seconds: float, fps: float) -> int:
    """The frame count nearest seconds * fps that the model's VAE takes: 1 + t k for its time compression t
    (Wan: 4), k = floor((seconds * fps - 1) / t + 1/2) >= 0, halves rounding up (4 s at 16 fps: 65 frames)."""
    t = pipe.family.temporal_compression(pipe)
    return 1 + t * max(0, math.floor((seconds * fps - 1) / t + 0.5))


def check(pipe, r: Request, video_format: str = "mp4") -> None:
    """The checks a request's fields need from the model's family (after its defaults are filled in);
    video_format: how the engine stores videos ("gif" caps fps)."""
    family = pipe.family
    if is_video(pipe):
        _check_video(pipe, r, video_format)
    elif r.fps is not None:
        raise FieldError("fps", f"only video models (Wan) take a frame rate; this is a {family.name} model")
    if family.prompt_kind == "class":
        try:
            family.prompts(pipe, r.prompt)
        except ValueError as e:
            raise FieldError("prompt", _message(e, "prompt")) from None
    if r.negative_prompt and not family.negative_prompt:
        raise FieldError("negative_prompt", f"a {family.name} model cannot use one ({family.no_negative_reason})")
    if r.shift is not None and pipe.sampling.kind != "flow":
        raise FieldError("shift", f"only flow-matching models (SD3, FLUX) have a schedule shift; this is a "
                                  f"{family.name} model")
    taken = [name for name in OPTIONS if name in family.options]
    for name in OPTIONS:
        if getattr(r, name) is not None and name not in family.options:
            raise FieldError(name, f"{family.name} models do not take it (their options: "
                                   f"{', '.join(taken + ['shift'] * (pipe.sampling.kind == 'flow')) or 'none'})")
    if r.skip_guidance_layers is not None:
        n = pipe.network.config.num_layers
        if not r.skip_guidance_layers or any(not 0 <= i < n for i in r.skip_guidance_layers):
            raise FieldError("skip_guidance_layers", f"must be a non-empty list of block indices in [0, {n - 1}]; "
                                                     f"got {r.skip_guidance_layers}")
        if r.guidance_scale <= 1:
            raise FieldError("skip_guidance_layers", "needs classifier-free guidance (guidance_scale > 1)")
    elif r.skip_layer_guidance_scale is not None:
        raise FieldError("skip_layer_guidance_scale", "needs skip_guidance_layers")
    if r.control_image is not None and not family.controlnet:
        raise FieldError("control_image", f"ControlNet is for SD 1/2 and SDXL models only; this is a {family.name} model")


def _check_video(pipe, r: Request, video_format: str) -> None:
    """A video request: num_frames by the family's rule (Wan: 1 + 4k), fps for the stored format, and none of the
    image-only fields."""
    first_frame = pipe.family.first_frame
    if first_frame == "required" and r.image is None:
        raise FieldError("image", f"a {pipe.family.name} model animates a first frame: send it as image")
    for name in IMAGE_ONLY:
        if getattr(r, name) is not None and not (name == "image" and first_frame):
            raise FieldError(name, f"{pipe.family.name} models make videos from text"
                                   f"{' or a first frame (image)' if first_frame else ''} only here (no img2img, "
                                   f"inpainting, ControlNet or refiner)")
    try:
        pipe.family.check_options({"num_frames": r.num_frames})
    except ValueError as e:
        raise FieldError("num_frames", _message(e, "num_frames")) from None
    try:
        check_fps(r.fps, video_format)
    except ValueError as e:
        raise FieldError("fps", _message(e, "fps")) from None


def check_refiner(pipe, refiner, name: str) -> None:
    """Whether `refiner` (the served model `name`) can finish from `pipe`'s latents (diffusers' ensemble of
    experts, Pipeline's denoising_end / denoising_start): both text-prompted DDPM models (SD, SDXL) with the same
    latent layout (channels and VAE factor), since the latents pass as they are. Raises FieldError("refiner")."""
    for model in (pipe, refiner):
        if model.family.name not in HANDOFF_FAMILIES or model.sampling.kind != "vp":
            raise FieldError("refiner", f"only SD / SDXL models hand off to a refiner; {name!r} and this model "
                                        f"are {refiner.family.name} and {pipe.family.name} models")
    layouts = [(m.family.latent_channels(m), m.downsample_factor) for m in (pipe, refiner)]
    if layouts[0] != layouts[1]:
        raise FieldError("refiner", f"{name!r} has latents of {layouts[1][0]} channels at VAE factor "
                                    f"{layouts[1][1]}; this model's are {layouts[0][0]} at {layouts[0][1]}: its "
                                    f"latents cannot be handed over")


def uses_cfg(pipe, r: Request) -> bool:
    """Whether the request runs classifier-free guidance against its negative prompt."""
    if not pipe.family.negative_prompt:
        return False  # DiT: its guidance is against the null class
    if pipe.family.name == "flux":
        return (r.true_cfg_scale or 0) > 1  # guidance_scale is the distilled guidance
    return r.guidance_scale > 1


def conditioning_key(pipe, r: Request) -> tuple:
    """What the family's conditioning needs two requests to share to be stacked in one pipeline call."""
    name = pipe.family.name
    if name == "sd":  # the number of 77-token chunks of the longest prompt (negatives included under CFG)
        texts = [r.prompt, r.negative_prompt] if uses_cfg(pipe, r) else [r.prompt]
        return (pipe.text_encoder.tokenize(texts).shape[1],)
    if name == "sdxl":  # the chunk count of both encoders, and None-vs-given negatives (None: zero embeddings)
        from ..text_conditioning import sdxl_chunk_count

        texts = [r.prompt, r.negative_prompt] if uses_cfg(pipe, r) else [r.prompt]
        return (sdxl_chunk_count(pipe.components.get("text_encoder"), pipe.text_encoder_2, *texts),
                r.negative_prompt is None)
    if name == "sd3":
        return (r.max_sequence_length or SEQUENCE_DEFAULTS[name], tuple(r.skip_guidance_layers or ()),
                r.skip_layer_guidance_scale)
    if name == "mmdit":  # reverie's own: CLIP states of a fixed length, SD3's skip-layer guidance
        return (tuple(r.skip_guidance_layers or ()), r.skip_layer_guidance_scale)
    if name == "flux":
        return (r.max_sequence_length or SEQUENCE_DEFAULTS[name], r.guidance_scale,
                r.true_cfg_scale if uses_cfg(pipe, r) else None)
    if name in ("wan", "wan_i2v"):  # the latents' frame count is the call's
        return (r.max_sequence_length or SEQUENCE_DEFAULTS["wan"], r.num_frames)
    if name == "spacetime":
        return (r.num_frames,)
    return ()  # DiT: class labels of any kind stack


def call_options(r: Request) -> dict:
    """The family arguments of Pipeline.__call__ for a request (equal for every request of one batch)."""
    out = {name: getattr(r, name) for name in OPTIONS if getattr(r, name) is not None}
    if r.shift is not None:
        out["shift"] = r.shift
    return out


def describe(pipe) -> dict:
    """What a client needs to know about a served model: its family, schedule kind, size multiple, the defaults
    a request gets and the family options it takes."""
    family, kind = pipe.family, pipe.sampling.kind
    out = dict(family=family.name, schedule=kind, prompt=family.prompt_kind, negative_prompt=family.negative_prompt,
               size_multiple=pipe.size_multiple, defaults=settings(pipe),
               options=[name for name in OPTIONS if name in family.options] + ["shift"] * (kind == "flow"),
               samplers=allowed_samplers(kind))
    if kind == "flow":
        out.update(shift=pipe.schedule.shift, dynamic_shift=pipe.schedule.use_dynamic_shifting)
    if family.name == "flux":
        out["variant"] = "dev" if pipe.network.config.guidance_embeds else "schnell"
    out["video"] = is_video(pipe)
    if out["video"]:
        t = pipe.family.temporal_compression(pipe)
        out["options"].append("fps")
        out["defaults"] = dict(out["defaults"], num_frames=family.default_frames, fps=VIDEO_FPS)
        out["frames"] = f"1 + {t}k" if t > 1 else "any"  # the num_frames the model takes
    return out


def warm_up_call(pipe) -> dict:
    """Arguments of a cheap first call that pays for lazy initialisation: one step, a small size, a sampler that
    runs on every schedule kind, a prompt of the family's kind."""
    multiple = pipe.size_multiple
    size = min(pipe.default_size, multiple * max(1, -(-64 // multiple)))
    prompt = 0 if pipe.family.prompt_kind == "class" else "warm-up"
    frames = dict(num_frames=1) if is_video(pipe) else {}  # one frame: the family's default is 81
    if pipe.family.first_frame == "required":  # image-to-video: a grey first frame
        from PIL import Image

        frames["image"] = Image.new("RGB", (size, size), (128, 128, 128))
    return dict(prompt=prompt, steps=1, seed=0, sampler="euler", width=size, height=size, progress=False, **frames)


def _message(error: ValueError, field: str) -> str:
    """A pipeline error's text without its leading field name (FieldError puts it back)."""
    text = str(error)
    for prefix in (f"{field}: ", f"{field} "):  # "num_frames: ..." or "num_frames must be ..."
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


__all__ = ["OPTIONS", "SD_DEFAULTS", "VIDEO_FPS", "allowed_samplers", "call_options", "check", "check_refiner",
           "conditioning_key", "describe", "frames_for", "is_video", "sampler_choice", "settings", "uses_cfg",
           "video_defaults", "warm_up_call"]
