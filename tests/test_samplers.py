"""Sampler contracts: determinism, batching, callbacks, validation, and the name resolver."""

import math

import pytest
import torch

from reverie import FlowDenoiser, resolve, schedules
from reverie.denoisers import flow_sigmas
from reverie.samplers import SAMPLERS, BrownianNoise
from reverie.toy import two_moons_mixture

VE_SAMPLERS = [name for name, fn in SAMPLERS.items() if fn.family != "flow"]
STOCHASTIC = ["ddpm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde"]
GM = two_moons_mixture()


def run(name, x, seed=None, **options):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return SAMPLERS[name](GM, x, schedules.karras(12, 0.01, 20.0), generator=generator, **options)


@pytest.mark.parametrize("name", VE_SAMPLERS)
def test_same_seed_same_output(name):
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 20
    a, b = run(name, x, seed=3), run(name, x, seed=3)
    assert torch.equal(a, b)
    assert a.dtype == torch.float64 and a.shape == x.shape
    if name in STOCHASTIC:
        assert not torch.equal(a, run(name, x, seed=4))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_batch_with_one_generator_per_item_equals_items_alone(name):
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 20
    sigmas = schedules.karras(8, 0.01, 20.0)
    batch = SAMPLERS[name](GM, x, sigmas, generator=[torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    for i, s in enumerate((10, 11, 12)):
        alone = SAMPLERS[name](GM, x[i:i + 1], sigmas, generator=torch.Generator().manual_seed(s))
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", VE_SAMPLERS)
def test_callback_reports_every_step(name):
    seen = []
    sigmas = schedules.karras(6, 0.01, 20.0)
    SAMPLERS[name](GM, torch.zeros(2, 2, dtype=torch.float64), sigmas, generator=torch.Generator().manual_seed(0),
                   callback=seen.append)
    assert [s.i for s in seen] == list(range(6))
    assert [s.sigma for s in seen] == pytest.approx(sigmas[:-1].tolist())
    assert [s.sigma_next for s in seen] == pytest.approx(sigmas[1:].tolist())
    assert all(s.denoised.shape == (2, 2) for s in seen)


@pytest.mark.parametrize("sigmas,match", [
    (torch.tensor([1.0]), "steps >= 1"),
    (torch.tensor([1.0, -0.5, 0.0]), ">= 0"),
    (torch.tensor([1.0, float("nan"), 0.0]), "finite"),
    (torch.tensor([float("inf"), 1.0, 0.0]), "finite"),
    (torch.tensor([1.0, 2.0, 0.0]), "non-increasing"),
    (torch.ones(2, 2), "1-D"),
])
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "unipc"])
def test_bad_sigmas_raise_naming_the_field(name, sigmas, match):
    with pytest.raises(ValueError, match=f"sigmas.*{match}|{match}.*sigmas|sigmas must"):
        SAMPLERS[name](GM, torch.zeros(1, 2), sigmas)


def test_resolve_accepts_every_dialect():
    karras_2m = resolve("dpmpp_2m", "karras")
    assert karras_2m.fn is SAMPLERS["dpmpp_2m"] and karras_2m.schedule == "karras"
    for same in (resolve("DPM++ 2M Karras"), resolve("dpm++ 2m  karras"), resolve("DPM++ 2M", scheduler="Karras"),
                 resolve("DPM++ 2M", scheduler="Automatic"),
                 resolve("DPMSolverMultistepScheduler", use_karras_sigmas=True)):
        assert same == karras_2m
    assert resolve("Euler a") == resolve("euler_ancestral", "normal") == resolve("EulerAncestralDiscreteScheduler")
    assert resolve("DPM++ 2M SDE Karras") == resolve("DPMSolverMultistepScheduler", use_karras_sigmas=True,
                                                     algorithm_type="sde-dpmsolver++")
    assert resolve("DPM++ 2M SDE", "Automatic").schedule == "exponential"
    assert resolve("UniPC") == resolve("UniPCMultistepScheduler") == resolve("uni_pc_bh2")
    assert resolve("uni_pc").options == {"variant": "bh1"}
    assert resolve("DDIMScheduler", eta=0.5).options == {"eta": 0.5}
    # a whole diffusers scheduler config can be splatted in: training keys are ignored
    assert resolve("EulerDiscreteScheduler", beta_start=0.00085, timestep_spacing="leading").name == "euler"


@pytest.mark.parametrize("call,match", [
    (lambda: resolve("DPM++ 9M"), "unknown sampler 'DPM\\+\\+ 9M'; valid: euler"),
    (lambda: resolve("euler", "polyexponential"), "scheduler must be one of"),
    (lambda: resolve("DPMSolverMultistepScheduler", algorithm_type="dpmsolver"), "algorithm_type"),
    (lambda: resolve("DPMSolverMultistepScheduler", solver_order=3), "solver_order"),
    (lambda: resolve("EulerDiscreteScheduler", use_beta_sigmas=True), "use_beta_sigmas"),
    (lambda: resolve("euler", eta=1.0), "unexpected options"),
    (lambda: resolve(None), "sampler must be a string"),
])
def test_resolve_errors_name_the_field(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_brownian_increments_are_consistent_and_standard():
    like = torch.zeros(20000, dtype=torch.float64)
    w = BrownianNoise(like, torch.Generator().manual_seed(0))
    a, b, c = 10.0, 4.0, 1.0
    whole, first, second = w(a, c), w(a, b), w(b, c)
    torch.testing.assert_close(whole * math.sqrt(a - c), first * math.sqrt(a - b) + second * math.sqrt(b - c))
    for z in (whole, first, second):
        assert abs(z.mean()) < 5 / math.sqrt(len(z)) and abs(z.var() - 1) < 5 * math.sqrt(2 / len(z))
    assert abs(torch.corrcoef(torch.stack([first, second]))[0, 1]) < 5 / math.sqrt(len(first))


class VelocityOfGaussian(torch.nn.Module):
    """Exact flow velocity for x0 ~ N(0, s^2 I): v(x, t) = E[eps - x0 | x_t]."""

    def __init__(self, s=0.5):
        super().__init__()
        self.s = s

    def forward(self, x, t):
        t = (t / 1000).reshape(-1, 1)
        var = (1 - t) ** 2 * self.s**2 + t**2
        return x * (t - (1 - t) * self.s**2) / var


def test_flow_euler_equals_ve_euler_and_recovers_the_data():
    flow = FlowDenoiser(VelocityOfGaussian())
    x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # the exact flow maps x(1) to x(0) = 0.5 x(1) (it scales with sqrt(var(t))); Euler converges to it at
    # first order
    errors = [(SAMPLERS["euler_flow"](flow, x, flow_sigmas(n, shift=3.0)) - 0.5 * x).abs().max() for n in (25, 200)]
    assert errors[1] < errors[0] / 5 and errors[1] < 0.04  # 8x the steps: about 8x smaller
    sigmas = flow_sigmas(20, shift=3.0)
    out = SAMPLERS["euler_flow"](flow, x, sigmas)
    # from t < 1 the same ODE in VE coordinates, integrated by plain euler, gives the same points
    t = flow_sigmas(20, shift=3.0)[1:].double()
    ve_sigmas = t / (1 - t)
    start = SAMPLERS["euler_flow"](flow, x, sigmas[:2])  # one step to t[0]
    via_ve = SAMPLERS["euler"](flow.ve(), start / (1 - t[0]), ve_sigmas)
    torch.testing.assert_close(via_ve, out, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="flow times"):
        SAMPLERS["euler_flow"](flow, x, torch.tensor([5.0, 0.0]))
