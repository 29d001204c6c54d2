"""Fewer network evaluations by reusing work across sampler steps: the state a network consults, reset at the start
of every pipeline call (Pipeline.enable_deepcache, Pipeline.enable_block_cache).

DeepCache (Ma et al. 2024, "DeepCache: Accelerating Diffusion Models for Free"): a UNet's deep features change
slowly from step to step, its shallow ones do not. Every `interval`-th network call runs the whole UNet and keeps
the input of its last (highest-resolution) up block; the calls between run only conv_in, the first down block
(its resnets and transformers, not its downsampler) and that last up block on the kept features — the "uniform"
schedule with the skip branch at the shallowest level. interval 1 runs every call in full: the uncached output.

First-block caching (the TeaCache / ParaAttention "first block cache" idea, Liu et al. 2024): a transformer's
output changes little between steps when its first block's output does. Each call runs the first block; when the
relative mean absolute change of its output since the last full call is below `threshold`, the remaining blocks
are skipped and their residual from that call (output of the last block minus output of the first) is added
instead. threshold 0 never skips: the uncached output.

A cache applies only to calls shaped like the one that filled it (batch, size, dtype, device); any other call
runs in full and refills it.
"""

from __future__ import annotations

from torch import Tensor


def _signature(x: Tensor) -> tuple:
    return tuple(x.shape), x.dtype, x.device


class DeepCache:
    """The kept deep features of a UNet and the call counter that decides when to refresh them."""

    def __init__(self, interval: int):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"deepcache interval must be an integer >= 1 (1: off); got {interval!r}")
        self.interval = interval
        self.reset()

    def reset(self) -> None:
        self.calls, self.features, self.key, self.skipped = 0, None, None, 0

    def reuse(self, sample: Tensor) -> bool:
        """Whether this call may run shallow on the kept features (counted as a call either way)."""
        full = self.calls % self.interval == 0 or self.features is None or self.key != _signature(sample)
        self.calls += 1
        self.skipped += not full
        return not full

    def store(self, features: Tensor, sample: Tensor) -> None:
        self.features, self.key = features, _signature(sample)


class BlockCache:
    """A transformer's first-block output and the residual of the other blocks, from its last full call."""

    def __init__(self, threshold: float):
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise ValueError(f"block cache threshold must be a number >= 0 (0: off; inf: reuse every call after the "
                             f"first); got {threshold!r}")
        self.threshold = float(threshold)
        self.reset()

    def reset(self) -> None:
        self.first, self.residual, self.key, self.calls, self.skipped = None, None, None, 0, 0

    def reuse(self, first: Tensor, key: Tensor) -> bool:
        """Whether the rest of the blocks may be skipped, given this call's first-block output (any tensor or
        tuple's first element that tells the change) and the input that keys the cache."""
        self.calls += 1
        if self.threshold == 0 or self.residual is None or self.key != _signature(key):
            return False
        change = (first - self.first).abs().mean() / self.first.abs().mean().clamp_min(1e-12)
        skip = bool(change < self.threshold)
        self.skipped += skip
        return skip

    def store(self, first: Tensor, residual, key: Tensor) -> None:
        """Keep a full call's first-block output and the other blocks' residual (a tensor or a tuple of them)."""
        self.first, self.residual, self.key = first, residual, _signature(key)


def _combine(a, b, op):
    if isinstance(a, tuple):
        return tuple(None if x is None else op(x, y) for x, y in zip(a, b))
    return op(a, b)


def run_blocks(cache: BlockCache | None, first, rest, state, key: Tensor):
    """rest(first(state)), where a BlockCache may stand in for rest: its kept residual added to first's output.
    first, rest: callables on a state (a tensor, or a tuple of tensors or None, as (image, text) tokens); the
    residual is rest's output minus its input, element by element. key: the call's input, which keys the cache."""
    h = first(state)
    if cache is None:
        return rest(h)
    probe = h[0] if isinstance(h, tuple) else h
    if cache.reuse(probe, key):
        return _combine(h, cache.residual, lambda x, r: x + r)
    out = rest(h)
    cache.store(probe, _combine(out, h, lambda o, x: o - x), key)
    return out


class BlockCached:
    """enable_block_cache / disable_block_cache for a diffusion transformer whose forward runs its blocks
    through run_blocks(self.block_cache, ...)."""

    block_cache: BlockCache | None = None

    def enable_block_cache(self, threshold: float) -> BlockCache:
        """First-block caching (reverie.models.step_cache); reset() the returned cache at each sampling run."""
        self.block_cache = BlockCache(threshold)
        return self.block_cache

    def disable_block_cache(self) -> None:
        self.block_cache = None
