"""Image-to-image, inpainting and outpainting: images and masks in, a starting point and denoiser wrappers out.

None of this is a second pipeline. `Pipeline.__call__` asks `prepare` for the image (and mask) at the
processing size, asks `plan_edit` where sampling starts, runs its usual sampler on the tail of the schedule,
and hands the decoded images to `EditSource.paste`:

- img2img (SDEdit, Meng et al. 2022): run the last int(steps * strength) steps of the schedule from the
  encoded image plus noise at the first of them, as diffusers' StableDiffusionImg2ImgPipeline does for every
  scheduler family (DDIM/DPM-Solver slice the timesteps, the Euler family the sigmas: the same thing here,
  a slice of `DiscreteSchedule.sampling_sigmas`).
- inpainting with any model: `KnownRegionDenoiser` re-imposes the known latents on the denoiser's estimate
  at every step (A1111's mask blending), so outside the mask the sample stays on the noised image.
- inpainting networks (SD inpainting, 9 input channels): the mask and the masked image's latents go to the
  network through the `concat` conditioning (`ConcatInputs`), as diffusers' StableDiffusionInpaintPipeline.
- A1111's options: mask blur, "only masked" (inpaint a crop around the mask at full resolution, then paste
  it back), and fill modes for the masked area ("original", "fill", "latent noise", "latent nothing").
- outpainting: `outpaint` pads the canvas and builds the mask; the rest is inpainting.

Masks are white (1) where the image is repainted. Images are (B, 3, H, W) tensors in [-1, 1] here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .denoisers import randn

FILLS = ("original", "fill", "latent noise", "latent nothing")  # A1111's "masked content" 1, 0, 2, 3
_A1111_FILL = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


# --- inputs -------------------------------------------------------------------------------------------


def _open(value, field: str) -> Image.Image:
    """A PIL image, or an image file's path, loaded now (so a bad file fails here, naming the field)."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, Path)):
        try:
            with Image.open(value) as im:
                im.load()
                return im.copy()
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"{field}: cannot read an image from {str(value)!r} ({e})") from None
    raise ValueError(f"{field} must be a PIL image, an image file path, a list of those, or a tensor; "
                     f"got {type(value).__name__}")


def _items(value, field: str) -> list:
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"{field}: got an empty list")
        return list(value)
    return [value]


def _stack(arrays: list[np.ndarray], field: str) -> Tensor:
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"{field}: all images must have the same size; got {sorted((w, h) for h, w in sizes)}")
    return torch.from_numpy(np.stack(arrays)).float()


def as_images(value, field: str = "image") -> Tensor:
    """PIL images, file paths, lists of them, or (B, 3, H, W) / (3, H, W) tensors in [-1, 1] -> (B, 3, H, W)
    float32 in [-1, 1] (PIL: u / 255 * 2 - 1, as diffusers' image processor)."""
    if isinstance(value, Tensor):
        x = value[None] if value.ndim == 3 else value
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise ValueError(f"{field}: a tensor must be float (B, 3, H, W) or (3, H, W); got {x.dtype} "
                             f"{tuple(value.shape)}")
        x = x.detach().float().cpu()
        if not torch.isfinite(x).all() or x.min() < -1 - 1e-3 or x.max() > 1 + 1e-3:
            raise ValueError(f"{field}: tensor values must be in [-1, 1]")
        return x.clamp(-1, 1)
    arrays = [np.asarray(_open(v, field).convert("RGB"), dtype=np.float32) for v in _items(value, field)]
    return (_stack(arrays, field) / 255.0 * 2 - 1).permute(0, 3, 1, 2).contiguous()


def _mask_array(im: Image.Image) -> np.ndarray:
    """A mask image's coverage in [0, 1]: its alpha channel when it has a transparent one (A1111), else its
    luminance."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        alpha = np.asarray(im.convert("RGBA"), dtype=np.float32)[..., 3]
        if alpha.min() < 255:
            return alpha / 255.0
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def as_masks(value, field: str = "mask_image") -> Tensor:
    """PIL images, file paths, lists of them, or tensors (B, 1, H, W) / (B, H, W) / (H, W) in [0, 1] ->
    (B, 1, H, W) float32 in [0, 1], white = repaint."""
    if isinstance(value, Tensor):
        m = value
        if m.ndim == 2:
            m = m[None, None]
        elif m.ndim == 3:
            m = m[:, None]
        if m.ndim != 4 or m.shape[1] != 1 or not m.is_floating_point():
            raise ValueError(f"{field}: a tensor must be float (B, 1, H, W), (B, H, W) or (H, W); got {m.dtype} "
                             f"{tuple(value.shape)}")
        m = m.detach().float().cpu()
        if not torch.isfinite(m).all() or m.min() < 0 or m.max() > 1:
            raise ValueError(f"{field}: tensor values must be in [0, 1]")
        return m
    arrays = [_mask_array(_open(v, field)) for v in _items(value, field)]
    return _stack(arrays, field)[:, None]


def check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise ValueError(f"strength must be a number in [0, 1]; got {strength!r}")
    return float(strength)


def check_fill(fill) -> str:
    """A fill mode by name ("latent noise", "latent_noise", "latent-noise") or by A1111's number (0-3)."""
    if isinstance(fill, int) and not isinstance(fill, bool) and fill in _A1111_FILL:
        return _A1111_FILL[fill]
    name = fill.strip().lower().replace("_", " ").replace("-", " ") if isinstance(fill, str) else fill
    if name not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(map(repr, FILLS))} (or A1111's 0-3); got {fill!r}")
    return name


def _check_count(field: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{field} must be an integer >= {low}; got {value!r}")
    return int(value)


# --- pixel operations -----------------------------------------------------------------------------------


def resize(x: Tensor, width: int, height: int) -> Tensor:
    """(B, C, H, W) -> (B, C, height, width): antialiased bicubic, clamped to the input's range."""
    if x.shape[-2:] == (height, width):
        return x
    out = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out.clamp(x.min().item(), x.max().item())


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W) with standard deviation `sigma` pixels and A1111's kernel size
    2 * int(2.5 sigma + 0.5) + 1; edges replicated."""
    if sigma <= 0:
        return x
    radius = int(2.5 * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    C = x.shape[1]
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1).repeat(C, 1, 1, 1),
                 groups=C)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1).repeat(C, 1, 1, 1),
                    groups=C)


def fill_masked(image: Tensor, hole: Tensor) -> Tensor:
    """Fill the pixels where `hole` is 1 with a smooth extension of the colours around them (pull-push
    interpolation, Gortler et al. 1996): average the known pixels down an image pyramid, then fill each
    level's gaps from the coarser level on the way back up. Known pixels are returned unchanged.

    image (B, C, H, W); hole (B, 1, H, W) in {0, 1}. This is A1111's "fill" masked content."""
    keep = 1 - hole
    levels = [(image * keep, keep)]  # premultiplied colour and coverage
    while max(levels[-1][1].shape[-2:]) > 1:
        c, w = levels[-1]
        levels.append((F.avg_pool2d(c, 2, ceil_mode=True), F.avg_pool2d(w, 2, ceil_mode=True)))
    c, w = levels[-1]
    color = c / w.clamp(min=1e-8)  # no known pixel at all: 0, mid grey
    for c, w in reversed(levels[:-1]):
        up = F.interpolate(color, size=c.shape[-2:], mode="bilinear", align_corners=False)
        color = c + (1 - w) * up  # = w * mean(known) + (1 - w) * coarser estimate
    return image * keep + color * hole


def crop_region(mask: Tensor, width: int, height: int, padding: int = 0) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the box around a (1, H, W) mask's nonzero pixels, grown by `padding` on each side
    and then to the aspect ratio width:height, centred and moved back inside the image (A1111's "only
    masked" crop, also diffusers' `padding_mask_crop`). An empty mask gives the whole image."""
    H, W = mask.shape[-2:]
    ys, xs = torch.nonzero(mask.reshape(H, W) > 0, as_tuple=True)
    if len(xs) == 0:
        return 0, 0, W, H
    x1, x2 = max(int(xs.min()) - padding, 0), min(int(xs.max()) + 1 + padding, W)
    y1, y2 = max(int(ys.min()) - padding, 0), min(int(ys.max()) + 1 + padding, H)
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), H)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), W)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, extra: int, size: int) -> tuple[int, int]:
    """Widen [lo, hi) by `extra`, half on each side, shifted (then clipped) to fit in [0, size)."""
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi > size:
        lo, hi = lo - (hi - size), size
    if lo < 0:
        lo, hi = 0, min(hi - lo, size)
    return lo, hi


# --- outpainting ----------------------------------------------------------------------------------------


def outpaint(image, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0, *, multiple: int = 1,
             field: str = "outpaint") -> tuple[Tensor, Tensor]:
    """Extend the canvas: (canvas (B, 3, H', W') in [-1, 1], mask (B, 1, H', W')) for inpainting.

    The image sits at (left, top) of the canvas; the new border is white in the mask and pre-filled with a
    smooth extension of the image's edge colours (`fill_masked`). Each side grows by its pixel count; when
    the canvas is not a multiple of `multiple` (the VAE factor), the right (bottom) side grows further, or
    the left (top) side when only that one is extended."""
    pads = [_check_count(f"{field}: {name}", v) for name, v in
            (("left", left), ("right", right), ("top", top), ("bottom", bottom))]
    if not any(pads):
        raise ValueError(f"{field}: give at least one side (left, right, top, bottom) a padding > 0")
    images = as_images(image, "image")
    B, _, H, W = images.shape
    left, right, top, bottom = pads
    right += -(W + left + right) % multiple if right or not left else 0
    left += -(W + left + right) % multiple
    bottom += -(H + top + bottom) % multiple if bottom or not top else 0
    top += -(H + top + bottom) % multiple
    canvas = images.new_zeros(B, 3, H + top + bottom, W + left + right)
    hole = torch.ones(B, 1, *canvas.shape[-2:])
    canvas[:, :, top:top + H, left:left + W] = images
    hole[:, :, top:top + H, left:left + W] = 0
    return fill_masked(canvas, hole), hole


# --- what the pipeline edits ------------------------------------------------------------------------------


@dataclass
class EditSource:
    """The image (and mask) at the processing size, and how to put results back into the original."""

    image: Tensor  # (B, 3, h, w) in [-1, 1]: what is encoded
    repaint: Tensor | None  # (B, 1, h, w) in {0, 1}: the blurred mask >= 0.5; None for img2img
    original: Tensor  # (B, 3, H, W): the output canvas before pasting (the input, resized unless cropped)
    overlay: Tensor | None  # (B, 1, H, W): weight of the generated image in the output (1 = generated)
    crops: list[tuple[int, int, int, int]] | None  # only masked: (x1, y1, x2, y2) in the original, per image
    strength: float = 0.75  # the fraction of the schedule to run, from the noised image
    fill: str = "original"  # what the masked area starts from (FILLS)
    params: dict | None = None  # the options, for GenerationResult.params
    latents: Tensor | None = None  # (B, C, h, w): start from these latents, not the encoded image (hires fix)

    @property
    def width(self) -> int:
        return self.image.shape[-1]

    @property
    def height(self) -> int:
        return self.image.shape[-2]

    def paste(self, generated: Tensor) -> Tensor:
        """Generated (B, 3, h, w) images -> the output (float32): resized into their crop boxes ("only
        masked"), then blended with the original by the overlay weights, so pixels outside the (blurred) mask
        are the input's exactly (A1111's overlay; diffusers' apply_overlay). img2img output passes through."""
        if self.overlay is None:
            return generated
        generated = generated.float()
        original = self.original.to(generated.device)
        placed = generated
        if self.crops is not None:
            placed = original.clone()
            for i, (x1, y1, x2, y2) in enumerate(self.crops):
                placed[i, :, y1:y2, x1:x2] = resize(generated[i:i + 1], x2 - x1, y2 - y1)[0]
        return torch.lerp(original, placed, self.overlay.to(generated.device))


def _check_size(name: str, value, multiple: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < multiple or value % multiple:
        raise ValueError(f"{name} must be a positive multiple of {multiple}; got {value!r}")
    return int(value)


def _per_prompt(x: Tensor, field: str, count: int, repeats: int) -> Tensor:
    """One item for all prompts or one per prompt -> one per image (each prompt's repeated `repeats` times)."""
    if x.shape[0] not in (1, count):
        raise ValueError(f"{field}: give one, or one per prompt ({count}); got {x.shape[0]}")
    return x.expand(count, *x.shape[1:]).repeat_interleave(repeats, dim=0)


def prepare(image, mask_image=None, *, strength: float | None = None, width: int | None = None,
            height: int | None = None, multiple: int = 8, default_size: int = 512, count: int = 1, repeats: int = 1,
            mask_blur: float = 4, only_masked: bool = False, padding: int = 32, fill="original") -> EditSource:
    """Read and check the image, mask and options, and bring image and mask to the processing size.

    strength defaults to 0.75 (A1111) for img2img and 1 (diffusers) for inpainting.

    width/height default to the image's size rounded down to `multiple` (diffusers' img2img), or with
    `only_masked` to `default_size` (the crop around the mask is inpainted at the model's resolution and
    pasted back into the full-size image). The mask is binarised at 0.5 and blurred by `mask_blur` pixels
    (a Gaussian's sigma, as A1111); the repainted region is the blurred mask >= 0.5, and the result is laid
    over the original with weight min(1, 2 * blurred mask). count/repeats: prompts and images per prompt."""
    if strength is None:
        strength = 0.75 if mask_image is None else 1.0
    strength = check_strength(strength)
    images = _per_prompt(as_images(image, "image"), "image", count, repeats)
    H, W = images.shape[-2:]
    if width is not None:
        width = _check_size("width", width, multiple)
    if height is not None:
        height = _check_size("height", height, multiple)
    if mask_image is None:
        if only_masked:
            raise ValueError("inpaint_only_masked needs a mask_image")
        width = width or max(W - W % multiple, multiple)
        height = height or max(H - H % multiple, multiple)
        return EditSource(resize(images, width, height), None, images, None, None, strength,
                          params=dict(strength=strength))

    masks = _per_prompt(as_masks(mask_image, "mask_image"), "mask_image", count, repeats)
    if masks.shape[-2:] != (H, W):
        raise ValueError(f"mask_image must have the image's size {W}x{H}; got {masks.shape[-1]}x{masks.shape[-2]}")
    if isinstance(mask_blur, bool) or not isinstance(mask_blur, (int, float)) or not 0 <= mask_blur < math.inf:
        raise ValueError(f"mask_blur must be a number >= 0 (pixels); got {mask_blur!r}")
    padding = _check_count("inpaint_padding", padding)
    fill = check_fill(fill)
    params = dict(strength=strength, mask_blur=mask_blur, inpaint_only_masked=bool(only_masked),
                  inpaint_padding=padding, fill=fill)
    blurred = gaussian_blur((masks >= 0.5).float(), mask_blur)
    overlay = (2 * blurred).clamp(max=1)
    if not only_masked:
        width = width or max(W - W % multiple, multiple)
        height = height or max(H - H % multiple, multiple)
        images, blurred, overlay = resize(images, width, height), resize(blurred, width, height), \
            resize(overlay, width, height)
        return EditSource(images, (blurred >= 0.5).float(), images, overlay, None, strength, fill, params)
    width, height = width or default_size, height or default_size
    crops = [crop_region(m, width, height, padding) for m in blurred]
    crop = lambda x, box: resize(x[None, :, box[1]:box[3], box[0]:box[2]], width, height)[0]  # noqa: E731
    cropped = torch.stack([crop(x, box) for x, box in zip(images, crops)])
    repaint = torch.stack([crop(m, box) for m, box in zip(blurred, crops)]) >= 0.5
    return EditSource(cropped, repaint.float(), images, overlay, crops, strength, fill, params)


# --- where sampling starts, and the wrappers -------------------------------------------------------------------


def strength_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The tail of a sampling schedule that img2img runs: its last int(steps * strength) steps (diffusers'
    get_timesteps, for every scheduler family: a second-order scheduler's doubled timesteps are one sigma
    here). strength 1 keeps all of them; below 1 / steps none, just the final level."""
    steps = len(sigmas) - 1
    return sigmas[steps - min(int(steps * strength), steps):]


@dataclass
class EditPlan:
    """Where sampling starts, and what the denoiser and the final latents need."""

    sigmas: Tensor  # the levels to sample; a single 0 when there is nothing to denoise (strength 0)
    x: Tensor  # (B, C, h, w) the sample at sigmas[0], VE convention
    cond: dict  # extra conditioning for the network ({"concat": mask + masked latents} for inpainting networks)
    known: Tensor | None = None  # (B, C, h, w) the image's latents, kept outside latent_mask
    latent_mask: Tensor | None = None  # (B, 1, h, w) 1 = repaint
    source: EditSource | None = None  # the edited images (None: text-to-image)

    def network(self, net):
        """The network, taking the `concat` conditioning when the plan has it."""
        return ConcatInputs(net) if "concat" in self.cond else net

    def denoiser(self, denoiser):
        """The denoiser, re-imposing the known region when the plan has one."""
        return denoiser if self.known is None else KnownRegionDenoiser(denoiser, self.known, self.latent_mask)

    def finish(self, x: Tensor) -> Tensor:
        """Final latents: exactly the image's outside the latent mask (no-op without one)."""
        return x if self.known is None else torch.lerp(self.known, x, self.latent_mask)

    def paste(self, images: Tensor) -> Tensor:
        """Decoded images -> the output images (EditSource.paste)."""
        return images if self.source is None else self.source.paste(images)

    @property
    def params(self) -> dict:
        return {} if self.source is None or self.source.params is None else dict(self.source.params)


def plan_edit(source: EditSource, sigmas: Tensor, *, encode, generator, shape, device,
              noise: Tensor | None = None, inpaint_network: bool = False, noise_scale: float = 1.0,
              tail=strength_sigmas, add_noise=None) -> EditPlan:
    """Where img2img / inpainting sampling starts, drawing from `generator` in diffusers' order (image
    latents, noise, masked-image latents), so a seed gives diffusers' image.

    encode(images, generator) -> latents; shape: the latents' (B, C, h, w); noise: the noise to add (drawn
    when None). The tail is the last int(steps * source.strength) steps of `sigmas`; it starts from the
    image latents plus noise at its first sigma (img2img);
    inpainting networks at strength 1 start from pure noise * noise_scale instead (diffusers' inpainting
    pipeline). Fill modes change the latents under the mask ("latent noise": fresh noise, "latent
    nothing": zeros) or the pixels before encoding ("fill").

    tail(sigmas, strength) picks the levels to run and add_noise(x0, noise, sigma) noises the image to the first
    of them: the VE ones by default (x0 + sigma * noise); flow models pass theirs (reverie.sampling)."""
    strength = source.strength
    tail = tail(sigmas, strength)
    masked, factor = source.repaint is not None, source.height // shape[-2]
    pure_noise = inpaint_network and strength == 1
    image = fill_masked(source.image, source.repaint) if masked and source.fill == "fill" else source.image
    if source.latents is not None:  # already latents (A1111's latent upscalers): nothing to encode
        init = source.latents.to(device, torch.float32)
    else:
        init = None if pure_noise else _encode_source(encode, image.to(device), generator)
    noise = randn(shape, generator, torch.device("cpu"), torch.float32) if noise is None else noise
    noise = noise.to(device, torch.float32)
    known, latent_mask = init, None  # known: the latents kept outside the mask (A1111: after "fill")
    if masked:
        latent_mask = F.max_pool2d(source.repaint.to(device), factor)  # a latent is repainted if any pixel is
        if init is not None and source.fill in ("latent noise", "latent nothing"):
            fresh = randn(shape, generator, torch.device("cpu"), torch.float32).to(device) \
                if source.fill == "latent noise" else torch.zeros_like(init)
            init = torch.lerp(init, fresh, latent_mask)
    cond = {}
    if inpaint_network:  # diffusers' layout: latents, the mask (nearest), the masked image's latents
        repaint = source.repaint.to(device) if masked else torch.ones(shape[0], 1, source.height, source.width,
                                                                        device=device)
        masked_latents = encode(source.image.to(device) * (1 - repaint), generator).float()
        cond["concat"] = torch.cat([F.interpolate(repaint, size=shape[-2:]), masked_latents], dim=1)
    if len(tail) == 1:  # nothing to denoise (strength 0): the image's own latents
        return EditPlan(tail.new_zeros(1), known, cond, source=source)
    if pure_noise:
        x = noise * noise_scale
    else:
        x = init + tail[0].item() * noise if add_noise is None else add_noise(init, noise, tail[0].item())
    if masked and not inpaint_network:
        return EditPlan(tail, x, cond, known, latent_mask, source)
    return EditPlan(tail, x, cond, source=source)


def _encode_source(encode, image: Tensor, generator) -> Tensor:
    """The image latents. One source image for the whole batch with one generator is encoded once and its
    latents repeated, as diffusers' img2img pipelines do (one posterior sample, not one per row); with one
    generator per image, each row draws its own (as diffusers, and as that image generated alone)."""
    if not isinstance(generator, (list, tuple)) and len(image) > 1 and bool((image == image[:1]).all()):
        return encode(image[:1], generator).float().expand(len(image), -1, -1, -1).contiguous()
    return encode(image, generator).float()


class KnownRegionDenoiser(nn.Module):
    """D'(x, sigma) = m * D(x, sigma) + (1 - m) * x0_known: inpainting with any denoiser.

    With the known region's x0 estimate pinned to the image latents, a deterministic sampler keeps that
    region on the image's own noised trajectory (x = x0_known + sigma * eps) and ends on it exactly at
    sigma = 0; the masked region is denoised in context (A1111's mask blending of the denoised latents)."""

    def __init__(self, denoiser, known: Tensor, mask: Tensor):
        super().__init__()
        self.denoiser, self.known, self.mask = denoiser, known, mask

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        return torch.lerp(self.known, self.denoiser(x, sigma, **cond), self.mask)


class ConcatInputs(nn.Module):
    """A network whose input is the sample concatenated with `concat` along channels (SD inpainting UNets:
    4 latent + 1 mask + 4 masked-image latent channels). The rest of the conditioning passes through."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, *, concat: Tensor, **cond) -> Tensor:
        return self.net(torch.cat([x, concat.to(x.dtype)], dim=1), t, **cond)
