"""Text-to-image: prompt -> conditioning -> sampler -> VAE decode -> images and the parameters used.

The pipeline only wires components together: the network becomes a denoiser (reverie.denoisers),
guidance is a denoiser wrapper (reverie.guidance), the sampler and its noise levels come from
reverie.samplers.resolve and the model's own DiscreteSchedule, so every sampler name works with every
model, and a folder's scheduler config (beta schedule, prediction type, timestep spacing, steps_offset) is
honoured exactly as diffusers honours it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import control, edit
from .denoisers import DiscreteDenoiser, randn
from .guidance import CFGDenoiser
from .progress import ProgressBar
from .samplers import resolve
from .schedules import DiscreteSchedule

MAX_SEED = 2**32 - 1


@dataclass
class GenerationResult:
    """What a generation produced and exactly how: enough to reproduce it."""

    images: list[Image.Image]
    latents: Tensor  # (B, C, h, w) final latents, before the VAE
    params: dict = field(default_factory=dict)  # prompt, negative_prompt, steps, guidance_scale, sampler, ...
    nsfw: list[bool] = field(default_factory=list)  # per image: flagged by the safety filter (and replaced)


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (high and value > high):
        bound = f"in [{low}, {high}]" if high else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}; got {value!r}")
    return int(value)


def _as_prompts(name: str, value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise ValueError(f"{name} must be a string or a non-empty list of strings; got {type(value).__name__}")


def _guidance(guidance_scale, prompts: int, num_images: int):
    """(use_cfg, scale for CFGDenoiser) from one number or a list with one number per prompt.

    As diffusers, a scale at or below 1 means no unconditional pass; in a list, such rows get scale 1
    (D_uncond + 1 * (D_cond - D_uncond) = D_cond), so a batch of mixed scales gives each row what it gives
    alone, up to float rounding."""
    scales = guidance_scale if isinstance(guidance_scale, (list, tuple)) else [guidance_scale]
    for s in scales:
        if isinstance(s, bool) or not (isinstance(s, (int, float)) and math.isfinite(s) and s >= 0):
            raise ValueError(f"guidance_scale must be a finite number >= 0 (or a list of them); got {s!r}")
    if not isinstance(guidance_scale, (list, tuple)):
        return guidance_scale > 1, (guidance_scale if guidance_scale > 1 else 1.0)
    if len(scales) != prompts:
        raise ValueError(f"guidance_scale: a list needs one scale per prompt ({prompts}); got {len(scales)}")
    if max(scales) <= 1:
        return False, 1.0
    return True, torch.tensor([max(float(s), 1.0) for s in scales for _ in range(num_images)])


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounded as diffusers rounds."""
    arr = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype("uint8")) for a in arr]


class Pipeline:
    """A latent text-to-image model: UNet, VAE, text encoder and the training schedule.

    Pipeline.from_pretrained(path) opens a diffusers folder or a single-file checkpoint; calling the
    pipeline generates images. Components stay on `device` in `dtype`; with `offload=True` they live on
    the CPU and visit the device one at a time (for small GPU memory)."""

    def __init__(self, unet, vae, text_encoder, schedule: DiscreteSchedule, *, name: str = "model",
                 device="cpu", dtype=torch.float32, offload: bool = False, scheduler_config: dict | None = None):
        self.unet, self.vae, self.text_encoder, self.schedule = unet, vae, text_encoder, schedule
        # the diffusers scheduler config this model came with, written back by save_pretrained
        self.scheduler_config = scheduler_config or {"_class_name": "DDIMScheduler", "clip_sample": False,
                                                     **dataclasses.asdict(schedule)}
        self.name, self.device, self.dtype, self.offload = name, torch.device(device), dtype, offload
        # the VAE asks for float32 when fp16 overflows it (diffusers' force_upcast; SD's VAE does)
        self.vae_dtype = torch.float32 if dtype == torch.float16 and vae.config.force_upcast else dtype
        for module, module_dtype in ((unet, dtype), (vae, self.vae_dtype), (text_encoder, dtype)):
            module.to("cpu" if offload else self.device, module_dtype).eval().requires_grad_(False)

    # --- loading and saving -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype=torch.float32, allow_pickle: bool = False,
                        prediction_type: str | None = None, tokenizer=None, offload: bool = False,
                        safety_checker="auto") -> "Pipeline":
        """Open a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or
        a single-file Stable Diffusion checkpoint (.safetensors; pickles only with allow_pickle=True).

        prediction_type overrides the scheduler config's (single files do not record it: SD 2.x 768 models
        are "v_prediction"). tokenizer: a tokenizer folder, needed for single files (they contain none).
        safety_checker: "auto" (on when the folder ships one), None (off), a checker folder, a callable
        images -> flags, or a reverie.safety.SafetyFilter (see reverie.safety.from_option)."""
        from .loading import load_folder, load_single_file

        path = Path(path)
        if not path.exists():
            raise ValueError(f"path does not exist: {path}")
        loader = load_folder if path.is_dir() else load_single_file
        unet, vae, text_encoder, scheduler_config = loader(path, allow_pickle=allow_pickle, tokenizer=tokenizer)
        if prediction_type is not None:
            scheduler_config = dict(scheduler_config, prediction_type=prediction_type)
        schedule = DiscreteSchedule.from_config(scheduler_config)
        pipe = cls(unet, vae, text_encoder, schedule, name=path.stem, device=device, dtype=dtype, offload=offload,
                   scheduler_config=scheduler_config)
        from .safety import from_option

        pipe.source = path
        pipe.safety_checker = from_option(safety_checker, path, device="cpu" if offload else device, dtype=dtype)
        return pipe

    def save_pretrained(self, path, *, dtype=None) -> None:
        """Write a diffusers folder that diffusers' StableDiffusionPipeline.from_pretrained opens."""
        from .loading import save_folder

        save_folder(self, Path(path), dtype=dtype)

    # --- memory options -----------------------------------------------------------------------------

    def enable_attention_slicing(self, slice_size: int | None = 1) -> None:
        from .models.layers import set_attention_slice

        set_attention_slice(self.unet, slice_size)

    @contextlib.contextmanager
    def _on_device(self, module):
        """Model offload: move a component to the device for the duration of its stage."""
        if not self.offload:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to("cpu")

    @property
    def downsample_factor(self) -> int:
        return self.vae.downsample_factor

    @property
    def default_size(self) -> int:
        """The image size the model was trained at (diffusers' default height and width)."""
        sample_size = self.unet.config.sample_size
        return (sample_size if isinstance(sample_size, int) else sample_size[0]) * self.downsample_factor

    # --- safety and provenance (reverie.safety, reverie.metadata) ----------------------------------------

    safety_checker = None  # a reverie.safety.SafetyFilter or None; from_pretrained sets it
    source = None  # the path the model was opened from: its hash goes into image metadata

    def _guard_previews(self, callback, prompts: list[str]):
        """The step callback, seeing latents only through the safety filter (reverie.safety.CheckedStep)."""
        if self.safety_checker is None or callback is None:
            return callback

        def decode(latents):
            with self._on_device(self.vae) as vae, torch.inference_mode():
                return to_pil(vae.decode(latents.to(self.device, self.vae_dtype) / vae.scaling_factor
                                         + vae.shift_factor))

        return self.safety_checker.guard(callback, decode, prompts)

    def _checked(self, result: GenerationResult, seed) -> GenerationResult:
        """Replace flagged images (and zero their latents: they would decode to them); record the flags, how
        seeds map to images, and the model's hash in params."""
        from .metadata import model_hash

        nsfw = [False] * len(result.images)
        if self.safety_checker is not None:
            result.images, nsfw = self.safety_checker(result.images, result.params["prompt"])
            keep = torch.tensor([not f for f in nsfw], dtype=result.latents.dtype)
            result.latents = result.latents * keep.reshape(-1, *[1] * (result.latents.ndim - 1))
        result.nsfw = nsfw
        result.params.update(nsfw=nsfw, seed_per_image=isinstance(seed, (list, tuple)) or len(nsfw) == 1,
                             model_hash=model_hash(self.source) if self.source is not None else None)
        return result

    # --- generation ---------------------------------------------------------------------------------

    def _generators(self, seed, batch: int):
        """One CPU generator for an int seed (diffusers' torch.Generator("cpu").manual_seed(s)), one per image
        for a list of seeds. Returns (generator or list, seeds recorded per image)."""
        if seed is None:
            seed = random.randint(0, MAX_SEED)
        if isinstance(seed, (list, tuple)):
            if len(seed) != batch:
                raise ValueError(f"seed: a list of seeds needs one per image ({batch}); got {len(seed)}")
            seeds = [_check_int("seed", s, 0, MAX_SEED) for s in seed]
            return [torch.Generator("cpu").manual_seed(s) for s in seeds], seeds
        seed = _check_int("seed", seed, 0, MAX_SEED)
        return torch.Generator("cpu").manual_seed(seed), [seed] * batch

    def encode_prompts(self, prompts: list[str], negatives: list[str] | None, clip_skip=None):
        """Text embeddings for the prompts and (if given) the negatives, encoded in one batch so long prompts
        and their negatives get the same number of 77-token chunks."""
        with self._on_device(self.text_encoder):
            embeds = self.text_encoder.encode(prompts + (negatives or []), clip_skip=clip_skip)
        embeds = embeds.to(self.device, self.dtype)
        return (embeds[: len(prompts)], embeds[len(prompts):]) if negatives else (embeds, None)

    # --- img2img, inpainting, outpainting (the logic lives in reverie.edit) ---------------------------------

    @property
    def inpaint_network(self) -> bool:
        """Whether the UNet also takes a mask and masked-image latents (SD inpainting: 4 + 1 + 4 channels)."""
        return self.unet.config.in_channels != self.vae.config.latent_channels

    def encode_images(self, images: Tensor, generator=None) -> Tensor:
        """(B, 3, H, W) images in [-1, 1] -> float32 latents on the device: a sample of q(z | x) drawn from
        `generator` (as diffusers' pipelines), or the posterior mean without one."""
        with self._on_device(self.vae) as vae, torch.inference_mode():
            x = images.to(self.device, self.vae_dtype)
            if generator is None:
                return ((vae.encode(x).mode() - vae.shift_factor) * vae.scaling_factor).float()
            return vae.latents_from_images(x, generator).float()

    def _edit_source(self, image, mask_image, strength, width, height, prompts: int, num_images: int, **options):
        """The image and mask to edit at the processing size (reverie.edit.prepare), or None for txt2img."""
        if image is None:
            for name, value in (("mask_image", mask_image), ("strength", strength)):
                if value is not None:
                    raise ValueError(f"{name} needs an image to edit (image=...)")
            if not self.inpaint_network:
                return None
            # text-to-image with an inpainting network: everything masked, nothing known (as A1111)
            size = (height or self.default_size, width or self.default_size)
            image, mask_image, strength = torch.zeros(1, 3, *size), torch.ones(1, 1, *size), 1.0
        return edit.prepare(image, mask_image, strength=strength, width=width, height=height,
                            multiple=self.downsample_factor, default_size=self.default_size, count=prompts,
                            repeats=num_images, **options)

    def _start(self, source, sigmas: Tensor, family: str, generator, latents, shape) -> edit.EditPlan:
        """Where sampling starts: noise at the first sigma (txt2img; `latents` is that noise), or the noised
        image on the tail of the schedule (reverie.edit.plan_edit; `latents` is the noise added)."""
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}; got {tuple(latents.shape)}")
        noise_scale = self.schedule.initial_noise_scale(sigmas[0].item(), family)
        if source is not None:
            return edit.plan_edit(source, sigmas, encode=self.encode_images, generator=generator, shape=shape,
                                  device=self.device, noise=latents, inpaint_network=self.inpaint_network,
                                  noise_scale=noise_scale)
        if latents is None:
            latents = randn(shape, generator, torch.device("cpu"), torch.float32)
        return edit.EditPlan(sigmas, latents.to(self.device, torch.float32) * noise_scale, {})

    def outpaint(self, prompt, image, *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                 **kwargs) -> GenerationResult:
        """Extend the canvas by these many pixels on each side and paint the new border: inpainting of
        reverie.edit.outpaint's canvas and mask. Other arguments as __call__ (mask_blur, fill, strength, ...)."""
        canvas, mask = edit.outpaint(image, left, right, top, bottom, multiple=self.downsample_factor)
        return self(prompt, image=canvas, mask_image=mask, **kwargs)

    def __call__(self, prompt, negative_prompt=None, steps: int = 30, guidance_scale: float = 7.5,
                 sampler: str = "dpmpp_2m", width: int | None = None, height: int | None = None, seed=None, num_images: int = 1,
                 latents: Tensor | None = None, *, scheduler: str | None = None, guidance_rescale: float = 0.0,
                 clip_skip: int | None = None, callback=None, progress: bool = True,
                 controlnet=None, control_image=None, controlnet_conditioning_scale=1.0,
                 control_guidance_start=0.0, control_guidance_end=1.0, guess_mode: bool = False,
                 image=None, strength: float | None = None, mask_image=None, mask_blur: float = 4,
                 inpaint_only_masked: bool = False, inpaint_padding: int = 32, fill="original") -> GenerationResult:
        """Generate images. `sampler` is any name reverie.samplers.resolve accepts ("DPM++ 2M Karras",
        "euler", "DDIMScheduler", ...); `scheduler` an optional schedule type ("karras", "exponential").
        seed: int (one generator for the batch, like diffusers) or a list with one seed per image. width and
        height default to the model's native size (UNet sample_size x VAE factor: 512 for SD 1.x).

        ControlNet (diffusers' names; see reverie.control.prepare): controlnet (a ControlNet, a folder, or a
        list), control_image (then the default size is its size), controlnet_conditioning_scale,
        control_guidance_start / _end (fractions of the steps), guess_mode.

        img2img and inpainting (see reverie.edit.prepare): image (PIL, path, list with one per prompt, or
        (B, 3, H, W) in [-1, 1]; then the default size is its size), strength (the fraction of the steps run
        from the noised image: 0.75 by default, 1 with a mask), mask_image (white = repaint), mask_blur
        (pixels), inpaint_only_masked with inpaint_padding (pixels), fill ("original", "fill", "latent noise",
        "latent nothing")."""
        prompts = _as_prompts("prompt", prompt)
        steps = _check_int("steps", steps, 1, self.schedule.num_train_timesteps)
        num_images = _check_int("num_images", num_images, 1)
        factor = self.downsample_factor
        width, height = control.default_size(control_image, width, height, factor)
        source = self._edit_source(image, mask_image, strength, width, height, len(prompts), num_images,
                                   mask_blur=mask_blur, only_masked=inpaint_only_masked, padding=inpaint_padding,
                                   fill=fill)
        if source is not None:  # img2img / inpainting: the processing size (the image's by default)
            width, height = source.width, source.height
        width = self.default_size if width is None else width
        height = self.default_size if height is None else height
        for name, value in (("width", width), ("height", height)):
            _check_int(name, value, factor)
            if value % factor:
                raise ValueError(f"{name} must be a multiple of {factor}; got {value}")
        use_cfg, cfg_scale = _guidance(guidance_scale, len(prompts), num_images)
        choice = resolve(sampler, scheduler)
        if choice.family == "flow":
            raise ValueError(f"sampler {sampler!r} is for flow-matching models; this model is a DDPM model")

        prompts = [p for p in prompts for _ in range(num_images)]
        batch = len(prompts)
        negatives = None
        if use_cfg:
            negatives = _as_prompts("negative_prompt", negative_prompt if negative_prompt is not None else "")
            if len(negatives) == 1:
                negatives = negatives * batch
            elif len(negatives) * num_images == batch:
                negatives = [n for n in negatives for _ in range(num_images)]
            else:
                raise ValueError(f"negative_prompt: give one, or one per prompt ({batch // num_images}); "
                                 f"got {len(negatives)}")
        cond, uncond = self.encode_prompts(prompts, negatives, clip_skip)

        # the sampling plan: this model's schedule, spaced the way the chosen sampler's family spaces it
        sigmas = self.schedule.sampling_sigmas(steps, choice.schedule, choice.family)
        mapping = self.schedule.timestep_mapping(choice.schedule, choice.family)
        generator, seeds = self._generators(seed, batch)
        shape = (batch, self.vae.config.latent_channels, height // factor, width // factor)
        plan = self._start(source, sigmas, choice.family, generator, latents, shape)  # txt2img, img2img, inpainting
        sigmas, x = plan.sigmas, plan.x
        controls = control.prepare(controlnet, control_image, controlnet_conditioning_scale, control_guidance_start,
                                   control_guidance_end, prompts=batch // num_images, images_per_prompt=num_images,
                                   width=width, height=height, device=self.device, dtype=self.dtype,
                                   offload=self.offload)

        with self._on_device(self.unet) as unet, control.attach(self, unet, controls, sigmas, mapping,
                                                                guess_mode) as unet:
            def net(x_t, t, encoder_hidden_states):  # sampling runs in float32; the network in self.dtype
                return unet(x_t.to(self.dtype), t, encoder_hidden_states).float()

            denoiser = DiscreteDenoiser(plan.network(net), self.schedule, timestep_mapping=mapping)
            guided = CFGDenoiser(denoiser, {"encoder_hidden_states": cond, **plan.cond},
                                 {"encoder_hidden_states": uncond, **plan.cond} if use_cfg else None,
                                 scale=cfg_scale, rescale=guidance_rescale)
            guided = plan.denoiser(guided)  # inpainting: keeps the known region
            with torch.inference_mode(), ProgressBar(len(sigmas) - 1, "sampling",
                                                     self._guard_previews(callback, prompts),
                                                     disable=not progress) as bar:
                if len(sigmas) > 1:  # img2img at strength 0 has nothing to denoise
                    x = choice(guided, x, sigmas, generator=generator, callback=bar)
        if sigmas[-1] > 0:  # DDIM without set_alpha_to_one ends on a noisy level: decode it as diffusers does
            x = x / (1 + sigmas[-1].item() ** 2) ** 0.5
        x = plan.finish(x)  # inpainting: exactly the image's latents outside the mask

        with self._on_device(self.vae) as vae, torch.inference_mode():
            images = plan.paste(vae.decode(x.to(self.vae_dtype) / vae.scaling_factor + vae.shift_factor))
        params = dict(prompt=prompts, negative_prompt=negatives, steps=steps, guidance_scale=guidance_scale,
                      guidance_rescale=guidance_rescale, sampler=choice.name, schedule=choice.schedule,
                      sampler_options=choice.options, width=width, height=height, seeds=seeds,
                      clip_skip=clip_skip, model=self.name)
        params |= control.describe(controls, guess_mode)
        params |= plan.params
        return self._checked(GenerationResult(to_pil(images), x.cpu(), params), seed)
