"""One resolver for the sampler names people already use: reverie's own, A1111 labels, ComfyUI
sampler_name + scheduler pairs, and diffusers scheduler class names with their flags."""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field

from .solvers import SAMPLERS


@dataclass(frozen=True)
class SamplerChoice:
    """A sampler from SAMPLERS, the kind of sigmas it runs on, and its fixed options."""

    name: str  # key in SAMPLERS
    schedule: str = "default"  # default | karras | exponential; flow models also simple | sgm_uniform | beta
    options: dict = field(default_factory=dict)  # e.g. {"eta": 1.0}; passed to the sampler
    flow_config: dict = field(default_factory=dict)  # FlowSchedule fields set by diffusers flags, e.g. {"shift": 3.0}

    @property
    def fn(self):
        return SAMPLERS[self.name]

    @property
    def family(self) -> str:
        """The diffusers scheduler family whose timestep spacing this sampler reproduces."""
        return self.fn.family

    @property
    def flow_family(self) -> str | None:
        """The sigma family on a flow model (reverie.flow.FlowSchedule); None: DDPM models only."""
        return self.fn.flow_family

    def for_schedule(self, schedule) -> "SamplerChoice":
        """The choice with the model's schedule among its options, for a sampler that takes one (lcm: its
        boundary conditions are functions of the discrete timestep of each sigma); otherwise the choice itself."""
        if "schedule" not in inspect.signature(self.fn).parameters:
            return self
        return dataclasses.replace(self, options={**self.options, "schedule": schedule})

    def __call__(self, denoiser, x, sigmas, **kwargs):
        return self.fn(denoiser, x, sigmas, **{**self.options, **kwargs})

    def __hash__(self):
        return hash((self.name, self.schedule, tuple(sorted(self.options.items())),
                     tuple(sorted(self.flow_config.items()))))


# A1111 labels (old combined names included: API clients still send "DPM++ 2M Karras") and reverie's own
# names. ComfyUI's sampler names are reverie's names, plus the aliases below.
_LABELS = {
    "Euler": ("euler", "default"),
    "Euler a": ("euler_ancestral", "default"),
    "Heun": ("heun", "default"),
    "LMS": ("lms", "default"),
    "LMS Karras": ("lms", "karras"),
    "DDIM": ("ddim", "default"),
    "DDPM": ("ddpm", "default"),
    "UniPC": ("unipc", "default"),
    "DPM++ 2M": ("dpmpp_2m", "default"),
    "DPM++ 2M Karras": ("dpmpp_2m", "karras"),
    "DPM++ 2M Exponential": ("dpmpp_2m", "exponential"),
    "DPM++ 2M SDE": ("dpmpp_2m_sde", "default"),
    "DPM++ 2M SDE Karras": ("dpmpp_2m_sde", "karras"),
    "DPM++ 2M SDE Exponential": ("dpmpp_2m_sde", "exponential"),
    "DPM++ SDE": ("dpmpp_sde", "default"),
    "DPM++ SDE Karras": ("dpmpp_sde", "karras"),
    "LCM": ("lcm", "default"),
    "Euler flow": ("euler_flow", "default"),
    "Flow Euler": ("euler_flow", "default"),
    "Heun flow": ("heun_flow", "default"),
    "Flow Heun": ("heun_flow", "default"),
    # ComfyUI aliases
    "uni_pc": ("unipc", "default"),
    "uni_pc_bh2": ("unipc", "default"),
    "dpmpp_2m_sde_gpu": ("dpmpp_2m_sde", "default"),
    "dpmpp_sde_gpu": ("dpmpp_sde", "default"),
}
_OPTIONS = {"uni_pc": {"variant": "bh1"}}

# The schedule a sampler gets under A1111's "Automatic" schedule type (sd_samplers_kdiffusion.py).
_AUTOMATIC = {"dpmpp_2m": "karras", "dpmpp_sde": "karras", "dpmpp_2m_sde": "exponential"}

# A1111 "Schedule type" and ComfyUI "scheduler" names that reverie implements. "simple", "sgm_uniform" and
# "beta" exist for flow models only (reverie.flow.FlowSchedule); DiscreteSchedule refuses them.
_SCHEDULES = {"default": "default", "uniform": "default", "normal": "default", "karras": "karras",
              "exponential": "exponential", "simple": "simple", "sgm_uniform": "sgm_uniform",
              "sgm uniform": "sgm_uniform", "beta": "beta"}

# diffusers scheduler classes; flags below refine them.
_DIFFUSERS = {
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "HeunDiscreteScheduler": "heun",
    "LMSDiscreteScheduler": "lms",
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "DPMSolverSDEScheduler": "dpmpp_sde",
    "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm",
    "FlowMatchEulerDiscreteScheduler": "euler_flow",
    "FlowMatchHeunDiscreteScheduler": "heun_flow",
}
# Flags of those classes that change the sampling algorithm: (flag, value) -> allowed, or why not.
_DPM_ALGORITHMS = {"dpmsolver++": "dpmpp_2m", "sde-dpmsolver++": "dpmpp_2m_sde"}
_FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
# Their config keys that are FlowSchedule fields (the flow schedule, not the sampler).
_FLOW_SCHEDULE_KEYS = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                       "base_image_seq_len", "max_image_seq_len", "time_shift_type", "shift_terminal")
# DPMSolverMultistep / UniPC flags with use_flow_sigmas=True, and the FlowSchedule field each sets.
_MULTISTEP_FLOW_KEYS = {"flow_shift": "shift", "use_dynamic_shifting": "use_dynamic_shifting",
                        "time_shift_type": "time_shift_type", "shift_terminal": "shift_terminal"}


def _normalize(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip().lower())


_LABEL_KEYS = {_normalize(k): v for k, v in _LABELS.items()}
_DIFFUSERS_KEYS = {_normalize(k): k for k in _DIFFUSERS}


def valid_names() -> list[str]:
    return list(SAMPLERS) + sorted(set(_LABELS) - set(SAMPLERS), key=str.lower)


def _bad(field_name, value, allowed):
    return ValueError(f"{field_name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _sigma_kind(cls: str, flags: dict) -> str:
    """The schedule kind that the use_*_sigmas flags of a diffusers class select."""
    chosen = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas") if flags.get(k)]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} are mutually exclusive")
    if chosen == ["use_beta_sigmas"] and cls not in _FLOW_CLASSES:
        raise ValueError("use_beta_sigmas is supported on FlowMatch schedulers only; allowed sigma flags here: "
                         "use_karras_sigmas, use_exponential_sigmas")
    return {"use_karras_sigmas": "karras", "use_exponential_sigmas": "exponential",
            "use_beta_sigmas": "beta"}[chosen[0]] if chosen else "default"


def _flow_flags(cls: str, flags: dict, schedule: str) -> tuple[dict, dict]:
    """(sampler options, FlowSchedule overrides) from the flow flags of a diffusers class."""
    options, flow_config = {}, {}
    if cls in _FLOW_CLASSES:
        if flags.get("invert_sigmas"):
            raise ValueError("invert_sigmas=True is not supported (reverie samples from noise, t = 1, to data, t = 0)")
        if flags.get("stochastic_sampling"):
            options["stochastic"] = True
        flow_config = {k: flags[k] for k in _FLOW_SCHEDULE_KEYS if k in flags}
    elif flags.get("use_flow_sigmas"):  # DPMSolverMultistep / UniPC on a flow model
        if schedule != "default":
            raise ValueError("use_karras_sigmas / use_exponential_sigmas with use_flow_sigmas=True are not supported "
                             "(diffusers then spaces the sigmas of its VP betas, not the flow schedule); use "
                             "scheduler='karras' with use_flow_sigmas=False, or the flow schedule's kinds")
        if flags.get("shift_terminal") and cls == "DPMSolverMultistepScheduler":
            raise ValueError("shift_terminal: DPMSolverMultistepScheduler has no shift_terminal")
        flow_config = {field_: flags[key] for key, field_ in _MULTISTEP_FLOW_KEYS.items() if key in flags}
    return options, flow_config


def _from_diffusers(cls: str, flags: dict) -> SamplerChoice:
    name = _DIFFUSERS[cls]
    options = {}
    schedule = _sigma_kind(cls, flags)
    if cls == "DPMSolverMultistepScheduler":
        algorithm = flags.get("algorithm_type", "dpmsolver++")
        if algorithm not in _DPM_ALGORITHMS:
            raise _bad("algorithm_type", algorithm, list(_DPM_ALGORITHMS))
        name = _DPM_ALGORITHMS[algorithm]
        if flags.get("solver_order", 2) != 2:
            raise _bad("solver_order", flags["solver_order"], [2])
        if flags.get("solver_type", "midpoint") != "midpoint":
            raise _bad("solver_type", flags["solver_type"], ["midpoint"])
    if cls == "UniPCMultistepScheduler":
        if flags.get("solver_order", 2) != 2:
            options["order"] = flags["solver_order"]
        if flags.get("solver_type", "bh2") != "bh2":
            options["variant"] = flags["solver_type"]
        if not flags.get("predict_x0", True):
            raise _bad("predict_x0", False, [True])
    if cls == "DDIMScheduler" and flags.get("eta"):
        options["eta"] = float(flags["eta"])
    if cls == "LCMScheduler" and flags.get("timestep_scaling", 10.0) != 10.0:
        options["timestep_scaling"] = float(flags["timestep_scaling"])
    for flag in ("thresholding", "clip_sample"):
        if flags.get(flag) and cls in ("DDIMScheduler", "DDPMScheduler", "LCMScheduler"):
            raise ValueError(f"{flag}=True is not supported by reverie's samplers; set it to False")
    flow_options, flow_config = _flow_flags(cls, flags, schedule)
    return SamplerChoice(name, schedule, {**options, **flow_options}, flow_config)


def resolve(name: str, scheduler: str | None = None, **flags) -> SamplerChoice:
    """The sampler and schedule for a name from any tool.

    - reverie / ComfyUI names: "dpmpp_2m", with scheduler "normal" | "karras" | "exponential", and on flow
      models also "simple" | "sgm_uniform" | "beta";
    - A1111 labels: "DPM++ 2M Karras", "Euler a", or "DPM++ 2M" with scheduler (Schedule type)
      "Automatic" | "Uniform" | "Karras" | "Exponential";
    - diffusers classes with their config flags: resolve("DPMSolverMultistepScheduler",
      use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"). Flow flags (FlowMatch* `shift`,
      `use_dynamic_shifting`, ...; DPMSolverMultistep / UniPC `use_flow_sigmas=True` with `flow_shift`) are
      schedule properties: they go to SamplerChoice.flow_config, which FlowSchedule.for_sampler applies.
      LCMScheduler's `original_inference_steps` is a DiscreteSchedule field, read from the model's scheduler
      config. Other config keys are ignored.
    Unknown names raise ValueError listing the valid ones."""
    if not isinstance(name, str):
        raise ValueError(f"sampler must be a string; got {type(name).__name__}")
    key = _normalize(name)
    if key in _DIFFUSERS_KEYS:
        if scheduler is not None:
            raise ValueError("scheduler: give diffusers schedulers their flags (use_karras_sigmas=True), "
                             "not a scheduler name")
        return _from_diffusers(_DIFFUSERS_KEYS[key], flags)
    if flags:
        raise ValueError(f"unexpected options {sorted(flags)} for sampler {name!r}; flags are for diffusers "
                         f"scheduler classes ({', '.join(sorted(_DIFFUSERS))})")
    if key in SAMPLERS:
        sampler, schedule = key, "default"
    elif key in _LABEL_KEYS:
        sampler, schedule = _LABEL_KEYS[key]
    else:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(valid_names())}, or a diffusers "
                         f"scheduler class ({', '.join(sorted(_DIFFUSERS))})")
    if scheduler is not None:
        skey = _normalize(scheduler)
        if skey == "automatic":
            schedule = _AUTOMATIC.get(sampler, schedule)
        elif skey in _SCHEDULES:
            schedule = _SCHEDULES[skey]
        else:
            raise _bad("scheduler", scheduler, ["automatic", *_SCHEDULES])
    return SamplerChoice(sampler, schedule, dict(_OPTIONS.get(key, {})))
