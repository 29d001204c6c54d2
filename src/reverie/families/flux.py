"""FLUX.1 (Black Forest Labs 2024): a rectified-flow transformer with double-stream (text and image apart, joint
attention) then single-stream blocks, RoPE over (text, image) positions, on 16-channel VAE latents packed as 2x2
patches. CLIP-L gives a pooled vector, T5 the token states. dev is guidance-distilled (guidance_scale goes into a
guidance embedding; no negative prompt unless true_cfg_scale > 1); schnell is timestep-distilled (4 steps, no
guidance).

The 2x2 packing lives in the network call: samplers, img2img and inpainting masks see (B, C, h, w) latents as
for every other family, and the sampler's elementwise steps are the same in either layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from . import Family, per_prompt


class Flux(Family):
    name = "flux"
    pipeline_classes = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    schedule_kind = "flow"
    negative_prompt = True  # with true_cfg_scale > 1 only (see guidance)
    options = ("max_sequence_length", "prompt_2", "negative_prompt_2", "true_cfg_scale")
    text_encoders = ("text_encoder", "text_encoder_2")

    def settings(self, pipe) -> dict:
        if pipe.transformer.config.guidance_embeds:  # dev: diffusers' defaults
            return dict(steps=28, guidance_scale=3.5, sampler=None)
        return dict(steps=4, guidance_scale=0.0, sampler=None)  # schnell

    def sampler_choice(self, choice):
        # FluxPipeline passes sigmas = linspace(1, 1/N, N) (ComfyUI "simple") unless a schedule is asked for
        return dataclasses.replace(choice, schedule="simple") if choice.schedule == "default" else choice

    def load_folder(self, path: Path, **options):
        from ..loading import load_transformer_folder
        from ..models.flux import Flux as Network

        return load_transformer_folder(path, Network, self.text_encoders, **options)

    def load_single_file(self, path: Path, **options):
        from ..single_files import load_transformer_single_file

        return load_transformer_single_file(path, self, **options)

    def save_folder(self, pipe, path: Path, dtype=None) -> None:
        from ..loading import save_transformer_folder

        save_transformer_folder(pipe, path, "FluxPipeline", "FluxTransformer2DModel", self.text_encoders,
                                dtype=dtype)

    def latent_channels(self, pipe) -> int:
        return pipe.transformer.config.in_channels // 4

    def size_multiple(self, pipe) -> int:
        return pipe.vae.downsample_factor * 2  # 2x2 latent patches per token

    def default_size(self, pipe) -> int:
        return 128 * pipe.vae.downsample_factor  # diffusers' FluxPipeline.default_sample_size

    def check_clip_skip(self, clip_skip):
        raise ValueError("clip_skip: FLUX uses CLIP's pooled output only; clip_skip does not apply")

    def guidance(self, guidance_scale, negatives_given, options, prompts, num_images):
        """Distilled guidance goes into the network; classifier-free guidance only with true_cfg_scale > 1 and a
        negative prompt (diffusers' FluxPipeline)."""
        import math

        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or \
                not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0 (FLUX: one value for the batch); "
                             f"got {guidance_scale!r}")
        true_cfg = options.get("true_cfg_scale", 1.0)
        if isinstance(true_cfg, bool) or not isinstance(true_cfg, (int, float)) or not true_cfg >= 0:
            raise ValueError(f"true_cfg_scale must be a number >= 0; got {true_cfg!r}")
        options["guidance_scale"] = float(guidance_scale)
        use_cfg = true_cfg > 1 and negatives_given
        return use_cfg, (float(true_cfg) if use_cfg else 1.0)

    def encode(self, pipe, prompts, negatives, options):
        from ..text_conditioning import flux_conditioning

        length = options.get("max_sequence_length", 512)

        def states(texts, key):
            with pipe._on_device(pipe.text_encoder), pipe._on_device(pipe.text_encoder_2):
                embeds, pooled = flux_conditioning(pipe.text_encoder, pipe.text_encoder_2, texts,
                                                   max_sequence_length=length,
                                                   prompt_2=per_prompt(key, options.get(key), texts))
            return {"encoder_hidden_states": embeds.to(pipe.device, pipe.dtype),
                    "pooled_projections": pooled.to(pipe.device, pipe.dtype)}

        cond = states(prompts, "prompt_2")
        return cond, (states(negatives, "negative_prompt_2") if negatives is not None else None)

    def network_call(self, pipe, network, shape, options):
        from ..models.flux import image_ids, pack_latents, text_ids, unpack_latents

        h, w = shape[-2:]
        img_ids = image_ids(h, w).to(pipe.device)
        guided = network.config.guidance_embeds
        scale = options.get("guidance_scale", 0.0)

        def call(x, t, encoder_hidden_states, pooled_projections):
            B = x.shape[0]
            guidance = torch.full((B,), scale, dtype=torch.float32, device=x.device) if guided else None
            out = network(pack_latents(x).to(pipe.dtype), t / 1000, encoder_hidden_states.to(pipe.dtype),
                          pooled_projections.to(pipe.dtype), img_ids,
                          text_ids(encoder_hidden_states.shape[1]).to(x.device), guidance=guidance)
            return unpack_latents(out.float(), h, w)  # the model sees t / 1000 and scales it back, as diffusers

        return call

    def mu(self, pipe, shape):
        return pipe.schedule.mu((shape[-2] // 2) * (shape[-1] // 2))  # image tokens; unused without dynamic shift

    def describe(self, pipe, options, sigmas=None, mu=None) -> dict:
        out = {"family": self.name, "variant": "dev" if pipe.transformer.config.guidance_embeds else "schnell"}
        if pipe.schedule.use_dynamic_shifting:  # the shift comes from the image size: mu, as FluxPipeline
            out["mu"] = mu
        else:
            out["shift"] = pipe.schedule.shift
        if pipe.transformer.config.guidance_embeds:
            out["distilled_guidance"] = options.get("guidance_scale")
        for key in ("max_sequence_length", "true_cfg_scale"):
            if key in options:
                out[key] = options[key]
        return out
