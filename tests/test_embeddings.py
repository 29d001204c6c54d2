"""Textual inversion (reverie.embeddings): images equal diffusers' load_textual_inversion on a tiny SD 1.x model (a
two-vector embedding in the prompt and in the negative prompt), every file format gives the same rows, SDXL's
clip_l / clip_g go to their encoders, and bad files change nothing."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_families import sd_folder, sdxl_folder

from reverie import Pipeline
from reverie.embeddings import read_embedding

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return sd_folder(tmp_path_factory.mktemp("sd") / "sd")


def vectors(n, dim=32, seed=0):
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))


def test_images_equal_diffusers_textual_inversion(sd, tmp_path):
    emb = vectors(2)
    save_file({"emb_params": emb}, str(tmp_path / "shiny.safetensors"))
    save_file({"emb_params": vectors(1, seed=1)}, str(tmp_path / "dull.safetensors"))
    ours = Pipeline.from_pretrained(sd)
    assert ours.load_embedding(tmp_path / "shiny.safetensors") == "shiny"
    ours.load_embedding(tmp_path / "dull.safetensors")
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(sd, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_textual_inversion(emb, token="shiny")
    theirs.load_textual_inversion(vectors(1, seed=1), token="dull")
    prompt, negative = ["a photo of a cat, shiny", "shiny red mat"], ["dull", "blurry"]
    result = ours(prompt, negative_prompt=negative, steps=4, sampler="ddim", width=32, height=32, seed=[3, 4],
                  progress=False)
    out = theirs(prompt, negative_prompt=negative, num_inference_steps=4, height=32, width=32, output_type="np",
                 generator=[torch.Generator().manual_seed(s) for s in (3, 4)])
    mine = np.stack([np.asarray(im, dtype=np.float64) for im in result.images])
    assert np.abs(mine - (out.images * 255).round()).mean() <= 1.0
    plain = Pipeline.from_pretrained(sd)(prompt, negative_prompt=negative, steps=4, sampler="ddim", width=32,
                                        height=32, seed=[3, 4], progress=False)
    assert np.abs(mine - np.stack([np.asarray(im, dtype=np.float64) for im in plain.images])).mean() > 1  # it acts


def test_every_format_gives_the_same_rows(sd, tmp_path):
    emb = vectors(3, seed=2)
    save_file({"emb_params": emb}, str(tmp_path / "kohya.safetensors"))
    save_file({"<tok>": emb}, str(tmp_path / "diffusers.safetensors"))
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": emb}, "name": "a1111", "step": 10},
               tmp_path / "a1111.pt")
    rows = []
    for file in ("kohya.safetensors", "diffusers.safetensors", "a1111.pt"):
        pipe = Pipeline.from_pretrained(sd)
        name = pipe.load_embedding(tmp_path / file, name="thing", allow_pickle=file.endswith(".pt"))
        te = pipe.text_encoder
        ids = te.tokenizer.convert_tokens_to_ids([name, f"{name}_1", f"{name}_2"])
        rows.append(te.text_model.get_input_embeddings().weight[ids].detach())
        assert te.tokenize("a thing")[0, 0, 2:5].tolist() == ids  # BOS, "a", then the three vectors
    for r in rows:
        assert torch.equal(r, emb)
    with pytest.raises(ValueError, match="pickle"):
        read_embedding(tmp_path / "a1111.pt")


def test_sdxl_clip_l_and_clip_g(tmp_path):
    pipe = Pipeline.from_pretrained(sdxl_folder(tmp_path / "xl"))
    l, g = vectors(2, seed=5), vectors(2, seed=6)
    save_file({"clip_l": l, "clip_g": g}, str(tmp_path / "xl_emb.safetensors"))
    pipe.load_embedding(tmp_path / "xl_emb.safetensors")
    for te, v in ((pipe.text_encoder, l), (pipe.text_encoder_2, g)):
        ids = te.tokenizer.convert_tokens_to_ids(["xl_emb", "xl_emb_1"])
        assert torch.equal(te.text_model.get_input_embeddings().weight[ids].detach(), v)


def test_bad_embeddings_change_nothing(sd, tmp_path):
    pipe = Pipeline.from_pretrained(sd)
    before = pipe.text_encoder.text_model.get_input_embeddings().weight.detach().clone()
    vocab = len(pipe.text_encoder.tokenizer)
    save_file({"emb_params": vectors(1, dim=48)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ValueError, match="fit none"):
        pipe.load_embedding(tmp_path / "wide.safetensors")
    save_file({"emb_params": vectors(1)}, str(tmp_path / "<|endoftext|>.safetensors"))
    with pytest.raises(ValueError, match="already a token"):
        pipe.load_embedding(tmp_path / "<|endoftext|>.safetensors", name="<|endoftext|>")
    save_file({"a": vectors(1), "b": vectors(1)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="not a textual-inversion file"):
        pipe.load_embedding(tmp_path / "two.safetensors")
    assert torch.equal(pipe.text_encoder.text_model.get_input_embeddings().weight, before)
    assert len(pipe.text_encoder.tokenizer) == vocab
    save_file({"emb_params": vectors(1)}, str(tmp_path / "twice.safetensors"))
    pipe.load_embedding(tmp_path / "twice.safetensors")
    with pytest.raises(ValueError, match="'twice' is already a token"):
        pipe.load_embedding(tmp_path / "twice.safetensors")


def test_generate_with_an_embedding_folder_records_and_regenerates(tmp_path):
    from PIL import Image

    from reverie.cli import main
    from reverie.metadata import read_png_info

    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": vectors(2, dim=256, seed=7) * 3}, str(folder / "wobbly.safetensors"))
    args = ["--steps", "4", "--seed", "2", "--embedding", str(folder)]
    assert main(["generate", "a red circle, wobbly", *args, "--out", str(tmp_path / "a.png")]) == 0
    assert main(["generate", "a red circle", *args, "--out", str(tmp_path / "plain.png")]) == 0
    a = np.asarray(Image.open(tmp_path / "a.png"), dtype=float)
    assert np.abs(a - np.asarray(Image.open(tmp_path / "plain.png"), dtype=float)).mean() > 1
    info = read_png_info(tmp_path / "a.png")
    [record] = info["request"]["embeddings"]
    assert record["name"] == "wobbly" and info["parameters"]["TI hashes"] == f"wobbly: {record['hash']}"
    assert "embeddings" not in read_png_info(tmp_path / "plain.png")["request"]  # only those a prompt used
    assert main(["generate", "--from", str(tmp_path / "a.png"), "--out", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png"), dtype=float), a)
