"""Samplers: stateless functions `fn(denoiser, x, sigmas, *, generator=None, callback=None, **options) -> x`.

`denoiser(x, sigma)` returns x0_hat in the VE convention x = x0 + sigma * eps (flow samplers: the flow
convention, see reverie.denoisers.FlowDenoiser). `sigmas` is 1-D and decreasing; the sampler steps from
sigmas[0] to sigmas[-1]. History for multistep solvers lives in local variables, so one function serves
any number of concurrent calls. `callback(StepInfo)` is called once per step.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..denoisers import randn
from ..schedules import DiscreteSchedule

SAMPLERS: dict[str, Callable] = {}


class StepInfo(NamedTuple):
    i: int  # step index, 0-based
    x: Tensor  # the sample at sigma, before the step
    sigma: float  # noise level of x
    sigma_next: float  # noise level the step goes to
    denoised: Tensor  # the denoiser's estimate of x0 at (x, sigma)


# The sigma family a sampler gets on a flow model (reverie.flow.FlowSchedule.sampling_sigmas), by its VP family;
# None: the sampler is for DDPM models only.
_FLOW_FAMILIES = {"k": "k", "multistep": "multistep", "flow": "flow", "ddim": None, "ddpm": None, "lcm": None}
_FROM_FAMILY = "from family"


def register(name: str, family: str = "k", flow_family: str | None = _FROM_FAMILY):
    """Add a sampler to SAMPLERS, checking its common arguments.

    `family` names the diffusers scheduler family whose timestep spacing this sampler reproduces
    ("k": Euler/Heun/LMS; "multistep": DPM-Solver++/UniPC; "ddim": DDIM; "ddpm": DDPM; "lcm": LCMScheduler;
    "flow": the FlowMatch schedulers). `flow_family` is the same on flow models (reverie.flow): by default derived from
    `family`, None where the sampler cannot run on one; UniPC's differs from DPM-Solver's there."""

    def wrap(fn):
        @functools.wraps(fn)
        def checked(denoiser, x, sigmas, *, generator=None, callback=None, **options):
            check_sigmas(sigmas)
            return fn(denoiser, x, sigmas.to(x.device), generator=generator, callback=callback, **options)

        checked.family = family
        checked.flow_family = _FLOW_FAMILIES[family] if flow_family == _FROM_FAMILY else flow_family
        SAMPLERS[name] = checked
        return checked

    return wrap


def check_sigmas(sigmas) -> None:
    if not isinstance(sigmas, Tensor) or sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError("sigmas must be a 1-D tensor of at least 2 noise levels (steps >= 1)")
    if not torch.isfinite(sigmas).all():
        raise ValueError(f"sigmas must be finite; got {sigmas.tolist()}")
    if (sigmas < 0).any():
        raise ValueError(f"sigmas must be >= 0; got {sigmas.tolist()}")
    if (sigmas[1:] > sigmas[:-1]).any():
        raise ValueError(f"sigmas must be non-increasing; got {sigmas.tolist()}")


def _report(callback, i, x, sigma, sigma_next, denoised):
    if callback is not None:
        callback(StepInfo(i, x, float(sigma), float(sigma_next), denoised))


def _evaluate(denoiser, x, sigmas, i, callback):
    """The denoiser at step i, reported to the callback: (sigma, sigma_next, denoised)."""
    sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
    denoised = denoiser(x, _s(x, sigma))
    _report(callback, i, x, sigma, sigma_next, denoised)
    return sigma, sigma_next, denoised


def _d(x, sigma, denoised):
    """dx/dsigma of the probability-flow ODE in the VE convention (Karras et al. 2022, eq. 4)."""
    return (x - denoised) / sigma


def _ancestral(sigma, sigma_next, eta=1.0):
    """Split a step into a deterministic step to sigma_down plus fresh noise of size sigma_up."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


def _noise(x, generator):
    return randn(x.shape, generator, x.device, x.dtype)


def _s(x, sigma):
    return x.new_ones(x.shape[0]) * sigma


@register("euler")
def euler(denoiser, x, sigmas, *, generator=None, callback=None, s_churn=0.0, s_tmin=0.0,
          s_tmax=float("inf"), s_noise=1.0):
    """Euler's method on the probability-flow ODE, with optional churn (Karras et al. 2022, Algorithm 2)."""
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + _noise(x, generator) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        denoised = denoiser(x, _s(x, sigma_hat))
        _report(callback, i, x, sigma_hat, sigma_next, denoised)
        x = x + _d(x, sigma_hat, denoised) * (sigma_next - sigma_hat)
    return x


@register("euler_ancestral")
def euler_ancestral(denoiser, x, sigmas, *, generator=None, callback=None, eta=1.0, s_noise=1.0):
    """Ancestral sampling with Euler steps (k-diffusion); eta=1 is DDPM's posterior, eta=0 is Euler."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, denoised = _evaluate(denoiser, x, sigmas, i, callback)
        sigma_down, sigma_up = _ancestral(sigma, sigma_next, eta)
        x = x + _d(x, sigma, denoised) * (sigma_down - sigma)
        if sigma_up > 0:
            x = x + _noise(x, generator) * s_noise * sigma_up
    return x


@register("ddim", family="ddim")
def ddim(denoiser, x, sigmas, *, generator=None, callback=None, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12) written in alphabar, stepping between the VE levels of `sigmas`."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, denoised = _evaluate(denoiser, x, sigmas, i, callback)
        a_t, a_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)  # alphabar at both levels
        eps = (x - denoised) / sigma
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5  # eq. 16
        x_prev = a_prev**0.5 * denoised + (1 - a_prev - std**2) ** 0.5 * eps  # VP space
        if std > 0:
            x_prev = x_prev + std * _noise(x, generator)
        x = x_prev / a_prev**0.5
    return x


@register("ddpm", family="ddpm")
def ddpm(denoiser, x, sigmas, *, generator=None, callback=None):
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0_hat) (Ho et al. 2020): DDIM with eta=1."""
    return ddim(denoiser, x, sigmas, generator=generator, callback=callback, eta=1.0)


SIGMA_DATA = 0.5  # the data standard deviation of LCM's boundary conditions (diffusers' LCMScheduler)


def consistency_scalings(t: float, timestep_scaling: float = 10.0) -> tuple[float, float]:
    """(c_skip, c_out) of a consistency function at discrete timestep t (Song et al. 2023, "Consistency Models",
    appendix C; LCM's discrete form, Luo et al. 2023): with s = t * timestep_scaling,
    c_skip = sigma_data^2 / (s^2 + sigma_data^2) and c_out = s / sqrt(s^2 + sigma_data^2), so f(x, 0) = x."""
    s = t * timestep_scaling
    return SIGMA_DATA**2 / (s**2 + SIGMA_DATA**2), s / (s**2 + SIGMA_DATA**2) ** 0.5


@register("lcm", family="lcm")
def lcm(denoiser, x, sigmas, *, generator=None, callback=None, boundary=True, schedule=None, timestep_scaling=10.0):
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 3; diffusers' LCMScheduler): each
    step the consistency function f = c_skip(t) x_vp + c_out(t) x0_hat, then, while sigma_next > 0, f put back on
    the noising path at sigma_next with fresh noise, x = f + sigma_next * eps.

    The boundary conditions are functions of the discrete timestep t of each sigma, so the sampler takes the
    model's `schedule` (a DiscreteSchedule; the pipeline passes its own, see SamplerChoice.for_schedule) and
    rounds schedule.sigma_to_t; None means Stable Diffusion's schedule, the one every published LCM was distilled
    on. x_vp = x / sqrt(1 + sigma^2) is the network's variance-preserving input. boundary=False drops c_skip /
    c_out (f = x0_hat): k-diffusion's sample_lcm (ComfyUI's "lcm" on a model whose boundary conditions live in
    its model sampling)."""
    if not isinstance(boundary, bool):
        raise ValueError(f"boundary must be True or False; got {boundary!r}")
    if schedule is not None and not isinstance(schedule, DiscreteSchedule):
        raise ValueError(f"schedule must be a reverie.schedules.DiscreteSchedule or None; got "
                         f"{type(schedule).__name__}")
    if isinstance(timestep_scaling, bool) or not isinstance(timestep_scaling, (int, float)) or timestep_scaling <= 0:
        raise ValueError(f"timestep_scaling must be a number > 0; got {timestep_scaling!r}")
    schedule = schedule or DiscreteSchedule()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        denoised = denoiser(x, _s(x, sigma))
        if boundary:
            t = schedule.sigma_to_t(torch.tensor([sigma], dtype=torch.float64), "round").item()
            c_skip, c_out = consistency_scalings(t, timestep_scaling)
            denoised = c_skip * x / (1 + sigma**2) ** 0.5 + c_out * denoised
        _report(callback, i, x, sigma, sigma_next, denoised)
        x = denoised
        if sigma_next > 0:
            x = x + sigma_next * _noise(x, generator)
    return x


@register("heun")
def heun(denoiser, x, sigmas, *, generator=None, callback=None):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1); the last step to sigma=0 is Euler."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, denoised = _evaluate(denoiser, x, sigmas, i, callback)
        d = _d(x, sigma, denoised)
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = _d(x_euler, sigma_next, denoiser(x_euler, _s(x, sigma_next)))
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


def _lms_coefficient(sigmas: np.ndarray, i: int, j: int, order: int) -> float:
    """Integral over [sigma_i, sigma_i+1] of the Lagrange basis polynomial for sigma_{i-j} on the last
    `order` sigmas (linear multistep, as k-diffusion's sample_lms). Exact: the integrand is a polynomial."""
    nodes = [sigmas[i - k] for k in range(order)]
    basis = np.polynomial.Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@register("lms")
def lms(denoiser, x, sigmas, *, generator=None, callback=None, order=4):
    """Linear multistep on the probability-flow ODE (k-diffusion), up to `order` past derivatives."""
    if order < 1:
        raise ValueError(f"order must be >= 1; got {order}")
    sigmas_np = sigmas.double().cpu().numpy()
    ds = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, denoised = _evaluate(denoiser, x, sigmas, i, callback)
        ds = [_d(x, sigma, denoised)] + ds[: order - 1]  # newest first
        cur = len(ds)
        x = x + sum(_lms_coefficient(sigmas_np, i, j, cur) * d for j, d in enumerate(ds))
    return x


@register("dpmpp_2m", family="multistep")
def dpmpp_2m(denoiser, x, sigmas, *, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): the noise-free (eta=0) case of dpmpp_2m_sde; first
    order at the first step and at the step to sigma=0."""
    return dpmpp_2m_sde(denoiser, x, sigmas, generator=generator, callback=callback, eta=0.0)


@register("dpmpp_2m_sde", family="multistep")
def dpmpp_2m_sde(denoiser, x, sigmas, *, generator=None, callback=None, eta=1.0, s_noise=1.0):
    """DPM-Solver++(2M) SDE, midpoint variant (Lu et al. 2022; diffusers' "sde-dpmsolver++"). In the data
    prediction form with lambda = -log sigma: a first-order exponential-integrator step, plus the midpoint
    correction 0.5 (D - D_prev) / r from the previous x0 estimate, plus fresh noise when eta > 0."""
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, denoised = _evaluate(denoiser, x, sigmas, i, callback)
        if sigma_next == 0:
            x = denoised
            continue
        h = math.log(sigma / sigma_next)
        eta_h = eta * h
        x = (sigma_next / sigma) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
        if old_denoised is not None:
            r = h_last / h
            x = x - 0.5 * math.expm1(-h - eta_h) * (1 / r) * (denoised - old_denoised)
        if eta:
            x = x + _noise(x, generator) * sigma_next * (-math.expm1(-2 * eta_h)) ** 0.5 * s_noise
        old_denoised, h_last = denoised, h
    return x


class BrownianNoise:
    """Brownian motion W(sigma) sampled lazily: W at a new point is drawn conditioned on its neighbours
    (a Brownian bridge), so increments over any intervals are jointly exact. noise(a, b) returns the
    standardised increment (W(b) - W(a)) / sqrt(|b - a|)."""

    def __init__(self, x: Tensor, generator=None):
        self.like, self.generator, self.points = x, generator, {}

    def _w(self, s: float) -> Tensor:
        if s in self.points:
            return self.points[s]
        lower = max((p for p in self.points if p < s), default=None)
        upper = min((p for p in self.points if p > s), default=None)
        z = _noise(self.like, self.generator)
        if lower is None and upper is None:
            w = torch.zeros_like(self.like)
        elif upper is None:
            w = self.points[lower] + (s - lower) ** 0.5 * z
        elif lower is None:
            w = self.points[upper] - (upper - s) ** 0.5 * z
        else:
            f = (s - lower) / (upper - lower)
            mean = self.points[lower] + f * (self.points[upper] - self.points[lower])
            w = mean + ((s - lower) * (upper - s) / (upper - lower)) ** 0.5 * z
        self.points[s] = w
        return w

    def __call__(self, a: float, b: float) -> Tensor:
        return (self._w(b) - self._w(a)) / abs(b - a) ** 0.5


@register("dpmpp_sde")
def dpmpp_sde(denoiser, x, sigmas, *, generator=None, callback=None, eta=1.0, s_noise=1.0, r=0.5):
    """DPM-Solver++ (stochastic, 2 evaluations a step; k-diffusion's sample_dpmpp_sde) with Brownian noise."""
    brownian = BrownianNoise(x, generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, denoised = _evaluate(denoiser, x, sigmas, i, callback)
        if sigma_next == 0:
            x = x + _d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        h = math.log(sigma / sigma_next)
        sigma_mid = sigma * math.exp(-r * h)
        # step 1: to the intermediate level, with its share of noise
        sd, su = _ancestral(sigma, sigma_mid, eta)
        x_2 = (sd / sigma) * x - math.expm1(math.log(sd / sigma)) * denoised
        if su > 0:
            x_2 = x_2 + brownian(sigma, sigma_mid) * s_noise * su
        denoised_2 = denoiser(x_2, _s(x, sigma_mid))
        # step 2: the full step with the corrected x0 estimate
        sd, su = _ancestral(sigma, sigma_next, eta)
        fac = 1 / (2 * r)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sd / sigma) * x - math.expm1(math.log(sd / sigma)) * denoised_d
        if su > 0:
            x = x + brownian(sigma, sigma_next) * s_noise * su
    return x


def _unipc_update(x, sigma_s, sigma_t, history, order, variant="bh2", model_t=None):
    """One UniPC update from sigma_s to sigma_t in the data prediction form (Zhao et al. 2023,
    Algorithms 1-2; B(h) = e^h - 1 for "bh2", h for "bh1"), in VE coordinates.

    history: [(sigma, denoised), ...] oldest first, its last entry at sigma_s. With model_t (the
    denoiser's output at sigma_t) this is the corrector UniC, else the predictor UniP."""
    lam = lambda s: -math.log(s)  # noqa: E731  (lambda = log alpha - log sigma_vp = -log sigma_ve)
    h = lam(sigma_t) - lam(sigma_s)
    m0 = history[-1][1]
    rks, d1s = [], []
    for k in range(1, order):
        sigma_k, m_k = history[-(k + 1)]
        rk = (lam(sigma_k) - lam(sigma_s)) / h
        rks.append(rk)
        d1s.append((m_k - m0) / rk)
    rks.append(1.0)
    hh = -h
    h_phi_1 = math.expm1(hh)  # h phi_1(h) = e^h - 1, evaluated at -h
    b_h = math.expm1(hh) if variant == "bh2" else hh
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = np.array([[rk ** (k - 1) for rk in rks] for k in range(1, order + 1)])
    x_t = (sigma_t / sigma_s) * x - h_phi_1 * m0
    if model_t is None:  # predictor
        if d1s:
            rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
            x_t = x_t - b_h * sum(float(rho) * d for rho, d in zip(rhos, d1s))
        return x_t
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b)
    corr = sum(float(rho) * d for rho, d in zip(rhos[:-1], d1s))
    return x_t - b_h * (corr + float(rhos[-1]) * (model_t - m0))


@register("unipc", family="multistep", flow_family="unipc")
def unipc(denoiser, x, sigmas, *, generator=None, callback=None, order=2, variant="bh2", corrector=True):
    """UniPC (Zhao et al. 2023): multistep predictor UniP plus corrector UniC that reuses the next model
    evaluation, so the corrector costs nothing; lower order at the start and the end (as diffusers)."""
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3; got {order}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2'; got {variant!r}")
    n = len(sigmas) - 1
    history, last_x, last_order = [], None, 0
    for i in range(n):
        sigma, sigma_next, denoised = _evaluate(denoiser, x, sigmas, i, callback)
        if corrector and last_x is not None:
            x = _unipc_update(last_x, history[-1][0], sigma, history, last_order, variant, denoised)
        history = (history + [(sigma, denoised)])[-order:]
        last_order = min(order, n - i, i + 1)
        last_x = x
        x = denoised if sigma_next == 0 else _unipc_update(x, sigma, sigma_next, history, last_order, variant)
    return x


def _check_flow_times(name, sigmas):
    if sigmas[0] > 1:
        raise ValueError(f"sigmas for {name} are flow times in [0, 1]; got sigmas[0]={sigmas[0].item()}")


@register("euler_flow", family="flow")
def euler_flow(denoiser, x, sigmas, *, generator=None, callback=None, stochastic=False):
    """Euler on a rectified-flow ODE, x = (1 - sigma) x0 + sigma eps (Liu et al. 2023; SD3): the
    denoiser is in the flow convention (reverie.denoisers.FlowDenoiser) and sigmas run from 1 to 0.

    stochastic: diffusers' `stochastic_sampling`: instead of the Euler step, put the x0 estimate back on the
    noising path at sigma_next with fresh noise, (1 - sigma_next) x0 + sigma_next eps (drawn at every step)."""
    _check_flow_times("euler_flow", sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, denoised = _evaluate(denoiser, x, sigmas, i, callback)
        if stochastic:
            x = (1 - sigma_next) * denoised + sigma_next * _noise(x, generator)
        else:
            velocity = (x - denoised) / sigma  # = eps_hat - x0_hat
            x = x + velocity * (sigma_next - sigma)
    return x


@register("heun_flow", family="flow")
def heun_flow(denoiser, x, sigmas, *, generator=None, callback=None):
    """Heun's method on the rectified-flow ODE (Karras et al. 2022, Algorithm 1, in flow time): average the
    velocities at both ends of an Euler step; the last step, to sigma 0, is Euler. The trajectory of
    diffusers' FlowMatchHeunDiscreteScheduler, whose repeated timesteps are the second evaluations here."""
    _check_flow_times("heun_flow", sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next, denoised = _evaluate(denoiser, x, sigmas, i, callback)
        velocity = (x - denoised) / sigma
        x_euler = x + velocity * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            velocity_next = (x_euler - denoiser(x_euler, _s(x, sigma_next))) / sigma_next
            x = x + (velocity + velocity_next) / 2 * (sigma_next - sigma)
    return x
