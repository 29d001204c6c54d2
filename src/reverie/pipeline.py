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
                        prediction_type: str | None = None, tokenizer=None, offload: bool = False) -> "Pipeline":
        """Open a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or
        a single-file Stable Diffusion checkpoint (.safetensors; pickles only with allow_pickle=True).

        prediction_type overrides the scheduler config's (single files do not record it: SD 2.x 768 models
        are "v_prediction"). tokenizer: a tokenizer folder, needed for single files (they contain none)."""
        from .loading import load_folder, load_single_file

        path = Path(path)
        if not path.exists():
            raise ValueError(f"path does not exist: {path}")
        loader = load_folder if path.is_dir() else load_single_file
        unet, vae, text_encoder, scheduler_config = loader(path, allow_pickle=allow_pickle, tokenizer=tokenizer)
        if prediction_type is not None:
            scheduler_config = dict(scheduler_config, prediction_type=prediction_type)
        schedule = DiscreteSchedule.from_config(scheduler_config)
        return cls(unet, vae, text_encoder, schedule, name=path.stem, device=device, dtype=dtype, offload=offload,
                   scheduler_config=scheduler_config)

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

    def __call__(self, prompt, negative_prompt=None, steps: int = 30, guidance_scale: float = 7.5,
                 sampler: str = "dpmpp_2m", width: int | None = None, height: int | None = None, seed=None, num_images: int = 1,
                 latents: Tensor | None = None, *, scheduler: str | None = None, guidance_rescale: float = 0.0,
                 clip_skip: int | None = None, callback=None, progress: bool = True) -> GenerationResult:
        """Generate images. `sampler` is any name reverie.samplers.resolve accepts ("DPM++ 2M Karras",
        "euler", "DDIMScheduler", ...); `scheduler` an optional schedule type ("karras", "exponential").
        seed: int (one generator for the batch, like diffusers) or a list with one seed per image. width and
        height default to the model's native size (UNet sample_size x VAE factor: 512 for SD 1.x)."""
        prompts = _as_prompts("prompt", prompt)
        steps = _check_int("steps", steps, 1, self.schedule.num_train_timesteps)
        num_images = _check_int("num_images", num_images, 1)
        factor = self.downsample_factor
        width = self.default_size if width is None else width
        height = self.default_size if height is None else height
        for name, value in (("width", width), ("height", height)):
            _check_int(name, value, factor)
            if value % factor:
                raise ValueError(f"{name} must be a multiple of {factor}; got {value}")
        if not (isinstance(guidance_scale, (int, float)) and math.isfinite(guidance_scale) and guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be a finite number >= 0; got {guidance_scale!r}")
        choice = resolve(sampler, scheduler)
        if choice.family == "flow":
            raise ValueError(f"sampler {sampler!r} is for flow-matching models; this model is a DDPM model")

        prompts = [p for p in prompts for _ in range(num_images)]
        batch = len(prompts)
        use_cfg = guidance_scale > 1  # as diffusers: no unconditional pass at or below 1
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
        shape = (batch, self.unet.config.in_channels, height // factor, width // factor)
        if latents is None:
            latents = randn(shape, generator, torch.device("cpu"), torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}; got {tuple(latents.shape)}")
        x = latents.to(self.device, torch.float32) * self.schedule.initial_noise_scale(sigmas[0].item(), choice.family)

        with self._on_device(self.unet) as unet:
            def net(x_t, t, encoder_hidden_states):  # sampling runs in float32; the network in self.dtype
                return unet(x_t.to(self.dtype), t, encoder_hidden_states).float()

            denoiser = DiscreteDenoiser(net, self.schedule, timestep_mapping=mapping)
            guided = CFGDenoiser(denoiser, {"encoder_hidden_states": cond},
                                 {"encoder_hidden_states": uncond} if use_cfg else None,
                                 scale=guidance_scale if use_cfg else 1.0, rescale=guidance_rescale)
            with torch.inference_mode(), ProgressBar(steps, "sampling", callback, disable=not progress) as bar:
                x = choice(guided, x, sigmas, generator=generator, callback=bar)
        if sigmas[-1] > 0:  # DDIM without set_alpha_to_one ends on a noisy level: decode it as diffusers does
            x = x / (1 + sigmas[-1].item() ** 2) ** 0.5

        with self._on_device(self.vae) as vae, torch.inference_mode():
            images = vae.decode(x.to(self.vae_dtype) / vae.scaling_factor + vae.shift_factor)
        params = dict(prompt=prompts, negative_prompt=negatives, steps=steps, guidance_scale=guidance_scale,
                      guidance_rescale=guidance_rescale, sampler=choice.name, schedule=choice.schedule,
                      sampler_options=choice.options, width=width, height=height, seeds=seeds,
                      clip_skip=clip_skip, model=self.name)
        return GenerationResult(to_pil(images), x.cpu(), params)
