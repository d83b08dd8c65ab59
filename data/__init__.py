"""Datasets: synthetic ones generated from a seed, scikit-learn's digits, and a user's own arrays (npz:PATH).

Every rank calls `build_dataset` with the same arguments and gets bit-identical
tensors: the data never depends on the rank, so DistributedSampler's index
shards line up across processes. Adding a synthetic dataset is one function in
`synthetic.py` and one line in `DATASETS`; `digits` (data/digits.py) and
`npz:PATH` (data/npz.py) are read from disk. Every dataset is refused up front,
from its sizes alone, when it cannot fit in memory (data/memory.py).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data import synthetic
from data.digits import DIGITS_CLASSES, DIGITS_SAMPLES, DIGITS_SHAPE, load_digits_split
from data.memory import check_fits, synthetic_dataset_bytes
from data.split import validation_size

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

# Read from disk rather than generated: --n-samples, --noise, --dim and --classes do not apply to them.
NPZ_PREFIX = "npz:"
REAL_DATASETS = ("digits", NPZ_PREFIX + "PATH")


def is_dataset_name(name: str) -> bool:
    """A synthetic generator, digits, or npz:PATH with a non-empty path."""
    return name in DATASETS or name == "digits" or (name.startswith(NPZ_PREFIX) and len(name) > len(NPZ_PREFIX))


def npz_path(name: str) -> str | None:
    """The file of `--dataset npz:PATH`, or None for any other dataset."""
    return name[len(NPZ_PREFIX):] if name.startswith(NPZ_PREFIX) else None


def short_name(name: str) -> str:
    """A name fit for a run folder: npz:/data/my-set.npz -> npz-my-set."""
    path = npz_path(name)
    return name if path is None else f"npz-{Path(path).stem}"


@dataclass(frozen=True)
class SplitDataset:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    in_dim: int  # features per sample, flattened: prod(input_shape)
    num_classes: int
    fingerprint: str
    input_shape: tuple[int, ...] = field(default=())  # one sample's shape, e.g. (1, 8, 8); () = (in_dim,)

    def __post_init__(self) -> None:
        if not self.input_shape:
            object.__setattr__(self, "input_shape", (self.in_dim,))

    def limit_train(self, n: int) -> SplitDataset:
        """Keep the first n training samples (validation untouched): the single-batch overfit check."""
        return SplitDataset(self.train_x[:n], self.train_y[:n], self.val_x, self.val_y, self.in_dim,
                            self.num_classes, self.fingerprint, self.input_shape)

    def to(self, device: torch.device) -> SplitDataset:
        move = {k: getattr(self, k).to(device) for k in ("train_x", "train_y", "val_x", "val_y")}
        return SplitDataset(**move, in_dim=self.in_dim, num_classes=self.num_classes, fingerprint=self.fingerprint,
                            input_shape=self.input_shape)


def dataset_shape(name: str, dim: int, classes: int) -> tuple[int, int]:
    """(input dimensions, classes) that `name` produces for the given flags."""
    return FIXED_SHAPE.get(name, (dim, classes))


def split_sizes(n_samples: int, val_fraction: float) -> tuple[int, int]:
    n_val = max(1, round(n_samples * val_fraction))
    return n_samples - n_val, n_val


def dataset_layout(name: str, n_samples: int, val_fraction: float, dim: int, classes: int
                   ) -> tuple[int, int, tuple[int, ...]]:
    """(training samples, validation samples, one sample's shape) without building the data: what the flag
    checks need. For npz:PATH it reads the file's array headers (and refuses a bad file, one line, here)."""
    path = npz_path(name)
    if path is not None:
        from data.npz import read_headers, split_sizes_from_headers

        headers = read_headers(path)
        n_train, n_val = split_sizes_from_headers(headers, val_fraction)
        return n_train, n_val, tuple(headers["x" if "x" in headers else "x_train"].shape[1:])
    if name == "digits":
        n_val = validation_size(DIGITS_SAMPLES, val_fraction)
        return DIGITS_SAMPLES - n_val, n_val, DIGITS_SHAPE
    n_train, n_val = split_sizes(n_samples, val_fraction)
    return n_train, n_val, (dataset_shape(name, dim, classes)[0],)


# Peak bytes per digits image while loading: scikit-learn's bunch holds the pixels twice as float64 (data and
# images, 2 x 512 B), then the float32 tensor, its train/val copies (2 x 256 B) and int64 labels and indices.
_DIGITS_BYTES_PER_SAMPLE = 2 * 512 + 2 * 256 + 64


def fingerprint(*tensors: torch.Tensor) -> str:
    """Short content hash: equal on two ranks only if they built the same bytes."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.numpy(force=True).tobytes())  # force: detached, on the CPU; tobytes: in C order
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
    world_size: int = 1,
    ranks_on_node: int = 1,
) -> SplitDataset:
    """Generate `n_samples` points (or read digits / an npz file), then split them into train and validation.

    `order="random"` stores the training set in a seeded random order;
    `order="sorted"` stores it grouped by class (the storage that makes a
    missing shuffle visible). `ranks_on_node` processes each hold a copy: the
    memory check counts them all. Raises UsageError (one line) for data that
    cannot fit or a bad npz file.
    """
    if order not in ("random", "sorted"):
        raise ValueError(f"unknown order {order!r}")
    if name == "digits" or npz_path(name) is not None:
        return _read_dataset(name, val_fraction, seed, order, world_size, ranks_on_node)
    if name not in DATASETS:
        raise KeyError(name)
    check_fits(synthetic_dataset_bytes(name, n_samples, dim, classes), f"--n-samples {n_samples}",
               copies=ranks_on_node)
    gen = torch.Generator().manual_seed(seed)
    x, y = DATASETS[name](n_samples, noise, dim, classes, gen)
    # Generators emit points grouped by class; a seeded permutation decides which go to validation.
    perm = torch.randperm(n_samples, generator=gen)
    n_train, _ = split_sizes(n_samples, val_fraction)
    train_idx, val_idx = perm[:n_train], perm[n_train:]
    if order == "sorted":
        train_idx = train_idx[torch.argsort(y[train_idx], stable=True)]
    train_x, train_y = x[train_idx].contiguous(), y[train_idx].contiguous()
    val_x, val_y = x[val_idx].contiguous(), y[val_idx].contiguous()
    in_dim, num_classes = dataset_shape(name, dim, classes)
    return SplitDataset(
        train_x, train_y, val_x, val_y, in_dim, num_classes, fingerprint(train_x, train_y, val_x, val_y)
    )


def _read_dataset(name: str, val_fraction: float, seed: int, order: str, world_size: int,
                  ranks_on_node: int) -> SplitDataset:
    """digits or npz:PATH, split by the seed (or as stored), with a fingerprint of what was read."""
    path = npz_path(name)
    if path is None:
        check_fits(DIGITS_SAMPLES * _DIGITS_BYTES_PER_SAMPLE, "--dataset digits", copies=ranks_on_node)
        train_x, train_y, val_x, val_y = load_digits_split(val_fraction, seed)
        num_classes, source = DIGITS_CLASSES, "digits"
    else:
        from data.npz import load_npz_split  # numpy's zip reader: only runs that use it pay for the import

        loaded = load_npz_split(path, val_fraction, seed, world_size, ranks_on_node)
        train_x, train_y, val_x, val_y = loaded[:4]
        # The file's own bytes (names, dtypes, shapes) as well as the tensors built from them: two ranks that
        # read different files, or the same file split differently, disagree.
        num_classes, source = loaded.num_classes, loaded.content_fingerprint
    if order == "sorted":
        by_class = torch.argsort(train_y, stable=True)
        train_x, train_y = train_x[by_class].contiguous(), train_y[by_class].contiguous()
    digest = hashlib.sha256(source.encode())
    digest.update(fingerprint(train_x, train_y, val_x, val_y).encode())
    shape = tuple(train_x.shape[1:])
    return SplitDataset(train_x, train_y, val_x, val_y, math.prod(shape), num_classes, digest.hexdigest()[:16],
                        shape)
