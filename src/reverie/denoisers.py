"""Turn a network into a denoiser D(x, sigma, **cond) -> x0_hat, and train it.

A network is a plain module `net(x, t, **cond)` predicting eps, v, x0 ("sample") or a flow velocity. The
wrappers here own everything about the parameterization: input scaling, the sigma -> timestep mapping of
a discrete schedule, the conversion of the output to x0, and the training loss for that target.

Variance-exploding convention: x = x0 + sigma * eps. A discrete DDPM model sees the variance-preserving
input x_t = x / sqrt(1 + sigma^2) = sqrt(alphabar) x0 + sqrt(1 - alphabar) eps at timestep t(sigma).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .schedules import DiscreteSchedule, TIMESTEP_MAPPINGS, _check_choice

PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) to broadcast against `like`."""
    return v.reshape(-1, *[1] * (like.ndim - 1))


def _sigma_batch(sigma, x: Tensor) -> Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def randn(shape, generator=None, device=None, dtype=torch.float32) -> Tensor:
    """Standard normal noise; `generator` may be one torch.Generator or a list with one per batch item
    (so a batch reproduces each item run alone), drawing exactly what diffusers' randn_tensor draws."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"generator: got {len(generator)} generators for a batch of {shape[0]}")
        items = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat(items).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


class DiscreteDenoiser(nn.Module):
    """A DDPM network on a discrete schedule as a VE denoiser (k-diffusion's DiscreteEpsDDPMDenoiser)."""

    def __init__(self, net: nn.Module, schedule: DiscreteSchedule, prediction: str | None = None,
                 timestep_mapping: str = "log"):
        super().__init__()
        prediction = prediction or schedule.prediction_type
        _check_choice("prediction", prediction, PREDICTIONS)
        _check_choice("timestep_mapping", timestep_mapping, TIMESTEP_MAPPINGS)
        self.net, self.schedule, self.prediction = net, schedule, prediction
        self.timestep_mapping = timestep_mapping

    def with_timestep_mapping(self, mapping: str) -> "DiscreteDenoiser":
        """The same network and schedule, mapping sigma -> t as a given sampling schedule requires."""
        return DiscreteDenoiser(self.net, self.schedule, self.prediction, mapping)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Timesteps in float32 whatever the sample dtype (fp16 cannot hold fractional timesteps near 1000)."""
        return self.schedule.sigma_to_t(sigma.float(), self.timestep_mapping)

    def forward(self, x: Tensor, sigma, **cond) -> Tensor:
        sigma = _sigma_batch(sigma, x)
        s = _bcast(sigma, x)
        c_in = (s**2 + 1) ** -0.5  # = sqrt(alphabar): VE x -> VP model input
        return self.denoised_from_output(x, sigma, self.net(x * c_in, self.sigma_to_t(sigma), **cond))

    def output_from_denoised(self, x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
        """What the network would have predicted (eps, v or x0) for this x0 estimate: the inverse of forward."""
        s = _bcast(_sigma_batch(sigma, x), x)
        eps = (x - denoised) / s
        if self.prediction == "epsilon":
            return eps
        if self.prediction == "v_prediction":
            return (eps - s * denoised) * (s**2 + 1) ** -0.5  # alpha eps - sigma_vp x0
        return denoised

    def denoised_from_output(self, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
        s = _bcast(_sigma_batch(sigma, x), x)
        if self.prediction == "epsilon":
            return x - s * out
        if self.prediction == "v_prediction":  # v = alpha eps - sigma_vp x0 (Salimans & Ho 2022)
            return x / (s**2 + 1) - out * s * (s**2 + 1) ** -0.5
        return out

    def loss(self, x0: Tensor, *, t: Tensor | None = None, noise: Tensor | None = None, generator=None,
             min_snr_gamma: float | None = None, offset_noise: float = 0.0, **cond) -> Tensor:
        """Per-item DDPM training loss (B,) for this denoiser's target.

        t: (B,) integer timesteps, uniform if None. offset_noise adds per-channel constant noise
        (Guttenberg 2023). min_snr_gamma weights by min(SNR, gamma) / SNR for eps, / (SNR + 1) for v, and
        min(SNR, gamma) for x0 (Hang et al. 2023, eq. 8 and its v variant)."""
        B, T = x0.shape[0], self.schedule.num_train_timesteps
        if t is None:
            t = torch.randint(0, T, (B,), generator=generator, device="cpu").to(x0.device)
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
            if offset_noise:
                noise = noise + offset_noise * randn((*x0.shape[:2], *[1] * (x0.ndim - 2)), generator,
                                                      x0.device, x0.dtype)
        alphabar = self.schedule.alphas_cumprod.to(x0.device)[t]
        x_t = _bcast(alphabar.sqrt(), x0) * x0 + _bcast((1 - alphabar).sqrt(), x0) * noise
        if self.prediction == "epsilon":
            target = noise
        elif self.prediction == "v_prediction":
            target = _bcast(alphabar.sqrt(), x0) * noise - _bcast((1 - alphabar).sqrt(), x0) * x0
        else:
            target = x0
        pred = self.net(x_t, t.to(x0.dtype), **cond)
        mse = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
        if min_snr_gamma is None:
            return mse
        snr = alphabar / (1 - alphabar)
        clipped = snr.clamp(max=min_snr_gamma)
        weight = {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1), "sample": clipped}[self.prediction]
        return mse * weight.float()


class FlowDenoiser(nn.Module):
    """A rectified-flow velocity network (SD3, FLUX) as a denoiser.

    Flow convention: x = (1 - sigma) x0 + sigma eps with sigma in [0, 1] (diffusers' FlowMatch "sigmas");
    the network predicts v = eps - x0 and sees the timestep sigma * timestep_scale. Flow samplers
    (`euler_flow`) use this denoiser directly; `.ve()` gives the same model in the VE convention for
    every other sampler (reverie.flow.sample does that).

    timesteps: optional (sigmas (n,), timesteps (n,)): at these flow times the network sees these timesteps
    instead (diffusers' DPMSolverMultistep / UniPC on flow models pass integer timesteps:
    FlowSchedule.timestep_table)."""

    def __init__(self, net: nn.Module, timestep_scale: float = 1000.0, timesteps: tuple | None = None):
        super().__init__()
        self.net, self.timestep_scale, self.timesteps = net, timestep_scale, timesteps

    def timestep(self, sigma: Tensor) -> Tensor:
        """What the network sees at flow times sigma (B,)."""
        t = sigma * self.timestep_scale
        if self.timesteps is None:
            return t
        table_sigmas, table_t = (torch.as_tensor(a, device=sigma.device) for a in self.timesteps)
        gap, index = (sigma[:, None].double() - table_sigmas[None].double()).abs().min(1)
        return torch.where(gap <= 1e-7, table_t[index].to(t.dtype), t)

    def forward(self, x: Tensor, sigma, **cond) -> Tensor:
        sigma = _sigma_batch(sigma, x)
        v = self.net(x, self.timestep(sigma), **cond)
        return x - _bcast(sigma, x) * v

    def ve(self) -> "VEFromFlow":
        return VEFromFlow(self)

    def loss(self, x0: Tensor, *, sigma: Tensor | None = None, noise: Tensor | None = None, generator=None,
             **cond) -> Tensor:
        """Per-item conditional flow-matching loss ||v - (eps - x0)||^2 (Lipman et al. 2023; Liu et al. 2023).

        sigma: (B,) flow times in [0, 1], logit-normal(0, 1) if None (Esser et al. 2024, SD3)."""
        B = x0.shape[0]
        if sigma is None:
            sigma = torch.sigmoid(randn((B,), generator, x0.device, x0.dtype))
        if noise is None:
            noise = randn(x0.shape, generator, x0.device, x0.dtype)
        s = _bcast(sigma, x0)
        pred = self.net((1 - s) * x0 + s * noise, sigma * self.timestep_scale, **cond)
        return ((pred.float() - (noise - x0).float()) ** 2).flatten(1).mean(1)


class VEFromFlow(nn.Module):
    """A flow denoiser (a FlowDenoiser, or a wrapper of one) seen in the VE convention:
    x_ve = x_flow / (1 - t), sigma_ve = t / (1 - t). `dtype`: what the flow denoiser gets (default x's), so a
    sampler can run in float64 around a float32 model; the x0 estimate comes back in x's dtype."""

    def __init__(self, flow, dtype: torch.dtype | None = None):
        super().__init__()
        self.flow, self.dtype = flow, dtype

    def forward(self, x: Tensor, sigma, **cond) -> Tensor:
        sigma = _sigma_batch(sigma, x)
        dtype = self.dtype or x.dtype
        x_flow = (x / _bcast(1 + sigma, x)).to(dtype)
        return self.flow(x_flow, (sigma / (1 + sigma)).to(dtype), **cond).to(x.dtype)


def flow_sigmas(steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """Flow times from 1 to 1/T, shifted toward noise by `shift` (SD3 eq. 23), then 0 — the sigmas of
    diffusers' FlowMatchEulerDiscreteScheduler."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1; got {steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0; got {shift!r}")
    t = torch.linspace(1, 1 / num_train_timesteps, steps, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return torch.cat([t, t.new_zeros(1)]).float()
