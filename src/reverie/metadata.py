"""PNG metadata: A1111's "parameters" infotext beside a JSON chunk with the full request, written and read back.

Every PNG reverie writes carries two text chunks:

- `parameters`: A1111's infotext (modules/processing.py create_infotext), which A1111's PNG Info, Civitai and
  other tools read: the prompt, a "Negative prompt: ..." line when there is one, then one line of
  `Key: value` pairs in A1111's order (Steps, Sampler, Schedule type, CFG scale, Seed, Size, Model hash,
  Model, ..., Version), values with `,` `:` or newlines JSON-quoted. Other families as Forge writes them:
  FLUX dev "CFG scale: 1, Distilled CFG Scale: 3.5" (CFG scale is true CFG, true_cfg_scale; the distilled
  guidance is reverie's guidance_scale), flow models (SD3, FLUX) "Shift: 3.0" (Forge Neo's key), and
  reverie's "Family: sd3" (A1111 has none; readers keep unknown keys);
- `reverie`: JSON of one image's parameters (what GenerationResult.params holds, for that image), plus the
  batch it was generated in, so that generation_kwargs() regenerates exactly the same pixels.

parse_infotext reads A1111's text (also from images A1111 wrote) into A1111's field names, as its
/sdapi/v1/png-info answers; request_from_infotext turns that into reverie's request fields.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import re
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .samplers import SAMPLERS, SamplerChoice, resolve, valid_names

PARAMETERS = "parameters"  # A1111's text chunk
REQUEST = "reverie"  # reverie's JSON chunk
BATCH_KEYS = ("prompt", "negative_prompt", "seeds", "guidance_scale")  # lists in a batch's params
SCHEDULE_TYPES = {"default": "Uniform", "karras": "Karras", "exponential": "Exponential",  # A1111's names
                  "simple": "Simple", "sgm_uniform": "SGM Uniform", "beta": "Beta"}  # the last three: flow models
FLOW_LABELS = {"euler_flow": "Euler", "heun_flow": "Heun"}  # what A1111 / Forge call them on flow models
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # `Key: value,` or `Key: "quoted",`
_SIZE = re.compile(r"^(\d+)x(\d+)$")


# --- one image's parameters ---------------------------------------------------------------------------------


def _jsonable(value):
    """value with tuples as lists; None for what JSON cannot hold (tensors, images)."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return None


def image_params(params: dict, index: int | None = None, *, record_batch: bool = False) -> dict:
    """One image's parameters from a generation's params (GenerationResult.params, whose prompt, negative_prompt
    and seeds are per image, guidance_scale per image or per prompt). Params of one image pass through. A
    batch of several images needs `index`. record_batch=True records the batch under "batch" (the image's index,
    the batch's prompts, negatives, seeds and scales, and whether each image had its own seed): regenerating the
    image bit for bit takes its whole batch. Leave it off where a batch merges other people's requests."""
    if not isinstance(params, dict) or "prompt" not in params:
        raise ValueError("params must be a dict of generation parameters with a prompt")
    if not isinstance(params["prompt"], (list, tuple)):  # one image's (DiT: a class id)
        return {k: _jsonable(v) for k, v in params.items()}
    size = len(params["prompt"])
    if index is None:
        if size != 1:
            raise ValueError(f"params: these are a batch of {size} images; give the image's index "
                             f"(image_params(params, i))")
        index = 0
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
        raise ValueError(f"index must be an integer in [0, {size - 1}]; got {index!r}")
    out = {}
    for key, value in params.items():
        if key in ("seeds", "seed_per_image"):
            continue
        if key == "guidance_scale" and isinstance(value, (list, tuple)):
            value = value[index * len(value) // size]  # one per prompt: image i comes from prompt i // n
        elif key in ("prompt", "negative_prompt", "nsfw") and isinstance(value, (list, tuple)):
            value = value[index]
        out[key] = _jsonable(value)
    if "seeds" in params:
        out["seed"] = params["seeds"][index]
    if size > 1 and record_batch:
        lists = {k: list(params[k]) for k in BATCH_KEYS if isinstance(params.get(k), (list, tuple))}
        if "guidance_scale" in lists:  # one per image, as the prompts are
            scales = lists["guidance_scale"]
            lists["guidance_scale"] = [scales[i * len(scales) // size] for i in range(size)]
        out["batch"] = {"index": index, "seed_per_image": bool(params.get("seed_per_image", True)),
                        **_jsonable(lists)}
    return out


# --- A1111 infotext -----------------------------------------------------------------------------------------


def _quote(value) -> str:
    """A1111's infotext quoting: JSON-quote values that contain a comma, a colon or a newline."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def sampler_label(sampler: str, schedule: str = "default", options: dict | None = None) -> tuple[str, str]:
    """A1111's (Sampler, Schedule type) for a reverie sampler and schedule, from reverie.samplers.names:
    ("DPM++ 2M", "Karras"). "Automatic" where A1111's automatic choice is this schedule, so that
    resolve(label, schedule_type) gives the sampler back (the flow solvers as "Euler" and "Heun", which run as
    them on a flow model)."""
    if schedule not in SCHEDULE_TYPES:
        raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULE_TYPES))}; got {schedule!r}")
    if sampler in FLOW_LABELS and not options:
        return FLOW_LABELS[sampler], SCHEDULE_TYPES[schedule]
    labels = [name for name in valid_names() if name not in SAMPLERS and "_" not in name]  # A1111's own
    plain = [name for name in labels if (c := resolve(name)).name == sampler and c.schedule == "default"]
    exact = [name for name in plain if resolve(name).options == (options or {})]
    label = (exact or plain or [sampler])[0]
    automatic = resolve(label, "Automatic").schedule
    return label, "Automatic" if automatic == schedule else SCHEDULE_TYPES[schedule]


def infotext(params: dict) -> str:
    """A1111's "parameters" text for one image (params of one image, or of a generation of one image)."""
    p = image_params(params)
    loras = p.get("loras") or []
    hires = p.get("hr_scale") is not None  # A1111 records the first pass's steps and size, then the hires pass's
    fields = {"Steps": p.get("first_pass_steps") if hires else p.get("steps")}
    if p.get("sampler"):
        fields["Sampler"], fields["Schedule type"] = sampler_label(p["sampler"], p.get("schedule") or "default",
                                                                   p.get("sampler_options"))
    size = f"{p['width']}x{p['height']}" if p.get("width") and p.get("height") else None
    if hires:
        size = "x".join(map(str, p["hr_first_size"]))
    clip_skip = p.get("clip_skip")
    if p.get("family") == "flux":  # Forge: CFG scale is true CFG, the distilled guidance has its own key
        fields |= {"CFG scale": p.get("true_cfg_scale") or 1.0, "Distilled CFG Scale": p.get("distilled_guidance")}
    else:
        fields["CFG scale"] = p.get("guidance_scale")
    fields |= {
        "Shift": p.get("shift"), "Seed": p.get("seed"), "Size": size,
        "Model hash": p.get("model_hash"), "Model": p.get("model"), "Family": p.get("family"),
        "Denoising strength": p.get("strength"),
        "Variation seed": p.get("subseed") if p.get("subseed_strength") else None,
        "Variation seed strength": p.get("subseed_strength") or None,
        "Hires upscale": None if p.get("hr_resize_x") or p.get("hr_resize_y") else p.get("hr_scale"),
        "Hires steps": p.get("hr_second_pass_steps") or None,
        "Hires upscaler": p.get("hr_upscaler"),
        "Hires resize": f"{p['hr_resize_x']}x{p['hr_resize_y']}" if p.get("hr_resize_x") or p.get("hr_resize_y")
        else None,
        "Tiling": True if p.get("tiling") else None,
        "Refiner": p.get("refiner"), "Refiner switch at": p.get("refiner_switch_at"),  # A1111's SDXL refiner
        "Clip skip": clip_skip + 1 if clip_skip else None,  # A1111 counts the last layer as 1 (reverie.models.text)
        "CFG Rescale": p.get("guidance_rescale") or None,
        "NSFW": "flagged" if p.get("nsfw") else None,
        "Lora hashes": ", ".join(f"{l['name']}: {l['hash']}" for l in loras if l.get("hash")) or None,
        "TI hashes": ", ".join(f"{e['name']}: {e['hash']}" for e in p.get("embeddings") or [] if e.get("hash"))
        or None,
        "Version": f"reverie {_version()}",
    }
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None)
    negative = f"\nNegative prompt: {p['negative_prompt']}" if p.get("negative_prompt") else ""
    return f"{_with_lora_tags(p['prompt'], loras)}{negative}\n{line}".strip()


def _with_lora_tags(prompt, loras: list[dict]):
    """The prompt as A1111 writes it: the merged LoRAs as <lora:name:te[:unet]> tags, where the text has none."""
    if not loras or not isinstance(prompt, str) or "<lora:" in prompt:
        return prompt
    tags = [f"<lora:{l['name']}:{l['text']:g}" + (f":{l['unet']:g}>" if l["unet"] != l["text"] else ">")
            for l in loras]
    return " ".join([prompt, *tags])


def parse_infotext(text: str) -> dict:
    """A1111 infotext -> A1111's fields, as its /sdapi/v1/png-info "parameters": {"Prompt", "Negative prompt",
    "Steps", "Sampler", ..., "Size-1", "Size-2", ...}, values as written (strings), quotes removed. The last line
    holds the parameters when it has at least 3 `Key: value` pairs; lines before "Negative prompt:" are the
    prompt, the rest the negative prompt."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("infotext must be a non-empty string")
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines, last = lines + [last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        if len(value) > 1 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        size = _SIZE.match(value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        else:
            out[key] = value
    return out


def _field(fields: dict, key: str, convert, name: str):
    if key not in fields or fields[key] in ("", None):
        return None
    try:
        return convert(fields[key])
    except (TypeError, ValueError):
        raise ValueError(f"infotext field {key!r} ({name}): cannot read {fields[key]!r} as "
                         f"{getattr(convert, '__name__', 'a value')}") from None


def request_from_infotext(info) -> dict:
    """reverie's request fields from A1111 infotext (a string or parse_infotext's dict): prompt,
    negative_prompt, steps, guidance_scale, sampler and scheduler (A1111's labels, which resolve() reads), seed,
    width, height, clip_skip (reverie's count: A1111's minus one), strength, model, model_hash, and for flow
    models shift and family. FLUX images (a "Distilled CFG Scale" or "Family: flux", as Forge writes them):
    guidance_scale is the distilled guidance, true_cfg_scale the CFG scale when above 1."""
    fields = parse_infotext(info) if isinstance(info, str) else info
    clip = _field(fields, "Clip skip", int, "clip_skip")
    cfg = _field(fields, "CFG scale", float, "guidance_scale")
    flux = "Distilled CFG Scale" in fields or fields.get("Family") == "flux"
    distilled = _field(fields, "Distilled CFG Scale", float, "guidance_scale")
    out = {
        "prompt": fields.get("Prompt", ""), "negative_prompt": fields.get("Negative prompt") or None,
        "steps": _field(fields, "Steps", int, "steps"),
        "guidance_scale": distilled if flux else cfg,
        "true_cfg_scale": cfg if flux and cfg is not None and cfg > 1 else None,
        "shift": _field(fields, "Shift", float, "shift"), "family": fields.get("Family"),
        "sampler": fields.get("Sampler"), "scheduler": fields.get("Schedule type"),
        "seed": _field(fields, "Seed", int, "seed"),
        "width": _field(fields, "Size-1", int, "width"), "height": _field(fields, "Size-2", int, "height"),
        "clip_skip": clip - 1 if clip and clip > 1 else None,
        "strength": _field(fields, "Denoising strength", float, "strength"),
        "subseed": _field(fields, "Variation seed", int, "subseed"),
        "subseed_strength": _field(fields, "Variation seed strength", float, "subseed_strength"),
        "tiling": True if fields.get("Tiling") == "True" else None,
        "model": fields.get("Model"), "model_hash": fields.get("Model hash"),
    }
    return {k: v for k, v in out.items() if v is not None or k in ("negative_prompt", "clip_skip")}


# --- regenerating -------------------------------------------------------------------------------------------


FAMILY_OPTIONS = ("shift", "max_sequence_length", "true_cfg_scale", "skip_guidance_layers", "skip_layer_guidance_scale",
                  "skip_layer_guidance_start", "skip_layer_guidance_stop", "prompt_syntax")  # Pipeline.__call__ keyword arguments
REPRODUCED = ("prompt", "negative_prompt", "steps", "guidance_scale", "guidance_rescale", "sampler", "schedule",
              "scheduler", "sampler_options", "width", "height", "seed", "clip_skip", "batch", "subseed",
              "subseed_strength", "tiling", *FAMILY_OPTIONS)
INFORMATIONAL = ("model", "model_hash", "nsfw", "reverie_version", "dtype", "device", "family", "variant",
                 "distilled_guidance", "loras", "embeddings")  # loaded by the caller (set_loras, load_embedding)


def _sampler_name(sampler: str, schedule: str, options: dict) -> str:
    """A name that resolve(name, schedule) turns into exactly this sampler, schedule and options."""
    target = SamplerChoice(sampler, schedule, options)
    for name in [sampler, *valid_names()]:
        if resolve(name, schedule) == target:
            return name
    raise ValueError(f"sampler: no sampler name gives {sampler!r} with options {options}")


def generation_kwargs(request: dict) -> tuple[dict, int, list[str]]:
    """(Pipeline.__call__ keyword arguments, index of the image among the generated ones, fields that are not
    reproduced) for a reverie JSON chunk or a request_from_infotext dict. A reverie image from a batch is
    regenerated with its whole batch, so its pixels come out bit-identical (same device and dtype)."""
    prompt = request.get("prompt") if isinstance(request, dict) else None
    if not isinstance(prompt, (str, int)) or isinstance(prompt, bool):
        raise ValueError("request must be a dict with a prompt string (DiT: a class id)")
    sampler, scheduler = request.get("sampler"), request.get("scheduler")  # None: the model's default
    if "schedule" in request and sampler is not None:  # reverie's own record: the resolved sampler
        scheduler = request["schedule"]
        sampler = _sampler_name(sampler, scheduler, request.get("sampler_options") or {})
    kwargs = {k: request[k] for k in ("prompt", "negative_prompt", "steps", "guidance_scale", "guidance_rescale",
                                      "width", "height", "seed", "clip_skip", "subseed", "subseed_strength",
                                      "tiling", *FAMILY_OPTIONS)
              if request.get(k) is not None}
    kwargs |= {"sampler": sampler, "scheduler": scheduler}
    index, batch = 0, request.get("batch")
    if batch:
        index = batch["index"]
        kwargs |= {k: batch[k] for k in ("prompt", "negative_prompt", "guidance_scale") if k in batch}
        kwargs["seed"] = batch["seeds"] if batch["seed_per_image"] else batch["seeds"][0]
    ignored = sorted(k for k in request if k not in REPRODUCED + INFORMATIONAL and request[k] is not None)
    return kwargs, index, ignored


# --- PNG files ----------------------------------------------------------------------------------------------


def png_bytes(image: Image.Image, params: dict) -> bytes:
    """The image as PNG bytes carrying A1111's "parameters" text and reverie's JSON request."""
    p = image_params(params)
    info = PngInfo()
    info.add_text(PARAMETERS, infotext(p))  # Pillow writes iTXt when the text is not Latin-1
    info.add_text(REQUEST, json.dumps({**p, "reverie_version": _version()}, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Image.Image, params: dict, path) -> Path:
    """Write png_bytes(image, params) to path atomically (a temp file renamed over it)."""
    from .formats.safetensors_io import _atomic_write

    data = png_bytes(image, params)
    return _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def read_png_info(source) -> dict:
    """{"info": A1111 text or "", "parameters": parse_infotext of it, "request": reverie's JSON or None,
    "items": the other text chunks} from PNG bytes, a path or an open PIL image (A1111's png-info answer
    shape, plus "request")."""
    try:
        if isinstance(source, Image.Image):
            chunks = dict(getattr(source, "text", None) or source.info)
        else:
            with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as im:
                chunks = dict(getattr(im, "text", None) or im.info)
    except (OSError, Image.UnidentifiedImageError) as e:
        raise ValueError(f"image: cannot read an image from it ({e})") from None
    chunks = {k: v for k, v in chunks.items() if isinstance(v, str)}
    text, raw = chunks.pop(PARAMETERS, ""), chunks.pop(REQUEST, None)
    try:
        request = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError as e:
        raise ValueError(f"image: its {REQUEST!r} chunk is not valid JSON ({e})") from None
    return {"info": text, "parameters": parse_infotext(text) if text.strip() else {}, "request": request,
            "items": chunks}


# --- model hash ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is hashed again
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def model_hash(path) -> str:
    """A1111's short model hash: the first 10 hex digits of the file's SHA-256 (what Civitai shows) for a
    single file; for a folder, of the SHA-256 over its weight files' relative paths and hashes."""
    path = Path(path)
    if path.is_file():
        return _file_sha256(path)[:10]
    files = sorted(p for p in path.rglob("*.safetensors") if p.is_file())
    if not files:
        raise ValueError(f"model: {path} holds no .safetensors weights to hash")
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + bytes.fromhex(_file_sha256(f)))
    return h.hexdigest()[:10]


def _version() -> str:
    from . import __version__

    return __version__
