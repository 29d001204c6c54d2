"""Flow-matching schedules and samplers (reverie.flow) against diffusers' schedulers and exact answers.

1. Schedules: the flow times reverie visits are diffusers' `scheduler.sigmas` (FlowMatchEuler with every kind
   and flag, FlowMatchHeun, DPMSolverMultistep and UniPC with use_flow_sigmas) for several step counts,
   static shifts and dynamic mu.
2. Trajectories: with a fixed toy velocity network and the same noise, every state of reverie's sampler
   equals the state of diffusers' scheduler driven by `scheduler.step(v, t, x)` (max abs <= 1e-4).
3. Closed form: with the exact x0 = E[x0 | x_t] of a Gaussian mixture under x_t = (1 - t) x0 + t eps, the ODE
   samplers converge to an RK4 solution of the flow ODE at their orders (euler 1, heun and dpmpp_2m 2).
4. The bridge (reverie.flow.sample), names, img2img helpers and configs.
"""

import math
import sys
import types

import numpy as np
import pytest
import torch

from reverie import DiscreteSchedule, FlowDenoiser, resolve
from reverie.edit import strength_sigmas
from reverie.flow import FLOW_TIME_MAX, FlowSchedule, img2img_sigmas, sample
from reverie.samplers import SAMPLERS, SamplerChoice
from reverie.toy import GaussianMixture

diffusers = pytest.importorskip("diffusers")

STEPS = (1, 2, 4, 10, 28)
FLOW_FLAGS = dict(use_flow_sigmas=True, prediction_type="flow_prediction")
# (FlowSchedule fields, mu): static shifts, then FLUX-style dynamic shifting at two mu
CONFIGS = [({"shift": 1.0}, None), ({"shift": 3.0}, None), ({"use_dynamic_shifting": True}, 0.5),
           ({"use_dynamic_shifting": True}, 1.15)]


def _mu(mu):
    return {} if mu is None else {"mu": mu}


# --- 1. schedules ----------------------------------------------------------------------------------------------


def flow_match_euler_sigmas(steps, kind, mu, **config):
    """What FlowMatchEulerDiscreteScheduler visits for a kind: its flags, or the sigmas a pipeline passes."""
    flags = {f"use_{kind}_sigmas": True} if kind in ("karras", "exponential", "beta") else {}
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config, **flags)
    if kind == "simple":  # FluxPipeline
        scheduler.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), **_mu(mu))
    elif kind == "sgm_uniform":  # ComfyUI's sgm_uniform, as custom sigmas
        sigmas = np.linspace(scheduler.sigma_max, scheduler.sigma_min, steps + 1)[:-1]
        scheduler.set_timesteps(steps, sigmas=sigmas, **_mu(mu))
    else:
        scheduler.set_timesteps(steps, **_mu(mu))
    return scheduler.sigmas


@pytest.mark.parametrize("kind", ["default", "simple", "sgm_uniform", "karras", "exponential", "beta"])
def test_flow_match_euler_sigmas(kind):
    pytest.importorskip("scipy")
    configs = CONFIGS + [({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 1.15),
                         ({"shift": 3.0, "shift_terminal": 0.1}, None)]
    for config, mu in configs:
        for steps in STEPS:
            if steps == 1 and "shift_terminal" in config:
                continue  # diffusers divides 0 by 0 there; reverie refuses (test_schedule_errors)
            ours = FlowSchedule(**config).sampling_sigmas(steps, kind, "flow", mu=mu)
            theirs = flow_match_euler_sigmas(steps, kind, mu, **config)
            assert ours.dtype == torch.float32 and ours[-1] == 0
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=f"{config} mu={mu} steps={steps}")
            if kind in ("karras", "exponential", "beta"):  # the config flag gives the same on kind "default"
                flagged = FlowSchedule(**config, **{f"use_{kind}_sigmas": True}).sampling_sigmas(steps, mu=mu)
                torch.testing.assert_close(flagged, ours, rtol=0, atol=0)


def test_flow_match_euler_default_is_the_double_shift():
    """architectures.md trap 6: at shift 3 the last nonzero time is about 0.0089, not 1/N."""
    sigmas = FlowSchedule(shift=3.0).sampling_sigmas(4)
    assert abs(sigmas[-2].item() - 0.0089) < 1e-4
    assert abs(FlowSchedule(shift=3.0).sampling_sigmas(4, "simple")[-2].item() - 0.5) < 1e-6  # 3 * 0.25 / 1.5


def test_flow_match_heun_sigmas():
    for shift in (1.0, 3.0):
        for steps in STEPS:
            scheduler = diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
            scheduler.set_timesteps(steps)
            theirs = torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1::2]])  # [s0, s1, s1, ..., 0] without repeats
            ours = FlowSchedule(shift=shift).sampling_sigmas(steps, family=resolve("FlowMatchHeunDiscreteScheduler")
                                                             .flow_family)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_multistep_flow_sigmas(cls):
    for config, mu in CONFIGS:
        flags = dict(FLOW_FLAGS, flow_shift=config.get("shift", 1.0),
                     use_dynamic_shifting=config.get("use_dynamic_shifting", False))
        choice = resolve(cls, **flags)
        for steps in STEPS:
            scheduler = getattr(diffusers, cls)(**flags)
            scheduler.set_timesteps(steps, **_mu(mu))
            ours = FlowSchedule().sigmas_for(choice, steps, mu=mu)  # the shift comes from flow_shift
            torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=1e-6, msg=f"{config} {steps}")
    # UniPC's own shift_terminal and custom sigmas (FLUX's "simple") agree too
    scheduler = diffusers.UniPCMultistepScheduler(**FLOW_FLAGS, flow_shift=3.0, shift_terminal=0.1)
    scheduler.set_timesteps(10)
    torch.testing.assert_close(FlowSchedule(shift=3.0, shift_terminal=0.1).sampling_sigmas(10, family="unipc"),
                               scheduler.sigmas, rtol=0, atol=1e-6)
    scheduler = diffusers.UniPCMultistepScheduler(**FLOW_FLAGS, flow_shift=3.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.1, 10))
    torch.testing.assert_close(FlowSchedule(shift=3.0).sampling_sigmas(10, "simple", "unipc"), scheduler.sigmas,
                               rtol=0, atol=1e-6)


def test_schedule_errors():
    with pytest.raises(ValueError, match="mu"):
        FlowSchedule(use_dynamic_shifting=True).sampling_sigmas(4)
    assert torch.equal(FlowSchedule(shift=3.0).sampling_sigmas(4, mu=0.7), FlowSchedule(shift=3.0).sampling_sigmas(4))
    for bad, field in [({"invert_sigmas": True}, "invert_sigmas"), ({"time_shift_type": "cubic"}, "time_shift_type"),
                       ({"use_karras_sigmas": True, "use_beta_sigmas": True}, "use_karras_sigmas"),
                       ({"shift": 0.0}, "shift"), ({"shift_terminal": 1.0}, "shift_terminal")]:
        with pytest.raises(ValueError, match=field):
            FlowSchedule(**bad)
    with pytest.raises(ValueError, match="kind"):
        FlowSchedule().sampling_sigmas(4, "polyexponential")
    with pytest.raises(ValueError, match="family"):
        FlowSchedule().sampling_sigmas(4, family="ddim")
    with pytest.raises(ValueError, match="shift_terminal"):
        FlowSchedule(shift_terminal=0.1).sampling_sigmas(4, family="multistep")
    with pytest.raises(ValueError, match="shift_terminal"):
        FlowSchedule(shift_terminal=0.1).sampling_sigmas(1)
    with pytest.raises(ValueError, match="linear"):
        FlowSchedule(use_dynamic_shifting=True, time_shift_type="linear").sampling_sigmas(4, family="multistep", mu=1.0)
    with pytest.raises(ValueError, match="kind"):  # VP models do not have the flow kinds
        DiscreteSchedule().sampling_sigmas(4, "simple")


def test_beta_needs_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # "import scipy.stats" now fails
    with pytest.raises(ImportError, match="scipy"):
        FlowSchedule().sampling_sigmas(4, "beta")


def test_mu_is_fluxs_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    schedule = FlowSchedule(use_dynamic_shifting=True)
    for seq in (256, 1024, 4096, 6000):
        assert schedule.mu(seq) == pytest.approx(calculate_shift(seq), abs=1e-12)
    assert schedule.mu(4096) == pytest.approx(1.15)


def test_from_config_like_diffusers():
    sd3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0",
           "num_train_timesteps": 1000, "shift": 3.0}
    flux = dict(sd3, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5,
                max_shift=1.15)
    for config in (sd3, flux, dict(sd3, _use_default_values=["shift"])):
        ours = FlowSchedule.from_config(config)
        theirs = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config).config
        for key, value in ours.to_config().items():
            if key in theirs:
                assert theirs[key] == value, key
    assert FlowSchedule.from_config(dict(sd3, _use_default_values=["shift"])).shift == 1.0
    wan = {"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": True, "flow_shift": 5.0,
           "prediction_type": "flow_prediction", "num_train_timesteps": 1000}
    assert FlowSchedule.from_config(wan).shift == 5.0
    assert FlowSchedule.from_config(FlowSchedule(shift=2.0).to_config()) == FlowSchedule(shift=2.0)


# --- 2. trajectories ---------------------------------------------------------------------------------------------


@pytest.fixture
def noise():
    return torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(0))  # non-square latents


def run_diffusers(scheduler, net, noise, set_kwargs, net_timesteps="scheduler", step_kwargs=None):
    """Drive a diffusers scheduler as SD3 / FLUX do: the net sees the scheduler's timesteps (FlowMatch: sigma *
    1000; DPM / UniPC: integers), or with net_timesteps="sigma" sigma * 1000. States before each step
    (first-order evaluations only, for Heun), then the result."""
    scheduler.set_timesteps(**set_kwargs)
    x, states = noise, []
    for i, t in enumerate(scheduler.timesteps):
        if getattr(scheduler, "state_in_first_order", True):
            states.append(x)
        v = net(x, t if net_timesteps == "scheduler" else scheduler.sigmas[i] * 1000)
        x = scheduler.step(v, t, x, **(step_kwargs or {})).prev_sample
    return states + [x]


def run_reverie(choice, schedule, net, noise, steps, mu=None, generator=None, table=False):
    sigmas = schedule.sigmas_for(choice, steps, mu=mu)
    denoiser = FlowDenoiser(net, timesteps=schedule.timestep_table(choice, steps, mu=mu) if table else None)
    states = []
    x = sample(choice, denoiser, noise, sigmas, generator=generator, callback=lambda info: states.append(info.x))
    return states + [x]


def assert_same_trajectory(ours, theirs, steps):
    assert len(ours) == len(theirs) == steps + 1
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert (a - b).abs().max().item() <= 1e-4, f"state {i}: {(a - b).abs().max().item():.2e}"
    assert ours[-1].abs().max() > 0.1  # a real sample, not zeros


@pytest.mark.parametrize("config,mu", CONFIGS[1:])
@pytest.mark.parametrize("kind", ["default", "simple"])
def test_euler_flow_follows_flow_match_euler(tiny_net, noise, config, mu, kind):
    steps = 10
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    set_kwargs = dict(num_inference_steps=steps, **_mu(mu))
    if kind == "simple":
        set_kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
    theirs = run_diffusers(scheduler, tiny_net, noise, set_kwargs)
    choice = resolve("FlowMatchEulerDiscreteScheduler", **config)
    if kind == "simple":
        choice = resolve("euler_flow", "simple")
    ours = run_reverie(choice, FlowSchedule(**config), tiny_net, noise, steps, mu)
    assert_same_trajectory(ours, theirs, steps)


def test_stochastic_euler_flow_follows_flow_match_euler(tiny_net, noise):
    steps = 6
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    theirs = run_diffusers(scheduler, tiny_net, noise, {"num_inference_steps": steps},
                           step_kwargs={"generator": torch.Generator().manual_seed(5)})
    choice = resolve("FlowMatchEulerDiscreteScheduler", shift=3.0, stochastic_sampling=True)
    assert choice.options == {"stochastic": True}
    ours = run_reverie(choice, FlowSchedule(), tiny_net, noise, steps, generator=torch.Generator().manual_seed(5))
    assert_same_trajectory(ours, theirs, steps)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_heun_flow_follows_flow_match_heun(tiny_net, noise, shift):
    steps = 8
    scheduler = diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
    theirs = run_diffusers(scheduler, tiny_net, noise, {"num_inference_steps": steps})
    ours = run_reverie(resolve("FlowMatchHeunDiscreteScheduler"), FlowSchedule(shift=shift), tiny_net, noise, steps)
    assert_same_trajectory(ours, theirs, steps)


@pytest.mark.parametrize("cls,sampler", [("DPMSolverMultistepScheduler", "dpmpp_2m"),
                                         ("UniPCMultistepScheduler", "unipc")])
@pytest.mark.parametrize("config,mu", [({"flow_shift": 1.0}, None), ({"flow_shift": 3.0}, None),
                                       ({"use_dynamic_shifting": True}, 1.15)])
@pytest.mark.parametrize("net_timesteps", ["scheduler", "sigma"])
def test_multistep_follows_diffusers_with_flow_sigmas(tiny_net, noise, cls, sampler, config, mu, net_timesteps):
    """Their pipelines pass the net the scheduler's integer timesteps: FlowSchedule.timestep_table gives those
    to the FlowDenoiser. Without it the net sees sigma * 1000, which matches diffusers driven that way."""
    steps = 10
    flags = dict(FLOW_FLAGS, **config)
    scheduler = getattr(diffusers, cls)(**flags)
    theirs = run_diffusers(scheduler, tiny_net, noise, dict(num_inference_steps=steps, **_mu(mu)), net_timesteps)
    choice = resolve(cls, **flags)
    assert choice.name == sampler
    ours = run_reverie(choice, FlowSchedule(), tiny_net, noise, steps, mu,  # FlowSchedule() + the flags
                       table=net_timesteps == "scheduler")
    assert_same_trajectory(ours, theirs, steps)


def test_timestep_table_is_diffusers_integer_timesteps():
    """The integers come from the float64 times: flooring the float32 sigmas would miss some (shift 1, 9 steps)."""
    for cls in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        for shift in (1.0, 3.0):
            choice = resolve(cls, **FLOW_FLAGS, flow_shift=shift)
            for steps in (*STEPS, 9, 27):
                scheduler = getattr(diffusers, cls)(**FLOW_FLAGS, flow_shift=shift)
                scheduler.set_timesteps(steps)
                sigmas, timesteps = FlowSchedule().timestep_table(choice, steps)
                assert torch.equal(sigmas, scheduler.sigmas[:-1])
                assert torch.equal(timesteps, scheduler.timesteps.float())
    assert FlowSchedule().timestep_table(resolve("euler_flow"), 4) is None


# --- 3. closed form ------------------------------------------------------------------------------------------------


class FlowMixture:
    """x0 ~ sum_k w_k N(mu_k, diag(s_k^2)) and its exact denoiser in the flow convention.

    Given component k, x_t = (1 - t) x0 + t eps ~ N((1 - t) mu_k, v_k) with v_k = (1 - t)^2 s_k^2 + t^2, and
    (x0, x_t) are jointly Gaussian with Cov(x0, x_t) = (1 - t) s_k^2, so
    E[x0 | x_t, k] = mu_k + (1 - t) s_k^2 / v_k (x_t - (1 - t) mu_k); the component posterior weighs w_k by
    N(x_t; (1 - t) mu_k, v_k). All in float64; x (B, d), t (B,) -> (B, d)."""

    def __init__(self):
        self.means = torch.tensor([[-2.0, 0.5], [1.5, 1.5], [1.0, -2.0]], dtype=torch.float64)  # (K, d)
        self.vars = torch.tensor([[0.5, 0.1], [0.3, 0.05], [0.2, 0.2]], dtype=torch.float64)  # (K, d): s_k^2
        self.weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)

    def __call__(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x.shape[0])[:, None, None]  # (B, 1, 1)
        a = 1 - t
        v = a**2 * self.vars + t**2  # (B, K, d)
        diff = x[:, None, :] - a * self.means  # (B, K, d)
        log_p = -0.5 * (diff**2 / v + v.log()).sum(-1) + self.weights.log()  # (B, K)
        per_component = self.means + a * self.vars / v * diff  # (B, K, d)
        return torch.einsum("bk,bkd->bd", torch.softmax(log_p, -1), per_component)


T_END = 0.05  # the samplers and the reference stop here: the last steps are then regular (not the jump to 0)


def flow_ode(denoiser, x, t_from, t_to, steps=250):
    """Classical RK4 on dx/dt = (x - D(x, t)) / t (= eps_hat - x0_hat, smooth on [T_END, 1]). With 250 steps
    it is within 2e-8 of 2000 steps, far below the samplers' errors."""
    h = (t_to - t_from) / steps

    def f(x, t):
        return (x - denoiser(x, t)) / t

    for i in range(steps):
        t = t_from + i * h
        k1 = f(x, t)
        k2 = f(x + h / 2 * k1, t + h / 2)
        k3 = f(x + h / 2 * k2, t + h / 2)
        k4 = f(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def test_flow_mixture_denoiser_is_the_ve_posterior_mean():
    """The derivation above against reverie.toy's VE mixture: D_flow(x, t) = D_ve(x / (1 - t), t / (1 - t))."""
    flow = FlowMixture()
    ve = GaussianMixture(flow.means, torch.diag_embed(flow.vars), flow.weights)
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for t in (0.1, 0.5, 0.9):
        torch.testing.assert_close(flow(x, t), ve(x / (1 - t), t / (1 - t)), rtol=0, atol=1e-12)


def test_ode_samplers_converge_at_their_order():
    mixture = FlowMixture()
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # pure noise at t = 1
    exact = flow_ode(mixture, x, 1.0, T_END)
    # name: (order, step counts, bound on the max error at the most steps); measured max errors 0.047 (euler,
    # 128 steps), 2.6e-3 (heun, 64), 8.8e-3 (dpmpp_2m through the VE bridge, 64); bounds ~2x those
    expected = {"euler": (1, (32, 64, 128), 0.1), "heun": (2, (16, 32, 64), 6e-3),
                "dpmpp_2m": (2, (16, 32, 64), 0.02)}
    for name, (order, ns, bound) in expected.items():
        errors = []
        for n in ns:
            sigmas = torch.linspace(1.0, T_END, n + 1, dtype=torch.float64)
            errors.append((sample(resolve(name), mixture, x, sigmas) - exact).norm(dim=-1).max().item())
        ratios = [a / b for a, b in zip(errors, errors[1:])]
        # doubling the steps divides the error by 2^order: ~2 (first order; measured 2.1-2.3), ~4 (second
        # order; measured 3.4-3.7)
        low, high = (1.6, 2.8) if order == 1 else (3.0, 5.5)
        assert all(low < r < high for r in ratios), f"{name}: errors {errors}, ratios {ratios}"
        assert errors[-1] < bound, f"{name}: {errors}"


# --- 4. the bridge, names, img2img ------------------------------------------------------------------------------


def test_ve_bridge_reports_flow_states(tiny_net, noise):
    """Euler ancestral at eta = 0 is Euler, which is the same step in the VE and flow views: through the bridge
    (from t = 1, moved to FLOW_TIME_MAX) it must retrace euler_flow, and its callback must see flow states."""
    sigmas = FlowSchedule(shift=3.0).sampling_sigmas(8)
    denoiser = FlowDenoiser(tiny_net)
    flow_steps, ve_steps = [], []
    x_flow = sample(resolve("euler_flow"), denoiser, noise, sigmas, callback=flow_steps.append)
    choice = SamplerChoice("euler_ancestral", options={"eta": 0.0})
    x_ve = sample(choice, denoiser, noise, sigmas, callback=ve_steps.append)
    assert (x_ve - x_flow).abs().max() < 1e-4
    assert ve_steps[0].sigma == pytest.approx(FLOW_TIME_MAX, abs=1e-9)
    for a, b in zip(ve_steps, flow_steps):
        assert a.i == b.i and a.sigma == pytest.approx(b.sigma, abs=2e-6)
        assert a.sigma_next == pytest.approx(b.sigma_next, abs=1e-6)
        assert (a.x - b.x).abs().max() < 1e-4 and (a.denoised - b.denoised).abs().max() < 1e-4
    assert len(ve_steps) == 8 and ve_steps[-1].sigma_next == 0


def test_every_flow_capable_sampler_runs_from_t_one(tiny_net, noise):
    sigmas = FlowSchedule(shift=3.0).sampling_sigmas(6, "simple")  # starts at exactly 1
    assert sigmas[0] == 1
    denoiser = FlowDenoiser(tiny_net)
    for name, fn in SAMPLERS.items():
        if fn.flow_family is None:
            continue
        out = sample(resolve(name), denoiser, noise, sigmas, generator=torch.Generator().manual_seed(1))
        again = sample(resolve(name), denoiser, noise, sigmas, generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(out).all() and out.abs().max() < 50, name
        assert torch.equal(out, again), name


def test_bridge_batch_with_one_generator_per_item_equals_items_alone(tiny_net, noise):
    sigmas = FlowSchedule(shift=3.0).sampling_sigmas(5)
    denoiser = FlowDenoiser(tiny_net)
    for name in ("dpmpp_2m_sde", "euler_ancestral"):
        batch = sample(resolve(name), denoiser, noise, sigmas,
                       generator=[torch.Generator().manual_seed(s) for s in (7, 8)])
        for i, seed in enumerate((7, 8)):
            alone = sample(resolve(name), denoiser, noise[i:i + 1], sigmas,
                           generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(batch[i:i + 1], alone, rtol=0, atol=1e-6)


def test_euler_and_heun_are_the_flow_solvers_on_flow_models(tiny_net, noise):
    sigmas = FlowSchedule(shift=3.0).sampling_sigmas(5)
    denoiser = FlowDenoiser(tiny_net)
    for name, flow_name in (("euler", "euler_flow"), ("heun", "heun_flow"), ("Euler", "euler_flow")):
        assert torch.equal(sample(resolve(name), denoiser, noise, sigmas),
                           sample(resolve(flow_name), denoiser, noise, sigmas))


def test_vp_only_samplers_are_refused_on_flow_models(tiny_net, noise):
    sigmas = FlowSchedule().sampling_sigmas(4)
    for name in ("ddim", "DDPMScheduler"):
        with pytest.raises(ValueError, match=r"(?s)(ddim|DDPM).*dpmpp_2m.*euler_flow.*heun_flow"):
            sample(resolve(name), FlowDenoiser(tiny_net), noise, sigmas)
        with pytest.raises(ValueError, match="DDPM models only"):
            FlowSchedule().sigmas_for(resolve(name), 4)
    for name in ("dpmpp_2m", "heun_flow", "euler_flow"):  # VE sigmas are not flow times
        with pytest.raises(ValueError, match="flow times"):
            sample(resolve(name), FlowDenoiser(tiny_net), noise, sigmas * 2)


def test_resolve_flow_names():
    assert resolve("FlowMatchEulerDiscreteScheduler").name == "euler_flow"
    assert resolve("FlowMatchHeunDiscreteScheduler").name == "heun_flow"
    assert resolve("FlowMatchEulerDiscreteScheduler", use_beta_sigmas=True).schedule == "beta"
    assert resolve("FlowMatchEulerDiscreteScheduler", shift=3.0, use_dynamic_shifting=False).flow_config == \
        {"shift": 3.0, "use_dynamic_shifting": False}
    dpm = resolve("DPMSolverMultistepScheduler", **FLOW_FLAGS, flow_shift=3.0)
    assert (dpm.name, dpm.flow_family, dpm.flow_config) == ("dpmpp_2m", "multistep", {"shift": 3.0})
    assert FlowSchedule().for_sampler(dpm).shift == 3.0
    unipc = resolve("UniPCMultistepScheduler", **FLOW_FLAGS, flow_shift=5.0)
    assert (unipc.name, unipc.family, unipc.flow_family, unipc.flow_config) == \
        ("unipc", "multistep", "unipc", {"shift": 5.0})
    assert resolve("DPMSolverMultistepScheduler", flow_shift=3.0).flow_config == {}  # without use_flow_sigmas
    for scheduler, kind in (("simple", "simple"), ("normal", "default"), ("sgm_uniform", "sgm_uniform"),
                            ("SGM Uniform", "sgm_uniform"), ("beta", "beta"), ("karras", "karras")):
        assert resolve("dpmpp_2m", scheduler).schedule == kind
    with pytest.raises(ValueError, match="invert_sigmas"):
        resolve("FlowMatchEulerDiscreteScheduler", invert_sigmas=True)
    with pytest.raises(ValueError, match="use_beta_sigmas"):
        resolve("EulerDiscreteScheduler", use_beta_sigmas=True)
    with pytest.raises(ValueError, match="use_flow_sigmas"):
        resolve("DPMSolverMultistepScheduler", **FLOW_FLAGS, use_karras_sigmas=True)


def test_add_noise_is_scale_noise():
    x0, eps = torch.randn(2, 4, 6, 10), torch.randn(2, 4, 6, 10)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(3)
    t = scheduler.timesteps[3]
    theirs = scheduler.scale_noise(x0, t[None], eps)
    torch.testing.assert_close(FlowSchedule.add_noise(x0, eps, scheduler.sigmas[3].item()), theirs, rtol=0, atol=1e-6)
    per_item = FlowSchedule.add_noise(x0, eps, torch.tensor([0.0, 1.0]))
    assert torch.equal(per_item[0], x0[0]) and torch.equal(per_item[1], eps[1])


def test_img2img_sigmas_match_sd3_and_flux_get_timesteps():
    from diffusers.pipelines.flux.pipeline_flux_img2img import FluxImg2ImgPipeline
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img import \
        StableDiffusion3Img2ImgPipeline

    for steps in (1, 4, 10, 28):
        for strength in (0.0, 0.1, 0.3, 0.35, 0.6, 0.75, 1.0):
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
            scheduler.set_timesteps(steps)
            for pipe in (StableDiffusion3Img2ImgPipeline, FluxImg2ImgPipeline):
                timesteps, n = pipe.get_timesteps(types.SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
                ours = img2img_sigmas(FlowSchedule(shift=3.0).sampling_sigmas(steps), strength)
                assert len(ours) - 1 == n == len(timesteps), (steps, strength)
                torch.testing.assert_close(ours[:-1] * 1000, timesteps, rtol=0, atol=1e-3)
    sigmas = FlowSchedule().sampling_sigmas(10)
    # where SD's rule differs: 10 steps at strength 0.35 (3.5 steps): SD3 / FLUX run 4, SD 3
    assert (len(img2img_sigmas(sigmas, 0.35)), len(strength_sigmas(sigmas, 0.35))) == (5, 4)
    assert math.isclose(FLOW_TIME_MAX, 1 - 1e-6)
