"""The samplers against exact answers: a Gaussian mixture's optimal denoiser and its probability-flow ODE.

With the exact denoiser D(x, sigma) = E[x0 | x] of a Gaussian mixture (reverie.toy) there is no model
error, so what a sampler returns can be compared with what it should return. In float64 this file shows:

1. The deterministic samplers (ddim, euler, heun, lms, dpmpp_2m, unipc) land on the solution of the
   probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma, computed here independently by RK4 in
   log sigma, and get closer to it with more steps.
2. Their convergence orders: euler and ddim first order, heun and dpmpp_2m second, unipc (order 2 with
   its corrector) and lms (order 4) higher.
3. ddim with eta=0 is, algebraically, the Euler step of the VE ODE (equal to 1e-10).
4. ddim with eta=1, ddpm and euler_ancestral (eta=1) are the same ancestral sampler, noise draw for draw.
5. The stochastic samplers (and dpmpp_2m, through the PF-ODE) turn noise into the data distribution:
   mean, covariance and mixture weights agree within 4.5 standard errors computed for the sample size.
6. For a single Gaussian the PF-ODE is linear with a closed-form solution; the reference integrator of
   (1)-(2) and heun both reproduce it (this validates the reference itself).

Tolerances are measured errors times a margin of about 2-3 (see the comments at each).
"""

import math

import pytest
import torch

from reverie.samplers import SAMPLERS
from reverie.schedules import exponential, karras
from reverie.toy import GaussianMixture, two_moons_mixture

SIGMA_MAX = 80.0
SIGMA_MIN = 0.002
SIGMA_TINY = 1e-6  # where the reference ODE solve stops before taking D(x, sigma) as x(0)
RK4_STEP = 0.02  # step in log sigma of the reference integrator (max error 1.1e-8: see test_reference_...)
DETERMINISTIC = ("ddim", "euler", "heun", "lms", "dpmpp_2m", "unipc")


# --- helpers ----------------------------------------------------------------------------------------------


def sigmas_to_zero(n: int) -> torch.Tensor:
    """n Karras levels from SIGMA_MAX down to SIGMA_MIN, then 0: (n + 1,) float64."""
    return karras(n, SIGMA_MIN, SIGMA_MAX).double()


def sigmas_to_min(n: int) -> torch.Tensor:
    """The same levels without the final 0, so the sampler stops at SIGMA_MIN: (n,) float64."""
    return sigmas_to_zero(n)[:-1]


# karras() returns float32: the levels the samplers actually visit are these roundings.
SIGMA_END = sigmas_to_min(2)[-1].item()  # float32(SIGMA_MIN), the same for every n


def pf_ode(denoiser, x, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """Solve dx/dsigma = (x - D(x, sigma)) / sigma from sigma_from to sigma_to by classical RK4 in
    t = log sigma, where it reads dx/dt = x - D(x, e^t): smooth and non-stiff (the Jacobian's
    eigenvalues lie in [0, 1] for a Gaussian). x: (B, d) float64 -> (B, d)."""
    t0, t1 = math.log(sigma_from), math.log(sigma_to)
    steps = math.ceil(abs(t1 - t0) / RK4_STEP)
    h = (t1 - t0) / steps

    def f(x, t):
        return x - denoiser(x, x.new_full((x.shape[0],), math.exp(t)))

    for i in range(steps):
        t = t0 + i * h
        k1 = f(x, t)
        k2 = f(x + h / 2 * k1, t + h / 2)
        k3 = f(x + h / 2 * k2, t + h / 2)
        k4 = f(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def pf_ode_limit(denoiser, x, sigma_from: float) -> torch.Tensor:
    """x(0): solve down to SIGMA_TINY, then denoise. For a component with covariance eigenvalue lam the
    last step's error is about SIGMA_TINY^2 / (2 lam) |x - mu|, far below 1e-9 here."""
    x = pf_ode(denoiser, x, sigma_from, SIGMA_TINY)
    return denoiser(x, x.new_full((x.shape[0],), SIGMA_TINY))


def run(name, denoiser, x, sigmas, seed=None, **options):
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return SAMPLERS[name](denoiser, x.clone(), sigmas, generator=generator, **options)


def distance(a, b):
    """Per-point Euclidean distance, (B, d), (B, d) -> (B,)."""
    return (a - b).norm(dim=-1)


def fitted_order(ns, errors) -> float:
    """Minus the least-squares slope of log(error) against log(n)."""
    log_n = torch.tensor(ns, dtype=torch.float64).log()
    log_e = torch.tensor(errors, dtype=torch.float64).log()
    log_n = log_n - log_n.mean()
    return -(log_n * (log_e - log_e.mean())).sum().item() / (log_n**2).sum().item()


def closed_form_gaussian_flow(mu, U, lam, x, sigma_from):
    """The exact PF-ODE map x(sigma_from) -> x(0) for x0 ~ N(mu, U diag(lam) U^T): in eigen-coordinates
    x(sigma) - mu scales as sqrt(lam + sigma^2). x: (B, d)."""
    scale = (lam / (lam + sigma_from**2)).sqrt()  # (d,)
    return mu + ((x - mu) @ U * scale) @ U.T


# --- fixtures -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixture():
    return two_moons_mixture()


@pytest.fixture(scope="module")
def start():
    """64 starting points at SIGMA_MAX: pure noise, (64, 2) float64."""
    return SIGMA_MAX * torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(mixture, start):
    """The PF-ODE solution from `start`: at SIGMA_END ("end") and in the limit sigma -> 0 ("zero")."""
    at_end = pf_ode(mixture, start, SIGMA_MAX, SIGMA_END)
    return {"end": at_end, "zero": pf_ode_limit(mixture, at_end, SIGMA_END)}


# --- 1. deterministic samplers solve the PF-ODE ----------------------------------------------------------------

# name: (steps, tolerance on the max over the 64 points of |x - x(0)| after that many steps).
# Measured max errors (Karras 0.002..80, then 0): euler = ddim 8.9e-2 at 128 steps and 4.2e-2 at 256;
# heun 7.5e-3, lms 1.2e-2, dpmpp_2m 1.9e-2, unipc 1.1e-2 at 64 steps. Tolerances ~2.5x those.
ODE_TOLERANCES = {
    "euler": (128, 0.2),
    "ddim": (128, 0.2),
    "heun": (64, 0.02),
    "lms": (64, 0.03),
    "dpmpp_2m": (64, 0.05),
    "unipc": (64, 0.03),
}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_sampler_lands_on_the_pf_ode_solution(name, mixture, start, reference):
    steps, tol = ODE_TOLERANCES[name]
    coarse = distance(run(name, mixture, start, sigmas_to_zero(steps)), reference["zero"])  # (64,)
    fine = distance(run(name, mixture, start, sigmas_to_zero(2 * steps)), reference["zero"])
    assert coarse.max() < tol, f"{name}: max error {coarse.max():.2e} with {steps} steps"
    # doubling the steps must help: by ~2x for first order, >= 3x for the others (measured >= 2.0 and >= 3.5)
    rms_coarse, rms_fine = coarse.pow(2).mean().sqrt(), fine.pow(2).mean().sqrt()
    assert rms_fine < rms_coarse / 1.5, f"{name}: rms error {rms_coarse:.2e} -> {rms_fine:.2e} on doubling"


# --- 2. convergence orders ---------------------------------------------------------------------------------------

# The error is measured at the last *nonzero* level, SIGMA_END, against the ODE solution there: the final
# jump to sigma = 0 is x = D(x, SIGMA_MIN) in every sampler here (heun's Euler step to 0, dpmpp_2m's and
# unipc's "x = denoised"), whose error, about SIGMA_MIN^2 / (2 lam) |x - mu| ~ 1e-5, does not shrink with
# the number of steps and would flatten the fitted slope of the accurate solvers (lms reaches 1e-5 at 256).
#
# The typical error is the median over the 64 points: a few trajectories start near the boundary between
# two components' basins, where the flow is very sensitive, and their errors stay pre-asymptotic longer.
# Measured orders of the median (n = 32..256): euler = ddim 1.02, heun 2.08, dpmpp_2m 2.10, unipc 3.11,
# lms 3.73 (the root-mean-square error gives 1.23, 2.07, 1.97, 2.79, 3.45).
ORDER_BOUNDS = {
    "euler": (0.8, 1.3),
    "ddim": (0.8, 1.3),
    "heun": (1.7, 2.5),
    "dpmpp_2m": (1.7, 2.5),
    "unipc": (2.5, 3.6),  # UniC raises UniP-2 to order 3 (Zhao et al. 2023, Theorem 3.1)
    "lms": (2.5, 4.5),  # order 4, pre-asymptotic with so few steps from sigma = 80
}
ORDER_STEPS = (32, 64, 128, 256)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_convergence_order(name, mixture, start, reference):
    errors = [distance(run(name, mixture, start, sigmas_to_min(n)), reference["end"]).median().item()
              for n in ORDER_STEPS]
    assert all(a > b for a, b in zip(errors, errors[1:])), f"{name}: errors {errors} do not decrease"
    lo, hi = ORDER_BOUNDS[name]
    order = fitted_order(ORDER_STEPS, errors)
    assert lo <= order <= hi, f"{name}: fitted order {order:.2f} not in [{lo}, {hi}]; errors {errors}"


# --- 3./4. algebraic identities -----------------------------------------------------------------------------------

SCHEDULES = {
    "karras": lambda: karras(30, SIGMA_MIN, SIGMA_MAX).double(),
    "exponential": lambda: exponential(30, SIGMA_MIN, SIGMA_MAX).double(),
    "karras_to_min": lambda: sigmas_to_min(30),
}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddim_eta0_is_euler(schedule, mixture, start):
    """DDIM's update in alphabar, mapped to VE, is x0_hat + sigma_next * eps_hat: Euler's step exactly."""
    sigmas = SCHEDULES[schedule]()
    a = run("ddim", mixture, start, sigmas, eta=0.0)
    b = run("euler", mixture, start, sigmas)
    assert (a - b).abs().max() <= 1e-10


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddim_eta1_is_ddpm_is_euler_ancestral(schedule, mixture, start):
    """With eta=1 DDIM's noise std, mapped to VE, is sigma_up = sigma_next sqrt(1 - sigma_next^2 / sigma^2) and
    its deterministic part sigma_down = sqrt(sigma_next^2 - sigma_up^2): k-diffusion's ancestral step. Both
    draw one normal of x's shape per step (none on a step to 0), so equal seeds give equal samples."""
    sigmas = SCHEDULES[schedule]()
    a = run("ddim", mixture, start, sigmas, seed=5, eta=1.0)
    b = run("euler_ancestral", mixture, start, sigmas, seed=5, eta=1.0)
    c = run("ddpm", mixture, start, sigmas, seed=5)
    assert (a - b).abs().max() <= 1e-10
    assert (a - c).abs().max() <= 1e-10
    # the noise matters: another seed lands elsewhere (so the comparison above is not vacuous)
    assert (a - run("ddim", mixture, start, sigmas, seed=6, eta=1.0)).abs().max() > 1e-2


# --- 5. samplers reproduce the data distribution -----------------------------------------------------------

N_SAMPLES = 8000
Z_MAX = 4.5
# Steps per sampler: the ancestral samplers (ddpm, euler_ancestral) are Euler-Maruyama, first order, and
# under-disperse (they drop Var[x0 | x_t] from the reverse kernel); their covariance bias, measured with
# 64000 samples and expressed in standard errors of an 8000-sample estimate, is -5.1 / -2.3 / -0.9 at
# 100 / 200 / 400 steps, hence 400. dpmpp_2m_sde: within 0.4 SE from 100 steps (its bias at 25 steps is
# +9 SE); dpmpp_sde and dpmpp_2m: within ~1.3 SE from 50 steps.
DISTRIBUTION_STEPS = {"ddpm": 400, "euler_ancestral": 400, "dpmpp_2m_sde": 100, "dpmpp_sde": 50, "dpmpp_2m": 50}


def component_of(gm, x):
    """The most likely component of each (clean) point, (B, d) -> (B,)."""
    return gm.responsibilities(x, x.new_full((x.shape[0],), SIGMA_TINY)).argmax(-1)


@pytest.fixture(scope="module")
def target(mixture):
    """Exact moments, plus what only a large exact sample gives simply: the per-sample standard deviation of
    the covariance products and the fractions the classifier `component_of` assigns (components overlap a
    little, so these differ from the weights by up to ~1e-3; misclassified: ~2e-4 of the points)."""
    big = mixture.sample(200_000, torch.Generator().manual_seed(123))[0]  # (M, 2)
    mu, cov = mixture.mean(), mixture.covariance()
    d = big - mu
    products = torch.stack([d[:, 0] * d[:, 0], d[:, 0] * d[:, 1], d[:, 1] * d[:, 1]], -1)  # (M, 3)
    fractions = torch.bincount(component_of(mixture, big), minlength=len(mixture.weights)).double() / len(big)
    assert (fractions - mixture.weights).abs().max() < 0.005
    return {"mean": mu, "cov": cov, "product_sd": products.std(0), "fractions": fractions, "m": len(big)}


def z_scores(gm, target, x):
    """Sample statistics of x (N, 2) minus their exact values, in standard errors for N samples."""
    n = len(x)
    mean, cov = x.mean(0), x.T.cov()
    z_mean = (mean - target["mean"]) / (target["cov"].diagonal() / n).sqrt()
    cov_entries = torch.stack([cov[0, 0], cov[0, 1], cov[1, 1]])
    exact_entries = torch.stack([target["cov"][0, 0], target["cov"][0, 1], target["cov"][1, 1]])
    z_cov = (cov_entries - exact_entries) / (target["product_sd"] / math.sqrt(n))
    p = target["fractions"]
    fractions = torch.bincount(component_of(gm, x), minlength=len(p)).double() / n
    z_weights = (fractions - p) / (p * (1 - p) * (1 / n + 1 / target["m"])).sqrt()
    return {"mean": z_mean, "cov (00, 01, 11)": z_cov, "weights": z_weights}


@pytest.mark.parametrize("name", list(DISTRIBUTION_STEPS))
def test_sampler_reproduces_the_data_distribution(name, mixture, target):
    generator = torch.Generator().manual_seed(7)
    x0, _ = mixture.sample(N_SAMPLES, generator)
    # Start from the exact marginal at SIGMA_MAX, x0 + SIGMA_MAX * eps, not from SIGMA_MAX * eps: the
    # deterministic flow would carry the start's missing mean, |mu| sqrt(lam) / SIGMA_MAX ~ 0.007 (0.4 SE),
    # to the end.
    x_start = x0 + SIGMA_MAX * torch.randn(N_SAMPLES, 2, generator=generator, dtype=torch.float64)  # (N, 2)
    out = SAMPLERS[name](mixture, x_start, sigmas_to_zero(DISTRIBUTION_STEPS[name]), generator=generator)
    z = z_scores(mixture, target, out)
    worst = max(v.abs().max().item() for v in z.values())
    details = ", ".join(f"{k}: {[round(v, 2) for v in zs.tolist()]}" for k, zs in z.items())
    assert worst <= Z_MAX, f"{name}: z-scores {details}"


# --- 6. a single Gaussian: the PF-ODE in closed form --------------------------------------------------------------


@pytest.fixture(scope="module")
def gaussian():
    """x0 ~ N(mu, U diag(lam) U^T) in 3-D, anisotropic (eigenvalues 0.05 .. 2) and rotated."""
    g = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    lam = torch.tensor([0.05, 0.5, 2.0], dtype=torch.float64)
    mu = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    gm = GaussianMixture(mu[None], (U @ torch.diag(lam) @ U.T)[None], torch.ones(1, dtype=torch.float64))
    x = SIGMA_MAX * torch.randn(64, 3, generator=g, dtype=torch.float64)  # (64, 3) at SIGMA_MAX
    return gm, mu, U, lam, x


def test_reference_integrator_matches_the_closed_form(gaussian):
    # measured max errors: 1.1e-8 with RK4_STEP = 0.02, 7.0e-10 with 0.01 (fourth order); the samplers' errors
    # that test_convergence_order fits go down to 3e-6 (lms, 256 steps)
    gm, mu, U, lam, x = gaussian
    exact = closed_form_gaussian_flow(mu, U, lam, x, SIGMA_MAX)
    exact_end = mu + ((exact - mu) @ U * ((lam + SIGMA_END**2) / lam).sqrt()) @ U.T  # x(SIGMA_END)
    at_end = pf_ode(gm, x, SIGMA_MAX, SIGMA_END)  # as `reference` does it
    assert (at_end - exact_end).abs().max() < 1e-7
    assert (pf_ode_limit(gm, at_end, SIGMA_END) - exact).abs().max() < 1e-7


def test_heun_matches_the_closed_form(gaussian):
    # measured max error with 50 Karras steps (0.002..80, then 0): 1.28e-2; with 100 steps 3.1e-3 (ratio 4.2;
    # a first-order corruption such as weights 0.6/0.4 instead of 1/2 gives 1.7e-2 and 1.1e-2, ratio 1.5)
    gm, mu, U, lam, x = gaussian
    exact = closed_form_gaussian_flow(mu, U, lam, x, SIGMA_MAX)
    err_50 = (run("heun", gm, x, sigmas_to_zero(50)) - exact).abs().max()
    err_100 = (run("heun", gm, x, sigmas_to_zero(100)) - exact).abs().max()
    assert err_50 < 0.03, f"heun: max error {err_50:.2e} against the closed form"
    assert err_100 < err_50 / 3, f"heun: error {err_50:.2e} -> {err_100:.2e} on doubling the steps"
