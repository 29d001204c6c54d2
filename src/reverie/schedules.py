"""Noise schedules as data: betas, alphas_cumprod, sigmas, and the sigmas a sampler visits.

Conventions (see DESIGN.md): a noise level is a variance-exploding sigma, x_sigma = x0 + sigma * eps,
with sigma = sqrt((1 - alphabar) / alphabar) for a DDPM-style schedule. Every function that picks the
noise levels for sampling returns a 1-D float32 tensor of n + 1 sigmas, decreasing, ending in the final
sigma (0 unless a schedule says otherwise).

`DiscreteSchedule` is a model's training schedule (the diffusers `scheduler_config.json`) together with
the three ways diffusers' scheduler families space their timesteps, so that a sampler here visits exactly
the noise levels the matching diffusers scheduler visits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
SIGMA_KINDS = ("default", "karras", "exponential")
FAMILIES = ("k", "multistep", "ddim", "ddpm", "lcm")
TIMESTEP_MAPPINGS = ("linear", "log", "round", "floor")


def _check_choice(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _check_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")


# --- the forward process ------------------------------------------------------------------------------


def linear_betas(n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's linear betas (Ho et al. 2020)."""
    return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)


def scaled_linear_betas(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """Stable Diffusion's betas: linear in sqrt(beta)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2


def cosine_betas(n: int = 1000, max_beta: float = 0.999, s: float = 0.008) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas clipped at max_beta ("squaredcos_cap_v2")."""

    def alphabar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alphabar((i + 1) / n) / alphabar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(beta_schedule: str = "scaled_linear", n: int = 1000, beta_start=0.00085, beta_end=0.012) -> Tensor:
    """Betas by diffusers' `beta_schedule` name ("cosine" is accepted for "squaredcos_cap_v2")."""
    beta_schedule = "squaredcos_cap_v2" if beta_schedule == "cosine" else beta_schedule
    _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    if beta_schedule == "linear":
        return linear_betas(n, beta_start, beta_end)
    if beta_schedule == "scaled_linear":
        return scaled_linear_betas(n, beta_start, beta_end)
    return cosine_betas(n)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(alphabar) so the last timestep has zero SNR (Lin et al. 2023, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))  # keeps the first value, makes the last 0
    alphabar = sqrt_ab**2
    alphas = torch.cat([alphabar[:1], alphabar[1:] / alphabar[:-1]])
    return 1 - alphas


def alphas_cumprod(betas: Tensor) -> Tensor:
    return torch.cumprod(1 - betas, 0)


def sigmas_from_alphas_cumprod(alphabar: Tensor) -> Tensor:
    return ((1 - alphabar) / alphabar) ** 0.5


def alphas_cumprod_from_sigmas(sigmas: Tensor) -> Tensor:
    return 1 / (1 + sigmas**2)


def add_noise(x0: Tensor, noise: Tensor, alphabar: Tensor) -> Tensor:
    """Sample q(x_t | x_0) in closed form: sqrt(alphabar) x0 + sqrt(1 - alphabar) eps (DDPM eq. 4).

    `alphabar` is a scalar or a (B,) tensor (one level per batch item)."""
    alphabar = torch.as_tensor(alphabar, dtype=x0.dtype, device=x0.device).reshape(-1, *[1] * (x0.ndim - 1))
    return alphabar.sqrt() * x0 + (1 - alphabar).sqrt() * noise


def snr(sigma: Tensor) -> Tensor:
    """Signal-to-noise ratio alphabar / (1 - alphabar) = 1 / sigma^2."""
    return sigma**-2


# --- sigma schedules ------------------------------------------------------------------------------------


def _append_zero(sigmas: Tensor, final: float = 0.0) -> Tensor:
    return torch.cat([sigmas, sigmas.new_tensor([final])])


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """n noise levels evenly spaced in sigma^(1/rho) from sigma_max to sigma_min, then 0 (Karras et al. 2022, eq. 5)."""
    _check_steps(n)
    _check_sigma_range(sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho).float()


def exponential(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n noise levels evenly spaced in log sigma from sigma_max to sigma_min, then 0."""
    _check_steps(n)
    _check_sigma_range(sigma_min, sigma_max)
    ramp = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return _append_zero(ramp.exp()).float()


def _check_sigma_range(sigma_min: float, sigma_max: float) -> None:
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    if sigma_min > sigma_max:
        raise ValueError(f"sigma_min ({sigma_min}) must not exceed sigma_max ({sigma_max})")


def lcm_timesteps(steps: int, num_train_timesteps: int = 1000, original_steps: int = 50,
                  strength: float = 1.0) -> np.ndarray:
    """The timesteps (descending) diffusers' LCMScheduler visits: `steps` of them, evenly spaced in index over
    the skipping-step schedule the model was distilled on (Luo et al. 2023, section 4.3: k = T // original_steps,
    timesteps k - 1, 2k - 1, ...), of which img2img keeps the first int(original_steps * strength)."""
    _check_steps(steps)
    T = num_train_timesteps
    if isinstance(original_steps, bool) or not isinstance(original_steps, int) or not 1 <= original_steps <= T:
        raise ValueError(f"original_inference_steps must be an integer in [1, {T}]; got {original_steps!r}")
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1]; got {strength!r}")
    origin = np.arange(1, int(original_steps * strength) + 1) * (T // original_steps) - 1
    if steps > len(origin):
        raise ValueError(f"steps must be at most original_inference_steps x strength ({len(origin)}) for the lcm "
                         f"family (its timesteps are a subset of that schedule); got {steps}")
    index = np.floor(np.linspace(0, len(origin), steps, endpoint=False)).astype(np.int64)
    return np.ascontiguousarray(origin[::-1][index], dtype=np.float64)


def spaced_timesteps(
    steps: int,
    spacing: str = "leading",
    num_train_timesteps: int = 1000,
    steps_offset: int = 0,
    family: str = "k",
    original_steps: int = 50,
) -> np.ndarray:
    """The timesteps (descending) a diffusers scheduler of `family` visits for `spacing`.

    The families differ (Table 2 of Lin et al. 2023 describes the spacings; the per-family details are
    diffusers'): "k" (Euler, Heun, LMS, Euler a) keeps fractional linspace timesteps; "multistep"
    (DPM-Solver++, UniPC) spaces n + 1 rounded points and drops the last; "ddim" (DDIM) and "ddpm" (DDPM) round;
    "lcm" (LCMScheduler) ignores the spacing and steps_offset, as diffusers does, and takes `lcm_timesteps` of
    an `original_steps` schedule.
    """
    _check_steps(steps)
    _check_choice("timestep_spacing", spacing, SPACINGS)
    _check_choice("family", family, FAMILIES)
    T = num_train_timesteps
    if steps > T:
        raise ValueError(f"steps must be at most num_train_timesteps ({T}); got {steps}")
    if family == "lcm":
        return lcm_timesteps(steps, T, original_steps)
    n = steps + 1 if family == "multistep" else steps
    if spacing == "linspace":
        t = np.linspace(0, T - 1, n)
        t = t if family == "k" else t.round()
        t = t[::-1]
    elif spacing == "leading":
        t = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    else:  # trailing
        t = np.arange(T, 0, -T / steps).round() - 1
    if family == "multistep" and spacing != "trailing":
        t = t[:-1]
    if family == "k" and spacing == "linspace":
        t = t.astype(np.float32)  # diffusers builds this one in float32
    return np.ascontiguousarray(t, dtype=np.float64)


# --- a model's training schedule ------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscreteSchedule:
    """A discrete DDPM training schedule, as in a diffusers `scheduler_config.json`."""

    num_train_timesteps: int = 1000  # T: training timesteps 0 .. T-1
    beta_schedule: str = "scaled_linear"  # linear | scaled_linear | squaredcos_cap_v2
    beta_start: float = 0.00085  # first beta (linear schedules)
    beta_end: float = 0.012  # last beta (linear schedules)
    prediction_type: str = "epsilon"  # what the network predicts: epsilon | v_prediction | sample
    timestep_spacing: str | None = None  # leading | trailing | linspace; None: each family's diffusers default
    steps_offset: int = 0  # added to "leading" timesteps (Stable Diffusion uses 1)
    rescale_betas_zero_snr: bool = False  # Lin et al. 2023 zero terminal SNR
    set_alpha_to_one: bool = True  # DDIM/DDPM family: the last step lands on sigma 0 (else on sigma(t=0))
    original_inference_steps: int = 50  # lcm family: steps of the schedule the model was distilled on

    def __post_init__(self):
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, ("epsilon", "v_prediction", "sample"))
        if self.timestep_spacing is not None:
            _check_choice("timestep_spacing", self.timestep_spacing, SPACINGS)
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2; got {self.num_train_timesteps}")

    @classmethod
    def from_config(cls, config: dict) -> "DiscreteSchedule":
        """From a diffusers scheduler config; keys reverie does not use (e.g. `_class_name`) are ignored, and so
        are keys that diffusers recorded as defaults (`_use_default_values`): like diffusers' from_config, a
        sampler then gets its own scheduler class's default (e.g. DDIM "leading" spacing, Euler "linspace")."""
        names = {f.name for f in fields(cls)}
        defaulted = set(config.get("_use_default_values") or ())
        kwargs = {k: v for k, v in config.items() if k in names and k not in defaulted}
        if config.get("trained_betas") is not None:
            raise ValueError("trained_betas is not supported; use beta_schedule")
        return cls(**kwargs)

    @cached_property
    def alphas_cumprod(self) -> Tensor:
        betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        if self.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphabar = alphas_cumprod(betas)
        if self.rescale_betas_zero_snr:
            alphabar[-1] = 2**-24  # as diffusers' Euler: keeps the last sigma finite (about 4096)
        return alphabar

    @cached_property
    def sigmas(self) -> Tensor:
        """sigma for each training timestep, increasing with t (float32, shape (T,))."""
        return sigmas_from_alphas_cumprod(self.alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Linear interpolation of the sigma table at (fractional) timesteps, as diffusers does."""
        table = self.sigmas.double().numpy()
        return torch.from_numpy(np.interp(np.asarray(t, dtype=np.float64), np.arange(len(table)), table))

    def sigma_to_t(self, sigma: Tensor, mapping: str = "log") -> Tensor:
        """The timestep the network sees at noise level `sigma` (inverse of the table; see TIMESTEP_MAPPINGS).

        "log" interpolates log sigma (k-diffusion, and diffusers for Karras/exponential sigmas); "linear"
        inverts `t_to_sigma` exactly; "round" and "floor" snap the "log" result to an integer timestep, as
        diffusers' multistep schedulers do."""
        _check_choice("timestep_mapping", mapping, TIMESTEP_MAPPINGS)
        table = self.sigmas.to(sigma.device, torch.float64)
        s = sigma.to(torch.float64)
        if mapping != "linear":
            table, s = table.log(), s.clamp(min=1e-10).log()
        hi = torch.searchsorted(table, s.contiguous()).clamp(1, len(table) - 1)
        lo = hi - 1
        w = ((s - table[lo]) / (table[hi] - table[lo])).clamp(0, 1)
        t = lo + w
        if mapping == "round":
            t = t.round()
        elif mapping == "floor":
            t = t.floor()
        return t.to(sigma.dtype)

    def spacing(self, family: str = "k") -> str:
        """The timestep spacing a family uses: the config's, else its diffusers class default."""
        return self.timestep_spacing or ("leading" if family in ("ddim", "ddpm") else "linspace")

    def sampling_sigmas(self, steps: int, kind: str = "default", family: str = "k") -> Tensor:
        """The n + 1 sigmas that diffusers' scheduler of `family` visits with `kind` sigmas.

        kind "default" spaces timesteps by `timestep_spacing`; "karras" and "exponential" space sigmas
        between the family's sigma_min and sigma_max (diffusers' `use_karras_sigmas` and
        `use_exponential_sigmas`)."""
        _check_choice("kind", kind, SIGMA_KINDS)
        t = spaced_timesteps(steps, self.spacing(family), self.num_train_timesteps, self.steps_offset, family,
                             self.original_inference_steps)
        sigmas = self.t_to_sigma(t)
        final = 0.0
        if family == "ddim" and not self.set_alpha_to_one:  # DDPMScheduler always ends on alphabar 1
            final = self.sigma_min
        if kind == "default":
            return _append_zero(sigmas.float(), final)
        # k-family schedulers take the range from the spaced sigmas, multistep ones from the whole table
        lo, hi = (sigmas[-1].item(), sigmas[0].item()) if family == "k" else (self.sigma_min, self.sigma_max)
        return (karras if kind == "karras" else exponential)(steps, lo, hi)

    def timestep_mapping(self, kind: str = "default", family: str = "k") -> str:
        """How the denoiser must turn the sigmas of `sampling_sigmas(kind, family)` back into timesteps."""
        if family == "k":
            return "linear" if kind == "default" else "log"
        if family == "multistep" and kind == "exponential":
            return "floor"  # diffusers casts these float timesteps to int64
        return "round"

    def initial_noise_scale(self, sigma_max: float, family: str = "k") -> float:
        """What diffusers multiplies unit noise by to start sampling, in reverie's VE convention.

        VE samplers start from sigma_max * eps; diffusers' "ddim"/"multistep" families and its
        "leading"-spaced Euler family start from sqrt(sigma_max^2 + 1) * eps (unit variance in VP space)."""
        if family == "k" and self.spacing(family) in ("linspace", "trailing"):
            return sigma_max
        return (sigma_max**2 + 1) ** 0.5

