"""Stable Diffusion XL (Podell et al. 2023): a larger UNet on 4-channel VAE latents conditioned on two CLIP
text encoders (CLIP ViT-L and OpenCLIP ViT-bigG: penultimate states concatenated, bigG's pooled projection) and
on micro-conditioning ids (original size, crop, target size; the refiner: an aesthetic score instead of the
target size) through the UNet's text_time embedding. A discrete DDPM schedule, as SD 1/2."""

from __future__ import annotations

from pathlib import Path

from . import Family, per_prompt


class SDXL(Family):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                        "StableDiffusionXLInpaintPipeline")
    network = "unet"
    controlnet = True  # reverie.control.ControlledUNet passes text_embeds and time_ids on to the ControlNets
    defaults = dict(steps=50, guidance_scale=5.0, sampler=None)  # diffusers' defaults; the folder's scheduler
    options = ("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size",
               "negative_original_size", "negative_crops_coords_top_left", "negative_target_size",
               "aesthetic_score", "negative_aesthetic_score")
    text_encoders = ("text_encoder", "text_encoder_2")

    def load_folder(self, path: Path, *, variant=None, allow_pickle=False, vae=None, **_):
        from ..formats import read_model_index
        from ..loading import load_transformer_folder
        from ..models.unet import UNet

        components, scheduler_config = load_transformer_folder(path, UNet, self.text_encoders, variant=variant,
                                                               allow_pickle=allow_pickle, vae=vae,
                                                               network_dir="unet")
        index = read_model_index(path)
        components["settings"] = dict(force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
                                      requires_aesthetics_score=index.get("requires_aesthetics_score", False))
        return components, scheduler_config

    def zeroes_absent_negative(self, pipe) -> bool:
        return pipe.settings["force_zeros_for_empty_prompt"]

    def load_single_file(self, path: Path, **options):
        """An SGM single file (sd_xl_base_1.0.safetensors, sd_xl_refiner_1.0.safetensors): see
        reverie.sdxl_files.load_sdxl_single_file (config=, tokenizer=, vae=)."""
        from ..sdxl_files import load_sdxl_single_file

        return load_sdxl_single_file(path, **options)

    def save_folder(self, pipe, path: Path, dtype=None) -> None:
        from ..loading import save_transformer_folder

        refiner = pipe.settings["requires_aesthetics_score"]
        save_transformer_folder(pipe, path, "StableDiffusionXLImg2ImgPipeline" if refiner else
                                "StableDiffusionXLPipeline", "UNet2DConditionModel", self.text_encoders,
                                dtype=dtype, network_dir="unet", extra=dict(pipe.settings))

    def inpaint_network(self, pipe) -> bool:
        return pipe.unet.config.in_channels != pipe.vae.config.latent_channels

    def time_ids(self, pipe, options: dict, batch: int) -> tuple:
        """(positive, negative) micro-conditioning ids, (B, 6) for the base or (B, 5) for a refiner, by diffusers'
        rules (text_conditioning.sdxl_time_ids / sdxl_negative_time_ids; img2img has its own negative rule)."""
        from ..text_conditioning import sdxl_negative_time_ids, sdxl_time_ids

        size = (options["height"], options["width"])
        original = options.get("original_size") or size
        crops = options.get("crops_coords_top_left") or (0, 0)
        target = options.get("target_size") or size
        refiner = pipe.settings["requires_aesthetics_score"]
        if not refiner and options.get("aesthetic_score") is not None:
            raise ValueError("aesthetic_score: only a refiner (requires_aesthetics_score) takes one")
        if refiner and not (options["img2img"] or options["handoff"]):
            raise ValueError("image: an SDXL refiner refines; give it an image (img2img) or a base model's latents "
                             "with denoising_start, not a text-to-image request")
        score = options.get("aesthetic_score", 6.0) if refiner else None
        positive = sdxl_time_ids(original, crops, target, aesthetic_score=score)
        negative = sdxl_negative_time_ids(
            original, crops, target, negative_original_size=options.get("negative_original_size"),
            negative_crops_coords_top_left=options.get("negative_crops_coords_top_left") or (0, 0),
            negative_target_size=options.get("negative_target_size"), aesthetic_score=score,
            negative_aesthetic_score=options.get("negative_aesthetic_score", 2.5), img2img=options["img2img"])
        return positive.repeat(batch, 1), negative.repeat(batch, 1)

    def encode(self, pipe, prompts, negatives, options):
        from ..text_conditioning import sdxl_chunk_count, sdxl_conditioning, sdxl_negative_conditioning

        encoders = (pipe.components.get("text_encoder"), pipe.text_encoder_2)
        prompt_2 = per_prompt("prompt_2", options.get("prompt_2"), prompts)
        negative = negatives if options["negative_given"] else None
        negative_2 = options.get("negative_prompt_2")
        chunks = sdxl_chunk_count(*encoders, prompts, prompt_2, negative, negative_2) if negatives else None
        with pipe._on_device(pipe.text_encoder_2):
            embeds, pooled = sdxl_conditioning(*encoders, prompts, prompt_2=prompt_2, clip_skip=options.get("clip_skip"),
                                               chunks=chunks)
        ids, negative_ids = self.time_ids(pipe, options, len(prompts))
        cond = {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": ids}
        uncond = None
        if negatives is not None:
            n_embeds, n_pooled = sdxl_negative_conditioning(
                *encoders, negative, embeds, pooled, negative_prompt_2=negative_2,
                force_zeros_for_empty_prompt=pipe.settings["force_zeros_for_empty_prompt"])
            uncond = {"encoder_hidden_states": n_embeds, "text_embeds": n_pooled, "time_ids": negative_ids}
        move = lambda d: d and {k: v.to(pipe.device, pipe.dtype) for k, v in d.items()}  # noqa: E731
        return move(cond), move(uncond)

    def network_call(self, pipe, network, shape, options):
        def call(x, t, encoder_hidden_states, text_embeds, time_ids, **extra):
            return network(x.to(pipe.dtype), t, encoder_hidden_states.to(pipe.dtype), text_embeds=text_embeds,
                           time_ids=time_ids, **extra).float()

        return call
