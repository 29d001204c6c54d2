"""Classifier-free guidance: one batched pass, exact formula, diffusers' guidance rescale."""

import math

import pytest
import torch

from reverie import CFGDenoiser, DiscreteDenoiser, DiscreteSchedule

from conftest import TinyNet

diffusers = pytest.importorskip("diffusers")


class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.denoiser = DiscreteDenoiser(TinyNet(), DiscreteSchedule())
        self.batches = []

    def forward(self, x, sigma, **cond):
        self.batches.append(x.shape[0])
        return self.denoiser(x, sigma, **cond)


X = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 5
SIGMA = torch.full((2,), 5.0)
COND = {"context": torch.randn(2, 16, generator=torch.Generator().manual_seed(1))}
UNCOND = {"context": torch.zeros(2, 16)}


def test_one_batched_pass_equals_the_formula():
    net = Counting()
    guided = CFGDenoiser(net, COND, UNCOND, scale=7.5)(X, SIGMA)
    assert net.batches == [4]
    d_cond, d_uncond = net.denoiser(X, SIGMA, **COND), net.denoiser(X, SIGMA, **UNCOND)
    torch.testing.assert_close(guided, d_uncond + 7.5 * (d_cond - d_uncond), rtol=1e-5, atol=1e-5)


def test_scale_one_skips_the_unconditional_pass():
    net = Counting()
    out = CFGDenoiser(net, COND, None, scale=1.0)(X, SIGMA)
    assert net.batches == [2]
    torch.testing.assert_close(out, net.denoiser(X, SIGMA, **COND))


def test_negative_conditioning_is_the_uncond_branch():
    net = Counting()
    negative = {"context": torch.randn(2, 16, generator=torch.Generator().manual_seed(2))}
    a = CFGDenoiser(net, COND, negative, scale=4.0)(X, SIGMA)
    b = CFGDenoiser(net, COND, UNCOND, scale=4.0)(X, SIGMA)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("rescale", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(rescale):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    net = Counting()
    ours = CFGDenoiser(net, COND, UNCOND, scale=7.5, rescale=rescale)(X, SIGMA)
    s = SIGMA.reshape(-1, 1, 1, 1)
    eps_c = (X - net.denoiser(X, SIGMA, **COND)) / s
    eps_u = (X - net.denoiser(X, SIGMA, **UNCOND)) / s
    eps = rescale_noise_cfg(eps_u + 7.5 * (eps_c - eps_u), eps_c, guidance_rescale=rescale)
    torch.testing.assert_close(ours, X - s * eps, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs,field", [
    (dict(scale=math.nan), "guidance_scale"),
    (dict(scale=math.inf), "guidance_scale"),
    (dict(scale=-1.0), "guidance_scale"),
    (dict(scale=7.5, rescale=1.5), "guidance_rescale"),
])
def test_bad_scales_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CFGDenoiser(Counting(), COND, UNCOND, **kwargs)


def test_guidance_needs_uncond():
    with pytest.raises(ValueError, match="uncond"):
        CFGDenoiser(Counting(), COND, None, scale=3.0)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_guidance_rescale_works_in_the_networks_output_space(prediction):
    """diffusers rescales what the UNet predicts (v for v-prediction models); reverie does the same."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    net = TinyNet()
    schedule = DiscreteSchedule()
    denoiser = DiscreteDenoiser(net, schedule, prediction)
    ours = CFGDenoiser(denoiser, COND, UNCOND, scale=6.0, rescale=0.7)(X, SIGMA)
    c_in, t = (SIGMA**2 + 1).rsqrt().reshape(-1, 1, 1, 1), schedule.sigma_to_t(SIGMA)
    out_c, out_u = net(X * c_in, t, **COND), net(X * c_in, t, **UNCOND)
    out = rescale_noise_cfg(out_u + 6.0 * (out_c - out_u), out_c, guidance_rescale=0.7)
    torch.testing.assert_close(ours, denoiser.denoised_from_output(X, SIGMA, out), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(denoiser.output_from_denoised(X, SIGMA, denoiser(X, SIGMA, **COND)), out_c,
                               rtol=1e-4, atol=1e-4)
