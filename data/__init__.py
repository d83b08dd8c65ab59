"""Synthetic datasets, generated deterministically from a seed.

Every rank calls `build_dataset` with the same arguments and gets bit-identical
tensors: the data never depends on the rank, so DistributedSampler's index
shards line up across processes. Adding a dataset is one function in
`synthetic.py` and one line in `DATASETS`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from data import synthetic

# name -> (generator, number of input dimensions given --dim, number of classes given --classes)
Generator = Callable[[int, float, int, int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]

DATASETS: dict[str, Generator] = {
    "moons": synthetic.two_moons,
    "circles": synthetic.circles,
    "xor": synthetic.xor,
    "spirals": synthetic.spirals,
    "linear": synthetic.linear,
    "rule": synthetic.rule,
}

# Datasets whose input size and class count are fixed by their geometry.
FIXED_SHAPE: dict[str, tuple[int, int]] = {
    "moons": (2, 2),
    "circles": (2, 2),
    "xor": (2, 2),
    "spirals": (2, 2),
    "linear": (2, 2),
}


@dataclass(frozen=True)
class SplitDataset:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    in_dim: int
    num_classes: int
    fingerprint: str

    def limit_train(self, n: int) -> SplitDataset:
        """Keep the first n training samples (validation untouched): the single-batch overfit check."""
        return SplitDataset(self.train_x[:n], self.train_y[:n], self.val_x, self.val_y, self.in_dim,
                            self.num_classes, self.fingerprint)

    def to(self, device: torch.device) -> SplitDataset:
        move = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "val_x", "val_y")}
        return SplitDataset(**move, in_dim=self.in_dim, num_classes=self.num_classes, fingerprint=self.fingerprint)


def dataset_shape(name: str, dim: int, classes: int) -> tuple[int, int]:
    """(input dimensions, classes) that `name` produces for the given flags."""
    return FIXED_SHAPE.get(name, (dim, classes))


def split_sizes(n_samples: int, val_fraction: float) -> tuple[int, int]:
    n_val = max(1, round(n_samples * val_fraction))
    return n_samples - n_val, n_val


def fingerprint(*tensors: torch.Tensor) -> str:
    """Short content hash: equal on two ranks only if they built the same bytes."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def build_dataset(
    name: str,
    n_samples: int,
    val_fraction: float,
    noise: float,
    dim: int,
    classes: int,
    seed: int,
    order: str = "random",
) -> SplitDataset:
    """Generate `n_samples` points, then split them into train and validation.

    `order="random"` stores the training set in a seeded random order;
    `order="sorted"` stores it grouped by class (the storage that makes a
    missing shuffle visible).
    """
    if name not in DATASETS:
        raise KeyError(name)
    gen = torch.Generator().manual_seed(seed)
    x, y = DATASETS[name](n_samples, noise, dim, classes, gen)
    # Generators emit points grouped by class; a seeded permutation decides which go to validation.
    perm = torch.randperm(n_samples, generator=gen)
    n_train, _ = split_sizes(n_samples, val_fraction)
    train_idx, val_idx = perm[:n_train], perm[n_train:]
    if order == "sorted":
        train_idx = train_idx[torch.argsort(y[train_idx], stable=True)]
    elif order != "random":
        raise ValueError(f"unknown order {order!r}")
    train_x, train_y = x[train_idx].contiguous(), y[train_idx].contiguous()
    val_x, val_y = x[val_idx].contiguous(), y[val_idx].contiguous()
    in_dim, num_classes = dataset_shape(name, dim, classes)
    return SplitDataset(
        train_x, train_y, val_x, val_y, in_dim, num_classes, fingerprint(train_x, train_y, val_x, val_y)
    )
