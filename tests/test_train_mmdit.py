"""reverie's own rectified-flow MMDiT (reverie.families.mmdit, the train task "mmdit"): a tiny run learns, exports a
ReverieMMDiTPipeline folder that Pipeline.from_pretrained opens and samples with the flow samplers; the exported
weights are the EMA's; resume is bit-exact; the objective is FlowDenoiser's loss on the text encoder's states and
pooled state; the family encodes prompts exactly as training does."""

import json

import pytest
import torch

from reverie import Pipeline
from reverie.denoisers import FlowDenoiser
from reverie.train import load_config, train
from reverie.train.checkpoint import latest_checkpoint, load_checkpoint_dir

from test_train import Squares, assert_states_equal, first_and_last, unet_config, vae_dir  # noqa: F401


def mmdit_config(out, vae_dir, *overrides):
    """test_train's tiny unet run, as an mmdit run."""
    return unet_config(out, vae_dir, "--model.kind=mmdit", "--model.mmdit_preset=tiny", *overrides)


def test_mmdit_run_learns_and_exports_a_pipeline_that_generates(tmp_path, vae_dir):
    result = train(mmdit_config(tmp_path / "run", vae_dir, "--train.steps=30", "--optim.lr=3e-3"), dataset=Squares())
    first, last = first_and_last(result.losses)
    assert last < 0.85 * first, (first, last)
    index = json.loads((result.export / "model_index.json").read_text())
    assert index["_class_name"] == "ReverieMMDiTPipeline" and index["transformer"][1] == "SD3Transformer2DModel"
    assert "text_encoder_2" not in index
    pipe = Pipeline.from_pretrained(result.export)
    assert pipe.family.name == "mmdit" and pipe.sampling.kind == "flow"
    assert_states_equal(pipe.transformer.state_dict(), {k.removeprefix("transformer."): v
                                                        for k, v in result.ema_state.items()
                                                        if k.startswith("transformer.")})
    for sampler in (None, "dpmpp_2m", "heun"):  # the folder's FlowMatchEuler, and two others on the flow schedule
        out = pipe(["a red square on blue", "a green square on red"], steps=3, guidance_scale=3.0, width=16,
                   height=16, seed=[0, 1], sampler=sampler, progress=False)
        assert [im.size for im in out.images] == [(16, 16)] * 2 and torch.isfinite(out.latents).all()
        assert out.params["family"] == "mmdit"
    with pytest.raises(ValueError, match="clip_skip"):
        pipe("a red square", steps=1, clip_skip=1, width=16, height=16, progress=False)
    assert (tmp_path / "run" / "samples" / "step_00000030.png").is_file()


def test_mmdit_resume_is_bit_exact(tmp_path, vae_dir):
    make = lambda out: mmdit_config(out, vae_dir, "--train.steps=6", "--train.grad_accum=2",  # noqa: E731
                                    "--train.checkpoint_every=0", "--train.cond_dropout=0.5")
    whole = train(make(tmp_path / "whole"), dataset=Squares(n=10))
    first = train(make(tmp_path / "split"), dataset=Squares(n=10), stop_at_step=3)
    assert first.stopped and first.step == 3
    second = train(make(tmp_path / "split"), dataset=Squares(n=10), resume=True)
    assert second.losses == whole.losses[3:]
    assert_states_equal(second.state, whole.state)
    assert_states_equal(second.ema_state, whole.ema_state)
    a, _ = load_checkpoint_dir(latest_checkpoint(tmp_path / "whole" / "checkpoints"))
    b, _ = load_checkpoint_dir(latest_checkpoint(tmp_path / "split" / "checkpoints"))
    assert_states_equal(a["optimizer"], b["optimizer"])


def test_objective_is_the_flow_loss_on_the_pipelines_conditioning(tmp_path, vae_dir):
    """The training loss of an item equals FlowDenoiser.loss of the exported pipeline's transformer on the
    conditioning its family encodes for the caption: training and sampling read the text the same way."""
    from reverie.train.distributed import setup_distributed
    from reverie.train.tasks import MMDiTTask

    config = mmdit_config(tmp_path / "run", vae_dir, "--train.steps=1", "--train.cond_dropout=0")
    task = MMDiTTask(config, Squares(n=8), setup_distributed("cpu"), tmp_path / "run", resume=False)
    items = [(0, 1), (1, 6), (2, 3)]
    inputs = task.inputs(5, items)
    assert inputs["t"].shape == (3,) and ((0 < inputs["t"]) & (inputs["t"] < 1)).all()
    with torch.no_grad():
        loss = task.objective(**inputs)
        pipe = task.pipeline(task.objective)
        captions = [task.captions[i] for _, i in items]
        cond, _ = pipe.family.encode(pipe, captions, None, {})
        expected = FlowDenoiser(pipe.transformer).loss(inputs["latents"], sigma=inputs["t"], noise=inputs["noise"],
                                                       **cond)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    assert task.inputs(5, items[1:2])["t"] == inputs["t"][1]  # an item's draws do not depend on its batch


def test_bad_mmdit_settings_name_the_field(tmp_path, vae_dir):
    with pytest.raises(ValueError, match="model.mmdit_preset"):
        train(mmdit_config(tmp_path / "a", vae_dir, "--model.mmdit_preset=huge", "--train.steps=1"),
              dataset=Squares(n=4))
    with pytest.raises(ValueError, match="model.flow_shift"):
        mmdit_config(tmp_path / "b", vae_dir, "--model.flow_shift=-1")
