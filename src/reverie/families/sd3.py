"""Stable Diffusion 3 / 3.5 (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis"): an MMDiT (text and image tokens in one joint attention) on 16-channel VAE latents, trained with
rectified flow. Three text encoders: CLIP-L and OpenCLIP bigG (penultimate states + pooled projections) and T5
(optional: zeros without it). Classifier-free guidance with negatives; optional skip-layer guidance (SD3.5)."""

from __future__ import annotations

from pathlib import Path

from . import Family, _dtype_call, per_prompt


class SD3(Family):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                        "StableDiffusion3InpaintPipeline")
    schedule_kind = "flow"
    defaults = dict(steps=28, guidance_scale=7.0, sampler=None)  # diffusers' defaults; the folder's scheduler
    options = ("max_sequence_length", "prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3",
               "skip_guidance_layers", "skip_layer_guidance_scale", "skip_layer_guidance_start",
               "skip_layer_guidance_stop")
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def load_folder(self, path: Path, **options):
        from ..loading import load_transformer_folder
        from ..models.mmdit import MMDiT

        return load_transformer_folder(path, MMDiT, self.text_encoders, **options)

    def load_single_file(self, path: Path, **options):
        from ..single_files import load_transformer_single_file

        return load_transformer_single_file(path, self, **options)

    def save_folder(self, pipe, path: Path, dtype=None) -> None:
        from ..loading import save_transformer_folder

        save_transformer_folder(pipe, path, "StableDiffusion3Pipeline", "SD3Transformer2DModel", self.text_encoders,
                                dtype=dtype)

    def encode(self, pipe, prompts, negatives, options):
        from ..text_conditioning import sd3_conditioning

        length = options.get("max_sequence_length", 256)
        width = pipe.transformer.config.joint_attention_dim

        def states(texts, suffix, clip_skip):
            with pipe._on_device(pipe.text_encoder), pipe._on_device(pipe.text_encoder_2):
                embeds, pooled = sd3_conditioning(
                    pipe.text_encoder, pipe.text_encoder_2, pipe.components.get("text_encoder_3"), texts,
                    clip_skip=clip_skip, max_sequence_length=length, joint_attention_dim=width,
                    prompt_2=per_prompt(f"{suffix}_2", options.get(f"{suffix}_2"), texts),
                    prompt_3=per_prompt(f"{suffix}_3", options.get(f"{suffix}_3"), texts))
            return {"encoder_hidden_states": embeds.to(pipe.device, pipe.dtype),
                    "pooled_projections": pooled.to(pipe.device, pipe.dtype)}

        cond = states(prompts, "prompt", options.get("clip_skip"))
        return cond, (states(negatives, "negative_prompt", None) if negatives is not None else None)

    def network_call(self, pipe, network, shape, options):
        return _dtype_call(network, pipe.dtype)

    def mu(self, pipe, shape):
        if not pipe.schedule.use_dynamic_shifting:
            return None
        patch = pipe.transformer.config.patch_size
        return pipe.schedule.mu((shape[-2] // patch) * (shape[-1] // patch))

    def guide(self, pipe, guided, denoiser, cond, sigmas, use_cfg, options):
        layers = options.get("skip_guidance_layers")
        if layers is None:
            return guided
        from ..guidance import SkipLayerGuidance

        n_layers = pipe.transformer.config.num_layers
        if not isinstance(layers, (list, tuple)) or not layers or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n_layers for i in layers):
            raise ValueError(f"skip_guidance_layers must be a non-empty list of block indices in [0, {n_layers - 1}];"
                             f" got {layers!r}")
        if not use_cfg:
            raise ValueError("skip_guidance_layers needs classifier-free guidance (guidance_scale > 1)")
        start = options.get("skip_layer_guidance_start", 0.01)
        stop = options.get("skip_layer_guidance_stop", 0.2)
        steps = len(sigmas) - 1
        active = [sigmas[i].item() for i in range(steps) if steps * start < i < steps * stop]
        return SkipLayerGuidance(guided, {"skip_layers": list(layers)}, options.get("skip_layer_guidance_scale", 2.8),
                                 active)

    def describe(self, pipe, options, sigmas=None, mu=None) -> dict:
        out = {"family": self.name, "shift": pipe.schedule.shift}
        for key in ("max_sequence_length", "skip_guidance_layers", "skip_layer_guidance_scale",
                    "skip_layer_guidance_start", "skip_layer_guidance_stop"):
            if key in options:
                out[key] = options[key]
        return out
