"""Stable Diffusion 1.x / 2.x (Rombach et al. 2022): a UNet on 4-channel VAE latents, one CLIP text encoder whose
token states condition every cross-attention layer, a discrete DDPM schedule. Also the models reverie trains
(the bundled `shapes` and `emoji`), which share the layout, and Latent Consistency Models distilled from SD (Luo
et al. 2023): a UNet with time_cond_proj_dim takes the guidance scale as an input and runs without CFG."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.unet import guidance_embedding
from . import Family, _dtype_call


class SD(Family):
    name = "sd"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                        "StableDiffusionControlNetPipeline", "LatentConsistencyModelPipeline")
    network = "unet"
    controlnet = True
    options = ("prompt_syntax",)  # "a1111" / "no_norm" / "comfy": (word:1.2) emphasis and BREAK (reverie.prompt_syntax)
    defaults = dict(steps=30, guidance_scale=7.5, sampler="dpmpp_2m")
    lcm_defaults = dict(steps=4, guidance_scale=8.5, sampler="lcm")  # diffusers' LatentConsistencyModelPipeline

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

    def settings(self, pipe) -> dict:
        return dict(self.lcm_defaults if _is_lcm(pipe) else self.defaults)

    def encode(self, pipe, prompts, negatives, options):
        """CLIP token states, prompts and negatives in one batch so long prompts and their negatives get the same
        number of 77-token chunks; clip_skip applies to both, as in A1111.

        An LCM UNet was distilled from guided sampling (Luo et al. 2023, section 4.2): the guidance scale is its
        input, timestep_cond = the w-embedding of w = guidance_scale - 1 (diffusers' Imagen-style scale; one per
        prompt for a list), and there is no unconditional side (uncond None: no CFG pass, no negative prompt)."""
        lcm = _is_lcm(pipe)
        if lcm and options.get("negative_given"):
            raise ValueError("negative_prompt: an LCM UNet (time_cond_proj_dim set) runs without classifier-free "
                             "guidance, so it cannot use one; its guidance_scale is an input of the network")
        negatives = None if lcm else negatives
        with pipe._on_device(pipe.text_encoder):
            if options.get("prompt_syntax"):
                embeds = weighted_states(pipe.text_encoder, prompts, negatives, options["prompt_syntax"],
                                         options.get("clip_skip"))
            else:
                embeds = pipe.text_encoder.encode(prompts + (negatives or []), clip_skip=options.get("clip_skip"))
        embeds = embeds.to(pipe.device, pipe.dtype)
        cond = {"encoder_hidden_states": embeds[:len(prompts)]}
        if lcm:
            cond["timestep_cond"] = _w_embedding(pipe, options["guidance_scale"], len(prompts))
        return cond, ({"encoder_hidden_states": embeds[len(prompts):]} if negatives else None)

    def network_call(self, pipe, network, shape, options):
        return _dtype_call(network, pipe.dtype)

    def describe(self, pipe, options: dict, sigmas=None, mu=None) -> dict:
        out = super().describe(pipe, options, sigmas, mu)
        if options.get("prompt_syntax"):
            out["prompt_syntax"] = options["prompt_syntax"]
        return out


def weighted_states(text_encoder, prompts, negatives, mode: str, clip_skip) -> "torch.Tensor":
    """A1111's weighted encoding (reverie.prompt_syntax.weighted_conditioning) of the prompts, then of the
    negatives, each group's mean restored over the group as A1111 encodes a batch's conditions; both get the
    larger chunk count. Prompt editing, alternation and AND need conditioning that changes per step or a sum of
    guidance terms, which the pipeline does not do yet: they are a ValueError."""
    import torch

    from ..prompt_syntax import MODES, parse, prompt_chunks, weighted_conditioning

    if mode not in MODES:
        raise ValueError(f"prompt_syntax must be one of {', '.join(map(repr, MODES))} or None; got {mode!r}")
    if not text_encoder.is_clip:
        raise ValueError("prompt_syntax: weighting needs a CLIP text encoder")

    def text_of(prompt: str) -> str:
        parsed = parse(prompt, 100)
        if len(parsed.parts) > 1 or len(parsed.parts[0].schedule) > 1:
            raise ValueError(f"prompt: with prompt_syntax, prompt editing [from:to:when], alternation [a|b] and AND "
                             f"are not supported yet (emphasis, escapes and BREAK are); got {prompt!r}")
        return parsed.parts[0].schedule[0].text

    groups = [text_encoder.expand_embeddings([text_of(p) for p in prompts])]
    if negatives:
        groups.append(text_encoder.expand_embeddings([text_of(n or "") for n in negatives]))
    model, tokenizer = text_encoder.text_model, text_encoder.tokenizer
    length = text_encoder.max_length
    k = max(prompt_chunks(tokenizer, g, max_length=length)[0].shape[1] for g in groups)
    return torch.cat([weighted_conditioning(model, tokenizer, g, mode=mode, clip_skip=clip_skip, chunks=k)
                      for g in groups])


def _is_lcm(pipe) -> bool:
    """Whether the UNet is a Latent Consistency Model's: it takes the guidance-scale embedding."""
    return getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None


def _w_embedding(pipe, guidance_scale, batch: int):
    """(batch, time_cond_proj_dim) w-embeddings of w = guidance_scale - 1, guidance_scale one number or one per
    prompt (the batch repeats each prompt's rows)."""
    scales = list(guidance_scale) if isinstance(guidance_scale, (list, tuple)) else [guidance_scale]
    w = torch.tensor([float(s) - 1 for s in scales]).repeat_interleave(batch // len(scales))  # (batch,)
    return guidance_embedding(w, pipe.unet.config.time_cond_proj_dim).to(pipe.device)


def _with_vae(components: dict, vae, allow_pickle: bool) -> dict:
    """The components with `vae` (a VAE file or folder, e.g. a fixed fp16 VAE) instead of the model's own."""
    if vae is None:
        return components
    from ..single_files import replace_vae

    return replace_vae(components, vae, allow_pickle=allow_pickle)
