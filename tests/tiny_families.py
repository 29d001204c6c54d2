"""Tiny random diffusers pipelines for the transformer families (DiT, SD3/SD3.5, FLUX.1, Wan 2.1) and SDXL (base
and refiner), built offline and saved with diffusers' own `save_pretrained`, so reverie and the diffusers oracle read
the same folder.

Each builder copies the component order and `torch.manual_seed(0)` calls of diffusers' fast pipeline tests
(tests/pipelines/{dit/test_dit.py, stable_diffusion_3/test_pipeline_stable_diffusion_3.py,
flux/test_pipeline_flux.py, stable_diffusion_xl/test_stable_diffusion_xl.py and test_stable_diffusion_xl_img2img.py});
see /work/shared/reference/architectures.md sections 1.8, 2.4, 3.5, 4.5 and 6.
Two things cannot be copied, because the Hub is out of reach:
- `hf-internal-testing/tiny-random-clip` and `tiny-random-t5` tokenizers: replaced by a byte-level CLIP BPE and a
  T5 Unigram vocabulary built here from the words the tests use (`clip_tokenizer`, `t5_tokenizer`).
- `tiny-random-t5`'s weights (SD3 loads them pretrained): SD3's T5 is built from `T5_CONFIG` after seed 0, as the
  FLUX test builds its T5. `T5_CONFIG` has tiny-random-t5's sizes (d_model 32, d_kv 8, d_ff 37, 4 heads, 5 layers,
  vocab 1103) with T5Config's default initializer_factor 1.0 (unconfirmed for the Hub file; a far smaller factor
  would leave attention nearly uniform and the tests blind to masking).

This is a plain module the tests import (not a test file). Every builder writes into the folder it is given,
returns it, and takes well under 2 s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CLIP_CONFIG = dict(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
                   num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000, hidden_act="gelu",
                   projection_dim=32)  # diffusers' SD3/FLUX/SDXL tests (eos_token_id 2: CLIP's legacy argmax pooling)
T5_CONFIG = dict(vocab_size=1103, d_model=32, d_kv=8, d_ff=37, num_layers=5, num_heads=4,
                 relative_attention_num_buckets=8, feed_forward_proj="relu", layer_norm_epsilon=1e-6,
                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # hf-internal-testing/tiny-random-t5's sizes

# the prompts diffusers' tests and reverie's tests use; both tokenizers know their words
PROMPTS = ["A painting of a squirrel eating a burger", "a red circle above a blue square", "bad quality",
           "a different prompt", "another different prompt", "deformed", "blurry", "a photo of a cat",
           "the cat on a red mat near the dog and an old car"]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _words() -> list[str]:
    seen = dict.fromkeys(w for p in PROMPTS for w in p.split())
    return list(seen)


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in CLIP's vocab.json order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]


def clip_tokenizer(pad_token: str = EOS):
    """A byte-level CLIP BPE in CLIP's vocab layout: 256 bytes, the same with "</w>", one piece per merge (each
    test word merged left to right into one token), then <|startoftext|> and <|endoftext|> as the two highest ids,
    so transformers' legacy pooling for eos_token_id == 2 (argmax of the ids) lands on EOS as with real CLIP.
    pad_token="!" imitates SD3's/SDXL's OpenCLIP tokenizer_2."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate([*symbols, *(s + "</w>" for s in symbols)])}
    merges = []
    for word in (w.lower() for w in _words()):
        pieces = [*word[:-1], word[-1] + "</w>"]
        for right in pieces[1:]:
            merge = (pieces[0], right)
            pieces[0] = "".join(merge)
            if merge not in merges:
                merges.append(merge)
                vocab.setdefault(pieces[0], len(vocab))
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    assert len(vocab) < CLIP_CONFIG["vocab_size"]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token)


def t5_tokenizer():
    """A T5 Unigram tokenizer without sentencepiece: <pad> 0, </s> 1, <unk> 2, "▁", then "▁" + each test word
    (lower case and capitalised; T5 keeps case) and single characters, so any ASCII prompt tokenizes."""
    from transformers import T5Tokenizer

    words = dict.fromkeys(v for w in _words() for v in (w.lower(), w.capitalize()))
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    scores = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    for pieces, score in (([f"▁{w}" for w in words], -5.0), ([f"▁{c}" for c in chars], -8.0), (chars, -10.0)):
        for piece in pieces:
            scores.setdefault(piece, score)  # a piece listed twice would give Unigram two ids for one string
    assert len(scores) <= T5_CONFIG["vocab_size"]
    return T5Tokenizer(vocab=list(scores.items()), extra_ids=0)


def _clip_text_model(with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(**CLIP_CONFIG))


def _t5_model():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(**T5_CONFIG))


def _flow_vae(latent_channels: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def _save(pipe, folder) -> Path:
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def dit_folder(tmp) -> Path:
    """diffusers' tiny DiTPipeline: seed 0 -> DiTTransformer2DModel, then AutoencoderKL() with defaults (no reseed,
    one 64-channel level: VAE factor 1) and DDIMScheduler(clip_sample=False); class_labels [1], 2 steps -> 16x16."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=4, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero", norm_elementwise_affine=False)
    vae = AutoencoderKL()
    # clip_sample=False as in the real DiT folders (diffusers' conversion script); the test's DDIMScheduler() clips
    return _save(DiTPipeline(transformer=transformer.eval(), vae=vae.eval(),
                             scheduler=DDIMScheduler(clip_sample=False)), tmp)


def sd3_folder(tmp, *, sd35: bool = False) -> Path:
    """diffusers' tiny StableDiffusion3Pipeline (32x32 images, T5 width 32 = CLIP-L width: the CLIP states are
    cropped, trap 10). sd35=True adds the SD3.5 transformer keys of diffusers' SD3.5 model test,
    qk_norm="rms_norm" and dual_attention_layers=(0,) (diffusers has no SD3.5 pipeline test)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    extra = dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if sd35 else {}
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4, **extra)
    text_encoder = _clip_text_model(with_projection=True)  # seed 0 before each: identical weights, as in diffusers
    text_encoder_2 = _clip_text_model(with_projection=True)
    text_encoder_3 = _t5_model()
    vae = _flow_vae(latent_channels=4)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        text_encoder_3=text_encoder_3, tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(),
        tokenizer_3=t5_tokenizer(), transformer=transformer, vae=vae)
    return _save(pipe, tmp)


def flux_folder(tmp, *, dev: bool) -> Path:
    """diffusers' tiny FluxPipeline (8x8 images, 4 image tokens, max_sequence_length 48 in its test); dev=True adds
    guidance_embeds (FLUX.1-dev's distilled guidance), dev=False is schnell-style."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=dev)
    text_encoder = _clip_text_model(with_projection=False)
    text_encoder_2 = _t5_model()
    vae = _flow_vae(latent_channels=1)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder,
                        text_encoder_2=text_encoder_2, tokenizer=clip_tokenizer(), tokenizer_2=t5_tokenizer(),
                        transformer=transformer, vae=vae, image_encoder=None, feature_extractor=None)
    return _save(pipe, tmp)


def sdxl_folder(tmp, *, refiner: bool = False) -> Path:
    """diffusers' tiny StableDiffusionXLPipeline (64x64 images: 32 latents, VAE factor 2), as
    test_stable_diffusion_xl.py's get_dummy_components builds it: seed 0 -> UNet (text_time, 6 ids x 8 + 32 pooled
    = 80), Euler; seed 0 -> VAE; seed 0 -> one CLIPTextConfig for a CLIPTextModel and a CLIPTextModelWithProjection
    built back to back (different weights). tokenizer_2 pads with "!" like real SDXL's OpenCLIP tokenizer.

    refiner=True: test_stable_diffusion_xl_img2img.py's get_dummy_components(skip_first_text_encoder=True) for a
    StableDiffusionXLImg2ImgPipeline: UNet (32, 64) with 32 groups, 5 ids (aesthetic score) x 8 + 32 = 72,
    cross_attention_dim 32 (text_encoder_2 only), requires_aesthetics_score=True, no text_encoder / tokenizer.
    The test's CLIPTextModel is still built (and dropped) so text_encoder_2 gets its weights; its image encoder
    (built after its own reseed, so it changes no other weights) is left out."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    sizes = (dict(block_out_channels=(32, 64), projection_class_embeddings_input_dim=72, cross_attention_dim=32)
             if refiner else
             dict(block_out_channels=(2, 4), projection_class_embeddings_input_dim=80, cross_attention_dim=64,
                  norm_num_groups=1))
    unet = UNet2DConditionModel(
        layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), **sizes)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=128)
    torch.manual_seed(0)
    config = CLIPTextConfig(**CLIP_CONFIG)
    text_encoder = CLIPTextModel(config)
    text_encoder_2 = CLIPTextModelWithProjection(config)  # no reseed: its own weights
    parts = dict(unet=unet, scheduler=scheduler, vae=vae, text_encoder_2=text_encoder_2,
                 tokenizer_2=clip_tokenizer(pad_token="!"), image_encoder=None, feature_extractor=None)
    if refiner:
        pipe = StableDiffusionXLImg2ImgPipeline(text_encoder=None, tokenizer=None, requires_aesthetics_score=True,
                                                **parts)
    else:
        pipe = StableDiffusionXLPipeline(text_encoder=text_encoder, tokenizer=clip_tokenizer(), **parts)
    return _save(pipe, tmp)


def sdxl_inpaint_folder(tmp, *, in_channels: int = 9) -> Path:
    """diffusers' tiny StableDiffusionXLInpaintPipeline as test_stable_diffusion_xl_inpaint.py's
    get_dummy_components builds it (64x64 images: 32 latents), but with an inpainting UNet: in_channels 9 = 4 noisy
    latents + 1 mask + 4 masked-image latents (diffusers' test keeps 4; in_channels=4 gives its model as it is).
    seed 0 -> UNet (32, 64), 32 groups, text_time with 5 ids (aesthetic score) x 8 + 32 pooled = 72,
    cross_attention_dim 64; Euler; seed 0 -> VAE; seed 0 -> one CLIPTextConfig for a CLIPTextModel and a
    CLIPTextModelWithProjection built back to back; requires_aesthetics_score=True. tokenizer_2 pads with "!" as in
    sdxl_folder."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=72,
        cross_attention_dim=64)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, sample_size=128)
    torch.manual_seed(0)
    config = CLIPTextConfig(**CLIP_CONFIG)
    text_encoder = CLIPTextModel(config)
    text_encoder_2 = CLIPTextModelWithProjection(config)  # no reseed: its own weights
    pipe = StableDiffusionXLInpaintPipeline(
        unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=clip_tokenizer(pad_token="!"), requires_aesthetics_score=True)
    return _save(pipe, tmp)


# --- Wan 2.1 text-to-video (tests/test_wan_pipeline.py, tests/test_video_io.py) --------------------------------

WAN_WORDS = "dance monkey negative a cat and dog baking cake in the kitchen red blue quick brown fox &".split()
WAN_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16,
                       out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                       qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
WAN_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])


def wan_tokenizer():
    """A word-level tokenizer with T5's special ids (<pad> 0, </s> 1, <unk> 2) and `</s>` appended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WAN_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def perturbed(model):
    """Every parameter moved off its init, so each layer matters (norm scales start at one, zero-init outputs)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def wan_pipeline():
    """diffusers' tiny WanPipeline (tests/pipelines/wan/test_wan.py: seed 0 before the VAE, the UMT5 encoder and
    the transformer), with a word-level tokenizer and the VAE's and transformer's weights moved off their init;
    FlowMatchEuler at shift 7. Not saved: callers set the scheduler and save_pretrained it."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tok = wan_tokenizer()
    torch.manual_seed(0)
    vae = perturbed(AutoencoderKLWan(**WAN_VAE))
    torch.manual_seed(0)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                               num_heads=4, relative_attention_num_buckets=8)).eval()
    torch.manual_seed(0)
    transformer = perturbed(WanTransformer3DModel(**WAN_TRANSFORMER))
    pipe = WanPipeline(tokenizer=tok, text_encoder=text_encoder, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_folder(tmp) -> Path:
    """wan_pipeline() saved to `tmp` (FlowMatchEuler, shift 7)."""
    return _save(wan_pipeline(), tmp)


# --- comparing images (the family parity tests) -----------------------------------------------------------------


def pixels(images) -> np.ndarray:
    """PIL images -> (B, H, W, 3) float64 on 0..255."""
    return np.stack([np.asarray(im, dtype=np.float64) for im in images])


def theirs_pixels(out) -> np.ndarray:
    """A diffusers output with output_type="np" -> the same, rounded as PIL rounds."""
    return (np.asarray(out.images, dtype=np.float64) * 255).round()


def assert_same_images(ours, theirs, tol=0.02):
    assert ours.shape == theirs.shape
    diff = np.abs(ours - theirs).mean()
    assert diff <= tol, f"mean abs pixel difference {diff:.4f} > {tol}"
    assert ours.std() > 1  # the images are not flat: the comparison means something


def source_image(size, seed=3):
    """A (width, height) RGB test image: a horizontal ramp plus noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    return Image.fromarray((0.6 * ramp + 0.4 * rng.uniform(0, 255, (h, w, 3))).astype("uint8"))


# --- Wan 2.1 image-to-video (tests/test_wan_i2v.py) ---------------------------------------------------------------

WAN_I2V_CLIP = dict(hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                    intermediate_size=16, patch_size=4)  # diffusers' I2V test's CLIP, 4 x 4 patches: 65 tokens


def wan_i2v_pipeline():
    """A tiny WanImageToVideoPipeline in the layout of diffusers' tests/pipelines/wan/test_wan_image_to_video.py:
    wan_pipeline()'s VAE, UMT5 encoder and tokenizer; a transformer taking 36 = 16 + 4 + 16 channels with CLIP
    image tokens (image_dim 4) through added key / value projections (added_kv_proj_dim = the model width 24, as
    the real 2.1 I2V checkpoints); a 2-layer CLIPVisionModel on 32 x 32 crops. Weights moved off their init;
    FlowMatchEuler at shift 7. Not saved: callers set the scheduler and save_pretrained it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    t2v = wan_pipeline()
    torch.manual_seed(0)
    transformer = perturbed(WanTransformer3DModel(**WAN_TRANSFORMER | dict(in_channels=36, image_dim=4,
                                                                           added_kv_proj_dim=24)))
    torch.manual_seed(0)
    image_encoder = perturbed(CLIPVisionModel(CLIPVisionConfig(**WAN_I2V_CLIP)))
    pipe = WanImageToVideoPipeline(tokenizer=t2v.tokenizer, text_encoder=t2v.text_encoder, vae=t2v.vae,
                                   transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                   image_encoder=image_encoder, image_processor=CLIPImageProcessor(crop_size=32,
                                                                                                   size=32))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_i2v_folder(tmp) -> Path:
    """wan_i2v_pipeline() saved to `tmp` (FlowMatchEuler, shift 7)."""
    return _save(wan_i2v_pipeline(), tmp)


def sd_folder(tmp) -> Path:
    """A tiny SD 1.x-layout StableDiffusionPipeline: two down blocks (cross-attention, then plain), 1x1-conv
    proj_in/out (use_linear_projection False, as SD 1.x), 32 norm groups, the tiny CLIP above, DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return _save(pipe, tmp)
