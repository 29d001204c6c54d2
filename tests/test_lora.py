"""LoRA / LyCORIS merging (reverie.lora): kohya and PEFT files give diffusers' fuse_lora weights on tiny SD 1.x and
SDXL models (SDXL's kohya files in SGM names), LoHa / LoKr / CP / DoRA against their closed forms, several LoRAs
and separate strengths, and the restore is bit-exact; a bad file changes nothing."""

import pytest
import torch
from safetensors.torch import save_file
from tiny_families import sd_folder, sdxl_folder

from reverie import Pipeline
from reverie.lora import LoraUse, _inner, module_names, parse_lora_option, read_lora

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

UNET_MODULES = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k",
                "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0",
                "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
                "mid_block.attentions.0.proj_in",  # a 1x1 conv in SD 1.x
                "down_blocks.1.resnets.0.conv1"]  # a 3x3 conv (LoCon)
TEXT_MODULES = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.4.mlp.fc1"]


def factors(weight, rank, seed, *, alpha=True):
    """Random LoRA factors for a weight: down (r, in[, k, k]), up (out, r[, 1, 1])."""
    g = torch.Generator().manual_seed(seed)
    out, inp = weight.shape[:2]
    down = torch.randn(rank, inp, *weight.shape[2:], generator=g) * 0.3
    up = torch.randn(out, rank, *[1] * (weight.ndim - 2), generator=g) * 0.3
    return down, up, (torch.tensor(rank / 2.0) if alpha else None)


def kohya_file(path, modules_by_prefix, seed=0, rank=2):
    """A kohya file: `prefix_path_with_underscores.lora_down.weight` / `.lora_up.weight` / `.alpha`."""
    state = {}
    for prefix, (root, paths, names) in modules_by_prefix.items():
        for i, p in enumerate(paths):
            down, up, alpha = factors(sub(root, p).weight, rank, seed + i)
            stem = f"{prefix}_{(names or {}).get(p, p).replace('.', '_')}"
            state |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": alpha}
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder = sd_folder(tmp_path_factory.mktemp("sd") / "sd")
    return folder


def theirs_fused(folder, lora_file, scale, cls=None):
    pipe = (cls or diffusers.StableDiffusionPipeline).from_pretrained(folder)
    pipe.load_lora_weights(str(lora_file))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the PEFT layers
    return pipe


def sub(root, path):
    """root's module at a file's path: transformers 5's CLIPTextModel has no text_model level."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return root.get_submodule(path.removeprefix("text_model."))


def weight(component, path):
    return sub(_inner(component), path).weight


def assert_equal_weights(ours, theirs, modules):
    for component, paths in modules.items():
        for p in paths:
            a, b = weight(getattr(ours, component), p), weight(getattr(theirs, component), p)
            assert torch.allclose(a, b, atol=2e-6, rtol=1e-5), (component, p, (a - b).abs().max())


def assert_closed_form_text(ours, base, lora_file, strength, component="text_encoder"):
    """Text-encoder LoRA weights: W + strength * alpha / r * up @ down. (diffusers 0.42.1 cannot be the oracle
    here: under transformers 5, whose CLIPTextModel has no text_model level, its loader reports the text
    encoder's LoRA keys as UNEXPECTED and leaves the weights as they were.)"""
    from safetensors.torch import load_file

    file = load_file(str(lora_file))
    prefix = {"text_encoder": ("lora_te_", "lora_te1_", "text_encoder."), "text_encoder_2": ("lora_te2_",)}[component]
    names = {n: p for n, (c, p) in module_names(ours).items() if c == component}
    checked = 0
    for key in file:
        if key.endswith(".lora_down.weight") and key.startswith(prefix):
            stem = key[:-len(".lora_down.weight")]
            path = names[stem]
            down, up = file[f"{stem}.lora_down.weight"], file[f"{stem}.lora_up.weight"]
            alpha = file.get(f"{stem}.alpha", torch.tensor(float(down.shape[0])))
            w = base[f"{component}.text_model.{path}.weight"]  # reverie wraps the transformers model
            expected = w + strength * float(alpha) / down.shape[0] * (up @ down)
            assert torch.allclose(weight(getattr(ours, component), path), expected, atol=1e-6), stem
            checked += 1
    assert checked


def state(pipe):
    return {f"{c}.{k}": v.clone() for c, m in pipe.components.items() if isinstance(m, torch.nn.Module)
            for k, v in m.state_dict().items()}


def test_kohya_sd_file_equals_diffusers_fuse_lora_and_restores_exactly(sd, tmp_path):
    ours = Pipeline.from_pretrained(sd)
    base = state(ours)
    lora = kohya_file(tmp_path / "style.safetensors", {"lora_unet": (ours.unet, UNET_MODULES, None),
                                                       "lora_te": (ours.text_encoder.text_model, TEXT_MODULES, None)})
    ours.set_loras([(lora, 0.7)])
    theirs = theirs_fused(sd, lora, 0.7)
    assert_equal_weights(ours, theirs, {"unet": UNET_MODULES})
    assert_closed_form_text(ours, base, lora, 0.7)
    changed = [k for k, v in state(ours).items() if not torch.equal(v, base[k])]
    assert len(changed) == len(UNET_MODULES) + len(TEXT_MODULES)  # the patched weights, nothing else
    ours.set_loras([])
    assert all(torch.equal(v, base[k]) for k, v in state(ours).items())  # bit-exact restore


def test_peft_sd_file_equals_diffusers(sd, tmp_path):
    ours = Pipeline.from_pretrained(sd)
    file = {}
    for component, root, paths in (("unet", ours.unet, UNET_MODULES[:5]),
                                   ("text_encoder", ours.text_encoder.text_model, TEXT_MODULES)):
        for i, p in enumerate(paths):
            down, up, _ = factors(sub(root, p).weight, 3, 10 + i)
            file |= {f"{component}.{p}.lora_A.weight": down, f"{component}.{p}.lora_B.weight": up}
    save_file(file, str(tmp_path / "pytorch_lora_weights.safetensors"))
    base = state(ours)
    ours.set_loras([(tmp_path / "pytorch_lora_weights.safetensors", 1.3)])
    theirs = theirs_fused(sd, tmp_path / "pytorch_lora_weights.safetensors", 1.3)
    assert_equal_weights(ours, theirs, {"unet": UNET_MODULES[:5]})
    for i, p in enumerate(TEXT_MODULES):  # alpha = r: W + 1.3 B A
        path = p.removeprefix("text_model.")
        w = base[f"text_encoder.text_model.{path}.weight"]
        B, A = file[f"text_encoder.{p}.lora_B.weight"], file[f"text_encoder.{p}.lora_A.weight"]
        assert torch.allclose(weight(ours.text_encoder, p), w + 1.3 * B @ A, atol=1e-6)


def test_sdxl_kohya_file_in_sgm_names_equals_diffusers(tmp_path):
    folder = sdxl_folder(tmp_path / "sdxl")
    ours = Pipeline.from_pretrained(folder)
    unet_paths = ["down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_v", "down_blocks.1.resnets.1.conv2",
                  "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.0.proj", "up_blocks.0.resnets.1.time_emb_proj",
                  "mid_block.attentions.0.transformer_blocks.1.attn1.to_out.0", "conv_in"]
    names = {v: k for k, v in _sgm(ours).items() if v in unet_paths}
    assert len(names) == len(unet_paths)
    lora = kohya_file(tmp_path / "xl.safetensors", {"lora_unet": (ours.unet, unet_paths, names)})
    assert any("input_blocks" in k for k in read_lora(lora).adapters)  # the file really uses SGM names
    ours.set_loras([(lora, 0.5)])
    theirs = theirs_fused(folder, lora, 0.5, diffusers.StableDiffusionXLPipeline)
    assert_equal_weights(ours, theirs, {"unet": unet_paths})
    # both text encoders (diffusers cannot read them under transformers 5: see assert_closed_form_text)
    base = state(ours)
    text = kohya_file(tmp_path / "xl_te.safetensors", {
        "lora_te1": (ours.text_encoder.text_model, TEXT_MODULES[:1], None),
        "lora_te2": (ours.text_encoder_2.text_model, TEXT_MODULES[1:], None)})
    ours.set_loras([(lora, 0.0), (text, 0.5)])
    assert_closed_form_text(ours, base, text, 0.5, "text_encoder")
    assert_closed_form_text(ours, base, text, 0.5, "text_encoder_2")


def _sgm(pipe):
    """SGM name (dots) -> diffusers path, from reverie's table of kohya names."""
    out = {}
    for name, (component, path) in module_names(pipe).items():
        if component == "unet" and name.startswith("lora_unet_") and name[10:] != path.replace(".", "_"):
            out[name[10:]] = path
    return {k.replace("_", "."): v for k, v in out.items()}


def test_strengths_stack_and_separate_text_from_unet(sd, tmp_path):
    ours = Pipeline.from_pretrained(sd)
    base = state(ours)
    a = kohya_file(tmp_path / "a.safetensors", {"lora_unet": (ours.unet, UNET_MODULES[:2], None),
                                                "lora_te": (ours.text_encoder.text_model, TEXT_MODULES, None)})
    b = kohya_file(tmp_path / "b.safetensors", {"lora_unet": (ours.unet, UNET_MODULES[1:3], None)}, seed=5)
    la, lb = read_lora(a), read_lora(b)
    ours.set_loras([LoraUse(la, text=0.25, unet=1.5), (lb, -0.5)])
    key = f"unet.{UNET_MODULES[1]}.weight"
    w = base[key].float()
    expected = w + 1.5 * la.adapters[f"lora_unet_{UNET_MODULES[1].replace('.', '_')}"].delta(w) \
        - 0.5 * lb.adapters[f"lora_unet_{UNET_MODULES[1].replace('.', '_')}"].delta(w)
    assert torch.allclose(state(ours)[key], expected, atol=1e-6)
    tkey = f"text_encoder.text_model.{TEXT_MODULES[0].removeprefix('text_model.')}.weight"
    tw = base[tkey]
    td = la.adapters[f"lora_te_{TEXT_MODULES[0].replace('.', '_')}"].delta(tw)
    assert torch.allclose(state(ours)[tkey], tw + 0.25 * td, atol=1e-6)
    ours.set_loras([(la, 0.0)])  # strength 0: the base model
    assert all(torch.equal(v, base[k]) for k, v in state(ours).items())


def test_lyco_closed_forms(sd, tmp_path):
    ours = Pipeline.from_pretrained(sd)
    lin, conv = UNET_MODULES[0], UNET_MODULES[5]
    W, C = weight(ours.unet, lin).clone(), weight(ours.unet, conv).clone()  # (32, 32), (64, 32, 3, 3)
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    k_lin, k_conv = f"lora_unet_{lin.replace('.', '_')}", f"lora_unet_{conv.replace('.', '_')}"
    loha = {f"{k_lin}.hada_w1_a": r(32, 2), f"{k_lin}.hada_w1_b": r(2, 32), f"{k_lin}.hada_w2_a": r(32, 2),
            f"{k_lin}.hada_w2_b": r(2, 32), f"{k_lin}.alpha": torch.tensor(1.0)}
    lokr_conv = {f"{k_conv}.lokr_w1": r(4, 2), f"{k_conv}.lokr_w2_a": r(16, 3), f"{k_conv}.lokr_w2_b": r(3, 16, 3, 3),
                 f"{k_conv}.alpha": torch.tensor(6.0)}
    ours.set_loras([(loha, 0.8), (lokr_conv, 1.0)])
    hada = (loha[f"{k_lin}.hada_w1_a"] @ loha[f"{k_lin}.hada_w1_b"]) * \
        (loha[f"{k_lin}.hada_w2_a"] @ loha[f"{k_lin}.hada_w2_b"])
    assert torch.allclose(weight(ours.unet, lin), W + 0.8 * 0.5 * hada, atol=1e-6)
    w2 = torch.einsum("or,rikl->oikl", lokr_conv[f"{k_conv}.lokr_w2_a"], lokr_conv[f"{k_conv}.lokr_w2_b"])
    kron = torch.zeros(64, 32, 3, 3)  # kron by hand: block (a, b) is w1[a, b] * w2
    for a in range(4):
        for b in range(2):
            kron[16 * a:16 * (a + 1), 16 * b:16 * (b + 1)] = lokr_conv[f"{k_conv}.lokr_w1"][a, b] * w2
    assert torch.allclose(weight(ours.unet, conv), C + 2.0 * kron, atol=1e-6)  # alpha 6 / rank 3

    # LoCon's CP form: up (out, r) . mid (r, r, 3, 3) . down (r, in); as three stacked convolutions
    cp = {f"{k_conv}.lora_down.weight": r(2, 32, 1, 1), f"{k_conv}.lora_mid.weight": r(2, 2, 3, 3),
          f"{k_conv}.lora_up.weight": r(64, 2, 1, 1)}
    ours.set_loras([(cp, 1.0)])
    x = torch.randn(1, 32, 6, 6, generator=g)
    conv_module = ours.unet.get_submodule(conv)
    stacked = torch.nn.functional.conv2d(torch.nn.functional.conv2d(torch.nn.functional.conv2d(
        x, cp[f"{k_conv}.lora_down.weight"]), cp[f"{k_conv}.lora_mid.weight"], padding=1),
        cp[f"{k_conv}.lora_up.weight"])
    merged = torch.nn.functional.conv2d(x, conv_module.weight - C, padding=1)
    assert torch.allclose(merged, stacked, atol=1e-5)


def test_dora_as_peft_merges_it(sd):
    """PEFT's DoRA merge on the same Linear, factors and magnitude is the oracle."""
    from peft import LoraConfig, get_peft_model

    ours = Pipeline.from_pretrained(sd)
    lin = UNET_MODULES[0]
    module = ours.unet.get_submodule(lin)
    torch.manual_seed(1)
    wrapper = torch.nn.Sequential()
    wrapper.add_module("to_q", torch.nn.Linear(32, 32, bias=False))
    wrapper.to_q.weight.data.copy_(module.weight)
    peft_model = get_peft_model(wrapper, LoraConfig(r=2, lora_alpha=3, target_modules=["to_q"], use_dora=True))
    layer = peft_model.base_model.model.to_q
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.3)
    layer.lora_magnitude_vector["default"].weight.data.mul_(torch.linspace(0.5, 1.5, 32))
    file = {f"unet.{lin}.lora_A.weight": layer.lora_A["default"].weight.detach().clone(),
            f"unet.{lin}.lora_B.weight": layer.lora_B["default"].weight.detach().clone(),
            f"unet.{lin}.lora_magnitude_vector": layer.lora_magnitude_vector["default"].weight.detach().clone(),
            f"unet.{lin}.alpha": torch.tensor(3.0)}
    layer.merge()
    ours.set_loras([(file, 1.0)])
    assert torch.allclose(module.weight, layer.base_layer.weight, atol=1e-6)


def test_kohya_dora_scale_closed_form(sd):
    ours = Pipeline.from_pretrained(sd)
    lin = UNET_MODULES[0]
    W = weight(ours.unet, lin).clone()
    down, up, _ = factors(W, 2, 4, alpha=False)
    m = torch.linspace(0.5, 2.0, 32)[None]  # (1, in): LyCORIS' default, one magnitude per input column
    stem = f"lora_unet_{lin.replace('.', '_')}"
    ours.set_loras([({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.dora_scale": m}, 0.6)])
    v = W + up @ down
    expected = W + 0.6 * (m * v / v.norm(dim=0, keepdim=True) - W)
    assert torch.allclose(weight(ours.unet, lin), expected, atol=1e-6)


def test_bad_files_change_nothing(sd, tmp_path):
    ours = Pipeline.from_pretrained(sd)
    good = kohya_file(tmp_path / "good.safetensors", {"lora_unet": (ours.unet, UNET_MODULES[:1], None)})
    ours.set_loras([(good, 1.0)])
    merged = state(ours)
    down, up, _ = factors(weight(ours.unet, UNET_MODULES[0]), 2, 0)
    ok = {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
          "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": up}
    cases = {
        "name no module": dict(ok, **{"lora_unet_down_blocks_9_nothing.lora_down.weight": down,
                                      "lora_unet_down_blocks_9_nothing.lora_up.weight": up}),
        "another model": {k: torch.randn(v.shape[0] * 2, *v.shape[1:]) if "up" in k else v for k, v in ok.items()},
        "rank mismatch": {k: v[:1] if "down" in k else v for k, v in ok.items()},
        "not a LoRA": {"model.diffusion_model.input_blocks.0.0.weight": down},
    }
    for expect, bad in cases.items():
        with pytest.raises(ValueError, match="LoRA"):
            ours.set_loras([(good, 1.0), (bad, 1.0)])
        assert all(torch.equal(v, merged[k]) for k, v in state(ours).items()), expect  # still the good merge
    (tmp_path / "x.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="pickle"):
        read_lora(tmp_path / "x.pt")


def test_lora_option():
    assert parse_lora_option("style.safetensors") == ("style.safetensors", 1.0, 1.0)
    assert parse_lora_option("style.safetensors:0.6") == ("style.safetensors", 0.6, 0.6)
    assert parse_lora_option("a/b:c.safetensors:0.5:1.2") == ("a/b:c.safetensors", 0.5, 1.2)


# ---------------------------------------------------------------- the command line


def shapes_lora(path, seed=0):
    """A kohya LoRA for the bundled shapes model's first attention (text and UNet parts) that changes its images."""
    pipe = Pipeline.from_pretrained("src/reverie/bundled/shapes")
    paths = ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", "down_blocks.0.attentions.0.proj_out"]
    return kohya_file(path, {"lora_unet": (pipe.unet, paths, None),
                             "lora_te": (pipe.text_encoder.text_model, TEXT_MODULES[:1], None)}, seed=seed, rank=4)


def test_generate_with_loras_records_and_regenerates_them(tmp_path):
    import numpy as np
    from PIL import Image

    from reverie.cli import main
    from reverie.lora import lora_hash
    from reverie.metadata import read_png_info

    loras = tmp_path / "loras"
    loras.mkdir()
    shapes_lora(loras / "wild.safetensors")
    base = ["generate", "a red circle", "--steps", "4", "--seed", "1"]
    assert main([*base, "--out", str(tmp_path / "plain.png")]) == 0
    assert main(["generate", "a red circle <lora:wild:0.8>", *base[2:], "--lora-dir", str(loras),
                 "--out", str(tmp_path / "tag.png")]) == 0
    assert main([*base, "--lora", f"{loras / 'wild.safetensors'}:0.8", "--out", str(tmp_path / "flag.png")]) == 0
    pixels = {n: np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=float) for n in ("plain", "tag", "flag")}
    assert np.array_equal(pixels["tag"], pixels["flag"])  # the tag and the flag merge the same LoRA
    assert np.abs(pixels["tag"] - pixels["plain"]).mean() > 1  # and it changes the image

    info = read_png_info(tmp_path / "tag.png")
    assert info["request"]["prompt"] == "a red circle "  # the tag is not encoded
    [record] = info["request"]["loras"]
    assert (record["name"], record["text"], record["unet"]) == ("wild", 0.8, 0.8)
    assert record["hash"] == lora_hash(loras / "wild.safetensors")
    assert info["parameters"]["Lora hashes"] == f"wild: {record['hash']}"
    assert "<lora:wild:0.8>" in info["parameters"]["Prompt"]  # as A1111 writes it

    assert main(["generate", "--from", str(tmp_path / "tag.png"), "--out", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png"), dtype=float), pixels["tag"])


def test_generate_lora_errors_write_nothing(tmp_path, capsys):
    from reverie.cli import main

    out = tmp_path / "x.png"
    assert main(["generate", "a red circle <lora:wild:1>", "--out", str(out)]) == 2
    assert "--lora-dir" in capsys.readouterr().err
    assert main(["generate", "a red circle <lora:nope:1>", "--lora-dir", str(tmp_path), "--out", str(out)]) == 2
    assert "no LoRA of that name" in capsys.readouterr().err
    sdxl_shaped = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 640),
                   "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(640, 2)}
    save_file(sdxl_shaped, str(tmp_path / "xl.safetensors"))
    assert main(["generate", "a red circle", "--lora", str(tmp_path / "xl.safetensors"), "--out", str(out)]) == 2
    assert "another architecture" in capsys.readouterr().err
    assert not out.exists()


def test_the_bundled_star_lora_loads_by_name_on_the_shapes_model():
    """src/reverie/bundled/loras/shapes-star.safetensors (configs/shapes_lora_star.toml's run): a kohya file for the
    shipped shapes model, found by its name; merging and restoring it leaves the base weights exact."""
    pipe = Pipeline.from_pretrained("src/reverie/bundled/shapes")
    base = state(pipe)
    lora = read_lora("shapes-star")
    assert lora.path.name == "shapes-star.safetensors" and any(k.startswith("lora_te_") for k in lora.adapters)
    pipe.set_loras([(lora, 1.0)])
    assert any(not torch.equal(v, base[k]) for k, v in state(pipe).items())
    pipe.set_loras([])
    assert all(torch.equal(v, base[k]) for k, v in state(pipe).items())
    with pytest.raises(ValueError, match="bundled LoRAs: shapes-star"):
        read_lora("no-such-lora")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_transformer_family_peft_lora_equals_diffusers(tmp_path, family):
    """The transformer families take diffusers-format LoRAs by the same name table (transformer.<path>): SD3's
    and FLUX's transformer weights after the merge equal diffusers' fuse_lora of the same file."""
    from tiny_families import flux_folder, sd3_folder

    folder = sd3_folder(tmp_path / "m") if family == "sd3" else flux_folder(tmp_path / "m", dev=False)
    ours = Pipeline.from_pretrained(folder)
    paths = [p for p, m in ours.transformer.named_modules()
             if isinstance(m, torch.nn.Linear) and p.endswith(("to_q", "to_k", "to_out.0", "add_k_proj", "proj_mlp"))]
    assert len(paths) >= 4
    file = {}
    for i, p in enumerate(paths):
        down, up, _ = factors(ours.transformer.get_submodule(p).weight, 2, 30 + i)
        file |= {f"transformer.{p}.lora_A.weight": down, f"transformer.{p}.lora_B.weight": up}
    save_file(file, str(tmp_path / "t.safetensors"))
    ours.set_loras([(tmp_path / "t.safetensors", 0.8)])
    cls = diffusers.StableDiffusion3Pipeline if family == "sd3" else diffusers.FluxPipeline
    theirs = theirs_fused(folder, tmp_path / "t.safetensors", 0.8, cls)
    for p in paths:
        a, b = ours.transformer.get_submodule(p).weight, theirs.transformer.get_submodule(p).weight
        assert torch.allclose(a, b, atol=2e-6), p
