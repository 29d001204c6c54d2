"""SDXL text conditioning and micro-conditioning equal diffusers' `encode_prompt` and `_get_add_time_ids` on the
tiny SDXL base and refiner folders of tests/tiny_families.py (which diffusers' own pipelines open and run 2 steps
on); A1111-style chunking equals diffusers for short prompts and keeps the whole of long ones."""

import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from reverie.models.text import text_encoder_from_folder  # noqa: E402
from reverie.text_conditioning import (sdxl_chunk_count, sdxl_conditioning, sdxl_negative_conditioning,  # noqa: E402
                                       sdxl_negative_time_ids, sdxl_time_ids)

from tiny_families import PROMPTS, sdxl_folder  # noqa: E402

LONG = " ".join(["a red circle above a blue square"] * 12)  # 84 words: two 75-token chunks
TOL = 1e-6


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def load_pipe(cls, path):
    pipe = cls.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = sdxl_folder(tmp_path_factory.mktemp("sdxl"))
    ours = (text_encoder_from_folder(path / "text_encoder", path / "tokenizer"),
            text_encoder_from_folder(path / "text_encoder_2", path / "tokenizer_2"))
    return load_pipe(diffusers.StableDiffusionXLPipeline, path), ours


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    path = sdxl_folder(tmp_path_factory.mktemp("sdxl_refiner"), refiner=True)
    ours = (None, text_encoder_from_folder(path / "text_encoder_2", path / "tokenizer_2"))
    return load_pipe(diffusers.StableDiffusionXLImg2ImgPipeline, path), ours


def reference(pipe, prompts, **kwargs):
    with torch.no_grad():
        return pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                  **kwargs)


def ours_all(encoders, prompts, *, prompt_2=None, clip_skip=None, negative_prompt=None, negative_prompt_2=None,
             force_zeros=True, chunked=False):
    with torch.no_grad():
        embeds, pooled = sdxl_conditioning(*encoders, prompts, prompt_2=prompt_2, clip_skip=clip_skip,
                                           chunked=chunked)
        neg, neg_pooled = sdxl_negative_conditioning(*encoders, negative_prompt, embeds, pooled,
                                                     negative_prompt_2=negative_prompt_2,
                                                     force_zeros_for_empty_prompt=force_zeros, chunked=chunked)
    return embeds, neg, pooled, neg_pooled


def assert_same(ours, ref):
    for a, b in zip(ours, ref):
        assert max_diff(a, b) <= TOL


def test_folders_run_in_diffusers(base, refiner):
    pipe, (te1, te2) = base
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert not torch.equal(pipe.text_encoder.get_input_embeddings().weight,
                           pipe.text_encoder_2.get_input_embeddings().weight)  # built back to back
    image = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=5.0, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    pipe_r, _ = refiner
    assert pipe_r.text_encoder is None and pipe_r.config.requires_aesthetics_score
    gen = torch.Generator("cpu").manual_seed(0)
    init = torch.rand((1, 3, 32, 32), generator=gen)
    image = pipe_r(PROMPTS[0], image=init, strength=0.8, num_inference_steps=2, guidance_scale=5.0,
                   output_type="np", generator=gen).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("case", [
    dict(prompts=PROMPTS[:2]),
    dict(prompts=[PROMPTS[0]], prompt_2=PROMPTS[3]),  # diffusers broadcasts no str prompt_2 to a batch
    dict(prompts=PROMPTS[:2], prompt_2=[PROMPTS[3], PROMPTS[4]], clip_skip=1),
    dict(prompts=PROMPTS[:2], force_zeros=False),
    dict(prompts=PROMPTS[:2], negative_prompt=""),
    dict(prompts=PROMPTS[:2], negative_prompt=PROMPTS[2]),
    dict(prompts=PROMPTS[:2], negative_prompt=[PROMPTS[2], PROMPTS[5]], negative_prompt_2=PROMPTS[6]),
    dict(prompts=["", PROMPTS[7]], negative_prompt=PROMPTS[2], clip_skip=0),
], ids=["two", "prompt_2", "clip_skip", "zeros_off", "neg_empty", "neg", "neg_2", "empty_prompt"])
@pytest.mark.parametrize("chunked", [False, True])
def test_base_equals_diffusers(base, case, chunked):
    pipe, encoders = base
    case = dict(case)
    force_zeros = case.pop("force_zeros", True)
    pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    try:
        ref = reference(pipe, **case)
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)
    ours = ours_all(encoders, **case, force_zeros=force_zeros, chunked=chunked)
    assert ours[0].shape == (len(case["prompts"]), 77, 64) and ours[2].shape == (len(case["prompts"]), 32)
    assert_same(ours, ref)
    if case.get("negative_prompt") is None:
        assert (ours[1] == 0).all() == force_zeros and (ours[3] == 0).all() == force_zeros


def test_negative_empty_vs_none(base):
    pipe, encoders = base
    none = ours_all(encoders, PROMPTS[:1])
    empty = ours_all(encoders, PROMPTS[:1], negative_prompt="")
    assert (none[1] == 0).all() and (none[3] == 0).all()
    assert empty[1].abs().max() > 0 and empty[3].abs().max() > 0  # "" is encoded, not zeroed (trap 11)
    unforced = ours_all(encoders, PROMPTS[:1], force_zeros=False)
    assert_same(unforced, empty)  # without force_zeros, None means ""


@pytest.mark.parametrize("case", [
    dict(prompts=[PROMPTS[0]]),
    dict(prompts=PROMPTS[:2], prompt_2=PROMPTS[3], negative_prompt=PROMPTS[2], negative_prompt_2=PROMPTS[5]),
    dict(prompts=PROMPTS[:2], clip_skip=1, negative_prompt=""),
], ids=["one", "prompt_2_ignored", "clip_skip"])
@pytest.mark.parametrize("chunked", [False, True])
def test_refiner_equals_diffusers(refiner, case, chunked):
    pipe, encoders = refiner
    ref = reference(pipe, **case)
    if "prompt_2" in case:
        with pytest.warns(UserWarning, match="prompt_2 is ignored"):
            ours = ours_all(encoders, **case, chunked=chunked)
    else:
        ours = ours_all(encoders, **case, chunked=chunked)
    assert ours[0].shape[-1] == 32  # text_encoder_2 only
    assert_same(ours, ref)


def test_long_prompts_chunked(base):
    pipe, encoders = base
    te1, te2 = encoders
    with pytest.warns(UserWarning, match="dropped"):
        short, short_pooled = sdxl_conditioning(te1, te2, [LONG, PROMPTS[2]], chunked=False)
    ref = quiet(reference, pipe, [LONG, PROMPTS[2]], negative_prompt=PROMPTS[5])
    assert max_diff(short, ref[0]) <= TOL and max_diff(short_pooled, ref[2]) <= TOL  # diffusers truncates
    with torch.no_grad():
        embeds, pooled = sdxl_conditioning(te1, te2, [LONG, PROMPTS[2]])
        neg, neg_pooled = sdxl_negative_conditioning(te1, te2, PROMPTS[5], embeds, pooled)
    assert embeds.shape == (2, 154, 64) and neg.shape == embeds.shape
    assert max_diff(embeds[:, :77], short) <= TOL  # the first chunk is the truncated encoding
    assert max_diff(pooled, short_pooled) <= TOL  # pooled from the first chunk (A1111's zs[0].pooled)
    assert max_diff(neg[:, :77], ref[1]) <= TOL and max_diff(neg_pooled, ref[3]) <= TOL
    # the second chunk is the prompt's tail (or the empty-prompt chunk for the short prompt), encoded on its own
    assert embeds[0, 77:].abs().max() > 0 and max_diff(embeds[0, 77:], embeds[0, :77]) > 1e-3
    empty = sdxl_conditioning(te1, te2, [""])[0]
    assert max_diff(embeds[1, 77:], empty[0]) <= TOL and max_diff(neg[0, 77:], empty[0]) <= TOL
    # negatives longer than the positive: same chunk count for both through sdxl_chunk_count
    k = sdxl_chunk_count(te1, te2, [PROMPTS[0]], [LONG])
    assert k == 2
    with pytest.raises(ValueError, match="chunks"):
        short_pos, short_pool = sdxl_conditioning(te1, te2, [PROMPTS[0]])
        sdxl_negative_conditioning(te1, te2, LONG, short_pos, short_pool)
    with torch.no_grad():
        pos, pos_pooled = sdxl_conditioning(te1, te2, [PROMPTS[0]], chunks=k)
        neg, _ = sdxl_negative_conditioning(te1, te2, LONG, pos, pos_pooled)
    assert pos.shape == neg.shape == (1, 154, 64)


def test_bad_input_raises(base):
    _, (te1, te2) = base
    with pytest.raises(ValueError, match="text_encoder_2"):
        sdxl_conditioning(te1, te1, PROMPTS[:1])
    with pytest.raises(ValueError, match="clip_skip"):
        sdxl_conditioning(te1, te2, PROMPTS[:1], clip_skip=5)
    with pytest.raises(ValueError, match="prompt_2"):
        sdxl_conditioning(te1, te2, PROMPTS[:2], prompt_2=[PROMPTS[0]])
    with pytest.raises(ValueError, match="chunks"):
        sdxl_conditioning(te1, te2, PROMPTS[:1], chunks=0)
    embeds, pooled = sdxl_conditioning(te1, te2, PROMPTS[:2])
    with pytest.raises(ValueError, match="negative_prompt"):
        sdxl_negative_conditioning(te1, te2, [PROMPTS[2]], embeds, pooled)
    with pytest.raises(ValueError, match="original_size"):
        sdxl_time_ids((64,), (0, 0), (64, 64))
    with pytest.raises(ValueError, match="aesthetic_score"):
        sdxl_negative_time_ids((64, 64), (0, 0), (64, 64), aesthetic_score=6.0)


SIZES = [dict(original_size=(64, 96), crops_coords_top_left=(0, 0), target_size=(64, 96)),
         dict(original_size=(1024, 768), crops_coords_top_left=(16, 8), target_size=(512, 384),
              negative_original_size=(256, 192), negative_crops_coords_top_left=(4, 2),
              negative_target_size=(512, 384)),
         dict(original_size=(1024, 768), crops_coords_top_left=(16, 8), target_size=(512, 384),
              negative_original_size=(256, 192))]


@pytest.mark.parametrize("sizes", SIZES, ids=["plain", "negative_sizes", "negative_original_only"])
def test_time_ids_base(base, sizes):
    pipe, _ = base
    positive = {k: v for k, v in sizes.items() if not k.startswith("negative")}
    ref = pipe._get_add_time_ids(*positive.values(), dtype=torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(sdxl_time_ids(*positive.values())[None], ref)
    # the pipeline's negative rule: both negative sizes given -> their own ids, else the positive's
    no, nt = sizes.get("negative_original_size"), sizes.get("negative_target_size")
    ref_neg = (pipe._get_add_time_ids(no, sizes.get("negative_crops_coords_top_left", (0, 0)), nt,
                                      dtype=torch.float32, text_encoder_projection_dim=32)
               if no is not None and nt is not None else ref)
    ours = sdxl_negative_time_ids(*positive.values(), **{k: v for k, v in sizes.items() if k.startswith("negative")})
    assert ours.shape == (6,) and torch.equal(ours[None], ref_neg)


@pytest.mark.parametrize("sizes", SIZES, ids=["plain", "negative_sizes", "negative_original_only"])
@pytest.mark.parametrize("aesthetics", [True, False])
def test_time_ids_img2img(refiner, sizes, aesthetics):
    pipe, _ = refiner
    scores = dict(aesthetic_score=7.5, negative_aesthetic_score=1.5)
    neg = dict(negative_original_size=sizes.get("negative_original_size"),
               negative_crops_coords_top_left=sizes.get("negative_crops_coords_top_left", (0, 0)),
               negative_target_size=sizes.get("negative_target_size"))
    positive = [sizes["original_size"], sizes["crops_coords_top_left"], sizes["target_size"]]
    # the pipeline fills the negative sizes with the positive ones before calling _get_add_time_ids
    filled = [neg["negative_original_size"] or positive[0], neg["negative_crops_coords_top_left"],
              neg["negative_target_size"] or positive[2]]
    pipe.register_to_config(requires_aesthetics_score=aesthetics)
    try:
        dim = 72 if aesthetics else 80  # the check needs a matching UNet: fake its in_features for 6 ids
        linear = pipe.unet.add_embedding.linear_1
        saved = linear.in_features
        linear.in_features = dim
        ref, ref_neg = pipe._get_add_time_ids(*positive, scores["aesthetic_score"],
                                              scores["negative_aesthetic_score"], *filled, dtype=torch.float32,
                                              text_encoder_projection_dim=32)
    finally:
        linear.in_features = saved
        pipe.register_to_config(requires_aesthetics_score=True)
    score = dict(aesthetic_score=scores["aesthetic_score"]) if aesthetics else {}
    assert torch.equal(sdxl_time_ids(*positive, **score)[None], ref)
    ours = sdxl_negative_time_ids(*positive, **neg, img2img=True, **(dict(
        score, negative_aesthetic_score=scores["negative_aesthetic_score"]) if aesthetics else {}))
    assert ours.shape == ((5,) if aesthetics else (6,)) and torch.equal(ours[None], ref_neg)
    if not aesthetics and "negative_crops_coords_top_left" in sizes:
        assert ours[2:4].tolist() == list(sizes["crops_coords_top_left"])  # trap 12: the positive crop
