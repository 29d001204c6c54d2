"""Data whose optimal denoiser is known exactly: Gaussian mixtures and finite data sets.

For x = x0 + sigma * eps the ideal denoiser is the posterior mean E[x0 | x] (Tweedie's formula). These are
the closed-form references for testing samplers and the "model" of the demo.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class GaussianMixture:
    """x0 ~ sum_k weights_k N(means_k, covs_k) in d dimensions, with its exact denoiser.

    means: (K, d); covs: (K, d, d) symmetric positive semi-definite; weights: (K,) summing to 1.
    Everything is computed in float64; the denoiser accepts x of shape (B, d) or (B, ...) flattening to d."""

    def __init__(self, means: Tensor, covs: Tensor, weights: Tensor):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        K, d = self.means.shape
        if self.covs.shape != (K, d, d) or self.weights.shape != (K,):
            raise ValueError(f"covs must be ({K}, {d}, {d}) and weights ({K},)")
        if not torch.isclose(self.weights.sum(), torch.tensor(1.0, dtype=torch.float64)):
            raise ValueError(f"weights must sum to 1; got {self.weights.sum().item()}")
        self.eigvals, self.eigvecs = torch.linalg.eigh(self.covs)  # (K, d), (K, d, d)
        self.eigvals = self.eigvals.clamp(min=0)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> Tensor:
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        mu = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covs + torch.einsum("ki,kj->kij", self.means, self.means))
        return second - torch.outer(mu, mu)

    def sample(self, n: int, generator=None) -> tuple[Tensor, Tensor]:
        """n samples (n, d) and the component each came from (n,)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        scale = self.eigvecs[k] * self.eigvals[k].sqrt()[:, None, :]  # (n, d, d): U diag(sqrt(lambda))
        return self.means[k] + torch.einsum("nij,nj->ni", scale, z), k

    def responsibilities(self, x: Tensor, sigma: Tensor) -> Tensor:
        """p(component k | x) under the noised mixture; x (B, d), sigma (B,) -> (B, K)."""
        z, var = self._whiten(x, sigma)
        log_p = -0.5 * ((z**2 / var) + var.log()).sum(-1) + self.weights.log()
        return torch.softmax(log_p, dim=-1)

    def _whiten(self, x, sigma):
        diff = x[:, None, :] - self.means[None]  # (B, K, d)
        z = torch.einsum("kji,bkj->bki", self.eigvecs, diff)  # U^T (x - mu)
        var = self.eigvals[None] + sigma.reshape(-1, 1, 1) ** 2  # (B, K, d)
        return z, var

    def denoise(self, x: Tensor, sigma) -> Tensor:
        """E[x0 | x0 + sigma eps = x]: sum_k r_k (mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k))."""
        shape, dtype = x.shape, x.dtype
        x = x.reshape(shape[0], -1).double()
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(shape[0]) if torch.as_tensor(sigma).ndim == 0 \
            else torch.as_tensor(sigma, dtype=torch.float64)
        z, var = self._whiten(x, sigma)
        shrunk = z * self.eigvals[None] / var  # Lambda (Lambda + sigma^2)^-1 U^T (x - mu)
        per_component = self.means[None] + torch.einsum("kij,bkj->bki", self.eigvecs, shrunk)  # (B, K, d)
        r = self.responsibilities(x, sigma)
        return torch.einsum("bk,bki->bi", r, per_component).reshape(shape).to(dtype)

    __call__ = denoise


class EmpiricalDenoiser:
    """The exact denoiser of a finite data set (a mixture of point masses): the softmax-weighted average
    of the data points, weights proportional to exp(-|x - x_i|^2 / (2 sigma^2)).

    Sampling with it reproduces training images exactly — the memorising limit a trained model
    approaches; the demo uses it to show the reverse process without a network."""

    def __init__(self, data: Tensor):
        self.data = data.reshape(data.shape[0], -1).double()  # (N, D)
        self.shape = data.shape[1:]

    def __call__(self, x: Tensor, sigma) -> Tensor:
        B = x.shape[0]
        flat = x.reshape(B, -1).double()
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(B)
        dist2 = torch.cdist(flat, self.data) ** 2  # (B, N)
        w = torch.softmax(-dist2 / (2 * sigma[:, None] ** 2), dim=-1)
        return (w @ self.data).reshape(x.shape).to(x.dtype)


def two_moons_mixture(d: int = 2) -> GaussianMixture:
    """A fixed, deliberately uneven three-component mixture used by the tests and the demo plots."""
    means = torch.tensor([[-2.0, 0.5], [1.5, 1.5], [1.0, -2.0]], dtype=torch.float64)[:, :d]
    rot = lambda a: torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)  # noqa: E731
    covs = torch.stack([rot(a) @ torch.diag(torch.tensor(v, dtype=torch.float64)) @ rot(a).T
                        for a, v in ((0.3, [0.5, 0.1]), (1.2, [0.3, 0.05]), (-0.5, [0.2, 0.2]))])[:, :d, :d]
    return GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2]))
