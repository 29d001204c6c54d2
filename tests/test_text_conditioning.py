"""SD3 and FLUX text conditioning equals diffusers' `encode_prompt` on the tiny random folders of
tests/tiny_families.py (which diffusers' own pipelines open and run); T5Encoder and the CLIP-with-projection
TextEncoder load from folders (sharded too) and round-trip; truncation warns; bad input raises naming the field."""

import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from reverie.models.t5 import T5Encoder  # noqa: E402
from reverie.models.text import TextEncoder, text_encoder_from_folder  # noqa: E402
from reverie.text_conditioning import flux_conditioning, sd3_conditioning  # noqa: E402

from tiny_families import (CLIP_CONFIG, PROMPTS, T5_CONFIG, clip_tokenizer, dit_folder, flux_folder,  # noqa: E402
                           sd3_folder, t5_tokenizer)

LONG = " ".join(["a red circle above a blue square"] * 12)  # 84 words: over 77 CLIP tokens and 77 T5 tokens
BATCHES = {"two": PROMPTS[:2], "long": [LONG, PROMPTS[2]], "empty": ["", "bad quality"]}
TOL = 1e-6


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def quiet(fn, *args, **kwargs):
    """Call fn with the truncation warnings of long prompts silenced (they are tested on their own)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def load_pipe(cls, path):
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    path = sd3_folder(tmp_path_factory.mktemp("sd3"))
    ours = dict(clip_l=text_encoder_from_folder(path / "text_encoder", path / "tokenizer"),
                clip_g=text_encoder_from_folder(path / "text_encoder_2", path / "tokenizer_2"),
                t5=T5Encoder.from_pretrained(path / "text_encoder_3", path / "tokenizer_3"))
    return load_pipe(diffusers.StableDiffusion3Pipeline, path), ours, path


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    path = flux_folder(tmp_path_factory.mktemp("flux"), dev=True)
    ours = dict(clip=text_encoder_from_folder(path / "text_encoder", path / "tokenizer"),
                t5=T5Encoder.from_pretrained(path / "text_encoder_2", path / "tokenizer_2"))
    return load_pipe(diffusers.FluxPipeline, path), ours, path


# ---------------------------------------------------------------- the tiny folders are valid diffusers pipelines


def test_tiny_tokenizers_split_the_test_prompts_into_known_tokens():
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    assert len(clip) < CLIP_CONFIG["vocab_size"] and len(t5) <= T5_CONFIG["vocab_size"]
    assert clip.convert_tokens_to_ids([clip.bos_token, clip.eos_token]) == [len(clip) - 2, len(clip) - 1]
    for prompt in PROMPTS[:3]:
        clip_ids, t5_ids = clip(prompt).input_ids, t5(prompt).input_ids
        assert len(clip_ids) > 3 and len(t5_ids) > 2  # more than one token besides the special ones
        assert t5.unk_token_id not in t5_ids
        assert len(clip_ids) < 20  # whole words were merged: not one token per letter
    assert t5("A").input_ids != t5("a").input_ids  # T5 keeps case
    assert len(clip(LONG).input_ids) > 77 and len(t5(LONG).input_ids) > 77


@pytest.mark.parametrize("family", ["dit", "sd3", "sd35", "flux-dev", "flux-schnell"])
def test_tiny_folders_run_two_steps_in_diffusers(family, tmp_path):
    gen = torch.Generator("cpu").manual_seed(0)
    if family == "dit":
        pipe = load_pipe(diffusers.DiTPipeline, dit_folder(tmp_path))
        # diffusers' test uses DDIMScheduler() as built, which clips x0 (the folder keeps clip_sample=False)
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=True)
        image = pipe(class_labels=[1], generator=gen, num_inference_steps=2, output_type="np").images
        assert image.shape == (1, 16, 16, 3)
        # diffusers' test_dit.py test_inference expects this slice: same seeds, same component order
        expected = np.array([0.2946, 0.6601, 0.4329, 0.3296, 0.4144, 0.5319, 0.7273, 0.5013, 0.4457])
        assert np.abs(image[0, -3:, -3:, -1].flatten() - expected).max() <= 1e-3
        return
    if family.startswith("sd3"):
        pipe = load_pipe(diffusers.StableDiffusion3Pipeline, sd3_folder(tmp_path, sd35=family == "sd35"))
        assert (pipe.transformer.config.qk_norm == "rms_norm") == (family == "sd35")
        kwargs, size = {}, 32
    else:
        pipe = load_pipe(diffusers.FluxPipeline, flux_folder(tmp_path, dev=family == "flux-dev"))
        assert pipe.transformer.config.guidance_embeds == (family == "flux-dev")
        kwargs, size = dict(height=8, width=8, max_sequence_length=48), 8
    image = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=5.0, generator=gen, output_type="np",
                 **kwargs).images
    assert image.shape == (1, size, size, 3) and np.isfinite(image).all() and image.std() > 0


# ---------------------------------------------------------------- SD3


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("clip_skip", [None, 1, 2])
@pytest.mark.parametrize("length", [256, 77])
@torch.no_grad()
def test_sd3_matches_diffusers_encode_prompt(sd3, batch, clip_skip, length):
    pipe, ours, _ = sd3
    prompts = BATCHES[batch]
    embeds, _, pooled, _ = quiet(pipe.encode_prompt, prompts, None, None, device="cpu",
                                 do_classifier_free_guidance=False, clip_skip=clip_skip, max_sequence_length=length)
    got, got_pooled = quiet(sd3_conditioning, **ours, prompts=prompts, clip_skip=clip_skip,
                            max_sequence_length=length)
    assert got.shape == (2, 77 + length, 32) and got_pooled.shape == (2, 64)
    assert max_diff(got, embeds) <= TOL and max_diff(got_pooled, pooled) <= TOL


@torch.no_grad()
def test_sd3_negatives_and_per_encoder_prompts_match_diffusers(sd3):
    pipe, ours, _ = sd3
    prompts, negatives = PROMPTS[:2], ["bad quality", ""]
    seconds, thirds, negative_seconds = ["a different prompt", "deformed"], "another different prompt", "blurry"
    # diffusers wants one prompt_3 per prompt; reverie also takes one str for all
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, seconds, [thirds] * 2, device="cpu", do_classifier_free_guidance=True, negative_prompt=negatives,
        negative_prompt_2=negative_seconds, clip_skip=1)
    got, got_pooled = sd3_conditioning(**ours, prompts=prompts, prompt_2=seconds, prompt_3=thirds, clip_skip=1)
    assert max_diff(got, embeds) <= TOL and max_diff(got_pooled, pooled) <= TOL
    # negatives: clip_skip is the positive prompt's only (diffusers passes None for them)
    got, got_pooled = sd3_conditioning(**ours, prompts=negatives, prompt_2=negative_seconds, clip_skip=None)
    assert max_diff(got, negative) <= TOL and max_diff(got_pooled, negative_pooled) <= TOL
    # the per-encoder prompts reach their encoders: CLIP-G's pooled half and T5's tokens change, CLIP-L's do not
    plain, plain_pooled = sd3_conditioning(**ours, prompts=prompts, clip_skip=1)
    assert max_diff(plain_pooled[:, :32], pooled[:, :32]) <= TOL
    assert max_diff(plain_pooled[:, 32:], pooled[:, 32:]) > 1e-3
    assert max_diff(plain[:, :77], embeds[:, :77]) <= TOL and max_diff(plain[:, 77:], embeds[:, 77:]) > 1e-3


@torch.no_grad()
def test_sd3_pads_clip_states_to_a_wider_t5_and_zeros_without_t5(sd3):
    """The tiny folder crops the CLIP states (32 + 32 channels to T5's 32, trap 10); a wider T5 and a CLIP-G of
    its own weights exercise the zero-padding branch, and the order L then G. Without T5, its part is zeros."""
    pipe, ours, _ = sd3
    torch.manual_seed(1)
    clip_g = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**CLIP_CONFIG)).eval()
    torch.manual_seed(0)
    t5 = transformers.T5EncoderModel(transformers.T5Config(**{**T5_CONFIG, "d_model": 96})).eval()
    wide = diffusers.StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_2": clip_g, "text_encoder_3": t5})
    prompts = BATCHES["empty"]
    embeds, _, pooled, _ = wide.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False)
    mine = dict(clip_l=ours["clip_l"], clip_g=TextEncoder(clip_g, ours["clip_g"].tokenizer),
                t5=T5Encoder(t5, ours["t5"].tokenizer))
    got, got_pooled = sd3_conditioning(**mine, prompts=prompts)
    assert got.shape == (2, 77 + 256, 96)
    assert max_diff(got, embeds) <= TOL and max_diff(got_pooled, pooled) <= TOL
    assert got[:, :77, 64:].abs().max() == 0 and got[:, :77, 32:64].abs().max() > 0

    bare = diffusers.StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    embeds, _, pooled, _ = bare.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False,
                                              max_sequence_length=77)
    got, got_pooled = sd3_conditioning(ours["clip_l"], ours["clip_g"], None, prompts, max_sequence_length=77,
                                       joint_attention_dim=pipe.transformer.config.joint_attention_dim)
    assert got.shape == (2, 154, 32) and got[:, 77:].abs().max() == 0
    assert max_diff(got, embeds) <= TOL and max_diff(got_pooled, pooled) <= TOL


# ---------------------------------------------------------------- FLUX


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("length", [48, 512])
@torch.no_grad()
def test_flux_matches_diffusers_encode_prompt(flux, batch, length):
    pipe, ours, _ = flux
    prompts = BATCHES[batch]
    embeds, pooled, _ = quiet(pipe.encode_prompt, prompts, device="cpu", max_sequence_length=length)
    got, got_pooled = quiet(flux_conditioning, ours["clip"], ours["t5"], prompts, max_sequence_length=length)
    assert got.shape == (2, length, 32) and got_pooled.shape == (2, 32)
    assert max_diff(got, embeds) <= TOL and max_diff(got_pooled, pooled) <= TOL


@torch.no_grad()
def test_flux_prompt_2_goes_to_t5_and_the_comparison_can_fail(flux):
    pipe, ours, _ = flux
    prompts, seconds = PROMPTS[:2], ["a different prompt", "another different prompt"]
    embeds, pooled, _ = pipe.encode_prompt(prompts, seconds, device="cpu", max_sequence_length=48)
    got, got_pooled = flux_conditioning(ours["clip"], ours["t5"], prompts, prompt_2=seconds, max_sequence_length=48)
    assert max_diff(got, embeds) <= TOL and max_diff(got_pooled, pooled) <= TOL
    plain, _ = flux_conditioning(ours["clip"], ours["t5"], prompts, max_sequence_length=48)
    assert max_diff(plain, embeds) > 1e-3
    # a padding mask (which neither pipeline passes) would change the states: the equality above is not vacuous
    t5 = ours["t5"]
    ids = t5.tokenize(seconds, 48)
    masked = t5.text_model(ids, attention_mask=(ids != t5.tokenizer.pad_token_id).long()).last_hidden_state
    assert max_diff(masked, embeds) > 1e-3


@torch.no_grad()
def test_pooled_vectors_are_transformers_eos_features(sd3, flux):
    """eos_token_id == 2 in the tiny configs: transformers pools at the largest id, which is EOS by construction."""
    clip = flux[1]["clip"]
    ids = clip.tokenize_truncated(BATCHES["two"])
    eos = (ids == clip.tokenizer.eos_token_id).int().argmax(-1)
    assert torch.equal(ids.argmax(-1), eos)
    states, pooled = clip.encode_pooled(BATCHES["two"])
    assert max_diff(pooled, states[torch.arange(2), eos]) == 0  # pooler_output: final-LayerNorm EOS state
    clip_l = sd3[1]["clip_l"]
    _, projected = clip_l.encode_pooled(BATCHES["two"])
    out = clip_l.text_model(ids, output_hidden_states=True)
    assert max_diff(projected, clip_l.text_model.text_projection(out.last_hidden_state[torch.arange(2), eos])) <= TOL
    penultimate, _ = clip_l.encode_pooled(BATCHES["two"], hidden_layer=-2)
    assert max_diff(penultimate, out.hidden_states[-2]) == 0  # no final LayerNorm on hidden states


# ---------------------------------------------------------------- truncation and bad input


def test_long_prompts_warn_naming_what_was_dropped(flux):
    _, ours, _ = flux
    t5_tokens, clip_tokens = len(ours["t5"].tokenizer(LONG).input_ids), len(ours["clip"].tokenizer(LONG).input_ids)
    with pytest.warns(UserWarning, match=f"max_sequence_length=48, so {t5_tokens - 48} were dropped"):
        ids = ours["t5"].tokenize([PROMPTS[0], LONG], 48)
    assert ids.shape == (2, 48) and ids[1, -1] == ours["t5"].tokenizer.eos_token_id  # </s> kept at the end
    with pytest.warns(UserWarning, match=f"CLIP encodes at most 77 tokens, so {clip_tokens - 77} were dropped"):
        ours["clip"].tokenize_truncated(LONG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about at the full length, nor for short prompts
        ours["t5"].tokenize(LONG, 512)
        ours["clip"].tokenize_truncated(PROMPTS)


def test_bad_input_raises_naming_the_field(sd3, flux, tmp_path):
    _, s, path = sd3
    _, f, _ = flux
    for bad in [513, 0, True, 48.0]:
        with pytest.raises(ValueError, match="max_sequence_length"):
            f["t5"].encode("a cat", bad)
        with pytest.raises(ValueError, match="max_sequence_length"):
            flux_conditioning(f["clip"], f["t5"], "a cat", max_sequence_length=bad)
        with pytest.raises(ValueError, match="max_sequence_length"):
            sd3_conditioning(s["clip_l"], s["clip_g"], None, "a cat", max_sequence_length=bad, joint_attention_dim=32)
    with pytest.raises(ValueError, match="joint_attention_dim"):
        sd3_conditioning(s["clip_l"], s["clip_g"], None, "a cat")
    with pytest.raises(ValueError, match="joint_attention_dim"):
        sd3_conditioning(**s, prompts="a cat", joint_attention_dim=64)
    for bad in [-1, 5, True]:
        with pytest.raises(ValueError, match="clip_skip"):
            sd3_conditioning(**s, prompts="a cat", clip_skip=bad)
    with pytest.raises(ValueError, match="prompt_2"):
        sd3_conditioning(**s, prompts=["a", "b"], prompt_2=["c"])
    with pytest.raises(ValueError, match="prompt_3"):
        sd3_conditioning(**s, prompts=["a"], prompt_3=[3])
    with pytest.raises(ValueError, match="prompt"):
        flux_conditioning(f["clip"], f["t5"], [])
    with pytest.raises(ValueError, match="clip: FLUX's text_encoder is a CLIPTextModel"):
        flux_conditioning(s["clip_l"], f["t5"], "a cat")
    with pytest.raises(ValueError, match="t5"):
        flux_conditioning(f["clip"], None, "a cat")
    with pytest.raises(ValueError, match="clip_g"):
        sd3_conditioning(s["clip_l"], s["t5"], s["t5"], "a cat")
    with pytest.raises(ValueError, match="hidden_layer"):
        s["clip_l"].encode_pooled("a cat", hidden_layer=6)
    # folders: a T5 folder is not a CLIP one and vice versa; pickled weights are refused, never unpickled
    with pytest.raises(ValueError, match="architectures"):
        text_encoder_from_folder(path / "text_encoder_3", path / "tokenizer_3")
    with pytest.raises(ValueError, match="model_type must be 't5'"):
        T5Encoder.from_pretrained(path / "text_encoder", path / "tokenizer_3")
    with pytest.raises(ValueError, match="tokenizer_dir"):
        T5Encoder.from_pretrained(path / "text_encoder_3", tmp_path)
    (tmp_path / "pickled").mkdir()
    s["t5"].text_model.config.save_pretrained(tmp_path / "pickled")
    torch.save(s["t5"].text_model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    for load in (text_encoder_from_folder, T5Encoder.from_pretrained):
        with pytest.raises(ValueError, match="text_encoder_dir"):
            load(tmp_path / "pickled", path / "tokenizer_3")


# ---------------------------------------------------------------- folders: sharded, round trips


@torch.no_grad()
def test_sharded_folders_load_and_saved_folders_round_trip(sd3, tmp_path):
    pipe, ours, path = sd3
    prompts = BATCHES["two"]
    want_states, want_pooled = ours["clip_l"].encode_pooled(prompts, hidden_layer=-2)
    want_t5 = ours["t5"].encode(prompts, 77)
    # sharded checkpoints (model-0000x-of-0000n.safetensors + model.safetensors.index.json), as large ones ship
    pipe.text_encoder.save_pretrained(tmp_path / "clip_sharded", max_shard_size="20KB")
    pipe.text_encoder_3.save_pretrained(tmp_path / "t5_sharded", max_shard_size="20KB")
    assert all((tmp_path / f / "model.safetensors.index.json").is_file() for f in ("clip_sharded", "t5_sharded"))
    clip = text_encoder_from_folder(tmp_path / "clip_sharded", path / "tokenizer")
    t5 = T5Encoder.from_pretrained(tmp_path / "t5_sharded", path / "tokenizer_3")
    assert type(clip.text_model).__name__ == "CLIPTextModelWithProjection"
    states, pooled = clip.encode_pooled(prompts, hidden_layer=-2)
    assert max_diff(states, want_states) == 0 and max_diff(pooled, want_pooled) == 0
    assert max_diff(t5.encode(prompts, 77), want_t5) == 0
    # reverie's own save, read back by reverie and by transformers (strictly: no key missing or unexpected)
    ours["clip_l"].save_pretrained(tmp_path / "te", tmp_path / "tok")
    ours["t5"].save_pretrained(tmp_path / "te3", tmp_path / "tok3")
    for cls, folder in ((transformers.CLIPTextModelWithProjection, "te"), (transformers.T5EncoderModel, "te3")):
        _, info = cls.from_pretrained(tmp_path / folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
    states, pooled = text_encoder_from_folder(tmp_path / "te", tmp_path / "tok").encode_pooled(prompts, hidden_layer=-2)
    assert max_diff(states, want_states) == 0 and max_diff(pooled, want_pooled) == 0
    assert max_diff(T5Encoder.from_pretrained(tmp_path / "te3", tmp_path / "tok3").encode(prompts, 77), want_t5) == 0
    ours["t5"].save_pretrained(tmp_path / "te3_half", tmp_path / "tok3", dtype=torch.float16)
    half = T5Encoder.from_pretrained(tmp_path / "te3_half", tmp_path / "tok3", dtype=torch.float16)
    assert half.dtype == torch.float16 and T5Encoder.from_pretrained(tmp_path / "te3_half", tmp_path / "tok3").dtype \
        == torch.float32
