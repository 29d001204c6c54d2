"""A1111's prompt syntax: every doctest of stable-diffusion-webui's modules/prompt_parser.py as data, more schedule
cases checked against A1111's own lark parser, the 75-token chunking with its comma backtrack and BREAK, and the
weighted encoding (A1111's multiply-then-restore-the-mean, ComfyUI's interpolation from the empty prompt) against
the closed form on a tiny random CLIPTextModel."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from reverie.cli import main  # noqa: E402
from reverie.models.text import TextEncoder  # noqa: E402
from reverie.prompt_syntax import (BREAK_PIECE, LoraTag, extract_networks, parse, prompt_chunks,  # noqa: E402
                                   schedule, split_and, weighted_conditioning, weighted_pieces)
from tiny_families import EOS, clip_tokenizer  # noqa: E402

# get_learned_conditioning_prompt_schedules' doctests (10 steps; the last two with 10 hires steps)
A1111_SCHEDULES = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[s, "a" if s % 2 else "(b:1.1)"] for s in range(1, 11)]),
    ("[fe|]male", [[s, "female" if s % 2 else "male"] for s in range(1, 11)]),
    ("[fe|||]male", [[s, "female" if s % 4 == 1 else "male"] for s in range(1, 11)]),
]
A1111_HIRES = [("a [b:.5] c", [[10, "a b c"]]), ("a [b:1.5] c", [[5, "a  c"], [10, "a b c"]])]
# The doctest `g("a [{b|d{:.5] c")  # not handling this right now` expects [[5, 'a  c'], [10, 'a {b|d{ c']], but its
# grammar has no "|" in plain text since alternation came in: A1111's parser (lark 1.1.2, its pinned version) fails
# on it and uses the prompt as it is. reverie follows the parser, not the stale comment.
A1111_STALE = ("a [{b|d{:.5] c", [[10, "a [{b|d{:.5] c"]])

# more cases, each output checked against A1111's lark parser (10 steps)
MORE_SCHEDULES = [
    ("a | b", [[10, "a | b"]]),  # "|" outside a group: the grammar fails, the prompt is literal
    ("[x:y:3] a|b", [[10, "[x:y:3] a|b"]]),  # ... schedule syntax included
    ("a\\", [[10, "a\\"]]),  # a lone backslash likewise
    ("[a:b:1]", [[1, "a"], [10, "b"]]),
    ("a [b:2.0] c", [[10, "a  c"]]),  # "." makes it a fraction: 2.0 * 10 is capped at 10
    ("a [b:-1] c", [[10, "a b c"]]),  # below 1: no boundary, never before
    ("[a:(b:3]", [[10, "[a:(b:3]"]]),  # an unbalanced "(" inside: the "[" is text
    ("[a:b:c:3]", [[10, "[a:b:c:3]"]]),
    ("[ :3]", [[3, ""], [10, " "]]),
    ("[[a|b]:c:3]", [[1, "a"], [2, "b"], [3, "a"], *([s, "c"] for s in range(4, 11))]),
    ("[a::4] \\[x:2]", [[4, "a \\[x:2]"], [10, " \\[x:2]"]]),  # escapes stay for the emphasis parser
    ("[a:b:1e1]", [[10, "a"]]),  # 1e1 is a step (no "."), 10
]


def g(prompt, steps=10, **kw):
    return [list(entry) for entry in schedule(prompt, steps, **kw)]


@pytest.mark.parametrize("prompt, expected", A1111_SCHEDULES + [A1111_STALE] + MORE_SCHEDULES)
def test_schedules_match_a1111(prompt, expected):
    assert g(prompt) == expected


@pytest.mark.parametrize("prompt, expected", A1111_HIRES)
def test_hires_schedules_match_a1111(prompt, expected):
    assert g(prompt, 10, hires_steps=10) == expected


def test_old_scheduling_reads_below_one_as_a_fraction():
    assert g("a [b:0.5] c [d:2.0]", use_old_scheduling=True) == [[2, "a  c "], [5, "a  c d"], [10, "a b c d"]]
    assert g("a [b:0.5] c [d:2.0]") == [[5, "a  c "], [10, "a b c "]]  # current rule: 2.0 is a fraction (capped)


A1111_ATTENTION = [  # parse_prompt_attention's doctests
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]
MORE_ATTENTION = [  # checked against A1111's parse_prompt_attention
    ("", [("", 1.0)]),
    ("((word:1.5))", [("word", 1.6500000000000001)]),  # multiplies (ComfyUI would set 1.5)
    ("[word]", [("word", 1 / 1.1)]),
    ("(word : 1.3 )", [("word ", 1.3)]),  # spaces around the weight are allowed; the text keeps its own
    ("a:b", [("a:b", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("a BREAK b", [("a", 1.0), BREAK_PIECE, ("b", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # A1111 quirk: multiplied, it is text
    ("[a (b]", [("a ", 1 / 1.1), ("b", 1.1 * (1 / 1.1))]),  # unclosed "(" applies first, then "["
]


@pytest.mark.parametrize("text, expected", A1111_ATTENTION + MORE_ATTENTION)
def test_weighted_pieces_match_a1111(text, expected):
    assert weighted_pieces(text) == expected


def test_and_and_lora_tags():
    assert split_and("a cat :1.2 AND a dog AND  mouse: -0.5 ") == [("a cat", 1.2), (" a dog", 1.0), ("  mouse", -0.5)]
    assert split_and("ANDROID") == [("ANDROID", 1.0)]
    text, loras, others = extract_networks("a <lora:ink:0.7> cat <lora:b:0.5:0.25:8><hypernet:h:1><lora:c:unet=0.3>")
    assert text == "a  cat "
    assert loras == [LoraTag("ink", 0.7, 0.7), LoraTag("b", 0.5, 0.25, 8), LoraTag("c", 1.0, 0.3)]
    assert others == [("hypernet", ["h", "1"])]
    parsed = parse("<lora:ink:0.7>[cat:dog:0.5] AND (bird):2", steps=4)
    assert parsed.loras == (LoraTag("ink", 0.7, 0.7),)
    first, second = parsed.parts
    assert [(s.until_step, s.text) for s in first.schedule] == [(2, "cat"), (4, "dog")]
    assert (second.text, second.weight, second.schedule[0].pieces) == (" (bird)", 2.0, ((" ", 1.0), ("bird", 1.1)))


@pytest.mark.parametrize("call, field", [
    (lambda: schedule("a", 0), "steps"),
    (lambda: weighted_pieces("(a:1.2.3)"), "weight"),
    (lambda: extract_networks("<lora:x:strong>"), "LoRA tag"),
    (lambda: extract_networks("<lora:te=1>"), "names no LoRA"),
    (lambda: prompt_chunks(clip_tokenizer(), "a", comma_backtrack=-1), "comma_backtrack"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


# ------------------------------------------------------------------------------------------------------- chunking


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def ids_of(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_chunks_split_at_75_tokens_and_pad_with_empty_chunks(tok):
    x, bos, eos = ids_of(tok, "x")[0], tok.bos_token_id, tok.eos_token_id
    ids, weights = prompt_chunks(tok, ["x " * 76, "x"])
    assert ids.shape == weights.shape == (2, 2, 77)
    assert ids[0, 0].tolist() == [bos] + [x] * 75 + [eos]
    assert ids[0, 1].tolist() == [bos, x] + [eos] * 75
    assert ids[1, 1].tolist() == [bos] + [eos] * 76  # the shorter prompt gets an empty chunk
    assert prompt_chunks(tok, "x " * 75)[0].shape == (1, 1, 77)
    assert prompt_chunks(tok, "")[0][0, 0].tolist() == [bos] + [eos] * 76
    assert prompt_chunks(tok, "x", chunks=3)[0].shape == (1, 3, 77)


@pytest.mark.parametrize("comma_at, backtrack, moved", [(70, 20, True), (55, 20, True), (54, 20, False),
                                                         (70, 0, False), (70, 5, True), (69, 5, False)])
def test_a_full_chunk_moves_the_tokens_after_a_recent_comma(tok, comma_at, backtrack, moved):
    x, y, comma, eos = ids_of(tok, "x")[0], ids_of(tok, "y")[0], ids_of(tok, ",")[0], tok.eos_token_id
    text = "x " * comma_at + ", " + "y " * (80 - comma_at)  # the comma is token comma_at (0-based)
    ids, _ = prompt_chunks(tok, text, comma_backtrack=backtrack)
    first, second = ids[0, 0, 1:-1].tolist(), ids[0, 1, 1:].tolist()
    tail = 75 - comma_at - 1  # y tokens that fit in the first chunk after the comma
    if moved:
        assert first == [x] * comma_at + [comma] + [eos] * tail
        assert second[:81 - comma_at] == [y] * (80 - comma_at) + [eos]
    else:
        assert first == [x] * comma_at + [comma] + [y] * tail
        assert second[:7] == [y] * 6 + [eos]


def test_a_comma_that_fills_no_chunk_starts_the_next(tok):
    comma = ids_of(tok, ",")[0]
    ids, _ = prompt_chunks(tok, "x " * 75 + ", y")
    assert ids[0, 1, 1:3].tolist() == [comma, ids_of(tok, "y")[0]]


def test_break_pads_the_chunk_and_weights_follow_their_tokens(tok):
    eos, bos = tok.eos_token_id, tok.bos_token_id
    a, b = ids_of(tok, "a")[0], ids_of(tok, "b")[0]
    ids, weights = prompt_chunks(tok, "a (b:1.5) BREAK [b]")
    assert ids.shape == (1, 2, 77)
    assert ids[0, 0, :4].tolist() == [bos, a, b, eos] and ids[0, 1, :3].tolist() == [bos, b, eos]
    assert weights[0, 0, :4].tolist() == [1.0, 1.0, 1.5, 1.0]
    assert weights[0, 1, :3].tolist() == pytest.approx([1.0, 1 / 1.1, 1.0])
    assert weights[0, :, 4:].eq(1.0).all()


def test_openclip_pad_follows_the_first_eos():
    tok = clip_tokenizer(pad_token="!")
    ids, _ = prompt_chunks(tok, "x " * 76)
    pad, eos = tok.pad_token_id, tok.eos_token_id
    assert ids[0, 0, -1] == eos and ids[0, 1, 2] == eos and ids[0, 1, 3:].eq(pad).all()


# ------------------------------------------------------------------------------------------------------- encoding


@pytest.fixture(scope="module", params=[EOS, "!"], ids=["sd1-pad", "openclip-pad"])
def clip(request):
    tok = clip_tokenizer(pad_token=request.param)
    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = CLIPTextModel(config).eval()
    norm = getattr(model, "text_model", model).final_layer_norm
    with torch.no_grad():  # a fresh LayerNorm (weight 1, bias 0) centres every state: mean(z) would be ~0
        norm.weight.normal_(1.0, 0.3), norm.bias.normal_(0.5, 0.3)
    return model, tok


def chunk_states(model, tok, tokens):
    """Reference: [BOS] + tokens + [EOS] + padding (EOS, or the pad id after the first EOS), through the model."""
    row = [tok.bos_token_id, *tokens, tok.eos_token_id]
    row += [tok.pad_token_id] * (77 - len(row))
    return model(torch.tensor([row])).last_hidden_state  # (1, 77, D)


@torch.no_grad()
def test_unit_weights_equal_the_plain_chunked_encoding(clip):
    model, tok = clip
    prompts = ["a photo of a cat " * 12, "the dog"]  # 72 and 2 tokens, then 2 chunks with the second doubled
    prompts[0] += prompts[0]
    plain = TextEncoder(model, tok).encode(prompts)
    # equal but for float rounding: chunk i of every text is one batch here, all chunks one batch in the plain path
    torch.testing.assert_close(weighted_conditioning(model, tok, prompts, comma_backtrack=0), plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(weighted_conditioning(model, tok, prompts, comma_backtrack=0, clip_skip=1),
                               TextEncoder(model, tok).encode(prompts, clip_skip=1), rtol=0, atol=1e-6)
    hidden = model(TextEncoder(model, tok).tokenize("the dog")[:, 0], output_hidden_states=True).hidden_states[-2]
    assert torch.equal(weighted_conditioning(model, tok, "the dog", hidden_layer=-2), hidden)


@torch.no_grad()
def test_a1111_weighting_is_multiply_then_restore_the_mean(clip):
    model, tok = clip
    texts = ["a (cat:2) on [the] mat", "the dog"]
    got = weighted_conditioning(model, tok, texts)
    z = torch.cat([chunk_states(model, tok, ids_of(tok, "a cat on the mat")),
                   chunk_states(model, tok, ids_of(tok, "the dog"))])  # (2, 77, D)
    w = torch.ones(2, 77)
    w[0, 2], w[0, 4] = 2.0, 1 / 1.1  # BOS, a, cat, on, the, mat
    expected = z * w[..., None] * (z.mean() / (z * w[..., None]).mean())  # the mean spans the batch, as A1111
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert got.mean().item() == pytest.approx(z.mean().item(), rel=1e-5)
    ratio = got / z  # one scalar c everywhere, 2c on "cat", c / 1.1 on "the"
    c = ratio[1].mean()
    torch.testing.assert_close(ratio[0, 2], torch.full((32,), 2 * c.item()), rtol=1e-5, atol=0)
    torch.testing.assert_close(ratio[0, 4], torch.full((32,), c.item() / 1.1), rtol=1e-5, atol=0)
    torch.testing.assert_close(ratio[:, 5:], torch.full_like(ratio[:, 5:], c.item()), rtol=1e-5, atol=0)
    alone = weighted_conditioning(model, tok, texts[:1])  # alone, its mean restore sees only itself
    assert not torch.allclose(alone, got[:1])
    torch.testing.assert_close(weighted_conditioning(model, tok, texts, mode="no_norm"), z * w[..., None],
                               rtol=0, atol=0)


@torch.no_grad()
def test_comfy_weighting_interpolates_from_the_empty_prompt(clip):
    model, tok = clip
    got = weighted_conditioning(model, tok, "a (cat:2) on [the] mat", mode="comfy")
    z = chunk_states(model, tok, ids_of(tok, "a cat on the mat"))[0]
    empty = chunk_states(model, tok, [])[0]
    expected = z.clone()
    expected[2] = empty[2] + 2.0 * (z[2] - empty[2])
    expected[4] = empty[4] + (1 / 1.1) * (z[4] - empty[4])
    torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-6)
    assert torch.equal(got[0, [0, 1, 3, 5, 6]], z[[0, 1, 3, 5, 6]])  # weight 1: untouched


def test_encoding_rejects_unknown_modes_and_layers(clip):
    model, tok = clip
    with pytest.raises(ValueError, match="mode"):
        weighted_conditioning(model, tok, "a", mode="compel")
    with pytest.raises(ValueError, match="clip_skip and hidden_layer"):
        weighted_conditioning(model, tok, "a", clip_skip=1, hidden_layer=-2)


# ------------------------------------------------------------------------------------------------------------ CLI


def test_cli_prints_the_schedule_pieces_parts_and_loras(capsys):
    assert main(["prompt", "a [cat:dog:0.5] (hat:1.2) <lora:ink:0.7:0.5> AND a bird:0.5", "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "ink" in out and "te 0.7" in out and "unet 0.5" in out
    assert "steps 1-2" in out and "steps 3-4" in out and "'a cat '" in out and "'a dog '" in out
    assert "('hat', 1.2)" in out and "weight 0.5" in out


# ---------------------------------------------------------------- in the pipeline (SD family: prompt_syntax=)


def test_pipeline_prompt_syntax_weights_the_states_as_a1111():
    import numpy as np

    from reverie import Pipeline
    from reverie.cli import main
    from reverie.loading import model_path
    from reverie.metadata import read_png_info

    pipe = Pipeline.from_pretrained(model_path("shapes"))
    te = pipe.text_encoder
    cond, uncond = pipe.family.encode(pipe, ["a (red:1.3) circle", "a [blue] square BREAK on the left"], ["", "x"],
                                      {"prompt_syntax": "a1111"})
    expected = weighted_conditioning(te.text_model, te.tokenizer, ["a (red:1.3) circle",
                                                                  "a [blue] square BREAK on the left"], chunks=2)
    assert torch.allclose(cond["encoder_hidden_states"], expected, atol=1e-6)
    assert uncond["encoder_hidden_states"].shape == expected.shape  # the negatives get the same chunk count
    common = dict(steps=3, seed=[1], progress=False)
    plain = pipe("a red circle", **common)
    same = pipe("a red circle", prompt_syntax="a1111", **common)  # nothing to weigh: the plain image
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(same.images[0]))
    assert same.params["prompt_syntax"] == "a1111"
    with pytest.raises(ValueError, match="prompt editing"):
        pipe("a [red:blue:0.5] circle", prompt_syntax="a1111", **common)
    with pytest.raises(ValueError, match="prompt_syntax must be one of"):
        pipe("a red circle", prompt_syntax="invoke", **common)


def test_cli_prompt_syntax_is_recorded_and_regenerated(tmp_path):
    import numpy as np
    from PIL import Image

    from reverie.cli import main
    from reverie.metadata import read_png_info

    out = tmp_path / "w.png"
    assert main(["generate", "a (red:1.4) circle", "--steps", "3", "--seed", "2", "--prompt-syntax", "a1111",
                 "--out", str(out)]) == 0
    assert read_png_info(out)["request"]["prompt_syntax"] == "a1111"
    assert main(["generate", "--from", str(out), "--out", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "again.png")))
