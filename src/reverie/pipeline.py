"""Text-to-image (and text-to-video) for every model family: request -> conditioning -> start latents -> denoiser
-> guidance and feature wrappers -> sampler -> decode -> safety -> images (or videos) and the parameters used.

The pipeline only wires components together. What differs between SD 1/2, DiT, SD3, FLUX and Wan lives in the
model's family (reverie.families: components, conditioning, the network call, the latent layout and how it
decodes: video families sample (B, C, frames, h, w) latents with the same samplers); what differs
between discrete VP and flow schedules in reverie.sampling. The network becomes a denoiser (reverie.denoisers),
guidance is a denoiser wrapper (reverie.guidance), img2img and inpainting are reverie.edit's plan, and the
sampler and its noise levels come from reverie.samplers.resolve and the model's own schedule, so every sampler
name works with every model, and a folder's scheduler config is honoured exactly as diffusers honours it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import control, edit
from . import families
from .denoisers import randn
from .guidance import CFGDenoiser
from .progress import ProgressBar
from .samplers import resolve
from .sampling import sampling_for
from .schedules import DiscreteSchedule

MAX_SEED = 2**32 - 1


@dataclass
class GenerationResult:
    """What a generation produced and exactly how: enough to reproduce it."""

    images: list[Image.Image]  # one per image; for a video, its first frame (previews, safety, metadata)
    latents: Tensor  # (B, C, h, w) final latents, before the VAE; video: (B, C, frames, h, w)
    params: dict = field(default_factory=dict)  # prompt, negative_prompt, steps, guidance_scale, sampler, ...
    nsfw: list[bool] = field(default_factory=list)  # per image: flagged by the safety filter (and replaced)
    frames: list[list[Image.Image]] | None = None  # video families: per video, its frames; None for images
    videos: Tensor | None = None  # video families: (B, F, 3, H, W) floats in [0, 1] (diffusers' "pt" frames)


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


def to_videos(videos: Tensor) -> Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F, 3, H, W) in [0, 1], as diffusers' postprocess_video(output_type="pt")."""
    return (videos.float() / 2 + 0.5).clamp(0, 1).transpose(1, 2).cpu()


def first_frames(decoded: Tensor) -> Tensor:
    """Decoded images (B, 3, H, W) as they are; videos (B, 3, F, H, W) by their first frames (what previews, the
    safety filter and metadata see)."""
    return decoded if decoded.ndim == 4 else decoded[:, :, 0]


def _result(decoded: Tensor, latents: Tensor, params: dict) -> GenerationResult:
    """The result for decoded pixels: images (B, 3, H, W), or videos (B, 3, F, H, W) with their first frames as
    the images."""
    if decoded.ndim == 4:
        return GenerationResult(to_pil(decoded), latents, params)
    frames = [to_pil(video.transpose(0, 1)) for video in decoded]  # (3, F, H, W) -> F frames
    return GenerationResult([f[0] for f in frames], latents, params, frames=frames, videos=to_videos(decoded))


def _check_handoff(denoising_end, denoising_start, image, mask_image, strength, latents):
    """Check denoising_end / denoising_start; the latents handed in with denoising_start (else None)."""
    for name, value in (("denoising_end", denoising_end), ("denoising_start", denoising_start)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 < value < 1):
            raise ValueError(f"{name} must be a number in (0, 1) (the fraction of the schedule); got {value!r}")
    if denoising_start is None:
        return None
    if denoising_end is not None:
        raise ValueError("denoising_start: give denoising_end to the first expert and denoising_start to the next, "
                         "not both to one call")
    if not isinstance(image, Tensor) or image.ndim != 4:
        raise ValueError("image: with denoising_start, give the (B, C, h, w) latents that a denoising_end run "
                         "returned (result.latents), not an image")
    for name, value in (("mask_image", mask_image), ("strength", strength), ("latents", latents)):
        if value is not None:
            raise ValueError(f"{name} does not go with denoising_start (the latents are where sampling resumes)")
    return image


class Pipeline:
    """A latent diffusion model of any family (reverie.families): its components, schedule and family.

    Pipeline.from_pretrained(path) opens a diffusers folder or a single-file checkpoint; calling the pipeline
    generates images. Components stay on `device` in `dtype`; with `offload=True` they live on the CPU and
    visit the device one at a time (for small GPU memory). Pipeline(unet, vae, text_encoder, schedule) builds an
    SD 1/2-layout model (the layout reverie trains); Pipeline.from_components(family, components, schedule)
    any family."""

    def __init__(self, unet, vae, text_encoder, schedule: DiscreteSchedule, *, name: str = "model",
                 device="cpu", dtype=torch.float32, offload: bool = False, scheduler_config: dict | None = None):
        self._setup(families.get("sd"), dict(unet=unet, vae=vae, text_encoder=text_encoder), schedule, name=name,
                    device=device, dtype=dtype, offload=offload, scheduler_config=scheduler_config)

    @classmethod
    def from_components(cls, family, components: dict, schedule, **options) -> "Pipeline":
        """A pipeline of `family` (a reverie.families.Family or its name) from its components by diffusers'
        names (transformer, vae, text_encoder, text_encoder_2, ...) and its schedule (DiscreteSchedule or
        reverie.flow.FlowSchedule). Options as Pipeline()."""
        pipe = cls.__new__(cls)
        pipe._setup(families.get(family) if isinstance(family, str) else family, components, schedule, **options)
        return pipe

    def _setup(self, family, components: dict, schedule, *, name="model", device="cpu", dtype=torch.float32,
               offload=False, scheduler_config=None):
        self.family, self.components, self.schedule = family, dict(components), schedule
        self.sampling = sampling_for(schedule)
        # what the features change (reverie.lora, reverie.embeddings, set_tiling, enable_freeu)
        self.embeddings: dict[str, Path] = {}  # loaded textual inversions: name -> file
        self._lora_state = self._lora_names = None
        self._tiling, self._freeu = False, None
        self.quantized: str | None = None  # quantize
        for key, component in self.components.items():
            setattr(self, key, component)
        self.network = self.components[family.network]
        # the diffusers scheduler config this model came with, written back by save_pretrained
        self.scheduler_config = scheduler_config or {"_class_name": "DDIMScheduler", "clip_sample": False,
                                                     **dataclasses.asdict(schedule)}
        self.name, self.device, self.dtype, self.offload = name, torch.device(device), dtype, offload
        # the VAE asks for float32 when fp16 overflows it (diffusers' force_upcast; SD's VAE does)
        vae = self.components["vae"]
        self.vae_dtype = torch.float32 if dtype == torch.float16 and getattr(vae.config, "force_upcast", False) \
            else dtype
        from .models.quant import to_keeping_fp8

        for key, module in self.components.items():
            if isinstance(module, torch.nn.Module):  # fp8-stored weights stay fp8 (reverie.models.quant)
                module_dtype = self.vae_dtype if key == "vae" else dtype
                to_keeping_fp8(module, "cpu" if offload else self.device, module_dtype).eval().requires_grad_(False)

    # --- adapters ------------------------------------------------------------------------------------

    def set_loras(self, loras) -> None:
        """Merge LoRA / LyCORIS adapters into the weights, replacing the set merged before; [] restores the
        weights exactly. Items: reverie.lora.LoraUse, a LoRA or file, (file, strength) or (file, text, unet)
        strengths. A file that does not fit this model changes nothing (reverie.lora)."""
        from .lora import set_loras

        if self.quantized is not None and loras:
            raise ValueError(f"loras: the network is quantized ({self.quantized}); merge LoRAs before quantize(), "
                             f"or load the model again without it")
        set_loras(self, loras)

    def compile(self, **options) -> None:
        """torch.compile the denoising network in place (nn.Module.compile: the same module, its forward compiled
        by inductor on first use; `options` go to torch.compile, e.g. mode="max-autotune"). The first call at each
        new shape pays the compilation (tens of seconds on a CPU); `reverie serve --compile` pays it in its
        warm-up, before it answers ready. Outputs equal the eager network's up to float rounding."""
        self.network.compile(**options)

    def quantize(self, mode: str) -> None:
        """Cheaper network weights, in place and for good (reverie.quantize.MODES): "fp8" (storage in
        float8_e4m3fn, each layer upcast per call), "int8-weight" (int8 weights, per-channel scales) or
        "int8-dynamic" (int8 weights and per-token int8 activations) on the network's Linear layers (torchao,
        the quant extra). Recorded as "quantize" in the image parameters."""
        from .quantize import quantize_network

        if self.quantized is not None:
            raise ValueError(f"quantize: the network is already quantized ({self.quantized})")
        quantize_network(self.network, mode, self.dtype)
        self.quantized = mode

    def load_embedding(self, source, *, name: str | None = None, allow_pickle: bool = False) -> str:
        """Add a textual-inversion embedding (A1111, kohya, diffusers or SDXL clip_l / clip_g file) to the CLIP
        text encoders; prompts and negative prompts then use it by name (the file's stem unless `name`).
        Returns the name (reverie.embeddings)."""
        from .embeddings import load_embedding

        name = load_embedding(self, source, name=name, allow_pickle=allow_pickle)
        self.embeddings[name] = Path(source)
        return name

    @property
    def loras(self) -> list:
        """The merged LoRAs (reverie.lora.LoraUse), in the order they were given."""
        state = self._lora_state
        return list(state.active) if state else []

    # --- loading and saving -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, *, device="cpu", dtype=torch.float32, allow_pickle: bool = False,
                        prediction_type: str | None = None, tokenizer=None, offload: bool = False,
                        safety_checker="auto", **options) -> "Pipeline":
        """Open a diffusers folder of any family (model_index.json names its pipeline: StableDiffusionPipeline,
        DiTPipeline, StableDiffusion3Pipeline, FluxPipeline) or a single-file checkpoint (.safetensors; SD 1/2,
        SD3 and FLUX are told apart by their keys; pickles only with allow_pickle=True).

        prediction_type overrides the scheduler config's (single files do not record it: SD 2.x 768 models
        are "v_prediction"). tokenizer: a tokenizer folder, needed for SD single files (they contain none).
        safety_checker: "auto" (on when the folder ships one), None (off), a checker folder, a callable
        images -> flags, or a reverie.safety.SafetyFilter (see reverie.safety.from_option). Family options
        (the family's load_folder / load_single_file): variant ("fp16", "bf16"), text_encoder / text_encoder_2 /
        text_encoder_3 / vae (separate files or folders for single files), config (a diffusers folder to
        take configs, tokenizers and missing components from)."""
        from .formats import load_checkpoint, read_safetensors_header
        from .safety import from_option

        path = Path(path)
        if not path.exists():
            raise ValueError(f"path does not exist: {path}")
        options = dict(options, allow_pickle=allow_pickle, tokenizer=tokenizer, dtype=dtype)
        if path.is_dir():
            family = families.family_of_folder(path)
            components, scheduler_config = family.load_folder(path, **options)
        else:
            keys = read_safetensors_header(path) if path.suffix == ".safetensors" else None
            family = families.family_of_checkpoint(dict.fromkeys(keys) if keys is not None else
                                                   load_checkpoint(path, allow_pickle=allow_pickle))
            components, scheduler_config = family.load_single_file(path, **options)
        if prediction_type is not None:
            if family.schedule_kind != "vp":
                raise ValueError(f"prediction_type: {family.name} models predict a flow velocity; only DDPM-family "
                                 f"models (SD, DiT) take epsilon | v_prediction | sample")
            scheduler_config = dict(scheduler_config, prediction_type=prediction_type)
        schedule = family.schedule(scheduler_config)
        pipe = cls.from_components(family, components, schedule, name=path.stem, device=device, dtype=dtype,
                                   offload=offload, scheduler_config=scheduler_config)
        pipe.source = path
        pipe.safety_checker = from_option(safety_checker, path, device="cpu" if offload else device, dtype=dtype)
        return pipe

    def save_pretrained(self, path, *, dtype=None) -> None:
        """Write a diffusers folder that diffusers' pipeline class for this family opens."""
        self.family.save_folder(self, Path(path), dtype=dtype)

    # --- memory options -----------------------------------------------------------------------------

    def enable_attention_slicing(self, slice_size: int | None = 1) -> None:
        from .models.layers import set_attention_slice

        set_attention_slice(self.network, slice_size)

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
        """The VAE's factor: image pixels per latent pixel (along each side)."""
        return self.family.downsample_factor(self)

    @property
    def size_multiple(self) -> int:
        """Widths and heights must be multiples of this (the VAE's factor times the network's patch size)."""
        return self.family.size_multiple(self)

    @property
    def default_size(self) -> int:
        """The image size the model was trained at (diffusers' default height and width)."""
        return self.family.default_size(self)

    # --- safety and provenance (reverie.safety, reverie.metadata) ----------------------------------------

    safety_checker = None  # a reverie.safety.SafetyFilter or None; from_pretrained sets it
    source = None  # the path the model was opened from: its hash goes into image metadata

    def decode_latents(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) latents in the network's space -> (B, 3, H, W) images in [-1, 1] (VAE scale and shift);
        a video family's (B, C, frames, h, w) -> (B, 3, F, H, W) (reverie.families: Family.decode)."""
        with self._on_device(self.vae) as vae, torch.inference_mode():
            return self.family.decode(vae, latents.to(self.device, self.vae_dtype))

    def _guard_previews(self, callback, prompts: list):
        """The step callback, seeing latents only through the safety filter (reverie.safety.CheckedStep)."""
        if self.safety_checker is None or callback is None:
            return callback
        return self.safety_checker.guard(callback, lambda latents: to_pil(first_frames(self.decode_latents(latents))),
                                         [str(p) for p in prompts])

    def _checked(self, result: GenerationResult, seed) -> GenerationResult:
        """Replace flagged images (and zero their latents: they would decode to them); record the flags, how
        seeds map to images, and the model's hash in params."""
        from .metadata import model_hash

        nsfw = [False] * len(result.images)
        if self.safety_checker is not None:
            result.images, nsfw = self.safety_checker(result.images, [str(p) for p in result.params["prompt"]])
            keep = torch.tensor([not f for f in nsfw], dtype=result.latents.dtype)
            result.latents = result.latents * keep.reshape(-1, *[1] * (result.latents.ndim - 1))
            flagged = [i for i, flag in enumerate(nsfw) if flag] if result.frames is not None else []
            for i in flagged:  # a video is checked by its first frame and replaced whole, frame by frame
                result.frames[i] = [self.safety_checker.replace(f) for f in result.frames[i]]
                result.images[i] = result.frames[i][0]
                pixels = np.stack([np.array(f) for f in result.frames[i]])  # (F, H, W, 3) uint8
                result.videos[i] = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 255
        result.nsfw = nsfw
        result.params.update(nsfw=nsfw, seed_per_image=isinstance(seed, (list, tuple)) or len(nsfw) == 1,
                             model_hash=model_hash(self.source) if self.source is not None else None)
        if self.loras:
            from .lora import lora_record

            result.params["loras"] = [lora_record(use) for use in self.loras]
        texts = " ".join(str(p) for key in ("prompt", "negative_prompt") for p in result.params.get(key) or [] if p)
        used = {name: path for name, path in self.embeddings.items() if name in texts}
        if used:
            from .lora import lora_hash

            result.params["embeddings"] = [{"name": name, "path": str(path), "hash": lora_hash(path)
                                            if path.suffix == ".safetensors" else None} for name, path in used.items()]
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
        """The family's conditioning for prompts and (if given) negatives: (cond, uncond) keyword tensors."""
        return self.family.encode(self, prompts, negatives, {"clip_skip": clip_skip})

    # --- img2img, inpainting, outpainting (the logic lives in reverie.edit) ---------------------------------

    @property
    def inpaint_network(self) -> bool:
        """Whether the network also takes a mask and masked-image latents (SD inpainting: 4 + 1 + 4 channels)."""
        return self.family.inpaint_network(self)

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
                            multiple=self.size_multiple, default_size=self.default_size, count=prompts,
                            repeats=num_images, **options)

    def _latent_source(self, init_latents: Tensor, image, mask_image, strength, batch: int) -> edit.EditSource:
        """img2img from given latents (reverie.hires): an EditSource holding them, with a blank image of their
        pixel size for the bookkeeping."""
        if image is not None or mask_image is not None:
            raise ValueError("init_latents: give either init_latents or image / mask_image, not both")
        if not isinstance(init_latents, Tensor) or init_latents.ndim != 4 or len(init_latents) not in (1, batch):
            raise ValueError(f"init_latents must be a (1 or {batch}, C, h, w) tensor; got "
                             f"{getattr(init_latents, 'shape', type(init_latents).__name__)}")
        strength = edit.check_strength(0.75 if strength is None else strength)
        latents = init_latents.float().expand(batch, -1, -1, -1).contiguous()
        f = self.downsample_factor
        blank = torch.zeros(batch, 3, latents.shape[-2] * f, latents.shape[-1] * f)
        return edit.EditSource(blank, None, blank, None, None, strength, params=dict(strength=strength),
                               latents=latents)

    def _start(self, sampling, source, sigmas: Tensor, choice, generator, latents, shape) -> edit.EditPlan:
        """Where sampling starts: noise at the first sigma (txt2img; `latents` is that noise), or the noised
        image on the tail of the schedule (reverie.edit.plan_edit; `latents` is the noise added)."""
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}; got {tuple(latents.shape)}")
        noise_scale = sampling.noise_scale(sigmas[0].item(), choice)
        if source is not None:
            return edit.plan_edit(source, sigmas, encode=self.encode_images, generator=generator, shape=shape,
                                  device=self.device, noise=latents, inpaint_network=self.inpaint_network,
                                  noise_scale=noise_scale, tail=sampling.tail, add_noise=sampling.add_noise)
        if latents is None:
            latents = randn(shape, generator, torch.device("cpu"), torch.float32)
        return edit.EditPlan(sigmas, latents.to(self.device, torch.float32) * noise_scale, {})

    def outpaint(self, prompt, image, *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                 **kwargs) -> GenerationResult:
        """Extend the canvas by these many pixels on each side and paint the new border: inpainting of
        reverie.edit.outpaint's canvas and mask. Other arguments as __call__ (mask_blur, fill, strength, ...)."""
        canvas, mask = edit.outpaint(image, left, right, top, bottom, multiple=self.size_multiple)
        return self(prompt, image=canvas, mask_image=mask, **kwargs)

    def _negatives(self, negative_prompt, use_cfg: bool, batch: int, num_images: int) -> list | None:
        """One negative prompt per image (None without CFG); a family without negatives refuses one."""
        if not self.family.negative_prompt:
            if negative_prompt is not None:
                raise ValueError(f"negative_prompt: a {self.family.name} model cannot use one "
                                 f"({self.family.no_negative_reason})")
            return None
        if not use_cfg:
            if negative_prompt is not None and self.family.name in ("flux",):
                warnings.warn("negative_prompt is ignored without true_cfg_scale > 1 (FLUX's distilled guidance)")
            return None
        negatives = _as_prompts("negative_prompt", negative_prompt if negative_prompt is not None else "")
        if len(negatives) == 1:
            return negatives * batch
        if len(negatives) * num_images == batch:
            return [n for n in negatives for _ in range(num_images)]
        raise ValueError(f"negative_prompt: give one, or one per prompt ({batch // num_images}); got {len(negatives)}")

    def _size(self, width, height, source) -> tuple[int, int]:
        if source is not None:  # img2img / inpainting: the processing size (the image's by default)
            width, height = source.width, source.height
        if width is None or height is None:
            default_width, default_height = self.family.default_dims(self)
            width = default_width if width is None else width
            height = default_height if height is None else height
        factor = self.size_multiple
        for name, value in (("width", width), ("height", height)):
            _check_int(name, value, factor)
            if value % factor:
                raise ValueError(f"{name} must be a multiple of {factor} for this {self.family.name} model "
                                 f"(VAE factor {self.downsample_factor} x patch size); got {value}")
        return width, height

    def _sampling(self, shift):
        """How this call samples: the model's schedule, or a flow schedule with another shift."""
        if shift is None:
            return self.sampling
        if self.sampling.kind != "flow":
            raise ValueError(f"shift: only flow-matching models (SD3, FLUX) have a schedule shift; this is a "
                             f"{self.family.name} model")
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a finite number > 0; got {shift!r}")
        # an explicit shift replaces dynamic shifting too (FLUX dev's mu from the image size)
        return sampling_for(dataclasses.replace(self.schedule, shift=float(shift), use_dynamic_shifting=False))

    def sampler_choice(self, sampler: str | None = None, scheduler: str | None = None):
        """The SamplerChoice a call runs for a sampler name (and schedule type), as this model's family runs it;
        sampler None: the scheduler the model's folder names, with its flags. Raises ValueError for unknown names
        (whether the sampler suits the model's schedule kind is checked by the call)."""
        if sampler is not None:
            return self.family.sampler_choice(resolve(sampler, scheduler))
        config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        choice = resolve(self.scheduler_config.get("_class_name", "DDIMScheduler"), **config)
        # the model's schedule was built from this same config: its flags (shift, ...) are already in it, and a
        # call's shift= must win over them
        choice = dataclasses.replace(choice, flow_config={})
        if scheduler is not None:
            choice = dataclasses.replace(choice, schedule=resolve(choice.name, scheduler).schedule)
        return self.family.sampler_choice(choice)

    def __call__(self, prompt, *args, tiling: bool | None = None, **kwargs) -> GenerationResult:
        """Generate images. `prompt` is a string or a list (DiT: class ids or label names). steps,
        guidance_scale and sampler default to the family's (SD: 30, 7.5, "dpmpp_2m"; see each family).
        `sampler` is any name reverie.samplers.resolve accepts ("DPM++ 2M Karras", "euler",
        "DDIMScheduler", ...); `scheduler` an optional schedule type ("karras", "exponential"; flow models
        also "simple", "normal", "sgm_uniform", "beta"). seed: int (one generator for the batch, like
        diffusers) or a list with one seed per image. width and height default to the model's native size.

        ControlNet (SD 1/2, SDXL; diffusers' names; see reverie.control.prepare): controlnet (a ControlNet, a folder,
        or a list), control_image (then the default size is its size), controlnet_conditioning_scale,
        control_guidance_start / _end (fractions of the steps), guess_mode.

        img2img and inpainting (see reverie.edit.prepare): image (PIL, path, list with one per prompt, or
        (B, 3, H, W) in [-1, 1]; then the default size is its size), strength (the fraction of the steps run
        from the noised image: 0.75 by default, 1 with a mask), mask_image (white = repaint), mask_blur
        (pixels), inpaint_only_masked with inpaint_padding (pixels), fill ("original", "fill", "latent noise",
        "latent nothing").

        init_latents ((B or 1, C, h, w)): img2img from these latents at `strength` instead of an encoded image (the
        hires fix's latent upscalers, reverie.hires). subseed / subseed_strength: A1111's variation seed, the
        start noise slerped from the seed's towards the subseed's (text-to-image; reverie.hires.variation_noise).

        denoising_end / denoising_start (fractions in (0, 1); diffusers' "ensemble of experts", e.g. SDXL base ->
        refiner at 0.8): denoising_end stops where the training timesteps fall below (1 - f) * T and returns the
        still-noisy latents in result.latents (params record their level); denoising_start takes such latents as
        `image` ((B, C, h, w) latents, no noise added) and runs the rest of the same schedule.

        shift (flow models): the schedule's shift for this call (ComfyUI's ModelSamplingSD3), instead of the
        model's (and instead of dynamic shifting, for FLUX dev).

        Family options (keyword arguments): SD3 max_sequence_length, prompt_2, prompt_3, skip_guidance_layers,
        skip_layer_guidance_scale / _start / _stop; FLUX max_sequence_length, prompt_2, true_cfg_scale; SDXL
        prompt_2, negative_prompt_2, original_size, crops_coords_top_left, target_size (and negative_*),
        aesthetic_score, negative_aesthetic_score (refiners); Wan num_frames, max_sequence_length (text-to-video:
        result.frames and result.videos hold the videos, result.images their first frames); Wan image-to-video the
        same, with `image` its first frame (one PIL image or path, resized to width x height), not an edit.

        tiling: seamless images for this call (circular padding in every convolution: set_tiling); None keeps
        the pipeline's setting."""
        for cache in (getattr(self.network, "deep_cache", None), getattr(self.network, "block_cache", None)):
            if cache is not None:
                cache.reset()  # a new sampling run: nothing from the last one is reused
        if tiling is None or bool(tiling) == self.tiling:
            return self._generate(prompt, *args, **kwargs)
        previous = self.tiling
        self.set_tiling(bool(tiling))
        try:
            return self._generate(prompt, *args, **kwargs)
        finally:
            self.set_tiling(previous)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU on the UNet (SD 1/2, SDXL; reverie.models.unet.UNet.enable_freeu, diffusers' names)."""
        if not hasattr(self.network, "enable_freeu"):
            raise ValueError(f"freeu: FreeU scales a UNet's up blocks; a {self.family.name} model has none")
        self.network.enable_freeu(s1, s2, b1, b2)
        self._freeu = [float(s1), float(s2), float(b1), float(b2)]

    def disable_freeu(self) -> None:
        if hasattr(self.network, "disable_freeu"):
            self.network.disable_freeu()
        self._freeu = None

    def enable_deepcache(self, interval: int = 3) -> None:
        """DeepCache on the UNet (SD 1/2, SDXL; reverie.models.step_cache): every `interval`-th network call in
        full, the calls between through the shallowest level only. interval 1 is the uncached model."""
        if not hasattr(self.network, "enable_deepcache"):
            raise ValueError(f"deepcache: DeepCache skips a UNet's deep levels; a {self.family.name} model has none "
                             f"(transformers: enable_block_cache)")
        self.network.enable_deepcache(interval)

    def enable_block_cache(self, threshold: float = 0.1) -> None:
        """First-block caching on a diffusion transformer (DiT, SD3, FLUX, Wan, spacetime;
        reverie.models.step_cache): the other blocks are skipped while the first block's output changes by less
        than `threshold` (relative mean absolute change) since the last full call. 0 is the uncached model."""
        if not hasattr(self.network, "enable_block_cache"):
            raise ValueError(f"block_cache: first-block caching is for diffusion transformers; a {self.family.name} "
                             f"model's network is a UNet (use enable_deepcache)")
        self.network.enable_block_cache(threshold)

    def disable_step_cache(self) -> None:
        """Turn DeepCache and first-block caching off."""
        for name in ("disable_deepcache", "disable_block_cache"):
            if hasattr(self.network, name):
                getattr(self.network, name)()

    @property
    def step_cache(self) -> dict | None:
        """The active step cache's setting, as the image metadata records it: {"deepcache": interval} or
        {"block_cache": threshold}; None when off."""
        deep, block = getattr(self.network, "deep_cache", None), getattr(self.network, "block_cache", None)
        if deep is not None:
            return {"deepcache": deep.interval}
        if block is not None:
            return {"block_cache": block.threshold}
        return None

    @property
    def tiling(self) -> bool:
        return self._tiling

    def set_tiling(self, enabled: bool) -> None:
        """Seamless (tileable) images, as A1111's Tiling: every 2-D convolution of the network and the VAE pads
        circularly instead of with zeros, so the image wraps around at its edges."""
        for key in (self.family.network, "vae"):
            for module in self.components[key].modules():
                if isinstance(module, torch.nn.Conv2d) and any(module.padding):
                    module.padding_mode = "circular" if enabled else "zeros"
        self._tiling = bool(enabled)

    def _generate(self, prompt, negative_prompt=None, steps: int | None = None, guidance_scale: float | None = None,
                 sampler: str | None = None, width: int | None = None, height: int | None = None, seed=None,
                 num_images: int = 1, latents: Tensor | None = None, *, scheduler: str | None = None,
                 guidance_rescale: float = 0.0, clip_skip: int | None = None, callback=None, progress: bool = True,
                 controlnet=None, control_image=None, controlnet_conditioning_scale=1.0,
                 control_guidance_start=0.0, control_guidance_end=1.0, guess_mode: bool = False,
                 image=None, strength: float | None = None, mask_image=None, mask_blur: float = 4,
                 inpaint_only_masked: bool = False, inpaint_padding: int = 32, fill="original",
                 shift: float | None = None, denoising_end: float | None = None,
                 denoising_start: float | None = None, init_latents: Tensor | None = None,
                 subseed=None, subseed_strength: float = 0.0, **options) -> GenerationResult:
        """__call__ without its tiling switch."""
        family = self.family
        options = family.check_options(options)
        image, options = family.conditioning_image(image, options)  # Wan I2V: the first frame is conditioning
        if clip_skip is not None:
            options["clip_skip"] = family.check_clip_skip(clip_skip)
        defaults = family.settings(self)
        steps = defaults["steps"] if steps is None else steps
        guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        sampler = defaults["sampler"] if sampler is None else sampler
        prompts = family.prompts(self, prompt)
        steps = _check_int("steps", steps, 1, self.schedule.num_train_timesteps)
        num_images = _check_int("num_images", num_images, 1)
        if controlnet is not None and not family.controlnet:
            raise ValueError(f"controlnet: ControlNet is not available for {family.name} models (only SD 1/2 and "
                             f"SDXL)")
        if not family.edits:
            for name, value in (("image", image), ("mask_image", mask_image), ("strength", strength),
                                ("denoising_end", denoising_end), ("denoising_start", denoising_start)):
                if value is not None:
                    raise ValueError(f"{name}: {family.name} models generate from text only here (no img2img, "
                                     f"inpainting or denoising_end / denoising_start hand-off)")
        width, height = control.default_size(control_image, width, height, self.size_multiple)
        handoff = _check_handoff(denoising_end, denoising_start, image, mask_image, strength, latents)
        if handoff is not None:  # denoising_start: `image` holds latents, not pixels
            width, height = image.shape[-1] * self.downsample_factor, image.shape[-2] * self.downsample_factor
            image = None
        if init_latents is not None:
            source = self._latent_source(init_latents, image, mask_image, strength, len(prompts) * num_images)
            width, height = source.width, source.height
        else:
            source = self._edit_source(image, mask_image, strength, width, height, len(prompts), num_images,
                                       mask_blur=mask_blur, only_masked=inpaint_only_masked,
                                       padding=inpaint_padding, fill=fill)
        width, height = self._size(width, height, source)
        use_cfg, cfg_scale = family.guidance(guidance_scale, negative_prompt is not None, options, len(prompts),
                                             num_images)
        choice = self.sampler_choice(sampler, scheduler)
        sampling = self._sampling(shift)
        sampling.check(choice, sampler)

        prompts = [p for p in prompts for _ in range(num_images)]
        batch = len(prompts)
        negatives = self._negatives(negative_prompt, use_cfg, batch, num_images)
        # what encode may need besides the prompts: SDXL's size conditioning and its None-vs-"" negative rule
        cond, uncond = family.encode(self, prompts, negatives, options | dict(
            use_cfg=use_cfg, width=width, height=height, negative_given=negative_prompt is not None,
            img2img=source is not None, handoff=handoff is not None, guidance_scale=guidance_scale))
        if uncond is None:  # the family has no unconditional side (LCM: the guidance scale is a network input)
            use_cfg, cfg_scale, negatives = False, 1.0, None

        # the sampling plan: this model's schedule, spaced the way the chosen sampler's family spaces it
        shape = family.latent_shape(self, batch, width, height, options)
        mu = family.mu(self, shape)
        sigmas = sampling.sigmas(steps, choice, mu=mu)
        generator, seeds = self._generators(seed, batch)
        if denoising_end is not None or denoising_start is not None:  # the experts' share of the same schedule
            t = sampling.timesteps(sigmas, choice)
            cutoff = int(round(self.schedule.num_train_timesteps * (1 - (denoising_end or denoising_start))))
            if denoising_end is not None:
                sigmas = sigmas[:int((t >= cutoff - 1e-3).sum()) + 1]
            else:
                sigmas = sigmas[len(t) - int((t < cutoff - 1e-3).sum()):]
        if handoff is not None:
            if tuple(handoff.shape[1:]) != shape[1:] or len(handoff) not in (1, batch):
                raise ValueError(f"image: with denoising_start, the latents of a denoising_end run, shape "
                                 f"(1 or {batch}, {', '.join(map(str, shape[1:]))}); got {tuple(handoff.shape)}")
            plan = edit.EditPlan(sigmas, handoff.to(self.device, torch.float32).expand(shape).contiguous(), {})
        else:
            if subseed_strength:
                from .hires import variation_noise

                if source is not None or latents is not None:
                    raise ValueError("subseed_strength: variation seeds are for text-to-image (no image, "
                                     "init_latents or latents)")
                subgenerator, subseeds = self._generators(subseed, batch)  # None draws one: recorded below
                latents = variation_noise(shape, generator, subgenerator, subseed_strength)
            plan = self._start(sampling, source, sigmas, choice, generator, latents, shape)  # txt2img, img2img, ...
        sigmas, x = plan.sigmas, plan.x
        controls = control.prepare(controlnet, control_image, controlnet_conditioning_scale, control_guidance_start,
                                   control_guidance_end, prompts=batch // num_images, images_per_prompt=num_images,
                                   width=width, height=height, device=self.device, dtype=self.dtype,
                                   offload=self.offload) if family.controlnet else []
        mapping = sampling.timestep_mapping(choice) if controls else None

        with self._on_device(self.network) as network, control.attach(self, network, controls, sigmas, mapping,
                                                                      guess_mode) as network:
            net = family.network_call(self, network, shape, options)
            denoiser = sampling.denoiser(plan.network(net), choice, steps=steps, mu=mu)
            guided = CFGDenoiser(denoiser, {**cond, **plan.cond}, {**uncond, **plan.cond} if use_cfg else None,
                                 scale=cfg_scale, rescale=guidance_rescale)
            guided = family.guide(self, guided, denoiser, {**cond, **plan.cond}, sigmas, use_cfg, options)
            guided = plan.denoiser(guided)  # inpainting: keeps the known region
            with torch.inference_mode(), ProgressBar(len(sigmas) - 1, "sampling",
                                                     self._guard_previews(callback, prompts),
                                                     disable=not progress) as bar:
                if len(sigmas) > 1:  # img2img at strength 0 has nothing to denoise
                    x = sampling.run(choice.for_schedule(sampling.schedule), guided, x, sigmas, generator=generator,
                                     callback=bar)
        if denoising_end is None:
            x = plan.finish(sampling.finish(x, sigmas))  # inpainting: exactly the image's latents outside the mask
            images = plan.paste(self.decode_latents(x))
        else:  # still noisy: the latents go on to the next expert; the images only preview them
            images = plan.paste(self.decode_latents(sampling.finish(x, sigmas)))
        if negative_prompt is None and negatives is not None and family.zeroes_absent_negative(self):
            negatives = [None] * len(negatives)  # what regenerates the image: zeros, not ""
        params = dict(prompt=prompts, negative_prompt=negatives, steps=steps, guidance_scale=guidance_scale,
                      guidance_rescale=guidance_rescale, sampler=choice.name, schedule=choice.schedule,
                      sampler_options=choice.options, width=width, height=height, seeds=seeds,
                      clip_skip=clip_skip, model=self.name)
        params |= family.describe(self, options, sigmas=sigmas, mu=mu if sampling.schedule is self.schedule else None)
        if shift is not None:
            params["shift"] = float(shift)
        if denoising_end is not None or denoising_start is not None:
            params |= dict(denoising_end=denoising_end, denoising_start=denoising_start,
                           latent_sigma=float(sigmas[-1]) if denoising_end is not None else 0.0)
        params |= control.describe(controls, guess_mode)
        params |= plan.params
        if self.tiling:
            params["tiling"] = True
        if self._freeu:
            params["freeu"] = list(self._freeu)  # s1, s2, b1, b2
        if self.step_cache:
            params.update(self.step_cache)  # deepcache: interval, or block_cache: threshold
        if self.quantized:
            params["quantize"] = self.quantized
        if subseed_strength:
            params |= dict(subseed=subseeds[0], subseed_strength=float(subseed_strength))
        return self._checked(_result(images, x.cpu(), params), seed)
