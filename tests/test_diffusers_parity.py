"""reverie's samplers follow the same trajectory as diffusers' schedulers built from the same config,
with the same network, timesteps and noise (diffusers is a test-only dependency)."""

import inspect

import pytest
import torch

from reverie import DiscreteDenoiser, DiscreteSchedule, resolve

diffusers = pytest.importorskip("diffusers")

SD_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    steps_offset=1, clip_sample=False, set_alpha_to_one=False,
)
CLASSES = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
EXTRA = {"dpmpp_2m_sde": {"algorithm_type": "sde-dpmsolver++"}}
KARRAS = {"euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde", "unipc"}  # those with use_karras_sigmas


def run_diffusers(cls_name, config, net, noise, steps, seed):
    scheduler = getattr(diffusers, cls_name).from_config(config)
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    generator = torch.Generator().manual_seed(seed)
    extra = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    states = []
    for t in scheduler.timesteps:
        states.append(x)
        out = net(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x, **extra).prev_sample
    return states + [x], scheduler


def run_reverie(choice, schedule, net, noise, steps, seed):
    sigmas = schedule.sampling_sigmas(steps, choice.schedule, choice.family)
    mapping = schedule.timestep_mapping(choice.schedule, choice.family)
    denoiser = DiscreteDenoiser(net, schedule, timestep_mapping=mapping)
    x = noise * schedule.initial_noise_scale(sigmas[0].item(), choice.family)
    states = []
    x = choice(denoiser, x, sigmas, generator=torch.Generator().manual_seed(seed),
               callback=lambda step: states.append(step.x))
    return states + [x], sigmas


def cases():
    for sampler in CLASSES:
        for prediction in ("epsilon", "v_prediction"):
            for spacing in ("leading", "trailing", "linspace"):
                if sampler == "ddim" and spacing == "linspace":
                    continue  # diffusers' DDIM steps to t - T//n, not to the next timestep: see README
                for karras in (False, True) if sampler in KARRAS else (False,):
                    yield sampler, prediction, spacing, karras


@pytest.mark.parametrize("sampler,prediction,spacing,karras", list(cases()))
def test_same_trajectory_as_diffusers(tiny_net, sampler, prediction, spacing, karras):
    steps, seed = 10, 1234
    flags = dict(EXTRA.get(sampler, {}), use_karras_sigmas=karras) if sampler in KARRAS else {}
    config = dict(SD_CONFIG, prediction_type=prediction, timestep_spacing=spacing)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    ours, sigmas = run_reverie(resolve(CLASSES[sampler], **flags), DiscreteSchedule.from_config(config), tiny_net,
                               noise, steps, seed)
    theirs, scheduler = run_diffusers(CLASSES[sampler], dict(config, **flags), tiny_net, noise, steps, seed)

    # diffusers' samples are VE (k family) or VP (multistep, ddim): x_vp = x_ve / sqrt(1 + sigma^2)
    vp = resolve(CLASSES[sampler], **flags).family != "k"
    to_theirs = [(1 + s**2) ** -0.5 if vp else 1.0 for s in sigmas.tolist()]
    if sampler == "heun":  # diffusers interleaves the corrector evaluations: states 0, 2, 4, ... are ours
        theirs = theirs[0:-1:2] + theirs[-1:]
    assert len(ours) == len(theirs) == steps + 1
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert (a * to_theirs[i] - b).abs().max().item() <= 1e-4, f"step {i}"
    assert ours[-1].abs().max() > 0.1  # a real image, not zeros


def test_sigmas_match_diffusers_tables():
    """The sigmas reverie visits are the scheduler's own sigmas (Karras and default, each family)."""
    config = dict(SD_CONFIG, timestep_spacing="leading")
    schedule = DiscreteSchedule.from_config(config)
    for sampler, cls in CLASSES.items():
        for karras in (False, True) if sampler in KARRAS else (False,):
            flags = dict(EXTRA.get(sampler, {}), use_karras_sigmas=karras) if sampler in KARRAS else {}
            choice = resolve(cls, **flags)
            scheduler = getattr(diffusers, cls).from_config(dict(config, **flags))
            scheduler.set_timesteps(25)
            ours = schedule.sampling_sigmas(25, choice.schedule, choice.family)
            if hasattr(scheduler, "sigmas") and sampler != "heun":
                theirs = scheduler.sigmas.float()
            elif sampler == "heun":
                theirs = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1::2]])
            else:  # DDIM: sigmas of its timesteps, then its final alpha
                ac = scheduler.alphas_cumprod
                theirs = torch.cat([((1 - ac[scheduler.timesteps]) / ac[scheduler.timesteps]) ** 0.5,
                                    ((1 - scheduler.final_alpha_cumprod) / scheduler.final_alpha_cumprod)[None] ** 0.5])
            torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6, msg=f"{sampler} karras={karras}")


def test_cosine_and_linear_betas_match_diffusers():
    from reverie import schedules

    for kind in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        for zsnr in (False, True):
            scheduler = diffusers.DDPMScheduler(beta_schedule=kind, rescale_betas_zero_snr=zsnr)
            ours = schedules.make_betas(kind, 1000, 1e-4, 0.02)
            if zsnr:
                ours = schedules.rescale_zero_terminal_snr(ours)
            torch.testing.assert_close(ours, scheduler.betas, rtol=1e-5, atol=1e-7)
