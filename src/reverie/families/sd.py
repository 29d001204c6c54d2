"""Stable Diffusion 1.x / 2.x (Rombach et al. 2022): a UNet on 4-channel VAE latents, one CLIP text encoder whose
token states condition every cross-attention layer, a discrete DDPM schedule. Also the models reverie trains
(the bundled `shapes` and `emoji`), which share the layout."""

from __future__ import annotations

from pathlib import Path

from . import Family, _dtype_call


class SD(Family):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                        "StableDiffusionControlNetPipeline")
    network = "unet"
    controlnet = True
    defaults = dict(steps=30, guidance_scale=7.5, sampler="dpmpp_2m")

    def load_folder(self, path: Path, *, allow_pickle=False, tokenizer=None, vae=None, **_):
        from ..loading import load_folder

        unet, own_vae, text_encoder, scheduler_config = load_folder(path, allow_pickle=allow_pickle,
                                                                    tokenizer=tokenizer)
        return _with_vae(dict(unet=unet, vae=own_vae, text_encoder=text_encoder), vae, allow_pickle), scheduler_config

    def load_single_file(self, path: Path, *, allow_pickle=False, tokenizer=None, vae=None, **_):
        from ..loading import load_single_file

        unet, own_vae, text_encoder, scheduler_config = load_single_file(path, allow_pickle=allow_pickle,
                                                                         tokenizer=tokenizer)
        return _with_vae(dict(unet=unet, vae=own_vae, text_encoder=text_encoder), vae, allow_pickle), scheduler_config

    def save_folder(self, pipe, path: Path, dtype=None) -> None:
        from ..loading import save_folder

        save_folder(pipe, path, dtype=dtype)

    def inpaint_network(self, pipe) -> bool:
        return pipe.unet.config.in_channels != pipe.vae.config.latent_channels

    def encode(self, pipe, prompts, negatives, options):
        """CLIP token states, prompts and negatives in one batch so long prompts and their negatives get the same
        number of 77-token chunks; clip_skip applies to both, as in A1111."""
        with pipe._on_device(pipe.text_encoder):
            embeds = pipe.text_encoder.encode(prompts + (negatives or []), clip_skip=options.get("clip_skip"))
        embeds = embeds.to(pipe.device, pipe.dtype)
        cond = {"encoder_hidden_states": embeds[:len(prompts)]}
        return cond, ({"encoder_hidden_states": embeds[len(prompts):]} if negatives else None)

    def network_call(self, pipe, network, shape, options):
        return _dtype_call(network, pipe.dtype)



def _with_vae(components: dict, vae, allow_pickle: bool) -> dict:
    """The components with `vae` (a VAE file or folder, e.g. a fixed fp16 VAE) instead of the model's own."""
    if vae is None:
        return components
    from ..single_files import replace_vae

    return replace_vae(components, vae, allow_pickle=allow_pickle)
