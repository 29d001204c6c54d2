"""Wan 2.1 text-to-video (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models",
arXiv 2503.20314): a rectified-flow DiT over (frames, rows, columns) patches of a causal 3-D VAE's latents,
conditioned on UMT5 states through cross-attention; classifier-free guidance with negatives (diffusers'
WanPipeline: guidance 5, 50 steps, 832 x 480, 81 frames).

Only the layout differs from the image families: the latents are (B, 16, 1 + (num_frames - 1) / 4, H / 8, W / 8),
normalised per channel by the VAE's latents_mean / latents_std, and decode to (B, 3, num_frames, H, W). The flow
schedule, the samplers (the folder's FlowMatchEuler, or UniPC in flow mode) and guidance are the shared ones.

WanI2V is Wan 2.1 image-to-video (diffusers' WanImageToVideoPipeline): the same sampling, with the first frame as
conditioning on both sides of CFG — its CLIP tokens in the cross-attention, and its VAE latents with a mask
concatenated to the latents on every network call."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from PIL import Image

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

    def temporal_compression(self, pipe) -> int:
        """Frames per latent frame after the first (Wan 2.1's VAE: 4): the model takes 1 + t k frames."""
        return pipe.vae.config.temporal_compression

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


class WanI2V(Wan):
    """Wan 2.1 image-to-video: the first frame enters twice (Wan Team 2025, image-to-video; diffusers'
    WanImageToVideoPipeline). CLIP ViT-H's penultimate hidden states are the transformer's
    encoder_hidden_states_image (its image_dim / added_kv_proj_dim cross-attention); and the frame followed by
    num_frames - 1 zero frames is VAE-encoded (the posterior's mode), normalised, and given a mask that is 1 on the
    first latent frame's t = temporal_compression channels (one per pixel frame it holds) and 0 after, so every
    network call sees [latents (z), mask (t), image latents (z)]: in_channels = 16 + 4 + 16 = 36."""

    name = "wan_i2v"
    first_frame = "required"
    pipeline_classes = ("WanImageToVideoPipeline",)

    def load_folder(self, path: Path, *, variant=None, **options):
        """Wan's components plus the folder's image_encoder (CLIPVisionModel) and image_processor
        (CLIPImageProcessor) when it has them; a transformer with image_dim needs both."""
        components, scheduler_config = super().load_folder(path, variant=variant, **options)
        c, vae = components["transformer"].config, components["vae"].config
        if c.pos_embed_seq_len is not None:
            raise ValueError(f"{path}: the transformer has pos_embed_seq_len (Wan 2.1 FLF2V, first and last frames); "
                             f"reverie opens Wan 2.1 image-to-video folders (one first frame)")
        expected = 2 * vae.z_dim + vae.temporal_compression
        if c.in_channels != expected:
            raise ValueError(f"{path}: an image-to-video transformer takes in_channels = 2 * z_dim + "
                             f"temporal_compression = {expected} (latents, mask, image latents); got {c.in_channels}")
        if (path / "image_encoder").is_dir() or c.image_dim is not None:
            components["image_encoder"] = _image_model(path / "image_encoder", variant)
            components["image_processor"] = _image_processor(path / "image_processor")
        return components, scheduler_config

    def latent_channels(self, pipe) -> int:
        return pipe.vae.config.z_dim  # what is sampled; the mask and image latents join it in the network call

    def conditioning_image(self, image, options: dict):
        """image= is the first frame (one PIL image or an image file's path), taken into the options for encode."""
        from ..edit import _open

        if image is None:
            raise ValueError("image: a Wan image-to-video model needs image= (the first frame: a PIL image or an "
                             "image file path)")
        if not isinstance(image, (Image.Image, str, Path)):
            raise ValueError(f"image: a Wan image-to-video model takes one first frame, a PIL image or an image file "
                             f"path (shared by every prompt); got {type(image).__name__}")
        return None, options | {"image": _open(image, "image").convert("RGB")}

    def encode(self, pipe, prompts, negatives, options):
        """Wan's text states, plus what the first frame adds to both sides alike: its CLIP tokens and the `concat`
        condition (edit.ConcatInputs), one copy per row."""
        if options.get("image") is None:
            raise ValueError("image: a Wan image-to-video model needs image= (the first frame)")
        cond, uncond = super().encode(pipe, prompts, negatives, options)
        image, batch = options["image"], len(prompts)
        frames = options.get("num_frames", self.default_frames)
        condition = first_frame_condition(pipe, image, options["width"], options["height"], frames)
        frame = {"concat": condition.expand(batch, -1, -1, -1, -1)}
        if pipe.transformer.config.image_dim is not None:
            frame["encoder_hidden_states_image"] = image_tokens(pipe, image).expand(batch, -1, -1)
        return cond | frame, (uncond | frame if uncond is not None else None)

    def network_call(self, pipe, network, shape, options):
        from ..edit import ConcatInputs

        return ConcatInputs(_dtype_call(network, pipe.dtype))


def image_tokens(pipe, image: Image.Image) -> torch.Tensor:
    """CLIP's penultimate hidden states (1, 1 + patches, width) for the image as the folder's CLIPImageProcessor
    prepares it (resize, centre crop, CLIP mean / std): diffusers' WanImageToVideoPipeline.encode_image."""
    pixels = pipe.image_processor(images=image, return_tensors="pt").pixel_values
    with pipe._on_device(pipe.image_encoder) as encoder, torch.inference_mode():
        weight = next(encoder.parameters())
        states = encoder(pixel_values=pixels.to(weight.device, weight.dtype), output_hidden_states=True).hidden_states
    return states[-2].to(pipe.device, pipe.dtype)


def first_frame_condition(pipe, image: Image.Image, width: int, height: int, num_frames: int) -> torch.Tensor:
    """(1, t + z, T, h, w) float32: the mask, then the normalised latents of the image (Lanczos-resized to width x
    height, u / 255 * 2 - 1) followed by num_frames - 1 zero frames, through the VAE's posterior mode (diffusers'
    prepare_latents: sample_mode "argmax"). The mask is diffusers' per-pixel-frame mask (1 for frame 0 only, frame
    0 counted t times) folded into t channels per latent frame: ones on latent frame 0, zeros after."""
    from ..edit import as_images

    frame = as_images(image.resize((width, height), Image.Resampling.LANCZOS))  # (1, 3, H, W) in [-1, 1]
    video = torch.cat([frame[:, :, None], frame.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
    with pipe._on_device(pipe.vae) as vae, torch.inference_mode():
        latents = vae.normalize_latents(vae.encode(video.to(pipe.device, pipe.vae_dtype)).mode().float())
        mask = latents.new_zeros(1, vae.config.temporal_compression, *latents.shape[2:])  # (1, t, T, h, w)
        mask[:, :, 0] = 1
        return torch.cat([mask, latents], dim=1)


def _image_model(folder: Path, variant: str | None):
    """The folder's CLIPVisionModel in float32, safetensors only."""
    from transformers import CLIPVisionModel

    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder}: expected a transformers CLIPVisionModel folder (config.json): an image-to-video "
                         f"transformer with image_dim needs the CLIP image encoder")
    return CLIPVisionModel.from_pretrained(folder, local_files_only=True, use_safetensors=True, dtype=torch.float32,
                                           variant=variant).eval()


def _image_processor(folder: Path):
    from transformers import CLIPImageProcessor

    if not (folder / "preprocessor_config.json").is_file():
        raise ValueError(f"{folder}: expected a CLIPImageProcessor folder (preprocessor_config.json)")
    return CLIPImageProcessor.from_pretrained(folder, local_files_only=True)


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
