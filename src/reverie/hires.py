"""A1111's generation extras: the hires fix (two passes, the second an img2img of the first upscaled) and
variation seeds (the start noise slerped towards a second seed's).

    result = hires_fix(pipe, "a red circle", hr_scale=2, hr_upscaler="Latent", denoising_strength=0.7, seed=1)
    pipe("a red circle", seed=1, subseed=7, subseed_strength=0.3)

Hires fix (A1111's txt2img `enable_hr`): the first pass at width x height; its latents are resized to
hr_scale times that (or hr_resize_x / hr_resize_y), by interpolation in latent space for the "Latent ..."
upscalers or by decoding, resizing the image (Lanczos, nearest) and encoding again for the others; then an
img2img pass at denoising_strength with hr_second_pass_steps steps (0: the first pass's), the same prompts,
seeds, sampler and guidance. The result is the second pass's, its params recording the hires settings and the
first pass's size (A1111's infotext "Size" is the first pass's, with "Hires upscale", "Hires steps",
"Hires upscaler").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .denoisers import randn

# A1111's shared.latent_upscale_modes: name -> torch interpolation
LATENT_UPSCALERS = {
    "Latent": dict(mode="bilinear", antialias=False),
    "Latent (antialiased)": dict(mode="bilinear", antialias=True),
    "Latent (bicubic)": dict(mode="bicubic", antialias=False),
    "Latent (bicubic antialiased)": dict(mode="bicubic", antialias=True),
    "Latent (nearest)": dict(mode="nearest", antialias=False),
    "Latent (nearest-exact)": dict(mode="nearest-exact", antialias=False),
}
IMAGE_UPSCALERS = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
UPSCALERS = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)


def slerp(val: float, low: Tensor, high: Tensor) -> Tensor:
    """A1111's slerp (modules/rng.py), as it is: norms along dim 1 of one image's (C, h, w) noise, and the
    near-parallel fallback `low * val + high * (1 - val)` with its arguments the other way round."""
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return (torch.sin((1.0 - val) * omega) / so).unsqueeze(1) * low + (torch.sin(val * omega) / so).unsqueeze(1) * high


def variation_noise(shape, generator, subgenerator, strength: float) -> Tensor:
    """Start noise (B, C, h, w): each image's noise from `generator` slerped towards `subgenerator`'s by
    `strength` (0: the seed's noise, 1: the subseed's), image by image as A1111's ImageRNG."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ValueError(f"subseed_strength must be a number in [0, 1]; got {strength!r}")
    noise = randn(shape, generator, torch.device("cpu"), torch.float32)
    sub = randn(shape, subgenerator, torch.device("cpu"), torch.float32)
    return torch.stack([slerp(float(strength), a, b) for a, b in zip(noise, sub)])


def hires_fix(pipe, prompt, *, hr_scale: float = 2.0, hr_upscaler: str = "Latent", hr_second_pass_steps: int = 0,
              denoising_strength: float = 0.7, hr_resize_x: int = 0, hr_resize_y: int = 0, **kwargs):
    """Two passes (see the module's docstring); `kwargs` go to both (seed, steps, sampler, guidance_scale,
    negative_prompt, width, height, ...). Returns the second pass's GenerationResult."""
    if hr_upscaler not in UPSCALERS:
        raise ValueError(f"hr_upscaler must be one of {', '.join(map(repr, UPSCALERS))}; got {hr_upscaler!r}")
    if isinstance(hr_scale, bool) or not isinstance(hr_scale, (int, float)) or not 1 <= hr_scale <= 8:
        raise ValueError(f"hr_scale must be a number in [1, 8]; got {hr_scale!r}")
    for name, value in (("hr_second_pass_steps", hr_second_pass_steps), ("hr_resize_x", hr_resize_x),
                        ("hr_resize_y", hr_resize_y)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0; got {value!r}")
    for name in ("image", "mask_image", "init_latents", "denoising_end", "denoising_start"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}: the hires fix is a text-to-image mode")
    first = pipe(prompt, **kwargs)
    p = first.params
    width, height = p["width"], p["height"]
    m = pipe.size_multiple
    if hr_resize_x or hr_resize_y:  # A1111: one of them given keeps the aspect ratio
        target_w = hr_resize_x or round(hr_resize_y * width / height)
        target_h = hr_resize_y or round(hr_resize_x * height / width)
    else:
        target_w, target_h = round(width * hr_scale), round(height * hr_scale)
    target_w, target_h = max(m, target_w - target_w % m), max(m, target_h - target_h % m)
    second = {k: v for k, v in kwargs.items() if k not in ("width", "height", "num_images", "prompt")}
    second["steps"] = hr_second_pass_steps or p["steps"]
    second["seed"] = p["seeds"] if kwargs.get("seed") is None else kwargs["seed"]
    second["sampler"], second["scheduler"] = p["sampler"], p["schedule"]
    second["negative_prompt"] = p["negative_prompt"] if kwargs.get("negative_prompt") is not None else None
    if hr_upscaler in LATENT_UPSCALERS:
        f = pipe.downsample_factor
        latents = F.interpolate(first.latents.float(), size=(target_h // f, target_w // f),
                                **LATENT_UPSCALERS[hr_upscaler])
        result = pipe(p["prompt"], init_latents=latents, strength=denoising_strength, **second)
    else:
        images = [im.resize((target_w, target_h), IMAGE_UPSCALERS[hr_upscaler]) for im in first.images]
        result = pipe(p["prompt"], image=images, strength=denoising_strength, width=target_w, height=target_h,
                      **second)
    result.params |= dict(hr_scale=float(hr_scale), hr_upscaler=hr_upscaler,
                          hr_second_pass_steps=hr_second_pass_steps, hr_first_size=[width, height],
                          first_pass_steps=p["steps"])
    if hr_resize_x or hr_resize_y:
        result.params |= dict(hr_resize_x=hr_resize_x, hr_resize_y=hr_resize_y)
    return result
