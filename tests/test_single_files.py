"""SD3 / SD3.5 and FLUX.1 single files (reverie.single_files): files written from diffusers' tiny folders with the
inverse key maps (Stability's transformer-only and all-in-one layouts, BFL's transformer-only, ComfyUI's packed
FLUX, separate CLIP / OpenCLIP / T5 / VAE files) open as pipelines that give the same images as the folder;
missing pieces and mismatched configs get a ValueError naming what to pass."""

import shutil

import numpy as np
import pytest
import torch

from reverie import Pipeline
from reverie.formats import load_safetensors, save_safetensors, to_ldm_checkpoint
from reverie.formats.flux_single_file import flux_transformer_to_original
from reverie.formats.sd3_single_file import sd3_transformer_to_original
from reverie.formats.single_file import _text_to_ldm
from reverie.single_files import SCHEDULERS, clip_state_dict, infer_clip_config, replace_vae

from tiny_families import flux_folder, sd3_folder

pytest.importorskip("diffusers")  # builds the tiny folders

PROMPTS = ["A painting of a squirrel eating a burger", "a red circle above a blue square"]
PREFIX = "model.diffusion_model."


def weights(folder, name):
    files = sorted((folder / name).glob("*.safetensors"))
    return load_safetensors(files[0])


def configs_only(folder, dest):
    """The folder without weights: what a config= folder needs to hold (configs, tokenizers, scheduler)."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors"))
    return dest


def ldm_vae(folder, prefix=""):
    return {prefix + k.removeprefix("first_stage_model."): v
            for k, v in to_ldm_checkpoint({"vae": weights(folder, "vae")}).items()}


def prefixed(prefix, state_dict):
    return {prefix + k: v for k, v in state_dict.items()}


def open_clip(folder, name):
    """A CLIP text encoder in OpenCLIP's names, with its bare (right-multiplied) text_projection."""
    te = dict(weights(folder, name))
    projection = te.pop("text_projection.weight")
    out = {k.removeprefix("cond_stage_model.model."): v for k, v in _text_to_ldm(te, "open_clip").items()}
    return out | {"text_projection": projection.T.contiguous()}


def images(pipe, flux, seed=0):
    size = dict(width=8, height=8, max_sequence_length=48) if flux else dict(width=32, height=32)
    guidance = (3.5 if pipe.transformer.config.guidance_embeds else 0.0) if flux else 5.0
    result = pipe(PROMPTS, steps=2, guidance_scale=guidance, seed=seed, progress=False, **size)
    return np.stack([np.asarray(im, dtype=np.float64) for im in result.images])


def assert_same(ours, theirs, tol=0.0):
    """Bit-identical images (reverie against reverie on the same weights); tol: mean abs difference on 0..255
    allowed against diffusers."""
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).mean() <= tol
    assert ours.std() > 1  # not flat images: the comparison means something


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = sd3_folder(tmp_path_factory.mktemp("sd3"))
    ref = Pipeline.from_pretrained(folder)
    return folder, ref, images(ref, flux=False)


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "schnell"])
def flux(request, tmp_path_factory):
    folder = flux_folder(tmp_path_factory.mktemp("flux"), dev=request.param)
    ref = Pipeline.from_pretrained(folder)
    return folder, ref, images(ref, flux=True)


# --- SD3 -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sd35", [False, True], ids=["sd3", "sd35"])
def test_sd3_transformer_only_file_with_config(tmp_path, sd35):
    folder = sd3_folder(tmp_path / "folder", sd35=sd35)
    file = save_safetensors(sd3_transformer_to_original(weights(folder, "transformer")), tmp_path / "sd3.safetensors")
    ours, ref = Pipeline.from_pretrained(file, config=folder), Pipeline.from_pretrained(folder)
    assert_same(images(ours, flux=False), images(ref, flux=False))
    assert ours.transformer.config == ref.transformer.config and ours.scheduler_config == ref.scheduler_config


def test_sd3_all_in_one_file(sd3, tmp_path):
    """Stability's layout: model.diffusion_model., text_encoders.{clip_l,clip_g,t5xxl}.transformer. (CLIP-L
    without text_projection: the identity, as diffusers), first_stage_model.; config= holds no weights."""
    folder, ref, _ = sd3
    clip_l = {k: v for k, v in weights(folder, "text_encoder").items() if k != "text_projection.weight"}
    packed = (prefixed(PREFIX, sd3_transformer_to_original(weights(folder, "transformer")))
              | prefixed("text_encoders.clip_l.transformer.", clip_l)
              | prefixed("text_encoders.clip_g.transformer.", weights(folder, "text_encoder_2"))
              | prefixed("text_encoders.t5xxl.transformer.", weights(folder, "text_encoder_3"))
              | ldm_vae(folder, "first_stage_model."))
    file = save_safetensors(packed, tmp_path / "sd3_medium_incl_clips_t5xxlfp16.safetensors")
    config = configs_only(folder, tmp_path / "configs")
    ours = Pipeline.from_pretrained(file, config=config)
    projection = ours.text_encoder.text_model.text_projection.weight
    assert torch.equal(projection, torch.eye(projection.shape[0]))
    expected = Pipeline.from_pretrained(folder)
    with torch.no_grad():
        expected.text_encoder.text_model.text_projection.weight.copy_(torch.eye(projection.shape[0]))
    assert_same(images(ours, flux=False), images(expected, flux=False))
    shutil.rmtree(config / "scheduler")  # without one, the release's is implied
    assert Pipeline.from_pretrained(file, config=config).scheduler_config == SCHEDULERS["sd3"]


def test_sd3_all_in_one_file_matches_diffusers_from_single_file(sd3, tmp_path):
    """diffusers' own reader of the same file (config= the folder) as the oracle. Two diffusers quirks are
    avoided: it gives every CLIP whose width equals CLIP-L's an identity projection (so clip_g's is the
    identity here), and it leaves its T5 in training mode (dropout on) without accelerate, hence .eval()."""
    diffusers = pytest.importorskip("diffusers")
    folder, _, _ = sd3
    clip_l = {k: v for k, v in weights(folder, "text_encoder").items() if k != "text_projection.weight"}
    clip_g = dict(weights(folder, "text_encoder_2"), **{"text_projection.weight": torch.eye(32)})
    t5 = dict(weights(folder, "text_encoder_3"))
    t5["encoder.embed_tokens.weight"] = t5["shared.weight"].clone()  # diffusers needs both tied names
    packed = (prefixed(PREFIX, sd3_transformer_to_original(weights(folder, "transformer")))
              | prefixed("text_encoders.clip_l.transformer.", clip_l)
              | prefixed("text_encoders.clip_g.transformer.", clip_g)
              | prefixed("text_encoders.t5xxl.transformer.", t5) | ldm_vae(folder, "first_stage_model."))
    file = save_safetensors(packed, tmp_path / "sd3_all.safetensors")
    theirs = diffusers.StableDiffusion3Pipeline.from_single_file(str(file), config=str(folder), local_files_only=True)
    theirs.text_encoder_3.eval()
    theirs.set_progress_bar_config(disable=True)
    out = theirs(PROMPTS, num_inference_steps=2, guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(0),
                 height=32, width=32, output_type="np")
    ours = Pipeline.from_pretrained(file, config=configs_only(folder, tmp_path / "configs"))
    assert_same(images(ours, flux=False), (np.asarray(out.images, dtype=np.float64) * 255).round(), tol=0.02)


def test_sd3_fp8_file(sd3, tmp_path):
    """An fp8 transformer (ComfyUI's plain casts) stays fp8 in a pipeline (each layer upcasts to the pipeline's
    dtype for its call: reverie.models.quant), with the weights the file rounded to."""
    from reverie import families
    from reverie.single_files import load_transformer_single_file

    folder, ref, _ = sd3
    original = sd3_transformer_to_original(weights(folder, "transformer"))
    fp8 = {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in original.items()}
    file = save_safetensors(fp8, tmp_path / "sd3_fp8.safetensors")
    ours = Pipeline.from_pretrained(file, config=folder)
    rounded = {k: v.to(torch.float8_e4m3fn).float() if v.ndim == 2 else v
               for k, v in ref.transformer.state_dict().items()}
    assert all(torch.equal(v.float(), rounded[k]) for k, v in ours.transformer.state_dict().items())
    assert any(v.dtype == torch.float8_e4m3fn for v in ours.transformer.state_dict().values())
    images(ours, flux=False)  # runs
    quant = pytest.importorskip("reverie.models.quant")
    plain, _ = load_transformer_single_file(file, families.get("sd3"), config=folder)  # float32 compute
    assert all(torch.equal(v.float(), rounded[k]) for k, v in plain["transformer"].state_dict().items())
    components, _ = load_transformer_single_file(file, families.get("sd3"), config=folder, dtype=torch.bfloat16)
    layers = [m for m in components["transformer"].modules() if isinstance(m, quant.Fp8Linear)]
    assert layers and all(m.weight.dtype == torch.float8_e4m3fn for m in layers)


def test_sd3_separate_files(sd3, tmp_path):
    """ComfyUI's separate files: clip_l (transformers' names), clip_g (OpenCLIP's names), t5xxl (T5EncoderModel
    names without the tied embed_tokens), a VAE in diffusers names; options win over config='s components."""
    folder, _, expected = sd3

    def save(state_dict, name):
        return save_safetensors(state_dict, tmp_path / name)

    file = save(sd3_transformer_to_original(weights(folder, "transformer")), "sd3.safetensors")
    ours = Pipeline.from_pretrained(
        file, config=configs_only(folder, tmp_path / "configs"),
        text_encoder=save(weights(folder, "text_encoder"), "clip_l.safetensors"),
        text_encoder_2=save(open_clip(folder, "text_encoder_2"), "clip_g.safetensors"),
        text_encoder_3=save(weights(folder, "text_encoder_3"), "t5xxl_fp16.safetensors"),
        vae=save(weights(folder, "vae"), "vae.safetensors"))
    assert_same(images(ours, flux=False), expected)


def test_sd3_without_t5_warns_and_uses_zeros(sd3, tmp_path):
    folder, _, _ = sd3
    file = save_safetensors(sd3_transformer_to_original(weights(folder, "transformer")), tmp_path / "sd3.safetensors")
    with pytest.warns(UserWarning, match="text_encoder_3"):
        ours = Pipeline.from_pretrained(file, config=configs_only(folder, tmp_path / "configs"),
                                        text_encoder=folder / "text_encoder", text_encoder_2=folder / "text_encoder_2",
                                        vae=folder / "vae")
    assert ours.components["text_encoder_3"] is None
    expected = Pipeline.from_pretrained(folder)
    expected.components["text_encoder_3"] = None
    assert_same(images(ours, flux=False), images(expected, flux=False))


@pytest.mark.filterwarnings("ignore:.*no T5-XXL")
def test_sd3_missing_components_and_tokenizers(sd3, tmp_path):
    folder, _, _ = sd3
    transformer = sd3_transformer_to_original(weights(folder, "transformer"))
    file = save_safetensors(transformer, tmp_path / "sd3.safetensors")
    with pytest.raises(ValueError, match="text_encoder .CLIP-L.*text_encoder_2 .*vae: pass vae=") as info:
        Pipeline.from_pretrained(file)
    assert "text_encoder_3" not in str(info.value)  # T5 is optional
    packed = save_safetensors(transformer | prefixed("text_encoders.clip_l.transformer.",
                                                     weights(folder, "text_encoder")), tmp_path / "packed.safetensors")
    with pytest.raises(ValueError, match="tokenizer of text_encoder .CLIP-L.: single files hold none; pass config="):
        Pipeline.from_pretrained(packed, text_encoder_2=folder / "text_encoder_2", vae=folder / "vae")
    # tokenizer= gives CLIP-L's, a text encoder folder its diffusers sibling tokenizer_2/; then what the tiny
    # transformer does not store (its head width) is asked for
    with pytest.raises(ValueError, match="attention_head_dim.*pass config=a diffusers sd3 folder"):
        Pipeline.from_pretrained(packed, tokenizer=folder / "tokenizer", text_encoder_2=folder / "text_encoder_2",
                                 vae=folder / "vae")
    with pytest.raises(ValueError, match="head count cannot be inferred; pass config="):  # tiny CLIPs: 4 heads of 8
        infer_clip_config(clip_state_dict(weights(folder, "text_encoder")), "clip_l")
    with pytest.raises(ValueError, match="text_encoder_3: no such file"):
        Pipeline.from_pretrained(file, text_encoder_3=tmp_path / "nothing.safetensors")


# --- FLUX ----------------------------------------------------------------------------------------------------


def test_flux_bfl_file_with_config(flux, tmp_path):
    folder, ref, expected = flux
    file = save_safetensors(flux_transformer_to_original(weights(folder, "transformer")),
                            tmp_path / "flux1.safetensors")
    ours = Pipeline.from_pretrained(file, config=folder)
    assert_same(images(ours, flux=True), expected)
    assert ours.scheduler_config == ref.scheduler_config


def test_flux_comfyui_packed_file(flux, tmp_path):
    """ComfyUI's packed FLUX: model.diffusion_model., text_encoders.clip_l / t5xxl .transformer., vae.; the
    configs-only config= gives configs and tokenizers; without its scheduler, the release's is implied."""
    folder, _, expected = flux
    packed = (prefixed(PREFIX, flux_transformer_to_original(weights(folder, "transformer")))
              | prefixed("text_encoders.clip_l.transformer.", weights(folder, "text_encoder"))
              | prefixed("text_encoders.t5xxl.transformer.", weights(folder, "text_encoder_2"))
              | ldm_vae(folder, "vae."))
    file = save_safetensors(packed, tmp_path / "flux1-packed.safetensors")
    config = configs_only(folder, tmp_path / "configs")
    assert_same(images(Pipeline.from_pretrained(file, config=config), flux=True), expected)
    shutil.rmtree(config / "scheduler")
    dev = weights(folder, "transformer").get("time_text_embed.guidance_embedder.linear_1.weight") is not None
    ours = Pipeline.from_pretrained(file, config=config)
    assert ours.scheduler_config == SCHEDULERS["flux_dev" if dev else "flux_schnell"]


def test_flux_separate_files_and_folders(flux, tmp_path):
    """A BFL file with CLIP-L as a whole transformers CLIPModel folder (as openai/clip-vit-large-patch14: its
    vision tower is dropped), T5 as a file and BFL's ae.safetensors; tokenizers from config=."""
    from transformers import CLIPConfig, CLIPModel

    from tiny_families import CLIP_CONFIG

    folder, ref, expected = flux
    clip = CLIPModel(CLIPConfig(text_config=CLIP_CONFIG, vision_config=dict(
        hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4)))
    clip.text_model.load_state_dict(ref.text_encoder.text_model.state_dict())
    clip.save_pretrained(tmp_path / "clip-vit-large-patch14")
    file = save_safetensors(prefixed(PREFIX, flux_transformer_to_original(weights(folder, "transformer"))),
                            tmp_path / "flux1.safetensors")
    ae = save_safetensors(ldm_vae(folder), tmp_path / "ae.safetensors")
    config = configs_only(folder, tmp_path / "configs")
    ours = Pipeline.from_pretrained(file, config=config, text_encoder=tmp_path / "clip-vit-large-patch14",
                                    text_encoder_2=save_safetensors(weights(folder, "text_encoder_2"),
                                                                    tmp_path / "t5xxl_fp16.safetensors"), vae=ae)
    assert_same(images(ours, flux=True), expected)
    # without config=, the tiny heads' rotary split is not in the weights
    with pytest.raises(ValueError, match="axes_dims_rope"):
        Pipeline.from_pretrained(file, text_encoder=folder / "text_encoder", text_encoder_2=folder / "text_encoder_2",
                                 vae=ae)


def test_flux_errors(flux, sd3, tmp_path):
    folder, _, _ = flux
    transformer = flux_transformer_to_original(weights(folder, "transformer"))
    file = save_safetensors(transformer, tmp_path / "flux1.safetensors")
    with pytest.raises(ValueError, match="text_encoder .CLIP-L.*text_encoder_2 .T5-XXL.*vae"):
        Pipeline.from_pretrained(file)
    with pytest.raises(ValueError, match="vae: pass vae=FILE or FOLDER .e.g. ae.safetensors"):
        Pipeline.from_pretrained(file, text_encoder=folder / "text_encoder", text_encoder_2=folder / "text_encoder_2")
    with pytest.raises(ValueError, match="config: .* holds a sd3 model"):
        Pipeline.from_pretrained(file, config=sd3[0])
    with pytest.raises(ValueError, match="text_encoder_3: a flux model has no text_encoder_3"):
        Pipeline.from_pretrained(file, config=folder, text_encoder_3=folder / "text_encoder_2")
    other = flux_folder(tmp_path / "other", dev="guidance_in.in_layer.weight" not in transformer)
    with pytest.raises(ValueError, match="guidance_embeds"):
        Pipeline.from_pretrained(file, config=other)


# --- the VAE option for folders ---------------------------------------------------------------------------------


def test_replace_vae_keeps_the_unstored_settings(sd3, tmp_path):
    folder = sd3[0]
    ref = Pipeline.from_pretrained(folder)
    ae = save_safetensors(ldm_vae(folder, "first_stage_model."), tmp_path / "ae.safetensors")
    with torch.no_grad():
        for p in ref.vae.parameters():
            p.add_(1.0)  # so the replacement must change something
    components = replace_vae(ref.components, ae)
    assert components["transformer"] is ref.transformer
    assert components["vae"].to_config() == ref.vae.to_config()  # scaling 1.5035 and one group, from the old VAE
    theirs = Pipeline.from_pretrained(folder).vae.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in components["vae"].state_dict().items())
    assert replace_vae(ref.components, folder)["vae"].to_config() == ref.vae.to_config()  # a pipeline folder's vae/
