"""Latent consistency distillation (reverie.train.lcd, model.kind = "lcm"): the student starts as the teacher, the
teacher's guided DDIM step is diffusers' DDIMScheduler.step, a short run learns, exports a
LatentConsistencyModelPipeline folder that reverie opens and samples with "lcm", and resumes bit-exactly; bad
settings are refused. The teacher is a tiny unet run's export (test_train's Squares data and tiny VAE)."""

import json

import pytest
import torch

from reverie.formats import save_component
from reverie.models.unet import guidance_embedding
from reverie.models.vae import VAE_PRESETS, AutoencoderKL
from reverie.samplers.solvers import consistency_scalings
from reverie.schedules import DiscreteSchedule
from reverie.train import load_config, train
from reverie.train.checkpoint import latest_checkpoint, load_checkpoint_dir
from reverie.train.lcd import LCDObjective, guided_ddim_step, lcm_student, skipping_timesteps, x0_and_eps

from test_train import Squares, assert_states_equal, first_and_last, unet_config


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A 4-step tiny unet run's exported StableDiffusionPipeline folder (DDIM schedule, epsilon)."""
    root = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE_PRESETS["tiny"])
    save_component(root / "vae", vae.state_dict(), vae.to_config(), "diffusion_pytorch_model.safetensors")
    result = train(unet_config(root / "run", root / "vae", "--train.steps=4", "--optim.lr=3e-3"), dataset=Squares())
    return result.export


def lcm_config(out, teacher, *overrides):
    return load_config(None, ["--model.kind=lcm", f"--model.base_model={teacher}", "--model.lcm_w_embedding_dim=32",
                              f"--train.output_dir={out}", "--train.batch_size=4", "--optim.lr=1e-3",
                              "--optim.warmup_steps=2", "--train.ema_decay=0.9", "--train.cond_dropout=0",
                              "--log.progress=false", "--log.sample_every=0", "--log.sample_count=2",
                              "--log.sample_steps=2", "--log.sample_sampler=lcm", *overrides])


def teacher_parts(teacher_dir):
    from reverie.loading import load_folder

    unet, _, text_encoder, scheduler_config = load_folder(teacher_dir)
    return unet.eval(), text_encoder, DiscreteSchedule.from_config(scheduler_config)


# --------------------------------------------------------------------------------------------- the math


def test_the_student_starts_as_the_teacher_for_every_w(teacher_dir):
    """cond_proj starts at zero: the student's consistency output f(x, w, t) = c_skip x + c_out x0_teacher(x, t)
    whatever w, at skipping-step timesteps of both ends and the middle, for a batch of captions."""
    teacher, text_encoder, schedule = teacher_parts(teacher_dir)
    student = lcm_student(teacher, 32).eval()
    objective = LCDObjective(student, teacher, schedule)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = objective.timesteps[torch.tensor([0, 24, 49])]  # 19, 499, 999
    assert t.tolist() == [19, 499, 999]
    a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    context = text_encoder.encode(["a red square on blue", "a green square on red", ""])
    with torch.no_grad():
        x0, _ = x0_and_eps(teacher(x, t, context), x, a, "epsilon")
        c_skip, c_out = consistency_scalings(t.double())
        want = c_skip.view(-1, 1, 1, 1).float() * x + c_out.view(-1, 1, 1, 1).float() * x0
        for w in ([0.0, 0.0, 0.0], [3.0, 7.5, 15.0]):
            got = objective.consistency(student, x, t, a, context, guidance_embedding(torch.tensor(w), 32))
            assert torch.equal(got, want)
        student.time_embedding.cond_proj.weight.normal_()  # the invariant is the zero init, not the architecture
        moved = objective.consistency(student, x, t, a, context, guidance_embedding(torch.tensor([3.0] * 3), 32))
        assert (moved - want).abs().max() > 1e-3


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_the_guided_teacher_step_is_ddim_schedulers_step(prediction):
    """DDIM with trailing spacing at 50 steps visits the skipping-step schedule (999, 979, .., 19) and steps
    t -> t - 20; from 19 it lands on alphabar_0 (set_alpha_to_one=False), LCD's clamp to t = 0. One guided model
    output out_u + (w + 1)(out_c - out_u) there equals LCD's guidance of x0 and eps separately."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, timestep_spacing="trailing", prediction_type=prediction)
    scheduler.set_timesteps(50)
    schedule = DiscreteSchedule.from_config(dict(scheduler.config))
    timesteps = skipping_timesteps(1000, 50)
    assert scheduler.timesteps.tolist() == timesteps.flip(0).tolist()
    g = torch.Generator().manual_seed(0)
    for t in (999, 499, 19):
        x, out_c, out_u = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
        w = 6.5
        want = scheduler.step(out_u + (w + 1) * (out_c - out_u), t, x).prev_sample
        t_prev = max(t - 20, 0)
        a, a_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod[t_prev]
        got = guided_ddim_step(x, out_c, out_u, torch.tensor(w), a, a_prev, prediction)
        assert (got - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item()), t


# --------------------------------------------------------------------------------------------- runs


def test_a_short_run_learns_and_exports_an_lcm_pipeline(tmp_path, teacher_dir):
    from reverie import Pipeline

    config = lcm_config(tmp_path / "run", teacher_dir, "--train.steps=24", "--train.lcm_target_decay=0.5")
    result = train(config, dataset=Squares())
    first, last = first_and_last(result.losses, 8)
    assert last < 0.8 * first, (first, last)
    assert result.state.keys() >= {"student.conv_in.weight", "target.conv_in.weight"}
    assert not any(k.startswith("teacher") for k in result.state)  # the frozen teacher is in no checkpoint

    index = json.loads((result.export / "model_index.json").read_text())
    assert index["_class_name"] == "LatentConsistencyModelPipeline"
    scheduler = json.loads((result.export / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler" and scheduler["original_inference_steps"] == 50
    pipe = Pipeline.from_pretrained(result.export)
    assert pipe.family.name == "sd" and pipe.unet.config.time_cond_proj_dim == 32
    assert_states_equal(pipe.unet.state_dict(), {k.removeprefix("student."): v for k, v in result.ema_state.items()
                                                 if k.startswith("student.")})
    four = pipe("a red square on blue", width=16, height=16, seed=0, progress=False)  # the family's LCM defaults
    assert (four.params["steps"], four.params["guidance_scale"], four.params["sampler"]) == (4, 8.5, "lcm")
    one = pipe("a red square on blue", steps=1, width=16, height=16, seed=0, progress=False)
    for out in (one, four):
        assert out.images[0].size == (16, 16) and torch.isfinite(out.latents).all()
    assert not torch.equal(one.latents, four.latents)
    assert pipe.unet.time_embedding.cond_proj.weight.abs().max() > 0  # the student learned to use w

    # diffusers opens the folder as its own LCM pipeline and samples the same latents (its last x0 estimate)
    from diffusers import LatentConsistencyModelPipeline

    theirs = LatentConsistencyModelPipeline.from_pretrained(result.export, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    assert type(theirs.scheduler).__name__ == "LCMScheduler"
    want = theirs("a red square on blue", num_inference_steps=4, guidance_scale=8.5, height=16, width=16,
                  output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert (four.latents - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())
    assert (tmp_path / "run" / "samples" / "step_00000024.png").is_file()


@pytest.mark.parametrize("loss", ["huber", "l2"])
def test_resume_is_bit_exact(tmp_path, teacher_dir, loss):
    extra = ["--train.steps=4", "--train.grad_accum=2", "--train.checkpoint_every=0", f"--train.lcm_loss={loss}",
             "--train.cond_dropout=0.5"]
    whole = train(lcm_config(tmp_path / "whole", teacher_dir, *extra), dataset=Squares(n=6))
    first = train(lcm_config(tmp_path / "split", teacher_dir, *extra), dataset=Squares(n=6), stop_at_step=2)
    assert first.stopped and first.step == 2
    second = train(lcm_config(tmp_path / "split", teacher_dir, *extra), dataset=Squares(n=6), resume=True)
    assert second.losses == whole.losses[2:]
    assert_states_equal(second.state, whole.state)  # student and target
    assert_states_equal(second.ema_state, whole.ema_state)
    (a, _), (b, _) = (load_checkpoint_dir(latest_checkpoint(tmp_path / name / "checkpoints"))
                      for name in ("whole", "split"))
    assert_states_equal(a["optimizer"], b["optimizer"])
    # the target moved off the student (an EMA of it), and the student off the teacher
    state = whole.state
    assert not torch.equal(state["target.conv_in.weight"], state["student.conv_in.weight"])


def test_the_target_is_an_ema_of_the_student_updated_once_per_step(tmp_path, teacher_dir):
    """theta^- <- mu theta^- + (1 - mu) theta once per optimizer step (not per micro-batch), from the student the
    previous step left: after 2 steps the target is lerp(init, student after step 1, 1 - mu)."""
    extra = ["--train.grad_accum=2", "--train.lcm_target_decay=0.7", "--train.checkpoint_every=0"]
    one = train(lcm_config(tmp_path / "one", teacher_dir, "--train.steps=1", *extra), dataset=Squares(n=4))
    two = train(lcm_config(tmp_path / "two", teacher_dir, "--train.steps=2", *extra), dataset=Squares(n=4))
    init = lcm_student(teacher_parts(teacher_dir)[0], 32).state_dict()
    assert_states_equal({k: one.state[f"target.{k}"] for k in init}, init)  # step 1: the student had not moved
    assert_states_equal({k: two.state[f"target.{k}"] for k in init},
                        {k: torch.lerp(v, one.state[f"student.{k}"], 1 - 0.7) for k, v in init.items()})


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("override, message", [
    ("--train.lcm_loss=l1", r"train.lcm_loss must be one of 'huber', 'l2'"),
    ("--train.lcm_w_min=20", r"train.lcm_w_min \(20.0\) must be <= train.lcm_w_max \(15.0\)"),
    ("--train.lcm_w_max=-1", r"train.lcm_w_max must be in \[0, inf\]"),
    ("--train.lcm_huber_c=0", r"train.lcm_huber_c must be a finite number > 0"),
    ("--train.lcm_target_decay=1.5", r"train.lcm_target_decay must be in \[0, 1\]"),
    ("--model.lcm_w_embedding_dim=0", r"model.lcm_w_embedding_dim must be >= 1"),
])
def test_bad_settings_raise_naming_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["--model.kind=lcm", override])


def test_an_lcm_run_needs_a_base_model_that_is_not_already_an_lcm(tmp_path, teacher_dir):
    with pytest.raises(ValueError, match="model.base_model: an lcm run needs"):
        train(lcm_config(tmp_path / "none", "", "--train.steps=1"), dataset=Squares(n=4))
    first = train(lcm_config(tmp_path / "lcm", teacher_dir, "--train.steps=1"), dataset=Squares(n=4))
    with pytest.raises(ValueError, match="model.base_model: .* is already an LCM"):
        train(lcm_config(tmp_path / "again", first.export, "--train.steps=1"), dataset=Squares(n=4))
