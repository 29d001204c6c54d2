"""The learning-rate schedule, the EMA of the weights, and the deterministic stream of data and noise.

Everything random in a training step is a pure function of (seed, step, slot in the global batch), so a
resumed run, a run split over N processes and a run with gradient accumulation all draw the same numbers.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

MASK64 = 2**64 - 1


class WarmupCosine:
    """LR factor after `i` completed steps: linear warmup over `warmup` steps, then a half cosine from 1 down to
    `min_ratio` at step `total` (Loshchilov & Hutter 2017, SGDR, without restarts). A plain object, so LambdaLR
    state dicts stay JSON-serialisable."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, i: int) -> float:
        if i < self.warmup:
            return (i + 1) / self.warmup
        progress = min(1.0, (i - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """An exponential moving average of a module's parameters (Polyak & Juditsky 1992), kept as a frozen copy of
    the module so that it can sample and be exported as is. With `warmup`, the decay after n updates is
    min(decay, (1 + n) / (10 + n)), as diffusers' EMAModel, so that early averages are not dominated by the init."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        self.module = copy.deepcopy(module).requires_grad_(False).eval()
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        decay = self.current_decay()
        torch._foreach_lerp_(list(self.module.parameters()), list(module.parameters()), 1.0 - decay)
        for mine, theirs in zip(self.module.buffers(), module.buffers()):
            mine.copy_(theirs)
        self.updates += 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers, mixed with splitmix64 (Steele et al. 2014) so nearby inputs give unrelated
    generator streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & MASK64)) & MASK64
        h = (h + 0x9E3779B97F4A7C15) & MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & MASK64
        h ^= h >> 31
    return h >> 1


class StepDraws:
    """The random numbers of one step's global batch: each quantity (timestep, noise, posterior sample, caption
    dropout) is drawn for all `batch_size` slots at once, in a fixed order, from one CPU generator seeded by
    (seed, step), and a micro-batch takes the rows of its slots. So an item's numbers never depend on which
    process or micro-batch it lands in (resume and DDP stay exact), at the cost of a few batched draws per step
    instead of one generator and several tiny draws per item (host time that bounded GPU steps).

        draws = StepDraws(seed, step, batch_size, slots)
        noise = draws.randn(4, 16, 16)     # (len(slots), 4, 16, 16)
    """

    def __init__(self, seed: int, step: int, batch_size: int, slots: list[int]):
        if any(not 0 <= s < batch_size for s in slots):
            raise ValueError(f"slots must be in [0, {batch_size}); got {slots}")
        self.generator = torch.Generator().manual_seed(mix_seed(seed, step))
        self.batch_size, self.rows = batch_size, torch.as_tensor(slots, dtype=torch.long)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn((self.batch_size, *shape), generator=self.generator)[self.rows]

    def rand(self, *shape: int) -> torch.Tensor:
        return torch.rand((self.batch_size, *shape), generator=self.generator)[self.rows]

    def randint(self, high: int) -> torch.Tensor:
        return torch.randint(0, high, (self.batch_size,), generator=self.generator)[self.rows]


class DataOrder:
    """The endless stream of data-set indices: epoch e is a permutation seeded by (seed, e), read in order.

    A position is (epoch, index within that epoch's permutation); a step takes the next batch_size positions,
    running on into the next epoch, so no item is dropped or padded and any position can be resumed exactly."""

    def __init__(self, length: int, seed: int, shuffle: bool = True):
        if length < 1:
            raise ValueError("the data set is empty")
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self._cached: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        if self._cached is None or self._cached[0] != epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(mix_seed(self.seed, 0x0DA7A, epoch))
                perm = torch.randperm(self.length, generator=g).tolist()
            else:
                perm = list(range(self.length))
            self._cached = (epoch, perm)
        return self._cached[1]

    def take(self, epoch: int, index: int, count: int) -> tuple[list[int], int, int]:
        """(the next `count` data-set indices, the epoch and index after them)."""
        out = []
        while len(out) < count:
            perm = self.permutation(epoch)
            n = min(count - len(out), self.length - index)
            out += perm[index:index + n]
            index += n
            if index == self.length:
                epoch, index = epoch + 1, 0
        return out, epoch, index
