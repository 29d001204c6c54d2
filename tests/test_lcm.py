"""Latent Consistency Models (Luo et al. 2023) against diffusers: LCMScheduler's timesteps, the `lcm` sampler's
trajectory step by step, the UNet's guidance-scale conditioning (time_cond_proj_dim), and the images of a tiny
LatentConsistencyModelPipeline opened with reverie's Pipeline (diffusers is a test-only dependency)."""

import numpy as np
import pytest
import torch

from reverie import DiscreteDenoiser, DiscreteSchedule, Pipeline, resolve
from reverie.models.unet import UNET_PRESETS, UNet, UNetConfig, guidance_embedding
from reverie.samplers import SAMPLERS
from reverie.samplers.solvers import consistency_scalings
from reverie.schedules import lcm_timesteps

diffusers = pytest.importorskip("diffusers")

from tiny_families import PROMPTS, assert_same_images, clip_tokenizer, pixels, theirs_pixels  # noqa: E402

LCM_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False)  # diffusers' LCM pipeline test


# --- timesteps ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("original", [50, 25])
def test_timesteps_are_lcm_schedulers(steps, spacing, original):
    config = dict(LCM_CONFIG, timestep_spacing=spacing, steps_offset=1, original_inference_steps=original)
    scheduler = diffusers.LCMScheduler(**config)
    scheduler.set_timesteps(steps)
    schedule = DiscreteSchedule.from_config(dict(scheduler.config))
    sigmas = schedule.sampling_sigmas(steps, family="lcm")
    t = schedule.sigma_to_t(sigmas[:-1].double(), schedule.timestep_mapping(family="lcm"))
    assert t.tolist() == scheduler.timesteps.tolist()
    alphabar = scheduler.alphas_cumprod[scheduler.timesteps]
    torch.testing.assert_close(sigmas[:-1], ((1 - alphabar) / alphabar).sqrt(), rtol=1e-6, atol=0)
    assert sigmas[-1] == 0  # the last step returns the consistency function's x0 estimate
    # LCMScheduler starts from unit noise in VP space: sqrt(1 + sigma^2) in VE
    assert schedule.initial_noise_scale(sigmas[0].item(), "lcm") == pytest.approx((1 + sigmas[0].item() ** 2) ** 0.5)


@pytest.mark.parametrize("strength", [1.0, 0.8, 0.5, 0.3])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_img2img_timesteps_are_lcm_schedulers(steps, strength):
    scheduler = diffusers.LCMScheduler(**LCM_CONFIG)
    scheduler.set_timesteps(steps, strength=strength)
    assert lcm_timesteps(steps, strength=strength).tolist() == scheduler.timesteps.tolist()


# --- the sampler ----------------------------------------------------------------------------------------------


def run_diffusers(config, net, noise, steps, seed):
    """LCMScheduler.step on the network's outputs: the VP samples before each step and the last x0 estimate."""
    scheduler = diffusers.LCMScheduler(**config)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x, states, denoised = noise * scheduler.init_noise_sigma, [], []
    for t in scheduler.timesteps:
        states.append(x)
        x, d = scheduler.step(net(x, t), t, x, generator=generator, return_dict=False)
        denoised.append(d)
    return states, denoised, x


def run_reverie(config, net, noise, steps, generator, **options):
    schedule = DiscreteSchedule.from_config(config)
    choice = resolve("lcm")
    sigmas = schedule.sampling_sigmas(steps, choice.schedule, choice.family)
    denoiser = DiscreteDenoiser(net, schedule, timestep_mapping=schedule.timestep_mapping(family=choice.family))
    x = noise * schedule.initial_noise_scale(sigmas[0].item(), choice.family)
    seen = []
    out = choice.for_schedule(schedule)(denoiser, x, sigmas, generator=generator, callback=seen.append, **options)
    vp = [step.x / (1 + step.sigma**2) ** 0.5 for step in seen]  # diffusers' samples are VP
    return vp, [step.denoised for step in seen], out


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("config", [
    dict(LCM_CONFIG),
    # timestep_scaling 0.05: c_skip is far from 0 (0.06 at t = 39), so the boundary conditions show
    dict(LCM_CONFIG, prediction_type="v_prediction", original_inference_steps=25, timestep_scaling=0.05),
    dict(LCM_CONFIG, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="sample"),
], ids=["sd-eps", "v-25-scaling0.05", "linear-sample"])
def test_trajectory_equals_lcm_scheduler_step(tiny_net, config, steps):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    theirs = run_diffusers(config, tiny_net, noise, steps, seed=1234)
    options = {"timestep_scaling": config["timestep_scaling"]} if "timestep_scaling" in config else {}
    assert resolve("LCMScheduler", **config).options == options

    def error(**extra):  # the largest difference over every sample and x0 estimate, relative to its scale
        ours = run_reverie(config, tiny_net, noise, steps, torch.Generator().manual_seed(1234), **options, **extra)
        assert len(ours[0]) == steps
        pairs = zip(ours[0] + ours[1] + [ours[2]], theirs[0] + theirs[1] + [theirs[2]])
        return max(((a - b).abs().max() / max(1.0, b.abs().max().item())).item() for a, b in pairs)

    # 1e-5 of the scale: a random network's x0 estimates at t = 999 reach about 40 (float32 rounds at 4e-6)
    assert error() <= 1e-5
    if options:
        assert error(boundary=False) > 1e-4  # without c_skip / c_out the trajectory is another one


def test_one_generator_per_item_reproduces_each_item_alone(tiny_net):
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    batch = run_reverie(dict(LCM_CONFIG), tiny_net, noise, 4, [torch.Generator().manual_seed(s) for s in (5, 6)])[2]
    for i, seed in enumerate((5, 6)):
        alone = run_reverie(dict(LCM_CONFIG), tiny_net, noise[i:i + 1], 4, torch.Generator().manual_seed(seed))[2]
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=0, atol=1e-6)


def test_without_boundary_conditions_it_is_k_diffusions_sample_lcm(tiny_net):
    """boundary=False: x <- D(x, sigma) + sigma_next * eps, noise drawn only before a non-zero level."""
    schedule = DiscreteSchedule()
    denoiser = DiscreteDenoiser(tiny_net, schedule, timestep_mapping="round")
    sigmas = schedule.sampling_sigmas(4, family="lcm")
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    out = SAMPLERS["lcm"](denoiser, x, sigmas, generator=torch.Generator().manual_seed(7), boundary=False)
    generator, expected = torch.Generator().manual_seed(7), x
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        expected = denoiser(expected, sigma)
        if sigma_next > 0:
            expected = expected + sigma_next * torch.randn(x.shape, generator=generator)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    with_boundary = SAMPLERS["lcm"](denoiser, x, sigmas, generator=torch.Generator().manual_seed(7))
    assert 0 < (with_boundary - out).abs().max() < 1e-2  # c_skip(t >= 19) is tiny but not zero


def test_consistency_scalings_meet_the_boundary_condition():
    assert consistency_scalings(0) == (1.0, 0.0)  # f(x, 0) = x
    previous = 1.0
    for t in (1, 19, 259, 999):
        c_skip, c_out = consistency_scalings(t)
        assert c_skip + c_out**2 == pytest.approx(1.0)  # (sigma_data^2 + s^2) / (s^2 + sigma_data^2)
        assert 0 < c_skip < previous  # the network's share grows with the noise
        previous = c_skip
    assert consistency_scalings(2, timestep_scaling=5.0) == consistency_scalings(1)


# --- the UNet's guidance-scale conditioning ---------------------------------------------------------------------


@pytest.mark.parametrize("dim", [32, 256, 33])
def test_guidance_embedding_equals_diffusers(dim):
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([7.5, 0.0, 2.25])
    theirs = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
    assert torch.equal(guidance_embedding(w, dim), theirs)


def test_unet_with_time_cond_proj_dim_equals_diffusers():
    config = dict(block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=2,
                  time_cond_proj_dim=256)
    torch.manual_seed(0)
    theirs = diffusers.UNet2DConditionModel(**config).eval()
    ours = UNet.from_config(dict(theirs.config)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 32, generator=g)
    cond = guidance_embedding(torch.tensor([7.5, 1.0]), 256)
    t = torch.tensor([999, 259])
    with torch.no_grad():
        want = theirs(x, t, context, timestep_cond=cond).sample
        got = ours(x, t, context, timestep_cond=cond)
        assert (got - want).abs().max() <= 1e-6
        assert (ours(x, t, context) - want).abs().max() > 1e-3  # the condition changes the output


# --- the pipeline ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    """diffusers' tiny LatentConsistencyModelPipeline (64x64 images), as its fast test's get_dummy_components builds
    it (the UNet has time_cond_proj_dim=32 there), with tiny_families' CLIP tokenizer for the Hub's
    hf-internal-testing/tiny-random-clip."""
    from diffusers import AutoencoderKL, LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(4, 8), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=2, time_cond_proj_dim=32)
    scheduler = LCMScheduler(**LCM_CONFIG)
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, norm_num_groups=2)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=64,
                                                layer_norm_eps=1e-05, num_attention_heads=8, num_hidden_layers=3,
                                                pad_token_id=1, vocab_size=1000))
    pipe = LatentConsistencyModelPipeline(unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                                          tokenizer=clip_tokenizer(), safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("lcm")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def pipes(lcm_folder):
    from diffusers import LatentConsistencyModelPipeline

    theirs = LatentConsistencyModelPipeline.from_pretrained(lcm_folder)
    theirs.set_progress_bar_config(disable=True)
    return Pipeline.from_pretrained(lcm_folder), theirs


@pytest.mark.parametrize("steps", [1, 4])
def test_images_equal_latent_consistency_model_pipeline(pipes, steps):
    ours, theirs = pipes
    prompts = [PROMPTS[0], PROMPTS[1]]
    want = theirs(prompts, num_inference_steps=steps, guidance_scale=8.5, output_type="np",
                  generator=torch.Generator().manual_seed(0))
    got = ours(prompts, steps=steps, guidance_scale=8.5, sampler="lcm", seed=0, progress=False)
    assert_same_images(pixels(got.images), theirs_pixels(want))
    assert got.params["negative_prompt"] is None and got.params["sampler"] == "lcm"
    latents = theirs(prompts, num_inference_steps=steps, guidance_scale=8.5, output_type="latent",
                     generator=torch.Generator().manual_seed(0)).images  # the last x0 estimate, about 60 at most
    assert (got.latents - latents).abs().max() <= 1e-5 * latents.abs().max()


def test_pipeline_defaults_are_lcms_and_the_guidance_scale_is_a_network_input(pipes):
    ours, theirs = pipes
    want = theirs(PROMPTS[1], output_type="np", generator=torch.Generator().manual_seed(3))  # 4 steps, 8.5
    got = ours(PROMPTS[1], seed=3, progress=False)
    assert (got.params["steps"], got.params["guidance_scale"], got.params["sampler"]) == (4, 8.5, "lcm")
    assert_same_images(pixels(got.images), theirs_pixels(want))
    other = ours(PROMPTS[1], seed=3, guidance_scale=2.0, progress=False)
    assert np.abs(pixels(other.images) - pixels(got.images)).mean() > 0.1  # w reaches the network
    a1111 = ours(PROMPTS[1], seed=3, sampler="LCM", progress=False)
    assert np.array_equal(pixels(a1111.images), pixels(got.images))


def test_save_pretrained_round_trip_keeps_the_lcm_unet(pipes, tmp_path):
    ours = pipes[0]
    ours.save_pretrained(tmp_path)
    again = Pipeline.from_pretrained(tmp_path)
    assert again.unet.config.time_cond_proj_dim == 32
    assert again.schedule == ours.schedule
    a, b = (p(PROMPTS[0], steps=2, seed=1, progress=False) for p in (ours, again))
    assert torch.equal(a.latents, b.latents)


# --- names and bad input --------------------------------------------------------------------------------------


def test_names_resolve_to_lcm():
    assert resolve("LCM").fn is SAMPLERS["lcm"] and resolve("LCM").schedule == "default"
    assert resolve("lcm").family == "lcm" and resolve("lcm").flow_family is None
    assert resolve("LCMScheduler", timestep_scaling=10.0).options == {}
    assert resolve("euler").for_schedule(DiscreteSchedule()) == resolve("euler")  # takes no schedule


@pytest.mark.parametrize("call,field", [
    (lambda: SAMPLERS["lcm"](lambda x, s: x, torch.zeros(1, 2), torch.tensor([1.0, 0.0]), boundary="yes"),
     "boundary"),
    (lambda: SAMPLERS["lcm"](lambda x, s: x, torch.zeros(1, 2), torch.tensor([1.0, 0.0]), timestep_scaling=0),
     "timestep_scaling"),
    (lambda: SAMPLERS["lcm"](lambda x, s: x, torch.zeros(1, 2), torch.tensor([1.0, 0.0]), schedule="sd"),
     "schedule"),
    (lambda: resolve("LCMScheduler", clip_sample=True), "clip_sample"),
    (lambda: DiscreteSchedule().sampling_sigmas(51, family="lcm"), "steps"),
    (lambda: DiscreteSchedule(original_inference_steps=0).sampling_sigmas(1, family="lcm"),
     "original_inference_steps"),
    (lambda: lcm_timesteps(4, strength=0.0), "strength"),
    (lambda: lcm_timesteps(8, strength=0.1), "steps"),  # 5 distillation timesteps left
    (lambda: UNetConfig(time_cond_proj_dim=0), "time_cond_proj_dim"),
    (lambda: UNet(UNET_PRESETS["tiny"])(torch.zeros(1, 4, 8, 8), 1, torch.zeros(1, 1, 16),
                                        timestep_cond=torch.zeros(1, 16)), "timestep_cond"),
])
def test_bad_input_raises_naming_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def test_lcm_pipeline_refuses_a_negative_prompt(pipes):
    with pytest.raises(ValueError, match="negative_prompt"):
        pipes[0](PROMPTS[0], negative_prompt="blurry", steps=1, seed=0, progress=False)
