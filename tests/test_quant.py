"""fp8 weight storage with per-layer upcast (reverie.models.quant): the same output, to the bit, as casting the
fp8 weights to the compute dtype up front; close to the fp32 model as fp8's 3-bit mantissa implies; equal to
diffusers' layerwise casting; files round-trip; half of bf16's bytes; scaled-fp8 files refused."""

import copy

import pytest
import torch

from reverie.formats.safetensors_io import FormatError, load_safetensors, read_safetensors_header, save_safetensors
from reverie.models import quant
from reverie.models.flux import Flux, FluxConfig, image_ids, text_ids
from reverie.models.mmdit import MMDiT, MMDiTConfig

# the tiny configs of tests/test_flux.py and tests/test_mmdit.py (diffusers' tiny pipelines)
FLUX = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
            guidance_embeds=True)  # + guidance_embeds: FLUX.1-dev's guidance embedder is fp8 too
SD3 = dict(sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
           caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
           qk_norm="rms_norm", dual_attention_layers=(0,))  # pos_embed_max_size 96: a persistent float buffer
SIZES = [(4, 4), (8, 12)]  # latent (h, w); the second is non-square
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
E4M3_UNIT_ROUNDOFF = 2.0 ** -4  # half an ulp, relative: 3 mantissa bits
E4M3_SUBNORMAL_HALF_STEP = 2.0 ** -10  # below 2^-6 the step is the smallest subnormal, 2^-9


def tiny(kind: str, device: str = "cpu", **overrides):
    """A tiny random fp32 model, seed 0, every parameter perturbed (RMSNorm scales start at one)."""
    torch.manual_seed(0)
    model = (Flux(FluxConfig(**FLUX | overrides)) if kind == "flux" else MMDiT(MMDiTConfig(**SD3 | overrides))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.to(device)


def meta_twin(model):
    """The same architecture built on the meta device: nothing allocated."""
    with torch.device("meta"):
        return type(model)(model.config).eval()


def run(model, h: int, w: int, dtype=torch.float32, device="cpu"):
    """One forward at batch 2 on an (h, w) latent with different t (and guidance) per row."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        if isinstance(model, Flux):
            n = (h // 2) * (w // 2)
            x, context, pooled = torch.randn(2, n, 4, generator=g), torch.randn(2, 7, 32, generator=g), \
                torch.randn(2, 32, generator=g)
            return model(x.to(device, dtype), torch.tensor([0.25, 0.8]), context.to(device, dtype),
                         pooled.to(device, dtype), image_ids(h, w, device), text_ids(7, device),
                         torch.tensor([3.5, 1.0]))
        x, context, pooled = torch.randn(2, 4, h, w, generator=g), torch.randn(2, 7, 32, generator=g), \
            torch.randn(2, 64, generator=g)
        return model(x.to(device, dtype), torch.tensor([250.0, 800.0]), context.to(device, dtype),
                     pooled.to(device, dtype))


def upfront(model, state_dict, dtype):
    """The reference: every tensor of the fp8 state dict cast to the compute dtype up front, in a plain model."""
    ref = copy.deepcopy(model).to(dtype)
    ref.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True)
    return ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind,skip", [("flux", quant.DEFAULT_SKIP), ("sd3", quant.DEFAULT_SKIP),
                                       ("sd3", ())])  # skip=(): SD3's patchify Conv2d is fp8 too
def test_fp8_storage_equals_upfront_cast_to_the_bit(kind, skip, dtype, device):
    model = tiny(kind, device)
    fp8 = quant.quantize_fp8(model, skip=skip)
    stored = quant.store_fp8(meta_twin(model), fp8, compute_dtype=dtype, skip=skip)
    ref = upfront(model, fp8, dtype)
    layers = quant.fp8_layers(stored, skip)
    assert any(isinstance(layer, torch.nn.Conv2d) for layer in layers.values()) == (kind == "sd3" and not skip)
    fp8_keys = {f"{name}.weight" for name in layers}
    for key, value in stored.state_dict().items():  # fp8 exactly where intended, the rest in compute dtype
        assert value.dtype == (torch.float8_e4m3fn if key in fp8_keys else dtype), key
        assert value.device.type == device, key
    for h, w in SIZES:
        out, expected = run(stored, h, w, dtype, device), run(ref, h, w, dtype, device)
        assert out.dtype == dtype and expected.abs().max() > 0.1
        assert torch.equal(out, expected), (h, w, (out - expected).abs().max())


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_close_to_fp32_model_as_a_3_bit_mantissa_implies(kind):
    """Each weight is rounded to nearest (|error| <= 2^-4 |w|, or half the subnormal step); the output then moves
    by about as much as under a random perturbation of the same size per tensor, no more and no less."""
    model = tiny(kind)
    fp8 = quant.quantize_fp8(model)
    own = model.state_dict()
    errors = {k: fp8[k].float() - own[k] for k in own if fp8[k].dtype in quant.FP8_DTYPES}
    for key, error in errors.items():
        bound = torch.clamp(E4M3_UNIT_ROUNDOFF * own[key].abs(), min=E4M3_SUBNORMAL_HALF_STEP)
        assert (error.abs() <= bound).all(), key
    stored = quant.store_fp8(meta_twin(model), fp8, compute_dtype=torch.float32)  # fp32 compute: storage error only
    g = torch.Generator().manual_seed(2)
    for h, w in SIZES:
        y = run(model, h, w)
        err = ((run(stored, h, w) - y).norm() / y.norm()).item()
        noise_errs = []
        for _ in range(3):
            noisy = copy.deepcopy(model)
            with torch.no_grad():
                for key, error in errors.items():
                    noise = torch.randn(error.shape, generator=g)
                    noisy.get_parameter(key).add_(noise * error.norm() / noise.norm())
            noise_errs.append(((run(noisy, h, w) - y).norm() / y.norm()).item())
        noise_err = sum(noise_errs) / len(noise_errs)
        assert 0 < err < 1 and noise_err / 3 < err < 3 * noise_err, (h, w, err, noise_errs)  # seen: 0.7x-1.3x


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_loads_diffusers_layerwise_cast_weights_and_matches_its_forward(kind):
    """diffusers' enable_layerwise_casting(fp8, bf16) on the same weights: its fp8 state dict (weights and biases of
    its non-skipped layers in fp8) loads here with its skip patterns, and the bf16 outputs are identical."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    if kind == "flux":
        ref = diffusers.FluxTransformer2DModel(**(FLUX | dict(axes_dims_rope=[4, 4, 8]))).eval()
    else:
        ref = diffusers.SD3Transformer2DModel(**SD3).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.to(torch.bfloat16).enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    assert ref._skip_layerwise_casting_patterns == ["pos_embed", "norm"]
    with torch.device("meta"):
        ours = (Flux if kind == "flux" else MMDiT).from_config(dict(ref.config)).eval()
    quant.store_fp8(ours, ref.state_dict(), skip=("pos_embed", "norm"))
    for h, w in SIZES:
        out = run(ours, h, w, torch.bfloat16)
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            if kind == "flux":
                n = (h // 2) * (w // 2)
                x, c, pooled = (torch.randn(*s, generator=g).bfloat16() for s in ((2, n, 4), (2, 7, 32), (2, 32)))
                expected = ref(hidden_states=x, encoder_hidden_states=c, pooled_projections=pooled,
                               timestep=torch.tensor([0.25, 0.8]), img_ids=image_ids(h, w), txt_ids=text_ids(7),
                               guidance=torch.tensor([3.5, 1.0])).sample
            else:
                x, c, pooled = (torch.randn(*s, generator=g).bfloat16() for s in ((2, 4, h, w), (2, 7, 32), (2, 64)))
                expected = ref(hidden_states=x, encoder_hidden_states=c, pooled_projections=pooled,
                               timestep=torch.tensor([250.0, 800.0])).sample
        assert torch.equal(out, expected), (h, w, (out - expected).abs().max())


@pytest.mark.parametrize("fp8_dtype", quant.FP8_DTYPES)
def test_safetensors_round_trip_keeps_fp8_bits_and_loads_without_copies(tmp_path, fp8_dtype):
    model = tiny("flux")
    fp8 = quant.quantize_fp8(model, dtype=fp8_dtype)
    assert quant.is_fp8_state_dict(fp8) and not quant.is_fp8_state_dict(model.state_dict())
    path = save_safetensors(fp8, tmp_path / "flux-fp8.safetensors")
    header = read_safetensors_header(path)
    name = {torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}[fp8_dtype]
    assert {k for k, v in header.items() if k != "__metadata__" and v["dtype"] == name} == \
        {k for k, v in fp8.items() if v.dtype == fp8_dtype}
    loaded = load_safetensors(path)
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k].view(torch.uint8), v.view(torch.uint8))
               if v.dtype == fp8_dtype else torch.equal(loaded[k], v) for k, v in fp8.items())
    stored = quant.store_fp8(meta_twin(model), loaded)
    for key, value in stored.state_dict().items():  # the file's fp8 tensors are the module's, not copies
        assert (value.data_ptr() == loaded[key].data_ptr()) == (value.dtype == fp8_dtype), key
    in_memory = quant.store_fp8(meta_twin(model), fp8)
    assert torch.equal(run(stored, 8, 12, torch.bfloat16), run(in_memory, 8, 12, torch.bfloat16))
    resaved = load_safetensors(save_safetensors(stored.state_dict(), tmp_path / "again.safetensors"))
    assert all(torch.equal(resaved[k].view(torch.uint8), v.view(torch.uint8)) for k, v in fp8.items()
               if v.dtype == fp8_dtype)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_parameter_bytes_about_half_of_bf16(kind):
    # without SD3's position table, a buffer that would outweigh the tiny model (1% of SD3's real bytes)
    model = tiny(kind) if kind == "flux" else tiny(kind, pos_embed_max_size=None)
    bf16 = sum(quant.parameter_bytes(copy.deepcopy(model).bfloat16()).values())
    stored = quant.store_fp8(copy.deepcopy(model))  # state_dict None: quantize the module's own weights
    held = quant.parameter_bytes(stored)
    fp8_numel = sum(layer.weight.numel() for layer in quant.fp8_layers(stored).values())
    assert held == {torch.float8_e4m3fn: fp8_numel, torch.bfloat16: bf16 - 2 * fp8_numel}
    assert 0.5 < sum(held.values()) / bf16 < 0.55  # biases, norms and embeddings stay bf16


def test_diffusers_norm_pattern_keeps_modulation_linears_in_compute_dtype():
    model = tiny("flux")
    fp8 = quant.quantize_fp8(model)  # every fp8 layer, modulation Linears included
    skip = quant.DEFAULT_SKIP + ("norm",)
    stored = quant.store_fp8(meta_twin(model), fp8, skip=skip)
    adaln = stored.transformer_blocks[0].norm1.linear
    assert type(adaln) is torch.nn.Linear and adaln.weight.dtype == torch.bfloat16  # fp8 in file: upcast at load
    assert torch.equal(adaln.weight, fp8["transformer_blocks.0.norm1.linear.weight"].bfloat16())
    assert type(stored.transformer_blocks[0].attn.to_q) is quant.Fp8Linear
    assert torch.equal(run(stored, 8, 12, torch.bfloat16), run(upfront(model, fp8, torch.bfloat16), 8, 12,
                                                                torch.bfloat16))


@pytest.mark.parametrize("key", ["transformer_blocks.0.attn.to_q.scale_weight", "single_transformer_blocks.0."
                                 "proj_mlp.weight_scale", "scaled_fp8"])
def test_scaled_fp8_refused_naming_the_key(key):
    model = tiny("flux")
    fp8 = quant.quantize_fp8(model) | {key: torch.tensor(0.01)}
    twin = meta_twin(model)
    with pytest.raises(FormatError, match=f"{key}: this is a scaled-fp8 checkpoint"):
        quant.store_fp8(twin, fp8)
    assert all(p.is_meta for p in twin.parameters()) and type(twin.x_embedder) is torch.nn.Linear


def test_strict_load_and_nothing_half_done():
    model = tiny("flux")
    fp8 = quant.quantize_fp8(model)
    before = copy.deepcopy(model.state_dict())
    bad = dict(fp8)
    del bad["x_embedder.bias"]
    bad["context_embedder.weight"] = bad["context_embedder.weight"][:, :8]
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing key: x_embedder.bias; 1 unexpected key: extra.weight; "
                                         r"1 wrong shape: context_embedder.weight"):
        quant.store_fp8(model, bad)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, quant.Fp8Linear) for m in model.modules())


def test_bad_arguments_are_named():
    model = tiny("flux")
    with torch.no_grad():
        model.x_embedder.weight[0, 0] = 1000.0
    with pytest.raises(ValueError, match=r"x_embedder.weight: max \|weight\| = 1000 is beyond"):
        quant.quantize_fp8(model)
    with pytest.raises(ValueError, match="dtype must be one of"):
        quant.quantize_fp8(model, dtype=torch.int8)
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        quant.store_fp8(model, compute_dtype=torch.float8_e4m3fn)


@pytest.mark.parametrize("device", DEVICES)
def test_to_keeping_fp8_changes_compute_dtype_not_storage(device):
    model = tiny("flux")
    stored = quant.store_fp8(meta_twin(model), quant.quantize_fp8(model), compute_dtype=torch.bfloat16)
    bits = {k: v.view(torch.uint8).clone() for k, v in stored.state_dict().items() if v.dtype in quant.FP8_DTYPES}
    ref = upfront(model, stored.state_dict(), torch.float32)  # the same tensors, bf16 ones included, in fp32
    quant.to_keeping_fp8(stored, device, torch.float32)
    for key, value in stored.state_dict().items():
        assert value.device.type == device
        if key in bits:
            assert torch.equal(value.view(torch.uint8).cpu(), bits[key]), key
        else:
            assert value.dtype == torch.float32, key
    assert stored.x_embedder.compute_dtype == torch.float32
    assert torch.equal(run(stored, 8, 12, device=device), run(ref.to(device), 8, 12, device=device))
    plain = quant.to_keeping_fp8(copy.deepcopy(model), dtype=torch.bfloat16)  # no fp8: as module.to
    assert all(p.dtype == torch.bfloat16 for p in plain.parameters())


def test_storing_again_from_a_bf16_state_dict_gives_plain_layers():
    model = tiny("flux")
    stored = quant.store_fp8(copy.deepcopy(model))
    assert type(stored.x_embedder) is quant.Fp8Linear
    bf16 = {k: v.bfloat16() for k, v in model.state_dict().items()}
    quant.store_fp8(stored, bf16)  # nothing in fp8: everything bf16, no layer upcasts
    assert not any(isinstance(m, quant.Fp8Linear) for m in stored.modules())
    assert torch.equal(run(stored, 8, 12, torch.bfloat16), run(upfront(model, bf16, torch.bfloat16), 8, 12,
                                                                torch.bfloat16))
