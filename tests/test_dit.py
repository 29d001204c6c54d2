"""reverie's DiT equals diffusers' DiTTransformer2DModel with the same weights, and reads its configs."""

import pytest
import torch

from reverie.models.dit import DiT, DiTConfig

diffusers = pytest.importorskip("diffusers")

# diffusers' tiny DiTs: tests/pipelines/dit/test_dit.py and tests/models/transformers/test_models_dit_transformer2d.py
PIPELINE_TINY = dict(sample_size=16, num_layers=2, patch_size=4, attention_head_dim=8, num_attention_heads=2,
                     in_channels=4, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                     num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False)
MODEL_TINY = dict(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=4, num_attention_heads=2,
                  in_channels=4, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
                  num_embeds_ada_norm=8, norm_type="ada_norm_zero", norm_elementwise_affine=False)
# the other branches: no q/k/v bias, an affine MLP LayerNorm, out_channels = in_channels (no learned sigma)
VARIANT_TINY = dict(MODEL_TINY, num_layers=2, attention_bias=False, norm_elementwise_affine=True, out_channels=None,
                    norm_eps=1e-6)

# facebook/DiT-XL-2-256's transformer/config.json (written by diffusers 0.12, hence Transformer2DModel)
HUB_XL_2_256 = {
    "_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0", "activation_fn": "gelu-approximate",
    "attention_bias": True, "attention_head_dim": 72, "cross_attention_dim": None, "dropout": 0.0,
    "in_channels": 4, "norm_elementwise_affine": False, "norm_num_groups": 32, "norm_type": "ada_norm_zero",
    "num_attention_heads": 16, "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None,
    "only_cross_attention": False, "out_channels": 8, "patch_size": 2, "sample_size": 32,
    "upcast_attention": False, "use_linear_projection": False,
}


def pair(kwargs):
    torch.manual_seed(0)
    ref = diffusers.DiTTransformer2DModel(**kwargs).eval()  # eval: in training its LabelEmbedding drops labels
    with torch.no_grad():  # LayerNorm affines start at 1 and 0: move every parameter off its init
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = DiT.from_config(dict(ref.config)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def diffusers_output(ref, x, t, y):
    """diffusers' output. Its unpatchify takes the grid as square (sqrt of the token count), so for a non-square
    latent this is its proj_out_2 tokens unpatchified on the true grid with its own einsum order."""
    if x.shape[2] == x.shape[3]:
        return ref(x, t, y).sample

    class Stop(Exception):
        pass

    tokens = []

    def capture(module, inputs, output):
        tokens.append(output)
        raise Stop

    handle = ref.proj_out_2.register_forward_hook(capture)
    try:
        ref(x, t, y)
    except Stop:
        pass
    finally:
        handle.remove()
    p, c = ref.config.patch_size, ref.out_channels
    h, w = x.shape[2] // p, x.shape[3] // p
    patches = tokens[0].reshape(-1, h, w, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", patches).reshape(-1, c, h * p, w * p)


@pytest.mark.parametrize("kwargs", [PIPELINE_TINY, MODEL_TINY, VARIANT_TINY], ids=["pipeline", "model", "variant"])
@pytest.mark.parametrize("scale", [(1, 1), (2, 2), (1, 2), (3, 2)], ids=["native", "larger", "wide", "tall"])
def test_matches_diffusers(kwargs, scale):
    ref, ours = pair(kwargs)
    if ref.config.num_layers > 1:  # every block has its own embedder: the final layer must pick block 0's
        tables = [b.norm1.emb.class_embedder.embedding_table.weight for b in ref.transformer_blocks]
        assert not torch.equal(tables[0], tables[1])
    s, n = ref.config.sample_size, ref.config.num_embeds_ada_norm
    x = torch.randn(3, 4, s * scale[0], s * scale[1])
    y = torch.tensor([1, n - 1, n])  # n: the null class
    for t in (torch.tensor([0, 421, 999]), torch.tensor([3.5, 250.25, 980.0])):
        with torch.no_grad():
            theirs, mine = diffusers_output(ref, x, t, y), ours(x, t, y)
        assert mine.shape == (3, ref.out_channels, *x.shape[2:])
        assert theirs.abs().mean() > 0.1
        assert (mine - theirs).abs().max() <= 1e-5


def test_scalar_timestep_and_label_broadcast():
    _, ours = pair(MODEL_TINY)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(ours(x, 500, 3), ours(x, torch.tensor([500, 500]), torch.tensor([3, 3])))


def test_follows_the_weights_dtype():
    ref, ours = pair(MODEL_TINY)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 8])
    with torch.no_grad():
        full = ours(x, t, y)
        half = ours.to(torch.bfloat16)(x.bfloat16(), t, y)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.1


def test_config_round_trip_through_diffusers():
    ref, ours = pair(PIPELINE_TINY)
    d = ours.to_config()
    assert d["_class_name"] == "DiTTransformer2DModel"
    theirs = diffusers.DiTTransformer2DModel.from_config(d)
    assert {k: theirs.config[k] for k in d if not k.startswith("_")} == {k: v for k, v in d.items()
                                                                         if not k.startswith("_")}
    assert DiT.from_config(d).config == ours.config
    assert DiT.from_config(dict(theirs.config)).config == ours.config
    assert ours.learned_sigma and ours.num_classes == 1000 and ours.out_channels == 8
    assert not DiT(DiTConfig(**{**PIPELINE_TINY, "out_channels": None})).learned_sigma
    # reverie's loader builds on the meta device and loads every weight: nothing may be left uninitialised
    with torch.device("meta"):
        empty = DiT.from_config(d)
    empty.to_empty(device="cpu").load_state_dict(ref.state_dict(), strict=True)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([5, 600]), torch.tensor([2, 1000])
    with torch.no_grad():
        assert torch.equal(empty(x, t, y), ours(x, t, y))


def test_defaults_are_diffusers_defaults():
    theirs = diffusers.DiTTransformer2DModel.from_config({"num_layers": 1, "num_attention_heads": 1,
                                                          "attention_head_dim": 4})
    ours = DiTConfig(num_layers=1, num_attention_heads=1, attention_head_dim=4).to_dict()
    assert {k: theirs.config[k] for k in ours if not k.startswith("_")} == {k: v for k, v in ours.items()
                                                                            if not k.startswith("_")}


def test_transformer2d_config_loads():
    torch.manual_seed(0)
    legacy = diffusers.Transformer2DModel(**MODEL_TINY).eval()  # its own patched forward: a second reference
    d = {"_class_name": "Transformer2DModel", **dict(legacy.config)}
    assert type(diffusers.Transformer2DModel.from_config(d)).__name__ == "DiTTransformer2DModel"  # the remap
    ours = DiT.from_config(d).eval()
    ours.load_state_dict(legacy.state_dict(), strict=True)
    assert ours.to_config()["_class_name"] == "DiTTransformer2DModel"
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([7, 700]), torch.tensor([5, 8])
    with torch.no_grad():
        assert (ours(x, t, y) - legacy(x, timestep=t, class_labels=y).sample).abs().max() <= 1e-5
    xl = DiTConfig.from_dict(HUB_XL_2_256)
    assert (xl.inner_dim, xl.num_layers, xl.patch_size, xl.sample_size, xl.out_channels) == (1152, 28, 2, 32, 8)


@pytest.mark.parametrize("change,field", [
    ({"norm_type": "ada_norm"}, "norm_type"),
    ({"norm_type": "ada_norm_single"}, "norm_type"),
    ({"activation_fn": "geglu"}, "activation_fn"),
    ({"num_embeds_ada_norm": None}, "num_embeds_ada_norm"),
    ({"num_layers": 0}, "num_layers"),
    ({"patch_size": 0}, "patch_size"),
    ({"out_channels": 0}, "out_channels"),
    ({"dropout": 1.5}, "dropout"),
    ({"norm_eps": 0}, "norm_eps"),
    ({"attention_bias": "yes"}, "attention_bias"),
    ({"num_attention_heads": 3, "attention_head_dim": 3}, "num_attention_heads \\* attention_head_dim"),
    ({"_class_name": "UNet2DConditionModel"}, "_class_name"),
    ({"frobnicate": 3}, "frobnicate"),
    ({"cross_attention_dim": 64}, "cross_attention_dim"),
])
def test_bad_config_values_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        DiTConfig.from_dict({**MODEL_TINY, **change})


@pytest.mark.parametrize("change", [{"double_self_attention": True}, {"norm_type": "layer_norm"},
                                    {"attention_type": "gated"}, {"num_vector_embeds": 16}])
def test_transformer2d_config_that_is_not_a_dit_is_refused(change):
    d = {**HUB_XL_2_256, **change}
    with pytest.raises(ValueError, match=next(iter(change))):
        DiTConfig.from_dict(d)
    d = dict(HUB_XL_2_256)
    del d["norm_type"]  # Transformer2DModel's default norm_type is layer_norm: not a DiT
    with pytest.raises(ValueError, match="norm_type"):
        DiTConfig.from_dict(d)


@pytest.mark.parametrize("labels", [[0, -1], [9, 0], [0.0, 1.0]])
def test_labels_outside_the_table_are_refused(labels):
    _, ours = pair(MODEL_TINY)  # 8 classes + the null class 8
    with pytest.raises(ValueError, match="class_labels"):
        ours(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor(labels))


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 4, 8, 7), (4, 8, 8)])
def test_bad_latents_and_timesteps_are_refused(shape):
    _, ours = pair(MODEL_TINY)
    with pytest.raises(ValueError, match="x must be"):
        ours(torch.randn(*shape), torch.tensor([1, 2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="t must be"):
        ours(torch.randn(2, 4, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([0, 1]))
