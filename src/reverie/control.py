"""ControlNet at sampling time: control images, their preprocessors, and the UNet wrapper that adds the
ControlNets' residuals at every step.

    pipe(prompt, controlnet="path/to/controlnet", control_image=canny(photo), controlnet_conditioning_scale=0.8)

The wrapper sits around the network, below the denoiser: `ControlledUNet(unet, controls, timesteps)` is called
like the UNet, runs each ControlNet on the same (scaled) input, timestep and text, and passes the sum of their
residuals to the UNet (diffusers' StableDiffusionControlNetPipeline and MultiControlNetModel, step for step; for
SDXL, StableDiffusionXLControlNetPipeline: the pooled text and time ids go to the ControlNets too).
A ControlNet is active at step i of n unless i / n < start or (i + 1) / n > end (diffusers' control_guidance
start and end). Classifier-free guidance batches (uncond, cond) get the control on both halves; in guess mode
only the conditional half does, with residuals scaled from 0.1 at the first skip to 1 at the mid block.

Preprocessors turn an ordinary image into a control image (CONTROL_TYPES): "canny" edges (Canny 1986, as
OpenCV's cv2.Canny computes them), "segmentation" (the shapes data set's layout: every shape filled with its
class colour on black), "none" (the image is a control image already).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

# ------------------------------------------------------------------------------------------------ preprocessors


def _pil(image, name: str = "image") -> Image.Image:
    """A PIL image from a PIL image, a path, or an (H, W, 3) uint8 array, in RGB."""
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise ValueError(f"{name}: no such file {str(image)!r}")
        try:
            image = Image.open(image)
            image.load()
        except OSError as e:
            raise ValueError(f"{name}: cannot read {str(image)!r} as an image: {e}") from e
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"{name}: arrays must be (H, W) or (H, W, 3) uint8; got {image.shape} {image.dtype}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be a PIL image, a path or an (H, W, 3) uint8 array; got {type(image).__name__}")
    return image.convert("RGB")


def canny(image, low: float = 100, high: float = 200) -> Image.Image:
    """Canny edges (Canny 1986) by OpenCV's cv2.Canny(image, low, high) on the RGB image, as ControlNet's canny
    annotator computes them: 3x3 Sobel gradients, L1 magnitude, non-maximum suppression, hysteresis between the
    thresholds. Returns white edges on black, RGB (ControlNet's input)."""
    import cv2

    if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and 0 <= low <= high):
        raise ValueError(f"canny thresholds must satisfy 0 <= low <= high; got low={low!r}, high={high!r}")
    edges = cv2.Canny(np.ascontiguousarray(np.asarray(_pil(image).convert("RGB"))), low, high)  # (H, W) 0 / 255
    return Image.fromarray(np.repeat(edges[..., None], 3, axis=-1))


SEGMENT_CLASSES = ("background", "circle", "square", "triangle")
# class colours of the shapes segmentation maps, far from each other and from the data set's palette hues
SEGMENT_PALETTE = {"background": (0, 0, 0), "circle": (255, 0, 255), "square": (0, 255, 255),
                   "triangle": (255, 255, 255)}


def shapes_segmentation(placed, resolution: int = 64) -> Image.Image:
    """The segmentation map of a shapes scene (reverie.data.shapes Placed objects): each shape's pixels
    (shape_masks) filled with its class colour (SEGMENT_PALETTE) on black."""
    out = np.zeros((resolution, resolution, 3), dtype=np.uint8)
    for p, mask in zip(placed, shape_masks(placed, resolution)):
        out[mask] = SEGMENT_PALETTE[p.shape]
    return Image.fromarray(out)


def shape_masks(placed, resolution: int = 64) -> list[np.ndarray]:
    """One (H, W) boolean mask per shape of a scene: the pixels it covers at least half-way, with the geometry
    of reverie.data.shapes.render (drawn at SUPERSAMPLE x, box-filtered)."""
    from .data.shapes import CANVAS, SUPERSAMPLE

    scale = resolution * SUPERSAMPLE / CANVAS
    masks = []
    for p in placed:
        big = Image.new("L", (resolution * SUPERSAMPLE,) * 2, 0)
        draw = ImageDraw.Draw(big)
        x, y, h = p.x * scale, p.y * scale, p.side * scale / 2
        box = (x - h, y - h, x + h, y + h)
        if p.shape == "circle":
            draw.ellipse(box, fill=255)
        elif p.shape == "square":
            draw.rectangle(box, fill=255)
        else:  # apex up, as render draws it
            draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=255)
        masks.append(np.asarray(big.resize((resolution, resolution), Image.BOX)) >= 128)
    return masks


def segmentation(image) -> Image.Image:
    """The segmentation map of a shapes image (a generated one, or a drawing in the data set's palette): the
    shapes analyzer (reverie.eval.shapes) finds each shape, its class and its pixels; each is filled with its
    class colour on black, as shapes_segmentation draws a scene."""
    from .eval.shapes import MIN_COVERAGE, PALETTE, coverage_map, find_objects, to_pixels

    image = _pil(image)
    pixels = to_pixels(image)
    colors, coverage = coverage_map(pixels)
    out = np.zeros(pixels.shape, dtype=np.uint8)
    for obj in reversed(find_objects(image)):  # largest last, on top
        left, top, right, bottom = obj.box
        mask = np.zeros(colors.shape, dtype=bool)
        mask[top:bottom, left:right] = True
        mask &= (colors == list(PALETTE).index(obj.color)) & (coverage >= MIN_COVERAGE)
        out[mask] = SEGMENT_PALETTE[obj.shape]
    return Image.fromarray(out)


CONTROL_TYPES = {
    "none": lambda image: _pil(image),  # the image is a control image already
    "canny": canny,
    "segmentation": segmentation,
}


def check_control_type(control_type: str, field: str = "control_type") -> str:
    if control_type not in CONTROL_TYPES:
        raise ValueError(f"{field} must be one of {', '.join(map(repr, CONTROL_TYPES))}; got {control_type!r}")
    return control_type


def preprocess(image, control_type: str = "none", **options) -> Image.Image:
    """A control image from an image, by the preprocessor `control_type` (a CONTROL_TYPES name)."""
    return CONTROL_TYPES[check_control_type(control_type)](image, **options)


def dataset_control(dataset, index: int, control_type: str) -> Image.Image:
    """The control image of a data set's item: a shapes scene's own segmentation map when the data set knows its
    geometry (ShapesDataset.placements), else the preprocessor applied to the item's image."""
    if control_type == "segmentation" and hasattr(dataset, "placements"):
        return shapes_segmentation(dataset.placements[index], dataset.resolution)
    image = dataset[index]["image"]  # (3, H, W) in [-1, 1]
    pixels = ((image.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return preprocess(Image.fromarray(pixels), control_type)


# ------------------------------------------------------------------------------------------------ control images


def default_size(control_image, width: int | None, height: int | None, factor: int) -> tuple[int | None, int | None]:
    """(width, height) of a generation: as given, else the (first) control image's size rounded down to a
    multiple of the VAE factor, as diffusers' ControlNet pipeline does. No control image: unchanged."""
    if control_image is None or (width is not None and height is not None):
        return width, height
    first = control_image
    while isinstance(first, (list, tuple)) and first:
        first = first[0]
    if isinstance(first, Tensor):
        h, w = first.shape[-2:]
    else:
        w, h = _pil(first, "control_image").size
    return (w - w % factor if width is None else width), (h - h % factor if height is None else height)


def control_tensor(images, width: int, height: int) -> Tensor:
    """(N, 3, height, width) float32 in [0, 1] from one image or a list: PIL images, paths or uint8 arrays are
    resized with Lanczos, tensors ((3, H, W) or (N, 3, H, W), in [0, 1]) with nearest neighbours, exactly as
    diffusers' control image processor (VaeImageProcessor without normalisation) prepares them."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError("control_image: got an empty list")
    if all(isinstance(i, Tensor) for i in items):
        x = torch.cat([i[None] if i.ndim == 3 else i for i in items]).float()
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"control_image tensors must be (3, H, W) or (N, 3, H, W); got {tuple(x.shape)}")
        if x.min() < 0 or x.max() > 1:
            raise ValueError(f"control_image tensors must hold values in [0, 1]; got [{x.min():.3g}, {x.max():.3g}]")
        return x if x.shape[-2:] == (height, width) else nn.functional.interpolate(x, size=(height, width))
    if any(isinstance(i, Tensor) for i in items):
        raise ValueError("control_image: a list must hold images or tensors, not both")
    pils = [_pil(i, "control_image") for i in items]
    pils = [im if im.size == (width, height) else im.resize((width, height), Image.LANCZOS) for im in pils]
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in pils])).permute(0, 3, 1, 2)


@dataclass
class Control:
    """One ControlNet's part in a generation."""

    controlnet: nn.Module  # a reverie.models.controlnet.ControlNet
    image: Tensor  # (B, 3, H, W) in [0, 1]: one control image per image of the batch
    scale: float = 1.0  # controlnet_conditioning_scale: residuals are multiplied by it
    start: float = 0.0  # control_guidance_start: fraction of the steps before the ControlNet starts
    end: float = 1.0  # control_guidance_end: fraction of the steps after which it stops
    name: str = "controlnet"  # what params records (its path when loaded from one)

    def active(self, i: int, n: int) -> bool:
        """Whether this ControlNet acts at step i of n (diffusers' controlnet_keep)."""
        return not (i / n < self.start or (i + 1) / n > self.end)


def _per_net(name: str, value, n: int) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name}: give one value, or one per ControlNet ({n}); got {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number (or a list of them); got {v!r}")
    return [float(v) for v in values]


def prepare(controlnet, control_image, scale=1.0, start=0.0, end=1.0, *, prompts: int, images_per_prompt: int,
            width: int, height: int, device="cpu", dtype=torch.float32, offload: bool = False,
            allow_pickle: bool = False) -> list[Control]:
    """The Controls of a generation, checked. controlnet: a ControlNet, a ControlNet folder, or a list of these
    (several ControlNets, their residuals summed); control_image: for one ControlNet an image or a list with one
    per prompt; for several, a list with one such entry per ControlNet. scale, start, end: one value, or one per
    ControlNet. ControlNets are moved to dtype and to device (the CPU with offload), the control images to
    device. Neither controlnet nor control_image: []."""
    if controlnet is None and control_image is None:
        return []
    if controlnet is None:
        raise ValueError("controlnet: a control_image needs a controlnet (a ControlNet or a ControlNet folder)")
    if control_image is None:
        raise ValueError("control_image: a controlnet needs a control image")
    nets = list(controlnet) if isinstance(controlnet, (list, tuple)) else [controlnet]
    if not nets:
        raise ValueError("controlnet: got an empty list")
    if len(nets) > 1:
        if not isinstance(control_image, (list, tuple)) or len(control_image) != len(nets):
            raise ValueError(f"control_image: with {len(nets)} ControlNets, give a list with one control image "
                             f"(or one list of images) per ControlNet")
        images = list(control_image)
    else:
        images = [control_image]
    scales, starts, ends = (_per_net(name, v, len(nets)) for name, v in (
        ("controlnet_conditioning_scale", scale), ("control_guidance_start", start), ("control_guidance_end", end)))
    for s, e in zip(starts, ends):
        if not 0 <= s < e <= 1:
            raise ValueError(f"control_guidance_start and control_guidance_end must satisfy 0 <= start < end <= 1; "
                             f"got start={s}, end={e}")
    from .models.controlnet import ControlNet

    controls = []
    for net, image, s, st, e in zip(nets, images, scales, starts, ends):
        name = "controlnet"
        if isinstance(net, (str, Path)):
            from .loading import load_controlnet

            name, net = str(net), load_controlnet(net, allow_pickle=allow_pickle)
        if not isinstance(net, ControlNet):
            raise ValueError(f"controlnet must be a ControlNet, a ControlNet folder or a list of these; got "
                             f"{type(net).__name__}")
        tensor = control_tensor(image, width, height)
        if len(tensor) not in (1, prompts):
            raise ValueError(f"control_image: give one control image, or one per prompt ({prompts}); got "
                             f"{len(tensor)}")
        tensor = tensor.repeat_interleave(prompts * images_per_prompt // len(tensor), dim=0)
        net.to("cpu" if offload else device, dtype).eval().requires_grad_(False)
        controls.append(Control(net, tensor.to(device, dtype), s, st, e, name))
    return controls


# ------------------------------------------------------------------------------------------------ sampling


class ControlledUNet(nn.Module):
    """unet(sample, timestep, encoder_hidden_states) with the Controls' residuals added.

    timesteps: the (n,) network timesteps of the sampling plan, one per step, so that a call knows its step
    (the nearest one) and each Control acts only on its steps."""

    def __init__(self, unet: nn.Module, controls: list[Control], timesteps: Tensor, guess_mode: bool = False):
        super().__init__()
        self.unet, self.controls, self.guess_mode = unet, controls, guess_mode
        self.timesteps = timesteps.detach().float().cpu()

    def step_index(self, timestep) -> int:
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        return int((self.timesteps - t).abs().argmin())

    def forward(self, sample: Tensor, timestep, encoder_hidden_states: Tensor, *, text_embeds: Tensor | None = None,
                time_ids: Tensor | None = None) -> Tensor:
        """text_embeds (B, pooled dim) and time_ids (B, n): SDXL's added conditioning, given to the ControlNets
        and to the UNet alike (None for SD)."""
        i, n = self.step_index(timestep), len(self.timesteps)
        added = {k: v for k, v in (("text_embeds", text_embeds), ("time_ids", time_ids)) if v is not None}
        down = mid = None
        for c in self.controls:
            scale = c.scale if c.active(i, n) else 0.0
            if scale == 0:  # diffusers runs it and multiplies by 0: adding nothing is the same, exactly
                continue
            d, m = self._residuals(c, sample, timestep, encoder_hidden_states, scale, added)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return self.unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=down,
                         mid_block_additional_residual=mid, **added)

    def _residuals(self, c: Control, sample, timestep, context, scale, added: dict):
        """One ControlNet's residuals for a batch of len(c.image) images, or a CFG batch (uncond, cond) of twice
        that: the control goes to both halves, or in guess mode to the conditional half only (zeros elsewhere;
        the added conditioning `added` is cut to that half too)."""
        B, n = len(sample), len(c.image)
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.expand(B) if t.ndim == 0 or len(t) == 1 else t
        if B == n:
            return c.controlnet(sample, t, context, c.image, conditioning_scale=scale, guess_mode=self.guess_mode,
                                **added)
        if B != 2 * n:
            raise ValueError(f"ControlledUNet: a batch of {B} does not fit {n} control images (nor {2 * n} with "
                             f"classifier-free guidance)")
        if not self.guess_mode:
            return c.controlnet(sample, t, context, torch.cat([c.image, c.image]), conditioning_scale=scale, **added)
        down, mid = c.controlnet(sample[n:], t[n:], context[n:], c.image, conditioning_scale=scale, guess_mode=True,
                                 **{k: v[n:] for k, v in added.items()})
        return [torch.cat([torch.zeros_like(d), d]) for d in down], torch.cat([torch.zeros_like(mid), mid])


def fits(controlnet, unet: nn.Module, vae_factor: int) -> bool:
    """Whether the ControlNet's residuals fit the UNet and its control encoder the VAE's factor (check_fits)."""
    try:
        check_fits(controlnet, unet, vae_factor)
    except ValueError:
        return False
    return True


def check_fits(controlnet, unet: nn.Module, vae_factor: int) -> None:
    """A ValueError unless the ControlNet's residuals fit the UNet and its control encoder the VAE's factor."""
    c, u = controlnet.config, unet.config
    layout = ("in_channels", "block_out_channels", "down_block_types")
    if any(getattr(c, k) != getattr(u, k) for k in layout) or set(u.per_block("layers_per_block")) != {
            c.layers_per_block}:
        raise ValueError(f"controlnet: made for another UNet ({', '.join(f'{k}={getattr(c, k)}' for k in layout)}, "
                         f"layers_per_block={c.layers_per_block}); this model's UNet has "
                         f"{', '.join(f'{k}={getattr(u, k)}' for k in layout)}, "
                         f"layers_per_block={u.layers_per_block}")
    if c.addition_embed_type != u.addition_embed_type:
        raise ValueError(f"controlnet: its addition_embed_type is {c.addition_embed_type!r} but this model's UNet's is "
                         f"{u.addition_embed_type!r} (an SDXL UNet needs an SDXL ControlNet, and an SD UNet an SD one)")
    if controlnet.downsample_factor != vae_factor:
        raise ValueError(f"controlnet: its control encoder downsamples {controlnet.downsample_factor}x but this "
                         f"model's VAE {vae_factor}x (conditioning_embedding_out_channels needs "
                         f"{vae_factor.bit_length()} entries; ControlNet.from_unet(unet, downsample_factor="
                         f"{vae_factor}))")


@contextlib.contextmanager
def attach(pipe, unet: nn.Module, controls: list[Control], sigmas: Tensor, timestep_mapping: str,
           guess_mode: bool = False):
    """The pipeline's UNet wrapped with its Controls for one sampling run over `sigmas` (the UNet itself when
    there are none); with model offload, the ControlNets visit the device for the run. guess_mode is also on
    when the first ControlNet pools its conditions globally, as in diffusers."""
    if not controls:
        yield unet
        return
    for c in controls:
        check_fits(c.controlnet, unet, pipe.downsample_factor)
    guess_mode = guess_mode or controls[0].controlnet.config.global_pool_conditions
    timesteps = pipe.schedule.sigma_to_t(sigmas[:-1].float(), timestep_mapping)
    with contextlib.ExitStack() as stack:
        for c in controls:
            stack.enter_context(pipe._on_device(c.controlnet))
        yield ControlledUNet(unet, controls, timesteps, guess_mode)


def describe(controls: list[Control], guess_mode: bool = False) -> dict:
    """What GenerationResult.params records about the Controls ({} without any)."""
    if not controls:
        return {}
    guess_mode = guess_mode or controls[0].controlnet.config.global_pool_conditions
    return {"controlnet": [c.name for c in controls], "controlnet_conditioning_scale": [c.scale for c in controls],
            "control_guidance_start": [c.start for c in controls], "control_guidance_end": [c.end for c in controls],
            "guess_mode": guess_mode}
