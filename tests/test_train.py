"""The training loop: tiny VAE and latent-diffusion runs learn and export; resume is bit-exact; non-finite losses are
skipped and stop the run; checkpoints are never half-written; two gloo processes equal one; configs are checked.

The data set is a tiny in-test one with reverie.data's interface ({"image": (3, H, W) in [-1, 1], "caption": str}).
"""

import argparse
import json
import math
import multiprocessing
import os
import random
import socket

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from reverie.formats import load_safetensors, save_component
from reverie.models.vae import VAE_PRESETS, AutoencoderKL
from reverie.train import NonFiniteLossError, load_config, train
from reverie.train import checkpoint as checkpoint_module
from reverie.train.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint_dir, rng_state,
                                      set_rng_state)
from reverie.train.cli import add_train_parser, parse_args
from reverie.train.cli import main as cli_main

COLORS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "yellow": (1.0, 1.0, -1.0)}


class Squares(Dataset):
    """A colored square at a random place on a dim colored background, captioned "a red square on blue"."""

    def __init__(self, n=16, size=16, seed=0, nan_items=()):
        g = torch.Generator().manual_seed(seed)
        names = list(COLORS)
        self.items = []
        for i in range(n):
            fg, bg = names[i % 4], names[(i // 4) % 4]
            image = 0.3 * torch.tensor(COLORS[bg]).view(3, 1, 1).expand(3, size, size).clone()
            s = size // 2
            x, y = torch.randint(0, size - s + 1, (2,), generator=g).tolist()
            image[:, y:y + s, x:x + s] = torch.tensor(COLORS[fg]).view(3, 1, 1)
            if i in nan_items:
                image[0, 0, 0] = float("nan")
            self.items.append({"image": image, "caption": f"a {fg} square on {bg}"})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def vae_config(out, *overrides):
    return load_config(None, ["--model.kind=vae", "--model.vae_preset=tiny", f"--train.output_dir={out}",
                              "--train.batch_size=4", "--optim.lr=2e-3", "--optim.warmup_steps=2",
                              "--train.ema_decay=0.9", "--log.progress=false", "--log.sample_every=0",
                              "--log.sample_count=2", *overrides])


def unet_config(out, vae_dir, *overrides):
    return load_config(None, ["--model.kind=unet", f"--model.vae_path={vae_dir}", "--model.unet_preset=tiny",
                              "--model.text_hidden_size=16", "--model.text_layers=1", "--model.text_heads=2",
                              "--model.text_max_length=12", "--model.vocab_size=600", f"--train.output_dir={out}",
                              "--train.batch_size=4", "--optim.lr=2e-3", "--optim.warmup_steps=2",
                              "--train.ema_decay=0.9", "--log.progress=false", "--log.sample_every=0",
                              "--log.sample_count=2", "--log.sample_steps=2", *overrides])


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A random tiny VAE as a diffusers vae/ component folder (the frozen VAE of the unet runs)."""
    path = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE_PRESETS["tiny"])
    save_component(path, vae.state_dict(), vae.to_config(), "diffusion_pytorch_model.safetensors")
    return path


def assert_states_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def first_and_last(losses, n=5):
    values = [loss for _, loss in losses]
    return sum(values[:n]) / n, sum(values[-n:]) / n


# --------------------------------------------------------------------------------------------- configs


def test_config_files_and_dotted_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[model]\nkind = "vae"\n[optim]\nlr = 1e-3\nbetas = [0.9, 0.99]\n[data.options]\nsize = 32\n')
    config = load_config(toml, ["--optim.lr=2e-4", "--train.steps", "100", "--data.options.colors=3",
                                "--train.min_snr_gamma=none", "--log.sample_prompts=a cat,a dog", "--log.progress=no"])
    assert config.model.kind == "vae" and config.optim.betas == (0.9, 0.99)
    assert config.optim.lr == 2e-4 and isinstance(config.optim.lr, float)
    assert config.train.steps == 100 and config.data.options == {"size": 32, "colors": 3}
    assert config.train.min_snr_gamma is None and config.log.sample_prompts == ["a cat", "a dog"]
    assert config.log.progress is False
    js = tmp_path / "run.json"
    js.write_text(json.dumps(config.to_dict()))
    assert load_config(js) == config  # a resolved config round-trips through JSON
    assert load_config(None, ["--train.min_snr_gamma=5"]).train.min_snr_gamma == 5.0


@pytest.mark.parametrize("override, message", [
    ("--optim.lrr=1", r"unknown config key 'optim.lrr'; valid: .*optim.lr,"),
    ("--optimizer.lr=1", r"unknown config section 'optimizer'; valid: data, log, model, optim, train"),
    ("--train.steps=1.5", r"train.steps must be int"),
    ("--optim.lr=fast", r"optim.lr must be float"),
    ("--log.progress=maybe", r"log.progress must be bool"),
    ("--optim.betas=0.9,0.99,0.5", r"optim.betas must be tuple\[float, float\]"),
    ("--model.kind=gan", r"model.kind must be one of 'vae', 'unet'"),
    ("--train.steps=0", r"train.steps must be >= 1"),
    ("--train.cond_dropout=1.5", r"train.cond_dropout must be in \[0, 1\]"),
    ("--optim.lr", r"has no value"),
])
def test_bad_overrides_raise_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_bad_file_keys_and_types_raise(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train": {"stepz": 3}}))
    with pytest.raises(ValueError, match=r"unknown key in section \[train\] 'train.stepz'; valid: .*train.steps"):
        load_config(path)
    path.write_text(json.dumps({"optim": {"lr": "1e-4"}}))
    with pytest.raises(ValueError, match="optim.lr must be float; got str"):
        load_config(path)
    path.write_text(json.dumps({"train": {"steps": True}}))
    with pytest.raises(ValueError, match="train.steps must be int; got bool"):
        load_config(path)


def test_cli_prints_the_resolved_config_and_reports_bad_keys(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"kind": "vae"}}))
    assert cli_main([str(path), "--print-config", "--train.steps=7", "--data.options.size=64"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["steps"] == 7 and printed["data"]["options"] == {"size": 64}
    assert cli_main([str(path), "--train.stepz=7"]) == 2
    assert "unknown config key 'train.stepz'" in capsys.readouterr().err


def test_train_subcommand_in_a_parent_parser():
    """How reverie.cli hooks it in: add_train_parser(subparsers), then parse_args(parser, argv)."""
    parser = argparse.ArgumentParser(prog="reverie")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("samplers")
    add_train_parser(sub)
    args = parse_args(parser, ["train", "c.toml", "--optim.lr=2e-4", "--resume", "--train.steps", "100"])
    assert (args.config, args.resume, args.resume_from) == ("c.toml", True, None)
    assert args.overrides == ["--optim.lr=2e-4", "--train.steps", "100"]
    with pytest.raises(SystemExit):  # other commands still reject unknown arguments
        parse_args(parser, ["samplers", "--optim.lr=2e-4"])


# --------------------------------------------------------------------------------------------- runs


def test_vae_run_learns_and_exports_a_vae_folder(tmp_path):
    config = vae_config(tmp_path / "run", "--train.steps=30", "--log.sample_every=15")
    result = train(config, dataset=Squares())
    first, last = first_and_last(result.losses)
    assert last < 0.9 * first, (first, last)
    assert result.step == 30 and result.skipped == 0 and not result.stopped
    samples = sorted(p.name for p in (tmp_path / "run" / "samples").iterdir())
    assert samples == ["step_00000015.png", "step_00000030.png"]
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss,lr") and len(rows) == 1 + 3  # every 10 steps
    # the export is the EMA VAE in diffusers' component layout, with a measured scaling factor
    exported = load_safetensors(result.export / "diffusion_pytorch_model.safetensors")
    assert_states_equal(exported, {k.removeprefix("vae."): v for k, v in result.ema_state.items()})
    config_json = json.loads((result.export / "config.json").read_text())
    assert config_json["_class_name"] == "AutoencoderKL" and config_json["scaling_factor"] != 0.18215


def test_unet_run_learns_and_exports_a_pipeline_that_generates(tmp_path, vae_dir):
    from reverie import Pipeline

    config = unet_config(tmp_path / "run", vae_dir, "--train.steps=30", "--optim.lr=3e-3")
    result = train(config, dataset=Squares())
    first, last = first_and_last(result.losses)
    assert last < 0.85 * first, (first, last)
    pipe = Pipeline.from_pretrained(result.export)
    assert_states_equal(pipe.unet.state_dict(), {k.removeprefix("unet."): v for k, v in result.ema_state.items()
                                                 if k.startswith("unet.")})
    out = pipe("a red square on blue", steps=3, guidance_scale=3.0, width=16, height=16, seed=0, progress=False)
    assert out.images[0].size == (16, 16) and torch.isfinite(out.latents).all()
    assert (tmp_path / "run" / "samples" / "step_00000030.png").is_file()  # the final grid


# --------------------------------------------------------------------------------------------- resume


def final_checkpoint(out):
    return load_checkpoint_dir(latest_checkpoint(out / "checkpoints"))


@pytest.mark.parametrize("kind", ["vae", "unet"])
def test_resume_is_bit_exact(tmp_path, vae_dir, kind):
    extra = ["--train.steps=6", "--train.grad_accum=2", "--optim.warmup_steps=2", "--train.checkpoint_every=0"]
    if kind == "unet":
        extra += ["--train.cond_dropout=0.5", "--train.min_snr_gamma=5", "--train.offset_noise=0.1",
                  "--model.prediction=v_prediction"]
        make = lambda out: unet_config(out, vae_dir, *extra)
    else:
        make = lambda out: vae_config(out, *extra)
    whole = train(make(tmp_path / "whole"), dataset=Squares(n=10))  # 6 steps of 4 from 10 items: epochs straddle
    first = train(make(tmp_path / "split"), dataset=Squares(n=10), stop_at_step=3)
    assert first.stopped and first.step == 3 and first.export is None
    assert [c.name for c in list_checkpoints(tmp_path / "split" / "checkpoints")] == ["step_00000003"]
    second = train(make(tmp_path / "split"), dataset=Squares(n=10), resume=True)
    assert second.step == 6 and [s for s, _ in second.losses] == [4, 5, 6]
    assert second.losses == whole.losses[3:]
    assert_states_equal(second.state, whole.state)
    assert_states_equal(second.ema_state, whole.ema_state)
    (a, a_state), (b, b_state) = final_checkpoint(tmp_path / "whole"), final_checkpoint(tmp_path / "split")
    assert_states_equal(a["optimizer"], b["optimizer"])
    assert a_state["scheduler"] == b_state["scheduler"] and a_state["epoch"] == b_state["epoch"] == 2


def test_resume_accepts_checkpoints_written_before_a_setting_existed(tmp_path):
    """A setting added to reverie later (absent from an old checkpoint's config) takes its default on resume;
    a setting that really differs is still refused."""
    out = tmp_path / "run"
    train(vae_config(out, "--train.steps=2", "--train.checkpoint_every=0"), dataset=Squares(n=4))
    state_file = latest_checkpoint(out / "checkpoints") / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["model"]["text_layers"]  # as if written before model.text_layers existed
    state_file.write_text(json.dumps(state))
    assert train(vae_config(out, "--train.steps=3"), dataset=Squares(n=4), resume=True).step == 3
    with pytest.raises(ValueError, match=r"other model settings \(model.text_layers\)"):
        train(vae_config(out, "--train.steps=4", "--model.text_layers=2"), dataset=Squares(n=4), resume=True)


def test_a_time_limit_finishes_the_run_early_with_a_checkpoint_and_an_export(tmp_path, capsys):
    """train.time_limit_minutes: the run ends at the first step past the limit like a finished run (checkpoint,
    export), not like a SIGTERM (checkpoint only); a resume continues the same schedule."""
    out = tmp_path / "run"
    result = train(vae_config(out, "--train.steps=50", "--train.time_limit_minutes=1e-9",
                              "--train.checkpoint_every=0"), dataset=Squares(n=4))
    assert result.step == 1 and not result.stopped
    assert result.export is not None and (result.export / "config.json").is_file()
    assert latest_checkpoint(out / "checkpoints").name.endswith("00000001")
    printed = capsys.readouterr()
    assert "train.time_limit_minutes=1e-09 reached at step 1 of 50" in printed.out + printed.err
    again = train(vae_config(out, "--train.steps=3"), dataset=Squares(n=4), resume=True)
    assert again.step == 3
    with pytest.raises(ValueError, match="train.time_limit_minutes must be >= 0"):
        vae_config(out, "--train.time_limit_minutes=-1")


def test_images_that_the_vae_cannot_divide_are_refused_with_the_sizes(tmp_path, vae_dir):
    with pytest.raises(ValueError, match=r"images are 17x17, not multiples of the VAE's downsample factor \d+ "
                                         r"\(model.vae_preset='tiny'\)"):
        train(vae_config(tmp_path / "vae", "--train.steps=1"), dataset=Squares(n=4, size=17))
    with pytest.raises(ValueError, match=r"images are 17x17, not multiples of the VAE's downsample factor \d+$"):
        train(unet_config(tmp_path / "unet", vae_dir, "--train.steps=1"), dataset=Squares(n=4, size=17))


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # from inside torch.compile
def test_a_compiled_run_computes_the_eager_losses_and_saves_the_same_names(tmp_path):
    eager = train(vae_config(tmp_path / "eager", "--train.steps=2"), dataset=Squares(n=4))
    compiled = train(vae_config(tmp_path / "compiled", "--train.steps=2", "--train.compile=true"),
                     dataset=Squares(n=4))
    assert compiled.state.keys() == eager.state.keys()  # no compile wrapper in the saved names
    # step 1 starts from the same weights; after that AdamW's sign-like first updates amplify rounding
    assert math.isclose(compiled.losses[0][1], eager.losses[0][1], rel_tol=1e-4)
    assert all(math.isfinite(loss) for _, loss in compiled.losses)


def test_fresh_run_refuses_an_output_dir_with_checkpoints(tmp_path):
    train(vae_config(tmp_path / "run", "--train.steps=1"), dataset=Squares(n=4))
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        train(vae_config(tmp_path / "run", "--train.steps=2"), dataset=Squares(n=4))


# --------------------------------------------------------------------------------------------- non-finite losses


def test_nonfinite_losses_are_skipped_counted_and_logged(tmp_path):
    # 8 items, 4 per step: the NaN item is in exactly one of the two steps of each epoch
    result = train(vae_config(tmp_path / "run", "--train.steps=6", "--train.max_nonfinite=3", "--log.every=100"),
                   dataset=Squares(n=8, nan_items=(5,)))
    assert result.step == 6 and result.skipped == 3
    assert sum(1 for _, loss in result.losses if math.isnan(loss)) == 3
    assert all(torch.isfinite(v).all() for v in result.state.values() if v.is_floating_point())
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]
    assert sum(row.split(",")[6] == "1" for row in rows) == 3  # every skipped step gets a row


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # the sample grid of NaN images
def test_a_skipped_step_changes_nothing(tmp_path):
    result = train(vae_config(tmp_path / "run", "--train.steps=2", "--train.max_nonfinite=5"),
                   dataset=Squares(n=4, nan_items=(0, 1, 2, 3)))
    assert result.skipped == 2
    # no optimizer step (not even weight decay) and no EMA update: the weights are still their EMA copy
    assert_states_equal(result.state, result.ema_state)


def test_k_nonfinite_losses_in_a_row_stop_the_run(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"non-finite for 3 steps in a row \(steps 1..3"):
        train(vae_config(tmp_path / "run", "--train.steps=10", "--train.max_nonfinite=3"),
              dataset=Squares(n=4, nan_items=(0,)))


# --------------------------------------------------------------------------------------------- checkpoints


def test_rng_states_round_trip_through_safetensors_and_json(tmp_path):
    from reverie.formats import save_safetensors

    np.random.randn()  # leaves a cached Gaussian in numpy's state
    tensors, meta = rng_state()
    save_safetensors(tensors, tmp_path / "rng.safetensors")
    (tmp_path / "rng.json").write_text(json.dumps(meta))
    expected = (torch.rand(4), np.random.randn(4), random.random())
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    set_rng_state(load_safetensors(tmp_path / "rng.safetensors"), json.loads((tmp_path / "rng.json").read_text()))
    again = (torch.rand(4), np.random.randn(4), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_an_interrupted_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    real_save = checkpoint_module.save_safetensors

    def crash_at_step_4(tensors, path, metadata=None):
        if path.name == "optimizer.safetensors" and "step_00000004" in str(path.parent):
            path.write_bytes(b"half a file")  # what a crash mid-write leaves
            raise KeyboardInterrupt("simulated crash during a checkpoint save")
        return real_save(tensors, path, metadata)

    monkeypatch.setattr(checkpoint_module, "save_safetensors", crash_at_step_4)
    config = vae_config(tmp_path / "run", "--train.steps=4", "--train.checkpoint_every=2")
    with pytest.raises(KeyboardInterrupt):
        train(config, dataset=Squares(n=8))
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]  # no partial dir, no temp dir
    assert latest_checkpoint(root).name == "step_00000002"
    monkeypatch.setattr(checkpoint_module, "save_safetensors", real_save)

    # a SIGKILL leaves its temp dir behind: it is ignored and cleaned, and the run resumes from step 2
    leftover = root / ".tmp-step_00000004-dead"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    resumed = train(config, dataset=Squares(n=8), resume=True)
    assert [s for s, _ in resumed.losses] == [3, 4] and not leftover.exists()
    uninterrupted = train(vae_config(tmp_path / "clean", "--train.steps=4"), dataset=Squares(n=8))
    assert_states_equal(resumed.state, uninterrupted.state)


# --------------------------------------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, config, out: str):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), GLOO_SOCKET_IFNAME="lo")
    from reverie.formats import save_safetensors

    result = train(config, dataset=Squares(n=12))
    save_safetensors(result.state, os.path.join(out, f"rank{rank}.safetensors"))


def test_two_gloo_processes_equal_one_process_on_the_combined_batch(tmp_path, vae_dir):
    # eps = 1 makes AdamW's step about lr * gradient (not its sign), and no clipping: a wrong sum-vs-mean scaling of
    # the gradient over processes or micro-batches shows up in the weights
    common = ["--train.steps=3", "--train.batch_size=8", "--optim.eps=1.0", "--optim.grad_clip=0", "--optim.lr=5e-2",
              "--optim.warmup_steps=0", "--train.cond_dropout=0.3"]
    single = train(unet_config(tmp_path / "single", vae_dir, *common), dataset=Squares(n=12))

    ddp_config = unet_config(tmp_path / "ddp", vae_dir, *common, "--train.grad_accum=2")
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(rank, 2, port, ddp_config, str(tmp_path))) for rank in range(2)]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    rank0, rank1 = (load_safetensors(tmp_path / f"rank{r}.safetensors") for r in range(2))
    assert_states_equal(rank0, rank1)  # DDP keeps the processes identical
    assert rank0.keys() == single.state.keys()
    diff = max((rank0[k].float() - single.state[k].float()).abs().max().item() for k in rank0)
    assert diff <= 1e-6, diff


def test_a_vae_run_with_vae_path_fine_tunes_that_vae(tmp_path):
    """model.vae_path on a vae run starts from those weights (fine-tuning, e.g. the shapes VAE on emoji)."""
    torch.manual_seed(123)  # not the run's own seed, so a fresh init would differ
    vae = AutoencoderKL(VAE_PRESETS["tiny"])
    save_component(tmp_path / "start", vae.state_dict(), vae.to_config(), "diffusion_pytorch_model.safetensors")
    config = vae_config(tmp_path / "run", "--train.steps=1", f"--model.vae_path={tmp_path / 'start'}",
                        "--optim.lr=1e-9", "--train.ema_decay=0")
    ema = {k.removeprefix("vae."): v for k, v in train(config, dataset=Squares()).ema_state.items()}
    start = vae.state_dict()
    assert ema.keys() == start.keys()
    assert max((ema[k] - start[k]).abs().max().item() for k in start) < 1e-6  # one step at lr 1e-9 from there


# --------------------------------------------------------------------------------------------- frozen sentence encoder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A random tiny BERT with a WordPiece tokenizer, laid out as sentence-transformers ships all-MiniLM-L6-v2
    (config.json, model.safetensors and the tokenizer files in one folder)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "on", "square", *COLORS, "crimson"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=48, max_position_embeddings=64)).save_pretrained(path)
    return path


def test_a_unet_learns_from_a_frozen_bert_encoder_through_a_text_projection(tmp_path, vae_dir, bert_dir):
    """model.text_encoder_path = a BERT-family folder: frozen, its 24-wide token states projected to the UNet's
    cross-attention width (model.text_hidden_size) by diffusers' encoder_hid_proj; model.unet_init starts from a
    trained UNet of that width (the projection starts fresh). The exported folder opens and generates."""
    from reverie import Pipeline
    from reverie.models.text import TextEncoder

    clip = train(unet_config(tmp_path / "clip", vae_dir, "--train.steps=2"), dataset=Squares())
    config = unet_config(tmp_path / "bert", vae_dir, f"--model.text_encoder_path={bert_dir}",
                         "--model.train_text_encoder=false", f"--model.unet_init={clip.export}", "--train.steps=2",
                         "--optim.lr=1e-12", "--optim.weight_decay=0")
    result = train(config, dataset=Squares())
    pipe = Pipeline.from_pretrained(result.export)
    assert type(pipe.text_encoder.text_model).__name__ == "BertModel" and pipe.text_encoder.max_length == 12
    assert pipe.unet.config.encoder_hid_dim == 24 and pipe.unet.config.cross_attention_dim == 16
    before = Pipeline.from_pretrained(clip.export).unet.state_dict()
    after = pipe.unet.state_dict()
    assert set(after) - set(before) == {"encoder_hid_proj.weight", "encoder_hid_proj.bias"}
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=1e-9) for k in before)  # lr ~0: still the init
    frozen = TextEncoder.from_pretrained(bert_dir, bert_dir)
    assert_states_equal(pipe.text_encoder.text_model.state_dict(), frozen.text_model.state_dict())
    ids = pipe.text_encoder.tokenize("a crimson square")
    assert ids[0, 0, :5].tolist() == [2, 5, 12, 7, 3] and (ids[0, 0, 5:] == 0).all()  # [CLS] ... [SEP] [PAD]...
    out = pipe("a crimson square", steps=2, width=16, height=16, seed=0, progress=False)
    assert out.images[0].size == (16, 16) and torch.isfinite(out.latents).all()
    with pytest.raises(ValueError, match="clip_skip"):
        pipe.text_encoder.encode("a red square", clip_skip=1)
    with pytest.raises(ValueError, match="unet_init"):
        train(unet_config(tmp_path / "misfit", vae_dir, f"--model.unet_init={clip.export}",
                          "--model.text_hidden_size=32", "--train.steps=1"), dataset=Squares())
