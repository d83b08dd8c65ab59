"""A seeded, stratified train/validation split for labelled data held in memory.

Shared by the digits and npz loaders so that `--val-fraction` means the same
thing for every real dataset. It uses only the torch.Generator it is given,
never the global RNG, so every rank computes the same split from the seed.
"""

from __future__ import annotations

import torch


def validation_size(n_samples: int, val_fraction: float) -> int:
    """Samples held out for validation: round(n * fraction), at least one (the synthetic sets' rule too)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    return max(1, round(n_samples * val_fraction))


def per_class_validation_counts(class_counts: list[int], n_val: int) -> list[int]:
    """Share n_val out over the classes in proportion to their sizes, each within one of its exact share.

    Largest remainder: every class gets the floor of its share, then the samples
    still unassigned go to the classes with the largest fractional parts (ties to
    the lower class index, so the result is deterministic).
    """
    total = sum(class_counts)
    shares = [c * n_val / total for c in class_counts]
    counts = [int(s) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda k: (-(shares[k] - counts[k]), k))
    for k in by_remainder[: n_val - sum(counts)]:
        counts[k] += 1
    return counts


def stratified_split(labels: torch.Tensor, val_fraction: float, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) into `labels` (1-D int64, values 0..K-1).

    Each class keeps the same proportion in validation (within one sample). Both
    index lists come back in a seeded random order, not grouped by class, so the
    first n training samples are a fair subset (what --limit-samples takes).
    """
    n_val = validation_size(len(labels), val_fraction)
    if n_val >= len(labels):
        raise ValueError(f"val_fraction {val_fraction} leaves no training samples out of {len(labels)}")
    class_counts = torch.bincount(labels).tolist()
    val_counts = per_class_validation_counts(class_counts, n_val)
    train_parts, val_parts = [], []
    for cls, n_cls_val in enumerate(val_counts):
        members = torch.nonzero(labels == cls).flatten()  # stored order: deterministic before the permutation
        members = members[torch.randperm(len(members), generator=generator)]
        val_parts.append(members[:n_cls_val])
        train_parts.append(members[n_cls_val:])
    train_idx, val_idx = torch.cat(train_parts), torch.cat(val_parts)
    # Mix the classes back together, again from the generator alone.
    train_idx = train_idx[torch.randperm(len(train_idx), generator=generator)]
    val_idx = val_idx[torch.randperm(len(val_idx), generator=generator)]
    return train_idx, val_idx
