import math

import pytest
import torch
from torch import nn

# The suite's models are tiny: one thread is as fast, and two threads spin-wait badly when the machine is busy.
torch.set_num_threads(1)


class TinyNet(nn.Module):
    """A small random network net(x, t) -> same shape as x, smooth in t: stands in for a UNet."""

    def __init__(self, channels: int = 4, hidden: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Parameter(torch.randn(hidden, channels, generator=g) / math.sqrt(channels))
        self.out = nn.Parameter(torch.randn(channels, hidden, generator=g) / math.sqrt(hidden))
        self.freqs = nn.Parameter(torch.randn(hidden, generator=g) * 3, requires_grad=False)
        self.mix = nn.Parameter(torch.randn(hidden, hidden, generator=g) / math.sqrt(hidden))

    def forward(self, x, t, **cond):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])
        temb = torch.sin(t[:, None] / 1000 * self.freqs + self.freqs)  # (B, hidden)
        h = torch.einsum("hc,bc...->bh...", self.inp, x)
        h = h + (temb @ self.mix).reshape(*temb.shape, *[1] * (x.ndim - 2))
        if "context" in cond:
            h = h + cond["context"].reshape(x.shape[0], -1, *[1] * (x.ndim - 2))
        return torch.einsum("ch,bh...->bc...", self.out, torch.tanh(h))


@pytest.fixture
def tiny_net():
    return TinyNet()
