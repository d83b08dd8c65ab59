"""Generators: each takes (n, noise, dim, classes, generator) and returns float32
inputs of shape (n, d) and int64 labels of shape (n,). All randomness comes
from the generator passed in, never from the global RNG, so the data depends on
the data seed alone.
"""

from __future__ import annotations

import math

import torch


def _counts(n: int, k: int) -> list[int]:
    """Split n into k class sizes that differ by at most one."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _labels(counts: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)])


def two_moons(n: int, noise: float, dim: int, classes: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved half circles: not linearly separable, easy for a small MLP."""
    n0, n1 = _counts(n, 2)
    t0 = torch.rand(n0, generator=gen) * math.pi
    t1 = torch.rand(n1, generator=gen) * math.pi
    upper = torch.stack([torch.cos(t0), torch.sin(t0)], 1)
    lower = torch.stack([1 - torch.cos(t1), 0.5 - torch.sin(t1)], 1)
    x = torch.cat([upper, lower]) + noise * torch.randn(n, 2, generator=gen)
    # Centre and scale so inputs are roughly unit-sized for any optimizer.
    x = (x - torch.tensor([0.5, 0.25])) * 1.5
    return x.float(), _labels([n0, n1])


def circles(n: int, noise: float, dim: int, classes: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """An inner ring (class 1) inside an outer ring (class 0)."""
    n0, n1 = _counts(n, 2)
    radii = torch.cat([torch.full((n0,), 1.0), torch.full((n1,), 0.5)])
    theta = torch.rand(n, generator=gen) * 2 * math.pi
    x = torch.stack([radii * torch.cos(theta), radii * torch.sin(theta)], 1)
    x = x + noise * torch.randn(n, 2, generator=gen)
    return x.float(), _labels([n0, n1])


def xor(n: int, noise: float, dim: int, classes: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Four clusters at the corners of a square; the label is the XOR of the signs."""
    n0, n1 = _counts(n, 2)
    corners0 = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    corners1 = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    c0 = corners0[torch.randint(0, 2, (n0,), generator=gen)]
    c1 = corners1[torch.randint(0, 2, (n1,), generator=gen)]
    x = torch.cat([c0, c1]) + (noise + 0.25) * torch.randn(n, 2, generator=gen)
    return x.float(), _labels([n0, n1])


def spirals(n: int, noise: float, dim: int, classes: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved spirals, 1.5 turns each: the hardest of the 2-D sets."""
    counts = _counts(n, 2)
    parts = []
    for k, c in enumerate(counts):
        r = torch.rand(c, generator=gen) * 0.9 + 0.1
        theta = r * 3 * math.pi + k * math.pi
        parts.append(torch.stack([r * torch.cos(theta), r * torch.sin(theta)], 1))
    x = torch.cat(parts) * 2 + noise * torch.randn(n, 2, generator=gen)
    return x.float(), _labels(counts)


def linear(n: int, noise: float, dim: int, classes: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Gaussian blobs on either side of the line x0 + x1 = 0, with a margin."""
    n0, n1 = _counts(n, 2)
    x = torch.randn(n, 2, generator=gen) * (0.5 + noise)
    shift = torch.cat([torch.full((n0,), -1.0), torch.full((n1,), 1.0)])
    x = x + shift[:, None] * torch.tensor([0.7, 0.7])
    return x.float(), _labels([n0, n1])


def rule(n: int, noise: float, dim: int, classes: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian vectors in `dim` dimensions labelled by a fixed rule.

    The label is the argmax of `classes` fixed random projections of a mildly
    nonlinear feature (x + 0.5 * x**2 elementwise); `noise` perturbs the
    projected scores before the argmax, so noise > 0 flips some labels near
    the boundaries.
    """
    x = torch.randn(n, dim, generator=gen)
    w = torch.randn(dim, classes, generator=gen) / math.sqrt(dim)
    scores = (x + 0.5 * x * x) @ w + noise * torch.randn(n, classes, generator=gen)
    y = scores.argmax(1)
    # Group by class like the other generators, so --order sorted means the same thing everywhere.
    order = torch.argsort(y, stable=True)
    return x[order].float().contiguous(), y[order].contiguous()
