"""TextEncoder equals diffusers' StableDiffusionPipeline.encode_prompt on short prompts, chunks long prompts the
A1111 way, round-trips through diffusers' folder layout, and trains from scratch with its own BPE tokenizer.

Everything is built locally: a tiny CLIP-format tokenizer (vocab.json + merges.txt) and a tiny random CLIPTextModel.
"""

import json

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from reverie.models.text import BOS, EOS, TextEncoder, load_tokenizer, train_bpe_tokenizer  # noqa: E402

SHORT = ["a cat on the mat", "THE   dog, the cat!!"]
NEGATIVE = ["", "blurry dog"]
WORDS = "the cat on a red mat near the dog and an old car".split()


def byte_symbols():
    """GPT-2/CLIP's printable stand-ins for the 256 bytes, in CLIP's vocab.json order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(256 - len(printable))]


def write_clip_tokenizer(path, pad_token=EOS):
    """A tiny tokenizer folder in CLIP's exact format: bytes, bytes + "</w>", a few merges, the two specials."""
    symbols = byte_symbols()
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>"),
              ("o", "n</w>"), ("m", "a"), ("ma", "t</w>"), ("a", "n</w>")]
    vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), BOS, EOS]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (path / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="CLIPTokenizer", model_max_length=77, bos_token=BOS, eos_token=EOS, unk_token=EOS,
        pad_token=pad_token)))
    return CLIPTokenizer.from_pretrained(path, local_files_only=True)


def tiny_encoder(tokenizer, seed=0, layers=3):
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return TextEncoder(CLIPTextModel(config).eval(), tokenizer)


@pytest.fixture(scope="module", params=[EOS, "!"], ids=["sd1-pad-eos", "sd2-pad-bang"])
def encoder(request, tmp_path_factory):
    tokenizer = write_clip_tokenizer(tmp_path_factory.mktemp("tok"), pad_token=request.param)
    return tiny_encoder(tokenizer)


@pytest.fixture(scope="module")
def sd_parts():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False)
    return diffusers, dict(unet=unet, vae=vae, scheduler=scheduler)


def prompt_of(tokenizer, n_tokens):
    """A prompt of exactly n_tokens tokens (each word of WORDS is 1-3 tokens; single letters fill the rest)."""
    words, count = [], 0
    for i in range(10 * n_tokens):
        word = WORDS[i % len(WORDS)]
        size = len(tokenizer(word, add_special_tokens=False).input_ids)
        if count + size > n_tokens:
            break
        words.append(word)
        count += size
    words += ["x"] * (n_tokens - count)
    prompt = " ".join(words)
    assert len(tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids) == n_tokens
    return prompt


def chunk_alone(enc, ids, clip_skip=None):
    """Reference for one chunk: BOS + ids + EOS, padded with the pad token, straight through CLIPTextModel."""
    tok = enc.tokenizer
    row = [tok.bos_token_id, *ids, tok.eos_token_id]
    row += [tok.pad_token_id] * (77 - len(row))
    out = enc.text_model(torch.tensor([row]), output_hidden_states=True)
    if clip_skip is None:
        return out.last_hidden_state[0]
    return enc.final_layer_norm(out.hidden_states[-(clip_skip + 1)])[0]


# ---------------------------------------------------------------- (a) equality with diffusers


@pytest.mark.parametrize("clip_skip", [None, 1, 2])
@torch.no_grad()
def test_short_prompts_match_diffusers_encode_prompt(encoder, sd_parts, clip_skip, monkeypatch):
    diffusers, parts = sd_parts
    # diffusers 0.42.1's clip_skip branch reads text_encoder.text_model.final_layer_norm (transformers 4's nesting);
    # transformers 5 flattened CLIPTextModel, so give the oracle that alias (in __dict__: not a registered submodule).
    if not hasattr(encoder.text_model, "text_model"):
        monkeypatch.setitem(encoder.text_model.__dict__, "text_model", encoder.text_model)
    pipe = diffusers.StableDiffusionPipeline(text_encoder=encoder.text_model, tokenizer=encoder.tokenizer,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False, **parts)
    prompts = SHORT + [prompt_of(encoder.tokenizer, 75)]  # 75 tokens: the longest prompt diffusers keeps whole
    negatives = NEGATIVE + ["the"]
    want, want_negative = pipe.encode_prompt(prompts, "cpu", 1, True, negative_prompt=negatives, clip_skip=clip_skip)
    got = encoder.encode(prompts, clip_skip=clip_skip)
    assert got.shape == want.shape == (3, 77, 32)
    assert (got - want).abs().max() <= 1e-5
    # diffusers never applies clip_skip to negative prompts: they match encode(..., clip_skip=None).
    assert (encoder.encode(negatives) - want_negative).abs().max() <= 1e-5
    if clip_skip is not None:  # the layer choice matters, so the comparison above is not vacuous
        assert (got - encoder.encode(prompts)).abs().max() > 1e-3


def test_tokenize_pads_each_chunk_with_the_pad_token(encoder):
    tok = encoder.tokenizer
    ids = encoder.tokenize("a cat")
    want = tok("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert ids.shape == (1, 1, 77) and ids[0, 0].tolist() == want
    assert ids[0, 0, -1].item() == tok.convert_tokens_to_ids(tok.pad_token)  # <|endoftext|> for SD1, "!" for SD2


# ---------------------------------------------------------------- (b) long prompts, (c) batches


@pytest.mark.parametrize("clip_skip", [None, 1])
@torch.no_grad()
def test_long_prompt_is_encoded_chunk_by_chunk(encoder, clip_skip):
    head = prompt_of(encoder.tokenizer, 75)  # ends on a word, so the first chunk is this prompt's own encoding
    prompt = head + " " + prompt_of(encoder.tokenizer, 85)
    ids = encoder.tokenizer(prompt, add_special_tokens=False, verbose=False).input_ids
    assert len(ids) == 160
    out = encoder.encode([prompt], clip_skip=clip_skip)
    assert out.shape == (1, 77 * 3, 32)
    for i in range(3):
        want = chunk_alone(encoder, ids[75 * i:75 * (i + 1)], clip_skip)
        assert (out[0, 77 * i:77 * (i + 1)] - want).abs().max() <= 1e-5
    # the first chunk is the encoding of the first 75 tokens as their own prompt
    assert (out[:, :77] - encoder.encode(head, clip_skip=clip_skip)).abs().max() <= 1e-5


@pytest.mark.parametrize("n_tokens, chunks", [(0, 1), (75, 1), (76, 2), (150, 2), (151, 3)])
def test_chunk_count_boundaries(encoder, n_tokens, chunks):
    prompt = prompt_of(encoder.tokenizer, n_tokens) if n_tokens else ""
    tok = encoder.tokenizer
    ids = encoder.tokenize(prompt)
    assert ids.shape == (1, chunks, 77)
    assert (ids[0, :, 0] == tok.bos_token_id).all()
    eos_at = (ids[0] == tok.eos_token_id).int().argmax(-1)  # first EOS of each chunk, (k,)
    assert (eos_at - 1).sum().item() == n_tokens  # every token lands in exactly one chunk
    assert (eos_at[:-1] == 76).all()  # all chunks but the last are full
    assert all((row[e + 1:] == tok.pad_token_id).all() for row, e in zip(ids[0], eos_at.tolist()))


@torch.no_grad()
def test_batch_gets_the_same_chunk_count(encoder):
    long = prompt_of(encoder.tokenizer, 100)
    out = encoder.encode(["a cat", long, ""])
    assert out.shape == (3, 154, 32)
    empty_chunk = encoder.encode("")[0]  # an empty chunk is BOS + EOS + padding, i.e. the empty prompt
    assert (out[0, :77] - encoder.encode("a cat")[0]).abs().max() <= 1e-5
    assert (out[0, 77:] - empty_chunk).abs().max() <= 1e-5
    assert (out[2, :77] - empty_chunk).abs().max() <= 1e-5 and (out[2, 77:] - empty_chunk).abs().max() <= 1e-5
    assert (out[1] - encoder.encode([long])[0]).abs().max() <= 1e-5  # batch = singles
    tok = encoder.tokenizer
    assert encoder.tokenize(["a cat", long])[0, 1, :3].tolist() == [tok.bos_token_id, tok.eos_token_id,
                                                                      tok.pad_token_id]


# ---------------------------------------------------------------- (d) diffusers folder layout


@torch.no_grad()
def test_an_fp16_folder_loads_in_float32_unless_a_dtype_is_asked_for(encoder, tmp_path):
    encoder.save_pretrained(tmp_path / "te", tmp_path / "tok", dtype=torch.float16)
    assert {p.dtype for p in TextEncoder.from_pretrained(tmp_path / "te", tmp_path / "tok").parameters()} == \
        {torch.float32}
    half = TextEncoder.from_pretrained(tmp_path / "te", tmp_path / "tok", dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}


@torch.no_grad()
def test_save_pretrained_round_trip(encoder, tmp_path):
    te_dir, tok_dir = tmp_path / "text_encoder", tmp_path / "tokenizer"
    encoder.save_pretrained(te_dir, tok_dir)
    assert (te_dir / "model.safetensors").is_file() and not list(te_dir.glob("*.bin"))
    with safe_open(te_dir / "model.safetensors", "pt") as f:  # SD's key names, which transformers 4 reads too
        assert all(k.startswith("text_model.") for k in f.keys())
        assert "text_model.final_layer_norm.weight" in f.keys()
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in tok_dir.iterdir()}
    loaded = TextEncoder.from_pretrained(te_dir, tok_dir)
    prompts = ["a cat", prompt_of(encoder.tokenizer, 90)]
    assert torch.equal(loaded.tokenize(prompts), encoder.tokenize(prompts))
    assert torch.equal(loaded.encode(prompts, clip_skip=1), encoder.encode(prompts, clip_skip=1))
    # transformers opens the folders on its own, as diffusers does
    model = CLIPTextModel.from_pretrained(te_dir, local_files_only=True, use_safetensors=True)
    assert all(torch.equal(v, encoder.text_model.state_dict()[k]) for k, v in model.state_dict().items())
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    assert tokenizer("a cat, the dog").input_ids == encoder.tokenizer("a cat, the dog").input_ids
    assert tokenizer.pad_token == encoder.tokenizer.pad_token and tokenizer.model_max_length == 77
    clip_files = tmp_path / "clip_files"  # vocab.json + merges.txt alone, the files transformers 4 reads
    clip_files.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (clip_files / name).write_bytes((tok_dir / name).read_bytes())
    assert load_tokenizer(clip_files)("a cat, the dog").input_ids == encoder.tokenizer("a cat, the dog").input_ids
    # dtype, and a bare tokenizer.json: same tokens, but it carries no pad token, so CLIP's <|endoftext|> is assumed
    bare = tmp_path / "bare"
    bare.mkdir()
    encoder.tokenizer.backend_tokenizer.save(str(bare / "tokenizer.json"))
    wide = TextEncoder.from_pretrained(te_dir, bare, dtype=torch.float64)
    assert wide.dtype == torch.float64 and wide.max_length == 77 and wide.hidden_size == 32
    ids = encoder.tokenize(prompts)
    after_eos = ids.eq(encoder.tokenizer.eos_token_id).long().cumsum(-1) - ids.eq(encoder.tokenizer.eos_token_id).long()
    assert torch.equal(wide.tokenize(prompts), ids.masked_fill(after_eos > 0, encoder.tokenizer.eos_token_id))
    out = wide.encode(prompts)
    want = encoder.encode_ids(wide.tokenize(prompts))
    assert out.dtype == torch.float64 and (out.float() - want).abs().max() <= 1e-5


# ---------------------------------------------------------------- (e) training from scratch

CORPUS = ["a photo of a cat sitting on a red mat", "a painting of a dog in the park at night",
          "the quick brown fox jumps over the lazy dog", "a red car parked near the old house",
          "a cat and a dog playing in the snow", "an old photo of the park in winter"] * 4


def test_bpe_tokenizer_round_trips_and_trains(tmp_path):
    tok = train_bpe_tokenizer(CORPUS, 600, tmp_path / "tokenizer")
    assert 514 < len(tok) <= 600 and tok.convert_tokens_to_ids("cat</w>") > 511  # merges were learned
    assert [tok.bos_token, tok.eos_token, tok.pad_token] == [BOS, EOS, EOS]
    for text in ["a photo of a cat sitting on a red mat", "zebras eat 4 quinces", "café ☃ ok"]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.eos_token_id not in ids[1:-1]  # byte-level: nothing maps to the unknown token
        assert tok.decode(ids, skip_special_tokens=True) == text
    reloaded = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer", local_files_only=True)
    assert reloaded("a red cat").input_ids == tok("a red cat").input_ids
    assert load_tokenizer(tmp_path / "tokenizer")("a red cat").input_ids == tok("a red cat").input_ids

    torch.manual_seed(0)
    enc = TextEncoder.small(tok, hidden_size=32, layers=2, heads=4, max_length=16)
    assert enc.max_length == 16 and tok.model_max_length == 16
    prompts = ["a cat on a mat", "the lazy dog in the snow at night near the park and the old house"]
    assert enc.encode(prompts).shape == (2, 32, 32)  # the long prompt takes two chunks of 14 tokens
    target = torch.randn(2, 32, 32)
    optimizer = torch.optim.Adam(enc.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = (enc.encode(prompts) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert enc.text_model.get_input_embeddings().weight.grad.abs().sum() > 0
    assert losses[-1] < 0.8 * losses[0]


def test_a_text_encoder_of_no_layers_keeps_words_apart(tmp_path):
    """layers=0: CLIP's embeddings and final LayerNorm only, so a token's state depends on its word and place
    alone; the folder still opens as a transformers CLIPTextModel, and clip_skip is refused by name."""
    tok = train_bpe_tokenizer(CORPUS, 600, tmp_path / "tokenizer")
    torch.manual_seed(0)
    enc = TextEncoder.small(tok, hidden_size=32, layers=0, heads=4, max_length=16)
    red_cat, red_dog, old_cat = enc.encode(["a red cat", "a red dog", "an old cat"]).detach()
    assert torch.equal(red_cat[:3], red_dog[:3])  # BOS, "a", "red": the next word changes nothing before it
    assert torch.equal(red_cat[3], old_cat[3])  # "cat" after other words: the same state
    assert not torch.equal(red_cat[3], red_dog[3])
    enc.save_pretrained(tmp_path / "te", tmp_path / "tok_saved")
    reloaded = CLIPTextModel.from_pretrained(tmp_path / "te", local_files_only=True)
    ids = enc.tokenize(["a red cat"]).reshape(1, -1)
    assert torch.allclose(reloaded(ids).last_hidden_state[0], red_cat, atol=1e-6)
    with pytest.raises(ValueError, match="clip_skip must be None"):
        enc.encode("a red cat", clip_skip=0)


# ---------------------------------------------------------------- (f) bad input


def test_bad_input_raises_naming_the_field(tmp_path):
    tok = write_clip_tokenizer(tmp_path / "tok")
    enc = tiny_encoder(tok, layers=3)
    for bad in [123, None, [], ["a", 3], [["a"]]]:
        with pytest.raises(ValueError, match="prompt"):
            enc.encode(bad)
    for bad in [-1, 3, True, 1.0]:
        with pytest.raises(ValueError, match="clip_skip"):
            enc.encode("a cat", clip_skip=bad)
    with pytest.raises(ValueError, match="heads"):
        TextEncoder.small(tok, hidden_size=32, heads=5)
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder.small(tok, max_length=2)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(CORPUS, 100, tmp_path / "bpe")
    with pytest.raises(ValueError, match="texts"):
        train_bpe_tokenizer("a single string", 600, tmp_path / "bpe")
    with pytest.raises(ValueError, match="text_encoder_dir"):
        TextEncoder.from_pretrained(tmp_path / "missing", tmp_path / "tok")
    enc.save_pretrained(tmp_path / "te", tmp_path / "tok_saved")
    with pytest.raises(ValueError, match="tokenizer_dir"):
        TextEncoder.from_pretrained(tmp_path / "te", tmp_path / "empty")
    (tmp_path / "pickled").mkdir()  # pickled weights only: refused, never unpickled
    enc.text_model.config.save_pretrained(tmp_path / "pickled")
    torch.save(enc.text_model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="text_encoder_dir"):
        TextEncoder.from_pretrained(tmp_path / "pickled", tmp_path / "tok")
