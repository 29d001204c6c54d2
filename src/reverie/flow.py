"""Rectified-flow schedules as data, and the one function that samples a flow model with any sampler.

Flow convention (SD3, FLUX): x_t = (1 - t) x0 + t eps with t in [0, 1]; reverie calls t the flow "sigma", as
diffusers does. `FlowSchedule` is diffusers' FlowMatchEulerDiscreteScheduler config together with the flow
times each diffusers scheduler visits (FlowMatchEuler / FlowMatchHeun, and DPMSolverMultistep / UniPC with
`use_flow_sigmas=True`), so a sampler here follows that scheduler's trajectory.

`sample` runs the flow samplers (euler_flow, heun_flow) directly and every other sampler in the VE
convention of the same model (Karras et al. 2022, sec. 2, with scaling s(t) = 1 - t): x_ve = x / (1 - t),
sigma_ve = t / (1 - t) with the same x0 estimate, then converts back. DPM-Solver++ and UniPC are written in
lambda = log(alpha / sigma), which is -log sigma_ve here, so in this view they are diffusers'
flow-prediction DPMSolverMultistep / UniPC step for step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

from .denoisers import VEFromFlow
from .samplers import SAMPLERS, StepInfo, check_sigmas
from .schedules import _check_choice, _check_steps

FLOW_KINDS = ("default", "simple", "sgm_uniform", "beta", "karras", "exponential")
FLOW_FAMILIES = ("flow", "k", "multistep", "unipc")
TIME_SHIFT_TYPES = ("exponential", "linear")
_CONVERSIONS = {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential", "use_beta_sigmas": "beta"}

# A flow time of 1 is an infinite VE sigma. Samplers that run in the VE view start just below it, where
# diffusers' UniPC flow schedule starts too (it subtracts 1e-6 from a first sigma of 1; ComfyUI's SDE samplers
# move it to percent_to_sigma(1e-4), offset_first_sigma_for_snr). The noise at t = 1 is taken as x there: an
# error of order 1e-6 in x. Their first step is then (nearly) the t -> 1 limit of the sampler's own step,
# which is finite for all of them but Heun in VE form (hence heun -> heun_flow below).
FLOW_TIME_MAX = 1 - 1e-6

# On a flow model these names are the flow solvers, as in diffusers (FlowMatchEuler / FlowMatchHeun) and
# ComfyUI: Euler is the same step in either view, and Heun's trapezoid over the VE sigma diverges from t = 1.
_FLOW_EQUIVALENTS = {"euler": "euler_flow", "heun": "heun_flow"}


@dataclass(frozen=True)
class FlowSchedule:
    """A rectified-flow schedule, as in a diffusers FlowMatchEulerDiscreteScheduler `scheduler_config.json`."""

    num_train_timesteps: int = 1000  # T: the network sees timestep t * T
    shift: float = 1.0  # static shift s: t -> s t / (1 + (s - 1) t) (SD3, Esser et al. 2024, eq. 23)
    use_dynamic_shifting: bool = False  # shift by mu instead (FLUX: mu from the image size, see .mu)
    base_shift: float = 0.5  # mu at base_image_seq_len
    max_shift: float = 1.15  # mu at max_image_seq_len
    base_image_seq_len: int = 256  # image tokens where mu = base_shift
    max_image_seq_len: int = 4096  # image tokens where mu = max_shift
    time_shift_type: str = "exponential"  # dynamic shift: e^mu / (e^mu + 1/t - 1) | linear: mu / (mu + 1/t - 1)
    shift_terminal: float | None = None  # stretch the shifted times so the last nonzero one is this (LTX-Video)
    use_karras_sigmas: bool = False  # kind "default" converts to Karras spacing between the end times
    use_exponential_sigmas: bool = False  # ... to log-uniform spacing
    use_beta_sigmas: bool = False  # ... to Beta(0.6, 0.6) quantiles (Lee et al. 2024); needs scipy
    invert_sigmas: bool = False  # diffusers samples from t = 0 to 1: not supported (must stay False)
    stochastic_sampling: bool = False  # FlowMatchEuler re-noises x0 each step: euler_flow(stochastic=True)

    def __post_init__(self):
        _check_choice("time_shift_type", self.time_shift_type, TIME_SHIFT_TYPES)
        if isinstance(self.num_train_timesteps, bool) or not isinstance(self.num_train_timesteps, int) \
                or self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be an integer >= 1; got {self.num_train_timesteps!r}")
        if not (isinstance(self.shift, (int, float)) and math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a finite number > 0; got {self.shift!r}")
        if self.base_image_seq_len == self.max_image_seq_len:
            raise ValueError(f"base_image_seq_len and max_image_seq_len must differ; both are {self.max_image_seq_len}")
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            raise ValueError(f"shift_terminal must be None or in [0, 1); got {self.shift_terminal!r}")
        chosen = [flag for flag in _CONVERSIONS if getattr(self, flag)]
        if len(chosen) > 1:
            raise ValueError(f"{' and '.join(chosen)} are mutually exclusive")
        if self.invert_sigmas:
            raise ValueError("invert_sigmas=True is not supported (reverie samples from noise, t = 1, to data, t = 0)")

    @classmethod
    def from_config(cls, config: dict) -> "FlowSchedule":
        """From a diffusers scheduler config. Keys reverie does not use (`_class_name`, ...) are ignored, and so
        are those diffusers recorded as defaults (`_use_default_values`), as DiscreteSchedule.from_config does.
        A DPMSolverMultistep / UniPC config with `use_flow_sigmas` (Wan) gives its `flow_shift` as the shift."""
        names = {f.name for f in fields(cls)}
        defaulted = set(config.get("_use_default_values") or ())
        kwargs = {k: v for k, v in config.items() if k in names and k not in defaulted}
        if config.get("use_flow_sigmas") and "flow_shift" in config and "flow_shift" not in defaulted:
            kwargs["shift"] = config["flow_shift"]
        return cls(**kwargs)

    def to_config(self) -> dict:
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", **dataclasses.asdict(self)}

    def for_sampler(self, choice) -> "FlowSchedule":
        """This schedule with the fields a SamplerChoice's diffusers flags set (e.g. flow_shift -> shift)."""
        return dataclasses.replace(self, **choice.flow_config) if choice.flow_config else self

    def sigmas_for(self, choice, steps: int, *, mu: float | None = None) -> Tensor:
        """The flow times a SamplerChoice visits: its flags applied, its kind, its flow family."""
        check_flow_sampler(choice)
        return self.for_sampler(choice).sampling_sigmas(steps, choice.schedule, choice.flow_family, mu=mu)

    def timestep_table(self, choice, steps: int, *, mu: float | None = None) -> tuple[Tensor, Tensor] | None:
        """(sigmas, timesteps) for FlowDenoiser(timesteps=...) where a SamplerChoice's diffusers scheduler passes
        the network other timesteps than t * T: DPMSolverMultistep and UniPC truncate theirs to integers (from
        the float64 times, so the table cannot be recomputed from the float32 sigmas). None otherwise."""
        check_flow_sampler(choice)
        if choice.flow_family not in ("multistep", "unipc"):
            return None
        schedule = self.for_sampler(choice)
        t = schedule._times(steps, choice.schedule, choice.flow_family, mu)
        return torch.from_numpy(t).float(), torch.from_numpy(np.trunc(t * self.num_train_timesteps)).float()

    # --- shifting ------------------------------------------------------------------------------------------

    def mu(self, image_seq_len: int) -> float:
        """FLUX's calculate_shift: mu on the line through (base_image_seq_len, base_shift) and
        (max_image_seq_len, max_shift)."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * m + (self.base_shift - m * self.base_image_seq_len)

    def time_shift(self, t, mu: float | None = None):
        """Move flow times (array or tensor) toward noise: dynamically by mu when use_dynamic_shifting (exponential:
        e^mu / (e^mu + 1/t - 1), the static shift with s = e^mu; linear: mu / (mu + 1/t - 1)), else by `shift`."""
        if self.use_dynamic_shifting:
            a = math.exp(mu) if self.time_shift_type == "exponential" else mu
            with np.errstate(divide="ignore"):  # t = 0 stays 0 (1 / 0 = inf)
                return a / (a + (1 / t - 1))
        return _static_shift(self.shift, t)

    def _stretch_to_terminal(self, t: np.ndarray) -> np.ndarray:
        """Scale 1 - t so the last time is shift_terminal (diffusers' stretch_shift_to_terminal, from LTX-Video)."""
        if t[-1] >= 1:
            raise ValueError("shift_terminal: the schedule's last time is 1, so it cannot be stretched (diffusers "
                             "gives NaN here); use more steps")
        one_minus = 1 - t
        return 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))

    # --- the times each scheduler visits ---------------------------------------------------------------------

    def _end_times(self) -> tuple[float, float]:
        """(t_max, t_min) of the training table, as FlowMatchEuler's __init__ computes them (in float32, shifted
        unless dynamic): set_timesteps spaces its default times between these and then shifts again."""
        t = torch.tensor([self.num_train_timesteps, 1], dtype=torch.float32) / self.num_train_timesteps
        if not self.use_dynamic_shifting:
            t = _static_shift(self.shift, t)
        return t[0].item(), t[1].item()

    def _base_times(self, steps: int, kind: str, family: str) -> np.ndarray:
        """The unshifted times (float64, in diffusers' own numpy operations) a kind spaces for `family`."""
        T = self.num_train_timesteps
        if kind == "default" and family == "multistep":  # DPMSolverMultistep: 1 - linspace(1, 1/T, N + 1), flipped
            return np.flip(1.0 - np.linspace(1, 1 / T, steps + 1))[:-1].copy()
        if kind == "default" and family == "unipc":  # UniPC: linspace(1, 1/T, N + 1) without its last point
            return np.linspace(1, 1 / T, steps + 1)[:-1]
        if kind == "simple":  # FLUX's sigmas = linspace(1, 1/N, N); ComfyUI "simple"
            return np.linspace(1.0, 1 / steps, steps)
        t_max, t_min = self._end_times()
        if kind == "sgm_uniform":  # ComfyUI: "normal" with N + 1 points, the last dropped
            return np.linspace(t_max * T, t_min * T, steps + 1)[:-1] / T
        return np.linspace(t_max * T, t_min * T, steps) / T  # FlowMatchEuler's default

    def _times(self, steps: int, kind: str, family: str, mu) -> np.ndarray:
        """The n nonzero flow times of sampling_sigmas, in float64."""
        _check_steps(steps)
        _check_choice("kind", kind, FLOW_KINDS)
        _check_choice("family", family, FLOW_FAMILIES)
        if self.use_dynamic_shifting:
            if mu is None or isinstance(mu, bool) or not math.isfinite(float(mu)):
                raise ValueError(f"mu must be a finite number when use_dynamic_shifting=True (FlowSchedule.mu("
                                 f"image_seq_len) gives FLUX's); got {mu!r}")
            mu = float(mu)
        own = kind == "default" and family in ("multistep", "unipc")  # the multistep schedulers' own spacing
        t = self._base_times(steps, kind, family)
        if own and family == "multistep":
            if self.use_dynamic_shifting and self.time_shift_type != "exponential":
                raise ValueError("time_shift_type 'linear' with dynamic shifting is not available for family "
                                 "'multistep' (DPMSolverMultistepScheduler takes mu as flow_shift = e^mu)")
            if self.shift_terminal:
                raise ValueError("shift_terminal is not available for family 'multistep' "
                                 "(DPMSolverMultistepScheduler has none); use another kind or sampler")
            t = _static_shift(np.exp(mu) if self.use_dynamic_shifting else self.shift, t)  # its flow_shift
        else:
            t = self.time_shift(t, mu)
        if self.shift_terminal:
            t = self._stretch_to_terminal(t)
        conversion = kind if kind in ("karras", "exponential", "beta") else \
            next((_CONVERSIONS[flag] for flag in _CONVERSIONS if getattr(self, flag)), None)
        if conversion is not None and not own:
            t = _convert(t, steps, conversion)
        if family == "unipc" and np.fabs(t[0] - 1) < 1e-6:
            t = t.copy()
            t[0] -= 1e-6
        return t

    def sampling_sigmas(self, steps: int, kind: str = "default", family: str = "flow", *,
                        mu: float | None = None) -> Tensor:
        """The n + 1 flow times (float32, from near 1 down to 0) that diffusers' scheduler of `family` visits.

        family "flow" and "k" (FlowMatchEuler / FlowMatchHeun, and every k sampler on a flow model) with kind:
          "default" FlowMatchEuler.set_timesteps(n): times spaced between the shifted table ends, then shifted
                    again (the double shift; ComfyUI "normal");
          "simple"  FLUX's set_timesteps(sigmas=linspace(1, 1/n, n)) (ComfyUI "simple");
          "sgm_uniform" "default" on n + 1 points without the last (ComfyUI "sgm_uniform");
          "karras", "exponential", "beta": the default times converted as use_karras_sigmas /
                    use_exponential_sigmas / use_beta_sigmas do (the config's flag converts the other kinds).
        Then the shift (dynamic by `mu`, required when use_dynamic_shifting and ignored otherwise, as
        FlowMatchEuler; else static), shift_terminal's stretch, the conversion, a final 0.
        family "multistep" (DPM-Solver++) and "unipc", kind "default": DPMSolverMultistepScheduler /
          UniPCMultistepScheduler with use_flow_sigmas=True and flow_shift = shift (the config's use_*_sigmas
          flags do not apply). With dynamic shifting, mu acts as in their set_timesteps(mu=...):
          DPMSolverMultistep's flow_shift becomes e^mu (exponential time_shift_type only; it has no
          shift_terminal), UniPC applies the time shift as above. UniPC moves a first time of 1 to 1 - 1e-6.
          Other kinds take the FlowMatchEuler times of that kind (as ComfyUI does; diffusers' use_*_sigmas
          flags would space VP sigmas there), UniPC with its first-time offset (= UniPC given those sigmas)."""
        t = torch.from_numpy(np.ascontiguousarray(self._times(steps, kind, family, mu))).float()
        return torch.cat([t, t.new_zeros(1)])

    # --- img2img ---------------------------------------------------------------------------------------------

    @staticmethod
    def add_noise(x0: Tensor, noise: Tensor, t) -> Tensor:
        """The flow forward process (1 - t) x0 + t noise (diffusers' scale_noise); t a number or (B,)."""
        t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device).reshape(-1, *[1] * (x0.ndim - 1))
        return (1 - t) * x0 + t * noise


def _static_shift(s: float, t):
    """SD3's shift s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23), in diffusers' order of operations."""
    return s * t / (1 + (s - 1) * t)


def _convert(t: np.ndarray, steps: int, conversion: str) -> np.ndarray:
    """Respace n times between their ends, as FlowMatchEuler's _convert_to_karras / _exponential / _beta."""
    lo, hi = float(t[-1]), float(t[0])
    if conversion == "karras":  # Karras et al. 2022, eq. 5, rho = 7
        ramp = np.linspace(0, 1, steps)
        return (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    if conversion == "exponential":
        return np.exp(np.linspace(math.log(hi), math.log(lo), steps))
    try:
        from scipy.stats import beta
    except ImportError as e:
        raise ImportError("beta sigmas (kind 'beta', use_beta_sigmas) need scipy: pip install scipy") from e
    ppf = beta.ppf(1 - np.linspace(0, 1, steps), 0.6, 0.6)  # Beta(0.6, 0.6) quantiles, from 1 down to 0
    return lo + ppf * (hi - lo)


def img2img_sigmas(sigmas: Tensor, strength: float) -> Tensor:
    """The tail of a flow schedule that img2img runs, as StableDiffusion3Img2ImgPipeline / FluxImg2ImgPipeline
    get_timesteps: skip int(steps - steps * strength) levels. Unlike reverie.edit.strength_sigmas (SD's
    int(steps * strength) kept), a fractional count rounds up: 10 steps at strength 0.35 run 4, not 3."""
    if not 0 <= strength <= 1:
        raise ValueError(f"strength must be in [0, 1]; got {strength!r}")
    steps = len(sigmas) - 1
    return sigmas[int(max(steps - min(steps * strength, steps), 0)):]


# --- sampling --------------------------------------------------------------------------------------------------


def flow_samplers() -> list[str]:
    """The samplers that run on flow models."""
    return [name for name, fn in SAMPLERS.items() if fn.flow_family is not None]


def check_flow_sampler(choice, sampler: str | None = None) -> None:
    """Refuse a sampler that cannot run on a flow model (DDIM and DDPM are written for VP schedules)."""
    if choice.flow_family is None:
        raise ValueError(f"sampler {sampler or choice.name!r} works on DDPM models only; on a flow-matching "
                         f"model use one of {', '.join(flow_samplers())}")


def _check_flow_times(sigmas) -> None:
    check_sigmas(sigmas)
    if sigmas[0] > 1:
        raise ValueError(f"sigmas must be flow times in [0, 1]; got sigmas[0]={sigmas[0].item()}")


def sample(choice, denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None) -> Tensor:
    """Run a SamplerChoice on a flow model: the one sampling call for SD3 / FLUX-style networks.

    denoiser: D(x, t) -> x0 in the flow convention (a FlowDenoiser or a wrapper such as CFG); x: the sample at
    sigmas[0] (pure noise at t = 1 for text-to-image); sigmas: flow times from FlowSchedule.sampling_sigmas.
    Flow samplers (and euler / heun without options, their flow equivalents) run directly; the others in the
    VE view, in float64, with flow times above FLOW_TIME_MAX (a first time of 1) moved to it; their noise is
    then drawn in float64. `callback` gets StepInfo in the flow convention (x in flow space, sigma a flow
    time, denoised = x0) whatever the sampler."""
    check_flow_sampler(choice)
    _check_flow_times(sigmas)
    if choice.family != "flow" and choice.name in _FLOW_EQUIVALENTS and not choice.options:
        choice = dataclasses.replace(choice, name=_FLOW_EQUIVALENTS[choice.name])
    if choice.family == "flow":
        return choice(denoiser, x, sigmas, generator=generator, callback=callback)
    # float64 (float32 on MPS, which has no float64): x_ve starts near 1e6 * x, and the Euler-type updates
    # x + d (sigma_next - sigma) cancel that down to O(sigma_next); float32 would lose ~1e-2 there
    work = torch.float32 if x.device.type == "mps" else torch.float64
    t = sigmas.to(work).clamp(max=FLOW_TIME_MAX)
    sigmas_ve = t / (1 - t)  # (n + 1,)
    flow_callback = None
    if callback is not None:
        def flow_callback(info: StepInfo):
            s, s_next = info.sigma, info.sigma_next
            callback(StepInfo(info.i, (info.x / (1 + s)).to(x.dtype), s / (1 + s), s_next / (1 + s_next),
                              info.denoised.to(x.dtype)))
    x_ve = choice(VEFromFlow(denoiser, x.dtype), x.to(work) / (1 - t[0].item()), sigmas_ve, generator=generator,
                  callback=flow_callback)
    return (x_ve * (1 - t[-1].item())).to(x.dtype)
