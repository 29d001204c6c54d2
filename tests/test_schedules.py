"""The forward process and the noise levels samplers visit."""

import math

import numpy as np
import pytest
import torch

from reverie import DiscreteSchedule, schedules

diffusers = pytest.importorskip("diffusers")


def test_karras_shape_and_spacing():
    s = schedules.karras(10, 0.03, 14.6, rho=7.0)
    assert s.shape == (11,) and s[-1] == 0
    assert s[0].item() == pytest.approx(14.6, rel=1e-6) and s[-2].item() == pytest.approx(0.03, rel=1e-6)
    inv = s[:-1].double() ** (1 / 7)  # evenly spaced in sigma^(1/rho) (Karras et al. eq. 5)
    torch.testing.assert_close(inv.diff(), inv.diff().mean().expand(9), rtol=1e-5, atol=1e-7)


def test_exponential_is_log_uniform():
    s = schedules.exponential(8, 0.1, 10.0)
    assert s.shape == (9,) and s[-1] == 0
    logs = s[:-1].double().log()
    torch.testing.assert_close(logs.diff(), logs.diff().mean().expand(7), rtol=1e-5, atol=1e-6)


def test_sigma_alphabar_roundtrip_and_snr():
    schedule = DiscreteSchedule()
    ab = schedule.alphas_cumprod
    torch.testing.assert_close(schedule.sigmas, ((1 - ab) / ab).sqrt())
    torch.testing.assert_close(schedules.alphas_cumprod_from_sigmas(schedule.sigmas), ab)
    torch.testing.assert_close(schedules.snr(schedule.sigmas), ab / (1 - ab))
    assert (schedule.sigmas.diff() > 0).all()


def test_add_noise_is_the_closed_form_q():
    """q(x_t | x_0) = N(sqrt(alphabar) x0, (1 - alphabar) I): check its moments on a large sample."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000,), 0.7)
    ab = DiscreteSchedule().alphas_cumprod[600]
    x_t = schedules.add_noise(x0, torch.randn(x0.shape, generator=g), ab)
    se = (1 / len(x0)) ** 0.5
    assert abs(x_t.mean() - ab.sqrt() * 0.7) < 5 * se
    assert abs(x_t.var() - (1 - ab)) < 5 * (2 / len(x0)) ** 0.5


def test_zero_terminal_snr():
    betas = schedules.scaled_linear_betas()
    rescaled = schedules.rescale_zero_terminal_snr(betas)
    ab, ab0 = schedules.alphas_cumprod(rescaled), schedules.alphas_cumprod(betas)
    assert ab[-1].item() == pytest.approx(0.0, abs=1e-12)
    assert ab[0].item() == pytest.approx(ab0[0].item(), rel=1e-6)
    assert (ab.diff() < 0).all()
    assert math.isfinite(DiscreteSchedule(rescale_betas_zero_snr=True).sigma_max)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 20, 50])
def test_timesteps_match_diffusers(spacing, steps):
    config = dict(timestep_spacing=spacing, steps_offset=1)
    for family, cls in (("k", "EulerDiscreteScheduler"), ("multistep", "DPMSolverMultistepScheduler"),
                        ("ddim", "DDIMScheduler")):
        scheduler = getattr(diffusers, cls)(**config)
        scheduler.set_timesteps(steps)
        ours = schedules.spaced_timesteps(steps, spacing, 1000, 1, family)
        np.testing.assert_allclose(ours, scheduler.timesteps.double().numpy(), rtol=0, atol=1e-4, err_msg=family)


def test_sigma_to_t_inverts_t_to_sigma():
    schedule = DiscreteSchedule()
    t = torch.tensor([999.0, 640.25, 33.5, 1.0, 0.0], dtype=torch.float64)
    sigma = schedule.t_to_sigma(t)
    torch.testing.assert_close(schedule.sigma_to_t(sigma, "linear"), t, atol=1e-6, rtol=0)
    ints = torch.tensor([999.0, 500.0, 1.0], dtype=torch.float64)
    for mapping in ("log", "round", "floor"):
        torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(ints) * (1 + 1e-9), mapping), ints,
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("call,field", [
    (lambda: schedules.karras(0, 0.1, 10), "steps"),
    (lambda: schedules.karras(5, -1, 10), "sigma_min"),
    (lambda: schedules.exponential(5, 0.1, float("nan")), "sigma_max"),
    (lambda: schedules.spaced_timesteps(10, "sideways"), "timestep_spacing"),
    (lambda: DiscreteSchedule(beta_schedule="quadratic"), "beta_schedule"),
    (lambda: DiscreteSchedule(prediction_type="noise"), "prediction_type"),
    (lambda: DiscreteSchedule().sampling_sigmas(10, "polyexponential"), "kind"),
    (lambda: DiscreteSchedule().sampling_sigmas(0), "steps"),
    (lambda: DiscreteSchedule().sampling_sigmas(1001), "steps"),
])
def test_bad_options_name_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def test_from_config_ignores_foreign_keys():
    config = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
              "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}
    s = DiscreteSchedule.from_config(config)
    assert (s.steps_offset, s.set_alpha_to_one, s.beta_schedule) == (1, False, "scaled_linear")
