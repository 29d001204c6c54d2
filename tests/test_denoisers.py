"""Parameterizations: every target turns into the same x0, and its loss is zero exactly at the truth."""

import pytest
import torch

from reverie import DiscreteDenoiser, DiscreteSchedule, FlowDenoiser

SCHEDULE = DiscreteSchedule()
G = torch.Generator().manual_seed(0)
X0 = torch.randn(4, 3, 5, 5, generator=G)
NOISE = torch.randn(4, 3, 5, 5, generator=G)


class Oracle(torch.nn.Module):
    """Knows x0 and the noise; returns the exact target of `prediction` for its VP input at timestep t."""

    def __init__(self, prediction, x0=X0, noise=NOISE):
        super().__init__()
        self.prediction, self.x0, self.noise = prediction, x0, noise
        self.calls = []

    def forward(self, x_t, t, **cond):
        self.calls.append(t)
        ab = SCHEDULE.alphas_cumprod[t.round().long()].reshape(-1, 1, 1, 1)
        # the oracle recovers the noise from its input, so it is right at any (x_t, t) on the path
        noise = (x_t - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        return {"epsilon": noise, "sample": self.x0,
                "v_prediction": ab.sqrt() * noise - (1 - ab).sqrt() * self.x0}[self.prediction]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_every_parameterization_denoises_to_x0(prediction):
    t = torch.tensor([999, 500, 20, 1])
    sigma = SCHEDULE.sigmas[t]
    denoiser = DiscreteDenoiser(Oracle(prediction), SCHEDULE, prediction)
    x = X0 + sigma.reshape(-1, 1, 1, 1) * NOISE  # VE: x = x0 + sigma eps
    torch.testing.assert_close(denoiser(x, sigma), X0, rtol=0, atol=2e-4)
    torch.testing.assert_close(denoiser.net.calls[-1], t.float())  # sigma -> t maps back to the integer timestep


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_loss_is_zero_at_the_truth_and_positive_elsewhere(prediction):
    t = torch.tensor([900, 400, 50, 3])
    exact = DiscreteDenoiser(Oracle(prediction), SCHEDULE, prediction).loss(X0, t=t, noise=NOISE)
    assert exact.shape == (4,) and exact.max() < 1e-9
    wrong = DiscreteDenoiser(Oracle(prediction, x0=X0 + 0.1), SCHEDULE, prediction).loss(X0, t=t, noise=NOISE)
    assert (wrong > 1e-4).all()


@pytest.mark.parametrize("prediction,weight", [
    ("epsilon", lambda snr, g: snr.clamp(max=g) / snr),
    ("v_prediction", lambda snr, g: snr.clamp(max=g) / (snr + 1)),
    ("sample", lambda snr, g: snr.clamp(max=g)),
])
def test_min_snr_weighting(prediction, weight):
    t = torch.tensor([900, 400, 50, 3])
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    denoiser = DiscreteDenoiser(zero, SCHEDULE, prediction)
    plain = denoiser.loss(X0, t=t, noise=NOISE)
    weighted = denoiser.loss(X0, t=t, noise=NOISE, min_snr_gamma=5.0)
    ab = SCHEDULE.alphas_cumprod[t]
    torch.testing.assert_close(weighted, plain * weight(ab / (1 - ab), 5.0))


def test_offset_noise_shifts_each_channel_by_a_constant():
    """Offset noise (Guttenberg 2023) adds one normal draw per (item, channel), constant over pixels."""
    seen = []

    def record(x_t, t):  # with x0 = 0 the network input is sqrt(1 - alphabar) * noise
        seen.append(x_t / (1 - SCHEDULE.alphas_cumprod[500]).sqrt())
        return torch.zeros_like(x_t)

    denoiser = DiscreteDenoiser(record, SCHEDULE, "epsilon")
    x0, t = torch.zeros(64, 3, 5, 5), torch.full((64,), 500)
    for offset in (0.0, 0.0, 3.0):
        denoiser.loss(x0, t=t, generator=torch.Generator().manual_seed(1), offset_noise=offset)
    plain, again, shifted = seen
    torch.testing.assert_close(plain, again)
    shift = shifted - plain  # (B, C, H, W), constant over H, W
    torch.testing.assert_close(shift, shift[:, :, :1, :1].expand_as(shift), rtol=0, atol=1e-5)
    assert abs(shift[:, :, 0, 0].std().item() - 3.0) < 0.5  # 192 draws of 3 * N(0, 1)


def test_flow_denoiser_and_its_ve_view():
    sigma = torch.tensor([0.9, 0.5, 0.2, 0.05])
    s = sigma.reshape(-1, 1, 1, 1)
    v_true = lambda x, t: NOISE - X0  # noqa: E731  (an oracle velocity)
    flow = FlowDenoiser(v_true)
    torch.testing.assert_close(flow((1 - s) * X0 + s * NOISE, sigma), X0)
    ve_sigma = sigma / (1 - sigma)
    torch.testing.assert_close(flow.ve()(X0 + ve_sigma.reshape(-1, 1, 1, 1) * NOISE, ve_sigma), X0)
    assert flow.loss(X0, sigma=sigma, noise=NOISE).max() == 0


def test_bad_prediction_and_mapping():
    with pytest.raises(ValueError, match="prediction"):
        DiscreteDenoiser(lambda x, t: x, SCHEDULE, "noise")
    with pytest.raises(ValueError, match="timestep_mapping"):
        DiscreteDenoiser(lambda x, t: x, SCHEDULE, timestep_mapping="cubic")
