"""Digits, a user's npz arrays, the memory guard and the CNN: shapes, determinism and every refusal."""

from __future__ import annotations

import time

import pytest
import torch

from data.digits import DIGITS_CLASSES, DIGITS_SAMPLES, DIGITS_SHAPE, load_digits_split
from data.memory import RUNTIME_RESERVE_BYTES, check_fits, synthetic_dataset_bytes
from data.split import per_class_validation_counts
from spine.errors import UsageError

# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(0.2, seed=0)


def test_digits_shapes_dtypes_and_range(digits):
    train_x, train_y, val_x, val_y = digits
    assert train_x.shape == (1438, *DIGITS_SHAPE) and val_x.shape == (359, *DIGITS_SHAPE)
    assert train_y.shape == (1438,) and val_y.shape == (359,)
    assert train_x.dtype == val_x.dtype == torch.float32 and train_y.dtype == val_y.dtype == torch.int64
    pixels = torch.cat([train_x, val_x])
    assert pixels.min() == 0 and pixels.max() == 1  # raw 0..16 scaled by 1/16, both ends present
    assert torch.equal(torch.unique(torch.cat([train_y, val_y])), torch.arange(DIGITS_CLASSES))


def test_digits_split_is_a_partition_of_the_whole_set(digits):
    from sklearn.datasets import load_digits

    train_x, _, val_x, _ = digits
    rows = torch.cat([train_x, val_x]).flatten(1) * 16
    original = torch.from_numpy(load_digits().data).float()
    assert len(rows) == DIGITS_SAMPLES
    # Same multiset of images: compare after sorting rows lexicographically (via their bytes).
    assert sorted(r.numpy().tobytes() for r in rows) == sorted(r.numpy().tobytes() for r in original)


def test_digits_are_bit_identical_for_a_seed_and_leave_the_global_rng_alone(digits):
    state = torch.get_rng_state()
    torch.manual_seed(123)  # must not matter
    again = load_digits_split(0.2, seed=0)
    other = load_digits_split(0.2, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(digits, again, strict=True))
    assert not torch.equal(digits[3], other[3])
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    load_digits_split(0.2, seed=0)
    assert torch.equal(torch.rand(1), expected_next)
    torch.set_rng_state(state)


def test_digits_validation_is_stratified(digits):
    train_y, val_y = digits[1], digits[3]
    class_sizes = torch.bincount(torch.cat([train_y, val_y]))
    val_counts = torch.bincount(val_y, minlength=DIGITS_CLASSES)
    expected = class_sizes.double() * 0.2
    assert ((val_counts - expected).abs() <= 1).all(), (val_counts.tolist(), expected.tolist())


def test_largest_remainder_shares_are_exact_in_total_and_within_one():
    for sizes, n_val in (([178, 182, 177, 183, 181, 182, 181, 179, 174, 180], 359), ([1, 1, 1], 2), ([5, 0, 7], 3)):
        counts = per_class_validation_counts(sizes, n_val)
        assert sum(counts) == n_val
        assert all(abs(c - s * n_val / sum(sizes)) < 1 for c, s in zip(counts, sizes, strict=True))


# ---------------------------------------------------------------- memory guard


def test_memory_guard_refuses_a_huge_synthetic_dataset_in_milliseconds():
    started = time.perf_counter()
    with pytest.raises(UsageError) as caught:
        check_fits(synthetic_dataset_bytes("moons", 10**12, 2, 2), "--n-samples 1000000000000")
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5
    message = str(caught.value)
    assert message.startswith("--n-samples 1000000000000: the dataset needs 59604.6 GiB, ") and "available" in message


def test_memory_guard_accepts_what_fits_and_counts_every_rank_on_the_machine():
    check_fits(synthetic_dataset_bytes("moons", 1000, 2, 2), "--n-samples 1000")  # real available memory
    free = 8 * 2**30
    per_rank = 3 * 2**30
    check_fits(per_rank, "x", copies=2, available=free)
    with pytest.raises(UsageError, match=r"x: the dataset needs 3.0 GiB on each of 3 ranks on this machine, "
                                         r"8.0 GiB available \(keeping 512.0 MiB per process for the runtime\)"):
        check_fits(per_rank, "x", copies=3, available=free)
    # The reserve is what tips it: exactly the free memory, less the reserve, fits; one byte more does not.
    check_fits(free - RUNTIME_RESERVE_BYTES, "x", available=free)
    with pytest.raises(UsageError):
        check_fits(free - RUNTIME_RESERVE_BYTES + 1, "x", available=free)


def test_synthetic_estimates_grow_with_the_flags_that_matter():
    assert synthetic_dataset_bytes("spirals", 1000, 99, 99) == synthetic_dataset_bytes("spirals", 1000, 2, 2)
    assert synthetic_dataset_bytes("rule", 1000, 64, 2) > synthetic_dataset_bytes("rule", 1000, 16, 2)
    assert synthetic_dataset_bytes("rule", 1000, 8, 64) > synthetic_dataset_bytes("rule", 1000, 8, 2)
    with pytest.raises(KeyError):
        synthetic_dataset_bytes("no-such-set", 1000, 2, 2)
