"""The lora training task (reverie.train.lora): adapters start as the base model and only they learn; a short run on
a tiny SD 1.x model exports kohya and PEFT files that reverie.lora reads back to the same weights, whose merge
gives the trained model's own outputs, and that diffusers loads (the PEFT file) to the same UNet weights."""

import json

import pytest
import torch
from test_lora import _inner, sub
from test_train import Squares
from tiny_families import sd_folder

from reverie import Pipeline
from reverie.lora import read_lora
from reverie.train import load_config, train
from reverie.train.lora import LoraLayer, add_lora_layers

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return sd_folder(tmp_path_factory.mktemp("base") / "sd")


def lora_config(out, base, *overrides):
    return load_config(None, ["--model.kind=lora", f"--model.base_model={base}", "--model.lora_rank=2",
                              "--model.lora_alpha=3", f"--train.output_dir={out}", "--train.batch_size=4",
                              "--optim.lr=5e-2", "--optim.warmup_steps=1", "--train.ema_decay=0.5",
                              "--log.progress=false", "--log.sample_every=0", "--train.steps=6", *overrides])


def test_adapters_start_as_the_base_and_only_they_get_gradients(base):
    pipe = Pipeline.from_pretrained(base)
    unet = pipe.unet
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    before = unet(x, t, ctx)
    attentions = [n for n, _ in unet.named_modules() if n.endswith(".to_q")]
    layers = add_lora_layers(unet.requires_grad_(False), ["to_q", "to_k", "to_v", "to_out.0"], 2, 2.0, "UNet")
    assert len(attentions) == 12 and len(layers) == 4 * len(attentions)  # self- and cross-attention of 6 blocks
    for layer in layers.values():
        layer.down.requires_grad_(True)
        layer.up.requires_grad_(True)
    after = unet(x, t, ctx)
    assert torch.equal(before, after)  # up starts at zero
    after.square().mean().backward()
    trained = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert trained and all(n.endswith(("down.weight", "up.weight")) for n in trained)
    with pytest.raises(ValueError, match="no UNet module"):
        add_lora_layers(unet, ["nothing_like_this"], 2, 2.0, "UNet")


def test_a_short_run_exports_both_formats_that_load_back(base, tmp_path):
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1"]  # attention and the resnets' 3x3 convs (LoCon)
    result = train(lora_config(tmp_path / "run", base, "--model.lora_text=true",
                               f"--model.lora_targets={json.dumps(targets)}"),
                   dataset=Squares(size=16))
    folder = result.export
    info = json.loads((folder / "lora.json").read_text())
    assert (info["rank"], info["alpha"], info["text_encoder"]) == (2, 3.0, True)
    kohya, peft = read_lora(folder / "lora.safetensors"), read_lora(folder / "pytorch_lora_weights.safetensors")
    assert any(k.startswith("lora_te_") for k in kohya.adapters) and any(k.startswith("unet.") for k in peft.adapters)

    # the trained (EMA) adapters, applied at forward time, from the run's last checkpoint-free state: rebuild
    # them from the kohya factors on a wrapped copy of the base
    merged = {}
    for file in ("lora.safetensors", "pytorch_lora_weights.safetensors"):
        pipe = Pipeline.from_pretrained(base)
        pipe.set_loras([(folder / file, 1.0)])
        merged[file] = pipe
    a, b = merged.values()
    for name, p in a.unet.named_parameters():
        assert torch.allclose(p, dict(b.unet.named_parameters())[name], atol=1e-6), name
    for name, p in a.text_encoder.named_parameters():
        assert torch.allclose(p, dict(b.text_encoder.named_parameters())[name], atol=1e-6), name
    fresh = Pipeline.from_pretrained(base).unet.parameters()
    assert any(not torch.equal(p, q) for p, q in zip(a.unet.parameters(), fresh))

    # merging equals running the adapters: wrap a fresh base with LoraLayer adapters holding the file's factors
    wrapped = Pipeline.from_pretrained(base).unet
    layers = add_lora_layers(wrapped, targets, 2, 3.0, "UNet")
    assert any(isinstance(layer.base, torch.nn.Conv2d) for layer in layers.values())
    for path, layer in layers.items():
        adapter = kohya.adapters[f"lora_unet_{path.replace('.', '_')}"]
        layer.down.weight.data.copy_(adapter.factors["down"].float())
        layer.up.weight.data.copy_(adapter.factors["up"].float())
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    assert torch.allclose(a.unet(x, t, ctx), wrapped(x, t, ctx), atol=1e-5)

    # diffusers reads the PEFT file (its lora_adapter_metadata alphas): the same fused UNet weights
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(base)
    theirs.load_lora_weights(str(folder / "pytorch_lora_weights.safetensors"))
    theirs.fuse_lora(lora_scale=1.0)
    theirs.unload_lora_weights()
    for path in layers:
        ours, their = sub(_inner(a.unet), path).weight, sub(theirs.unet, path).weight
        assert torch.allclose(ours, their, atol=2e-6), path


def test_lora_task_errors(base, tmp_path):
    with pytest.raises(ValueError, match="model.base_model"):
        train(lora_config(tmp_path / "a", ""), dataset=Squares())
    with pytest.raises(ValueError, match="model.lora_targets"):
        train(lora_config(tmp_path / "b", base, '--model.lora_targets=["norm1"]'), dataset=Squares())
    with pytest.raises(ValueError, match="lora_rank"):
        train(lora_config(tmp_path / "c", base, "--model.lora_rank=0"), dataset=Squares())
    assert isinstance(LoraLayer(torch.nn.Linear(3, 4), 2, 2.0).up, torch.nn.Linear)
