"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022), with guidance rescale
(Lin et al. 2023, Algorithm 2). Conditioning is passed as keyword tensors, batched along dim 0."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _check_scale(name: str, value: float, low: float = 0.0, high: float = math.inf) -> float:
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name} must be a finite number in [{low}, {high}]; got {value!r}")
    return value


class CFGDenoiser(nn.Module):
    """D_cfg = D_uncond + scale * (D_cond - D_uncond), in one batched forward pass.

    cond / uncond: keyword arguments for the denoiser (e.g. encoder_hidden_states=...). A negative prompt
    is simply `uncond`. scale == 1 skips the unconditional pass; a (B,) tensor gives each row its own scale
    (so requests with different scales share one batch). rescale in [0, 1] blends in the guided
    prediction rescaled to the standard deviation of the conditional one, computed on what the network
    predicts (eps or v) exactly as diffusers' `guidance_rescale` — on eps for denoisers that do not say."""

    def __init__(self, denoiser, cond: dict, uncond: dict | None = None, scale: float = 7.5,
                 rescale: float = 0.0):
        super().__init__()
        self.denoiser, self.cond, self.uncond = denoiser, cond, uncond
        self.scale = _check_row_scales(scale) if isinstance(scale, Tensor) else _check_scale("guidance_scale", scale)
        self.rescale = _check_scale("guidance_rescale", rescale, 0.0, 1.0)
        if (isinstance(self.scale, Tensor) or self.scale != 1) and uncond is None:
            raise ValueError("uncond: guidance_scale != 1 needs unconditional (or negative) conditioning")
        if uncond is not None and set(uncond) != set(cond):
            raise ValueError(f"uncond must have the same keys as cond ({sorted(cond)}); got {sorted(uncond)}")

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        if not isinstance(self.scale, Tensor) and self.scale == 1:
            return self.denoiser(x, sigma, **self.cond)
        return self.combine(x, sigma, *self.parts(x, sigma))

    def parts(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(D_uncond, D_cond) in one batched pass."""
        both = {k: torch.cat([self.uncond[k], self.cond[k]]) for k in self.cond}
        return self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both).chunk(2)

    def combine(self, x: Tensor, sigma: Tensor, d_uncond: Tensor, d_cond: Tensor) -> Tensor:
        scale = self.scale
        if isinstance(scale, Tensor):  # (B,) -> (B, 1, ..., 1)
            scale = scale.to(x.device, x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        guided = d_uncond + scale * (d_cond - d_uncond)
        if self.rescale == 0:
            return guided
        # std ratios are taken per item over all non-batch dims, in the network's output space
        to_out = getattr(self.denoiser, "output_from_denoised", _eps_from_denoised)
        to_denoised = getattr(self.denoiser, "denoised_from_output", _denoised_from_eps)
        out_cond, out_guided = to_out(x, sigma, d_cond), to_out(x, sigma, guided)
        dims = list(range(1, x.ndim))
        ratio = out_cond.std(dim=dims, keepdim=True) / out_guided.std(dim=dims, keepdim=True)
        out = self.rescale * out_guided * ratio + (1 - self.rescale) * out_guided
        return to_denoised(x, sigma, out)


def _check_row_scales(scale: Tensor) -> Tensor:
    """A (B,) tensor of per-row guidance scales, each finite and >= 0."""
    if scale.ndim != 1 or not (torch.isfinite(scale).all() and (scale >= 0).all()):
        raise ValueError(f"guidance_scale must be a number or a 1-D tensor of finite numbers >= 0; got {scale!r}")
    return scale


def _eps_from_denoised(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    return (x - denoised) / sigma.reshape(-1, *[1] * (x.ndim - 1))


def _denoised_from_eps(x: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    return x - sigma.reshape(-1, *[1] * (x.ndim - 1)) * eps


class SkipLayerGuidance(nn.Module):
    """D = D_cfg + scale * (D_cond - D_skip) at the chosen steps, D_skip being the conditional prediction with
    some transformer blocks skipped (Stability's skip-layer guidance for SD3.5; diffusers' skip_guidance_layers).

    Linear in the prediction, so applying it to x0 estimates equals diffusers' on velocities. `sigmas` are the
    levels at which it is active (steps i with steps * start < i < steps * stop, as diffusers)."""

    def __init__(self, cfg: CFGDenoiser, skip: dict, scale: float, sigmas: list[float]):
        super().__init__()
        if cfg.uncond is None:
            raise ValueError("skip_guidance_layers needs classifier-free guidance (guidance_scale > 1)")
        self.cfg, self.skip, self.sigmas = cfg, skip, sigmas
        self.scale = _check_scale("skip_layer_guidance_scale", scale)

    def _active(self, sigma: float) -> bool:
        return any(abs(sigma - s) <= 1e-5 * max(1.0, s) for s in self.sigmas)

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        d_uncond, d_cond = self.cfg.parts(x, sigma)
        guided = self.cfg.combine(x, sigma, d_uncond, d_cond)
        if not self._active(float(sigma[0])):
            return guided
        d_skip = self.cfg.denoiser(x, sigma, **self.cfg.cond, **self.skip)
        return guided + self.scale * (d_cond - d_skip)
