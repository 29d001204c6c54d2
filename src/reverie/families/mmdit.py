"""reverie's own text-to-image transformer: an MMDiT (SD3's joint text-image attention blocks, reverie.models.mmdit)
on rectified flow, conditioned by one small CLIP text encoder trained with it. The encoder's final states (after
its LayerNorm) are the text tokens and its pooled EOS state is the pooled vector, so the transformer's
joint_attention_dim and pooled_projection_dim are both the encoder's width. Every image token reads every word in
every block, where a UNet reads the text only through cross-attention at some resolutions.

The folder is in the diffusers layout (transformer/ as an SD3Transformer2DModel, vae/, text_encoder/, tokenizer/,
scheduler/ a FlowMatchEulerDiscreteScheduler) under the pipeline name "ReverieMMDiTPipeline": diffusers has no
pipeline that conditions an SD3 transformer on a single CLIP, so only reverie opens it."""

from __future__ import annotations

from pathlib import Path

from .sd3 import SD3

PIPELINE_CLASS = "ReverieMMDiTPipeline"


class ReverieMMDiT(SD3):
    name = "mmdit"
    pipeline_classes = (PIPELINE_CLASS,)
    defaults = dict(steps=20, guidance_scale=5.0, sampler=None)  # the folder's scheduler
    options = ("skip_guidance_layers", "skip_layer_guidance_scale", "skip_layer_guidance_start",
               "skip_layer_guidance_stop")
    text_encoders = ("text_encoder",)

    def load_single_file(self, path: Path, **options):
        raise ValueError(f"{self.name}: reverie's MMDiT models are diffusers folders; there is no single-file format")

    def save_folder(self, pipe, path: Path, dtype=None) -> None:
        from ..loading import save_transformer_folder

        save_transformer_folder(pipe, path, PIPELINE_CLASS, "SD3Transformer2DModel", self.text_encoders, dtype=dtype)

    def check_clip_skip(self, clip_skip):
        if clip_skip is not None:
            raise ValueError("clip_skip: reverie's MMDiT reads its text encoder's final states (no clip skip)")
        return None

    def encode(self, pipe, prompts, negatives, options):
        def states(texts):
            with pipe._on_device(pipe.text_encoder):
                embeds, pooled = pipe.text_encoder.encode_pooled(texts)
            return {"encoder_hidden_states": embeds.to(pipe.device, pipe.dtype),
                    "pooled_projections": pooled.to(pipe.device, pipe.dtype)}

        return states(prompts), (states(negatives) if negatives is not None else None)
