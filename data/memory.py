"""Refuse data that cannot fit in memory before building or loading any of it.

Without this, `--n-samples 10000000000` allocates until the kernel kills the
process, minutes later and with no message. The estimates here come from sizes
alone (flags, or an npz file's array headers), so the refusal takes
milliseconds.
"""

from __future__ import annotations

import psutil

from spine.errors import UsageError

# Kept free per process on top of the data: a train.py process at the default recipe peaks at about 320 MiB
# RSS before any data (torch, tensorboard, the model, optimizer and evaluation temporaries); 512 MiB leaves
# room for a larger model. Refusing up front is cheap, being OOM-killed an hour in is not.
RUNTIME_RESERVE_BYTES = 512 * 2**20

# Peak bytes per sample of build_dataset (generator, then the train/val split): peak RSS over the RSS before
# the call at n = 4,000,000, one process per case, torch 2.13 CPU (python -m data.measure_memory re-measures):
#   moons 48.7, circles 47.1, xor 47.1, spirals 52.3, linear 55.1 (2-d float32 x, int64 y);
#   rule (dim, classes): (2, 2) 56.0, (16, 2) 206.3, (64, 2) 767.9, (2, 10) 135.9, (16, 10) 203.2, (8, 64) 800.0.
# The 2-d sets hold about seven copies of x (8 bytes) at their peak: temporaries of the geometry, the labels,
# the permutation and the split copies; 64 covers all five.
_TWO_D_BYTES_PER_SAMPLE = 64


def _rule_bytes_per_sample(dim: int, classes: int) -> int:
    # rule keeps about three float32 (n, dim) tensors alive while it builds its features (x, x*x, the sum),
    # then x plus three (n, classes) ones for the scores (product, noise, sum); 48 bytes of int64 index and
    # label tensors (argmax, argsort, the split's permutation and copies) come on top.
    return 4 * max(3 * dim, dim + 3 * classes) + 48


def synthetic_dataset_bytes(name: str, n_samples: int, dim: int, classes: int) -> int:
    """Peak memory of building synthetic dataset `name` with these flags (an upper bound, from sizes alone)."""
    if name == "rule":
        return n_samples * _rule_bytes_per_sample(dim, classes)
    if name in ("moons", "circles", "xor", "spirals", "linear"):
        return n_samples * _TWO_D_BYTES_PER_SAMPLE
    raise KeyError(f"no memory estimate for synthetic dataset {name!r}")


def format_bytes(n_bytes: float) -> str:
    """GiB with one decimal from 1 GiB up, MiB below: '74.5 GiB', '312.0 MiB'."""
    if n_bytes >= 2**30:
        return f"{n_bytes / 2**30:.1f} GiB"
    return f"{n_bytes / 2**20:.1f} MiB"


def available_bytes() -> int:
    """Memory the kernel can hand out now without swapping (MemAvailable on Linux)."""
    return psutil.virtual_memory().available


def check_fits(n_bytes: int, what: str, copies: int = 1, available: int | None = None) -> None:
    """Raise UsageError (one line, naming `what`) unless `copies` x (n_bytes + runtime reserve) fit in memory.

    `copies` is the number of processes on this machine that each hold the whole dataset (every rank builds
    its own, so it is the ranks on this node). `available` defaults to psutil's available memory; tests pass
    their own.
    """
    if copies < 1:
        raise ValueError(f"copies must be at least 1, got {copies}")
    free = available_bytes() if available is None else available
    need = copies * (n_bytes + RUNTIME_RESERVE_BYTES)
    if need > free:
        per_rank = f" on each of {copies} ranks on this machine" if copies > 1 else ""
        raise UsageError(f"{what}: the dataset needs {format_bytes(n_bytes)}{per_rank}, {format_bytes(free)} "
                         f"available (keeping {format_bytes(RUNTIME_RESERVE_BYTES)} per process for the runtime)")
