"""Wan 2.1 text-to-video (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models",
arXiv 2503.20314): a rectified-flow DiT over (frames, rows, columns) patches of a causal 3-D VAE's latents,
conditioned on UMT5 states through cross-attention; classifier-free guidance with negatives (diffusers'
WanPipeline: guidance 5, 50 steps, 832 x 480, 81 frames).

Only the layout differs from the image families: the latents are (B, 16, 1 + (num_frames - 1) / 4, H / 8, W / 8),
normalised per channel by the VAE's latents_mean / latents_std, and decode to (B, 3, num_frames, H, W). The flow
schedule, the samplers (the folder's FlowMatchEuler, or UniPC in flow mode) and guidance are the shared ones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from . import Family, _dtype_call

TEXT_MODELS = {"umt5": "UMT5EncoderModel", "t5": "T5EncoderModel"}  # config.json model_type -> transformers class


class Wan(Family):
    name = "wan"
    pipeline_classes = ("WanPipeline",)
    schedule_kind = "flow"
    edits = False  # text-to-video only: no img2img / inpainting / expert hand-off on video latents
    defaults = dict(steps=50, guidance_scale=5.0, sampler=None)  # diffusers' WanPipeline; the folder's scheduler
    options = ("num_frames", "max_sequence_length")
    default_frames = 81  # diffusers' num_frames default (5 s at 16 fps)

    # --- loading ---------------------------------------------------------------------------------------------

    def load_folder(self, path: Path, *, variant=None, allow_pickle: bool = False, dtype=None, **_):
        from ..formats import read_model_index
        from ..formats.folder import read_json
        from ..loading import load_network
        from ..models.wan import WanTransformer
        from ..models.wan_vae import WanVAE

        index = read_model_index(path)
        if index.get("boundary_ratio") is not None or (index.get("transformer_2") or [None])[-1] is not None:
            raise ValueError(f"{path}: transformer_2 / boundary_ratio (Wan 2.2's two experts) is not supported; "
                             f"reverie opens Wan 2.1 text-to-video folders")
        if index.get("expand_timesteps"):
            raise ValueError(f"{path}: expand_timesteps (Wan 2.2 TI2V's per-token timesteps) is not supported")
        components = {
            "transformer": load_network(WanTransformer, path / "transformer", variant=variant,
                                        allow_pickle=allow_pickle, dtype=dtype),
            "vae": load_network(WanVAE, path / "vae", variant=variant, allow_pickle=allow_pickle),
            "text_encoder": _text_model(path / "text_encoder", variant),
            "tokenizer": _tokenizer(path / "tokenizer"),
        }
        return components, read_json(path / "scheduler" / "scheduler_config.json")

    # --- layout ----------------------------------------------------------------------------------------------

    def latent_channels(self, pipe) -> int:
        return pipe.transformer.config.in_channels

    def downsample_factor(self, pipe) -> int:
        return pipe.vae.config.spatial_compression

    def size_multiple(self, pipe) -> int:
        """WanPipeline requires multiples of 16, and of the VAE factor times the patch's rows and columns."""
        s, (_, ph, pw) = pipe.vae.config.spatial_compression, pipe.transformer.config.patch_size
        return math.lcm(16, s * ph, s * pw)

    def default_size(self, pipe) -> int:
        return 480  # the short side of diffusers' default 832 x 480

    def default_dims(self, pipe) -> tuple[int, int]:
        return 832, 480

    def latent_shape(self, pipe, batch, width, height, options) -> tuple:
        """(B, C, 1 + (num_frames - 1) / temporal, H / s, W / s): the causal VAE keeps frame 0 alone."""
        frames = options.get("num_frames", self.default_frames)
        s, t = pipe.vae.config.spatial_compression, pipe.vae.config.temporal_compression
        return batch, self.latent_channels(pipe), (frames - 1) // t + 1, height // s, width // s

    def decode(self, vae, latents):
        """z * latents_std + latents_mean, then the causal VAE: (B, 3, num_frames, H, W) in [-1, 1]."""
        return vae.decode(vae.denormalize_latents(latents))

    # --- conditioning and the network call -------------------------------------------------------------------

    def check_clip_skip(self, clip_skip):
        raise ValueError("clip_skip: Wan's text encoder is UMT5 (its last hidden state); clip_skip does not apply")

    def check_options(self, options: dict) -> dict:
        """num_frames must be 1 + 4k: Wan 2.1's VAE compresses time 4x after the first frame (diffusers rounds
        other counts down with a warning; reverie raises). max_sequence_length is checked by wan_conditioning."""
        options = super().check_options(options)
        frames = options.get("num_frames", self.default_frames)
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1 or (frames - 1) % 4:
            raise ValueError(f"num_frames must be 1 + 4k frames (1, 5, 9, ..., 81) for the Wan VAE's 4x time "
                             f"compression; got {frames!r}")
        return options

    def encode(self, pipe, prompts, negatives, options):
        from ..text_conditioning import wan_conditioning

        length = options.get("max_sequence_length", 512)

        def states(texts):
            with pipe._on_device(pipe.text_encoder) as text_model:
                embeds = wan_conditioning(text_model, pipe.tokenizer, texts, max_sequence_length=length)
            return {"encoder_hidden_states": embeds.to(pipe.device, pipe.dtype)}

        return states(prompts), (states(negatives) if negatives is not None else None)

    def network_call(self, pipe, network, shape, options):
        return _dtype_call(network, pipe.dtype)

    def describe(self, pipe, options, sigmas=None, mu=None) -> dict:
        out = {"family": self.name, "shift": pipe.schedule.shift,
               "num_frames": options.get("num_frames", self.default_frames)}
        if "max_sequence_length" in options:
            out["max_sequence_length"] = options["max_sequence_length"]
        return out


def _text_model(folder: Path, variant: str | None):
    """The folder's UMT5EncoderModel (Wan) or T5EncoderModel (diffusers' tiny test) in float32, safetensors only."""
    import transformers

    config = folder / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if model_type not in TEXT_MODELS:
        raise ValueError(f"{folder}: config.json's model_type must be one of {', '.join(TEXT_MODELS)} (a UMT5 or "
                         f"T5 encoder); got {model_type!r}")
    cls = getattr(transformers, TEXT_MODELS[model_type])
    # transformers 5 loads in the checkpoint's dtype when given none: ask for float32, the pipeline casts it
    return cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, dtype=torch.float32,
                               variant=variant).eval()


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not (folder / "tokenizer_config.json").is_file():
        raise ValueError(f"{folder}: expected a transformers tokenizer folder (tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)
