"""How a model's schedule kind samples: discrete VP models (SD 1/2, DiT) and rectified-flow models (SD3, FLUX).

The pipeline holds one of these beside the model's schedule and asks it the five things that differ between
the two kinds: the noise levels for a sampler, the denoiser wrapper around the network, the start of sampling
(pure noise, or an image noised to the first level for img2img), running the sampler, and the last step. Both
keep the latents in the model's own convention, so guidance, inpainting and previews are the same code for
every family:

    VP:   x = x0 + sigma * eps                  (VE sigmas from the betas; DiscreteDenoiser)
    flow: x = (1 - t) * x0 + t * eps, t in [0, 1] (FlowDenoiser; other samplers via reverie.flow.sample)
"""

from __future__ import annotations

import torch
from torch import Tensor

from .denoisers import DiscreteDenoiser, FlowDenoiser
from .schedules import DiscreteSchedule


class VPSampling:
    """Sampling a discrete DDPM-trained network exactly as diffusers' schedulers do (reverie.schedules)."""

    kind = "vp"

    def __init__(self, schedule: DiscreteSchedule):
        self.schedule = schedule

    def check(self, choice, sampler: str) -> None:
        if choice.family == "flow":
            raise ValueError(f"sampler {sampler!r} is for flow-matching models; this model is a DDPM model")

    def sigmas(self, steps: int, choice, *, mu: float | None = None) -> Tensor:
        return self.schedule.sampling_sigmas(steps, choice.schedule, choice.family)

    def denoiser(self, net, choice, *, steps: int | None = None, mu: float | None = None) -> DiscreteDenoiser:
        return DiscreteDenoiser(net, self.schedule, timestep_mapping=self.timestep_mapping(choice))

    def timestep_mapping(self, choice) -> str:
        return self.schedule.timestep_mapping(choice.schedule, choice.family)

    def timesteps(self, sigmas: Tensor, choice) -> Tensor:
        """The training timesteps of the levels sigmas[:-1] (what diffusers' scheduler.timesteps holds)."""
        return self.schedule.sigma_to_t(sigmas[:-1].double(), self.timestep_mapping(choice))

    def noise_scale(self, sigma: float, choice) -> float:
        """What unit noise is multiplied by at the first level (diffusers' init_noise_sigma)."""
        return self.schedule.initial_noise_scale(sigma, choice.family)

    @staticmethod
    def add_noise(x0: Tensor, noise: Tensor, sigma: float) -> Tensor:
        return x0 + sigma * noise

    @staticmethod
    def tail(sigmas: Tensor, strength: float) -> Tensor:
        """img2img's levels: the last int(steps * strength) (diffusers' SD img2img get_timesteps)."""
        from .edit import strength_sigmas

        return strength_sigmas(sigmas, strength)

    @staticmethod
    def run(choice, denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None) -> Tensor:
        return choice(denoiser, x, sigmas, generator=generator, callback=callback)

    @staticmethod
    def finish(x: Tensor, sigmas: Tensor) -> Tensor:
        """DDIM without set_alpha_to_one ends on a noisy level: scale it to VP as diffusers decodes it."""
        return x / (1 + sigmas[-1].item() ** 2) ** 0.5 if sigmas[-1] > 0 else x


class FlowSampling:
    """Sampling a rectified-flow velocity network (reverie.flow: FlowMatch* schedulers and the VE bridge)."""

    kind = "flow"

    def __init__(self, schedule):
        self.schedule = schedule  # a reverie.flow.FlowSchedule

    def check(self, choice, sampler: str) -> None:
        from .flow import check_flow_sampler

        check_flow_sampler(choice, sampler)

    def sigmas(self, steps: int, choice, *, mu: float | None = None) -> Tensor:
        """The flow times the choice's diffusers scheduler visits (its flags applied, e.g. flow_shift)."""
        return self.schedule.sigmas_for(choice, steps, mu=mu)

    def denoiser(self, net, choice, *, steps: int, mu: float | None = None) -> FlowDenoiser:
        """The velocity network as a denoiser; DPM-Solver and UniPC on flow models feed it diffusers' integer
        timesteps (FlowSchedule.timestep_table)."""
        return FlowDenoiser(net, timesteps=self.schedule.timestep_table(choice, steps, mu=mu))

    def timesteps(self, sigmas: Tensor, choice) -> Tensor:
        """The timesteps of the flow times sigmas[:-1] (t * T, as diffusers' FlowMatch scheduler.timesteps)."""
        return sigmas[:-1].double() * self.schedule.num_train_timesteps

    @staticmethod
    def noise_scale(sigma: float, choice) -> float:
        return 1.0

    @staticmethod
    def add_noise(x0: Tensor, noise: Tensor, sigma: float) -> Tensor:
        return torch.lerp(x0, noise, sigma)  # (1 - t) x0 + t eps (diffusers' scale_noise)

    @staticmethod
    def tail(sigmas: Tensor, strength: float) -> Tensor:
        """img2img's levels as SD3's and FLUX's img2img pipelines pick them (a fractional step count rounds up,
        where SD's rounds down)."""
        from .flow import img2img_sigmas

        return img2img_sigmas(sigmas, strength)

    @staticmethod
    def run(choice, denoiser, x: Tensor, sigmas: Tensor, *, generator=None, callback=None) -> Tensor:
        from .flow import sample

        return sample(choice, denoiser, x, sigmas, generator=generator, callback=callback)

    @staticmethod
    def finish(x: Tensor, sigmas: Tensor) -> Tensor:
        return x


def sampling_for(schedule) -> VPSampling | FlowSampling:
    return VPSampling(schedule) if isinstance(schedule, DiscreteSchedule) else FlowSampling(schedule)
