"""reverie's own text-to-video model: a small Wan transformer (reverie.models.wan) over spacetime patches (Brooks et
al. 2024, "Video generation models as world simulators": (1, 2, 2) patches of latent frames x rows x columns, 3-D
RoPE) on rectified flow, in the latent space of an image VAE applied frame by frame (no temporal compression:
latent frames = frames), conditioned through cross-attention on the final states of one small CLIP text encoder
trained with it (as reverie.families.mmdit; no pooled vector). Trained by reverie.train's video task.

Image-to-video by first-frame conditioning: with image=, the first latent frame is the image's latents (posterior
mode), given clean to the network (training gives it so, its flow time 0, for a fraction model.p_image of the clips)
and pinned as that frame's x0 estimate at every step, so every sampler keeps it and ends on it.

The folder is in the diffusers layout (transformer/ a WanTransformer3DModel, vae/ an AutoencoderKL, text_encoder/ a
CLIPTextModel, tokenizer/, scheduler/ a FlowMatchEulerDiscreteScheduler) under the pipeline name
"ReverieVideoPipeline": diffusers has no pipeline for a Wan transformer on a per-frame image VAE and CLIP, so only
reverie opens it."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from . import Family
from .wan import Wan

PIPELINE_CLASS = "ReverieVideoPipeline"


class Spacetime(Wan):
    name = "spacetime"
    first_frame = "optional"
    pipeline_classes = (PIPELINE_CLASS,)
    defaults = dict(steps=20, guidance_scale=5.0, sampler=None)  # the folder's scheduler (FlowMatchEuler), as mmdit
    options = ("num_frames",)  # and image= (conditioning_image)
    default_frames = 16  # the video task's clip length (configs/moving_shapes_video.toml)
    text_encoders = ("text_encoder",)

    # --- loading ---------------------------------------------------------------------------------------------

    def load_folder(self, path: Path, **options):
        from ..loading import load_transformer_folder
        from ..models.wan import WanTransformer

        return load_transformer_folder(path, WanTransformer, self.text_encoders, **options)

    def save_folder(self, pipe, path: Path, dtype=None) -> None:
        from ..loading import save_transformer_folder

        save_transformer_folder(pipe, path, PIPELINE_CLASS, "WanTransformer3DModel", self.text_encoders, dtype=dtype)

    # --- layout ----------------------------------------------------------------------------------------------

    def downsample_factor(self, pipe) -> int:
        return pipe.vae.downsample_factor

    def size_multiple(self, pipe) -> int:
        f, (_, ph, pw) = pipe.vae.downsample_factor, pipe.transformer.config.patch_size
        return math.lcm(f * ph, f * pw)

    def default_size(self, pipe) -> int:
        return 64  # the shapes VAE's training size

    def default_dims(self, pipe) -> tuple[int, int]:
        return 64, 64

    def num_frames(self, pipe, options: dict) -> int:
        """The call's frames: 1 to the transformer's rope_max_seq_len (the training clip's longest axis in tokens:
        RoPE positions past it were never seen), default_frames if that fits."""
        limit = pipe.transformer.config.rope_max_seq_len
        frames = options.get("num_frames", min(self.default_frames, limit))
        if not frames <= limit:
            raise ValueError(f"num_frames must be in [1, {limit}] for this model (its RoPE length, rope_max_seq_len: "
                             f"the longest clip axis it was trained on); got {frames}")
        return frames

    def temporal_compression(self, pipe) -> int:
        return 1  # an image VAE per frame: any frame count

    def latent_shape(self, pipe, batch, width, height, options) -> tuple:
        """(B, C, num_frames, H / f, W / f): one latent frame per frame."""
        f = pipe.vae.downsample_factor
        return batch, self.latent_channels(pipe), self.num_frames(pipe, options), height // f, width // f

    def decode(self, vae, latents):
        """Every latent frame through the image VAE (its scale and shift undone): (B, 3, F, H, W) in [-1, 1]."""
        B, C, F, h, w = latents.shape
        frames = latents.transpose(1, 2).reshape(B * F, C, h, w)  # (B F, C, h, w), video-major
        return Family.decode(self, vae, frames).unflatten(0, (B, F)).transpose(1, 2)

    # --- conditioning ----------------------------------------------------------------------------------------

    def check_clip_skip(self, clip_skip):
        raise ValueError("clip_skip: reverie's video model reads its text encoder's final states (no clip skip)")

    def check_options(self, options: dict) -> dict:
        """Any frame count >= 1 (no 1 + 4k rule: the VAE does not compress time); its upper bound is the model's
        (num_frames). Family's check of the option names, not Wan's."""
        options = Family.check_options(self, options)
        frames = options.get("num_frames", 1)
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"num_frames must be an integer >= 1; got {frames!r}")
        return options

    def conditioning_image(self, image, options: dict):
        """image= (a PIL image, a path, a list with one per video, or (B, 3, H, W) in [-1, 1]) is the first frame:
        taken into the options as (1 | B, 3, H, W) pixels, not an edit."""
        from ..edit import as_images

        return None, (options if image is None else options | {"image": as_images(image, "image")})

    def encode(self, pipe, prompts, negatives, options):
        """The CLIP's final states (after its LayerNorm) of one truncated chunk, as the video task trains on."""
        image = options.get("image")
        if image is not None:
            W, H = options.get("width"), options.get("height")
            if tuple(image.shape[-2:]) != (H, W) or len(image) not in (1, len(prompts)):
                raise ValueError(f"image: the first frame must be {W}x{H} (the requested width x height), one for all "
                                 f"videos or one per video ({len(prompts)}); got {len(image)} of "
                                 f"{image.shape[-1]}x{image.shape[-2]}")

        def states(texts):
            with pipe._on_device(pipe.text_encoder):
                embeds, _ = pipe.text_encoder.encode_pooled(texts)
            return {"encoder_hidden_states": embeds.to(pipe.device, pipe.dtype)}

        return states(prompts), (states(negatives) if negatives is not None else None)

    def guide(self, pipe, guided, denoiser, cond, sigmas, use_cfg, options):
        image = options.get("image")
        return guided if image is None else FirstFrame(guided, pipe.encode_images(image))

    def describe(self, pipe, options, sigmas=None, mu=None) -> dict:
        return {"family": self.name, "shift": pipe.schedule.shift, "num_frames": self.num_frames(pipe, options),
                "image_to_video": options.get("image") is not None}


class FirstFrame(nn.Module):
    """D'(x, sigma): D with the first latent frame given as `first` (the image's latents) in its input, as training
    gives it (clean: flow time 0), and as that frame's x0 estimate in its output (reverie.edit.KnownRegionDenoiser
    with a clean known region), so a sampler keeps the frame on the image's trajectory and ends on it at sigma 0."""

    def __init__(self, denoiser, first: Tensor):  # first (1 | B, C, h, w)
        super().__init__()
        self.denoiser, self.first = denoiser, first

    def forward(self, x: Tensor, sigma: Tensor, **cond) -> Tensor:  # x (B, C, F, h, w), flow convention
        first = self.first.to(x.dtype).expand(x.shape[0], -1, -1, -1)[:, :, None]  # (B, C, 1, h, w)
        denoised = self.denoiser(torch.cat([first, x[:, :, 1:]], dim=2), sigma, **cond)
        return torch.cat([first, denoised[:, :, 1:]], dim=2)
