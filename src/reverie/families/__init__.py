"""Model families: what differs between SD 1/2, DiT, SD3, FLUX and Wan — and only that.

A family is a small object, not a pipeline. It says which components a model has and how they load and save,
how a request becomes conditioning (text encoders, pooled vectors, class labels, FLUX's guidance value), how the
network is called (`net(x, t, **cond)` in the family's timestep convention, FLUX's token packing inside it), the
latent layout (image latents (B, C, h, w) or video latents (B, C, frames, h, w), the VAE factor times the patch
size), how latents decode, and the schedule kind (discrete VP or flow). The
one generation path in reverie.pipeline does the rest — guidance with negatives, img2img, inpainting, the
sampler, decoding, safety and metadata — for every family, and a family that cannot do something says so.

    family_of_folder(path)            the family of a diffusers folder (model_index.json's pipeline class)
    family_of_checkpoint(state_dict)  the family of a single file (its key names)
    get(name)                         a family by name: "sd", "sdxl", "dit", "sd3", "flux", "mmdit", "wan", "wan_i2v",
                                      "spacetime"
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor


class Family:
    """Defaults and hooks of one model family; subclasses override what differs."""

    name = "family"
    pipeline_classes: tuple[str, ...] = ()  # diffusers' pipeline classes (model_index.json _class_name)
    network = "transformer"  # the component that denoises: "unet" or "transformer"
    prompt_kind = "text"  # "text" prompts or "class" labels
    negative_prompt = True  # whether a negative prompt can be used (CFG's unconditional side)
    no_negative_reason = ""  # why not, when it cannot
    schedule_kind = "vp"  # "vp" (discrete DDPM: DiscreteSchedule) or "flow" (rectified flow: FlowSchedule)
    controlnet = False  # ControlNet support
    edits = True  # img2img, inpainting and the denoising_end / denoising_start hand-off (image families)
    first_frame = None  # video families conditioned on a first frame (image=): "required" or "optional"
    defaults = dict(steps=30, guidance_scale=7.5, sampler="dpmpp_2m")  # sampler None: the folder's scheduler
    options: tuple[str, ...] = ()  # family-specific keyword arguments of Pipeline.__call__ (besides clip_skip)

    # --- loading ---------------------------------------------------------------------------------------------

    def load_folder(self, path: Path, **options) -> tuple[dict, dict]:
        """(components, scheduler config) from a diffusers folder."""
        raise NotImplementedError

    def load_single_file(self, path: Path, **options) -> tuple[dict, dict]:
        raise ValueError(f"{self.name}: single-file checkpoints are not supported for this family; give a "
                         f"diffusers folder")

    def save_folder(self, pipe, path: Path, dtype=None) -> None:
        raise ValueError(f"{self.name}: save_pretrained is not supported for this family")

    def schedule(self, scheduler_config: dict):
        """The model's schedule from its diffusers scheduler config."""
        if self.schedule_kind == "vp":
            from ..schedules import DiscreteSchedule

            return DiscreteSchedule.from_config(scheduler_config)
        from ..flow import FlowSchedule

        return FlowSchedule.from_config(scheduler_config)

    def zeroes_absent_negative(self, pipe) -> bool:
        """Whether a call without a negative prompt guides against zero embeddings rather than the empty prompt's
        (SDXL base: force_zeros_for_empty_prompt): then no negative and "" are different requests."""
        return False

    def settings(self, pipe) -> dict:
        """Default steps, guidance_scale and sampler for this model (FLUX schnell differs from dev)."""
        return dict(self.defaults)

    def sampler_choice(self, choice):
        """The sampler as this family runs it (FLUX: its "simple" sigmas when none are asked for)."""
        return choice

    # --- layout ----------------------------------------------------------------------------------------------

    def latent_channels(self, pipe) -> int:
        return pipe.vae.config.latent_channels

    def downsample_factor(self, pipe) -> int:
        """Pixels per latent pixel along each side (the VAE's spatial factor)."""
        return pipe.vae.downsample_factor

    def latent_shape(self, pipe, batch: int, width: int, height: int, options: dict) -> tuple:
        """The shape of the latents sampled for a request: (B, C, h, w) for images (video families add frames)."""
        f = self.downsample_factor(pipe)
        return batch, self.latent_channels(pipe), height // f, width // f

    def decode(self, vae, latents: Tensor) -> Tensor:
        """Latents in the network's space -> pixels in [-1, 1], (B, 3, H, W) for images (the VAE's scale and
        shift undone); a video family returns (B, 3, F, H, W)."""
        return vae.decode(latents / vae.scaling_factor + vae.shift_factor)

    def size_multiple(self, pipe) -> int:
        """Image sizes must be multiples of this: the VAE's factor times the network's patch size."""
        return pipe.vae.downsample_factor * getattr(pipe.network.config, "patch_size", 1)

    def default_size(self, pipe) -> int:
        sample_size = pipe.network.config.sample_size
        return (sample_size if isinstance(sample_size, int) else sample_size[0]) * pipe.vae.downsample_factor

    def default_dims(self, pipe) -> tuple[int, int]:
        """(width, height) of a request that gives neither: square at default_size unless the family says."""
        size = self.default_size(pipe)
        return size, size

    def inpaint_network(self, pipe) -> bool:
        """Whether the network also takes a mask and masked-image latents (SD inpainting UNets)."""
        return False

    # --- conditioning and the network call -------------------------------------------------------------------

    def prompts(self, pipe, prompt) -> list:
        """The request's prompts as a list (text families: strings)."""
        from ..pipeline import _as_prompts

        return _as_prompts("prompt", prompt)

    def check_clip_skip(self, clip_skip):
        return clip_skip

    def conditioning_image(self, image, options: dict) -> tuple:
        """(image, options) for a call's image=: families conditioned on an image (Wan I2V's first frame) move it
        into the options that encode sees and return image None; the others leave it to img2img / inpainting."""
        return image, options

    def check_options(self, options: dict) -> dict:
        unknown = sorted(set(options) - set(self.options))  # (clip_skip is checked by check_clip_skip)
        if unknown:
            allowed = ", ".join(self.options) or "none"
            raise ValueError(f"unexpected argument(s) {', '.join(unknown)} for a {self.name} model; its own options: "
                             f"{allowed}")
        return options

    def guidance(self, guidance_scale, negatives_given: bool, options: dict, prompts: int, num_images: int):
        """(use_cfg, scale): classifier-free guidance when the scale is above 1 (diffusers' rule)."""
        from ..pipeline import _guidance

        return _guidance(guidance_scale, prompts, num_images)

    def encode(self, pipe, prompts: list, negatives: list | None, options: dict) -> tuple[dict, dict | None]:
        """Conditioning keyword tensors (batched along dim 0) for the prompts and, with CFG, the negatives."""
        raise NotImplementedError

    def network_call(self, pipe, network, shape: tuple, options: dict):
        """net(x, t, **cond) -> the network's prediction in float32, for latents of `shape`."""
        raise NotImplementedError

    def guide(self, pipe, guided, denoiser, cond: dict, sigmas, use_cfg: bool, options: dict):
        """Further guidance around the CFG denoiser (SD3's skip-layer guidance); none by default."""
        return guided

    def mu(self, pipe, shape: tuple) -> float | None:
        """The dynamic shift of a flow schedule for this latent size (None: the schedule's static shift)."""
        return None

    def describe(self, pipe, options: dict, sigmas=None, mu=None) -> dict:
        """What the family adds to GenerationResult.params."""
        return {"family": self.name}


def per_prompt(name: str, value, prompts: list) -> list:
    """An option given once or once per prompt, as one value per row of `prompts` (rows repeat per image)."""
    if value is None:
        return list(prompts)
    values = [value] if isinstance(value, str) else list(value)
    if not values or not all(isinstance(v, str) for v in values) or len(prompts) % len(values):
        raise ValueError(f"{name} must be a string or a list with one string per prompt; got {value!r}")
    return [v for v in values for _ in range(len(prompts) // len(values))]


def _dtype_call(module, dtype):
    """net(x, t, **cond) running `module` in `dtype` and returning float32: sampling runs in float32, the network
    in the pipeline's dtype. Timesteps stay float32 (fp16 cannot hold fractional timesteps near 1000)."""

    def call(x, t, **cond):
        cond = {k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in cond.items()}
        return module(x.to(dtype), t, **cond).float()

    return call


def _register():
    from .dit import DiT
    from .flux import Flux
    from .mmdit import ReverieMMDiT
    from .sd import SD
    from .sd3 import SD3
    from .sdxl import SDXL
    from .spacetime import Spacetime
    from .wan import Wan, WanI2V

    return {f.name: f for f in (SD(), SDXL(), DiT(), SD3(), Flux(), ReverieMMDiT(), Wan(), WanI2V(), Spacetime())}


FAMILIES: dict[str, Family] = {}


def get(name: str) -> Family:
    if not FAMILIES:
        FAMILIES.update(_register())
    if name not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(map(repr, FAMILIES))}; got {name!r}")
    return FAMILIES[name]


def family_of_folder(path: Path) -> Family:
    """The family of a diffusers pipeline folder, from model_index.json's _class_name."""
    from ..formats import read_model_index

    cls = read_model_index(path)["_class_name"]
    get("sd")
    for family in FAMILIES.values():
        if cls in family.pipeline_classes:
            return family
    known = sorted(c for f in FAMILIES.values() for c in f.pipeline_classes)
    raise ValueError(f"{path}: model_index.json names {cls!r}; reverie opens {', '.join(known)}")


def family_of_checkpoint(state_dict: dict) -> Family:
    """The family of a single-file checkpoint, from its key names."""
    from ..formats.flux_single_file import is_flux_checkpoint
    from ..formats.sd3_single_file import is_sd3_checkpoint
    from ..sdxl_files import is_sdxl_checkpoint

    if is_flux_checkpoint(state_dict):
        return get("flux")
    if is_sd3_checkpoint(state_dict):
        return get("sd3")
    if is_sdxl_checkpoint(state_dict):
        return get("sdxl")
    return get("sd")


__all__ = ["FAMILIES", "Family", "family_of_checkpoint", "family_of_folder", "get"]
