"""Digits, a user's npz arrays, the memory guard and the CNN: shapes, determinism and every refusal."""

from __future__ import annotations

import io
import time
import zipfile

import numpy as np
import pytest
import torch

from data.digits import DIGITS_CLASSES, DIGITS_SAMPLES, DIGITS_SHAPE, load_digits_split
from data.memory import RUNTIME_RESERVE_BYTES, check_fits, synthetic_dataset_bytes
from data.npz import load_npz_split, peak_bytes, read_headers
from data.split import per_class_validation_counts
from models.cnn import CNN
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


# ---------------------------------------------------------------- npz: accepted files


def _xy(n: int = 60, classes: int = 3, features: tuple[int, ...] = (2, 3), seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *features)), np.arange(n) % classes


def test_npz_x_y_is_split_stratified_and_deterministic(tmp_path):
    x, y = _xy(n=100, classes=4)
    path = str(tmp_path / "data.npz")
    np.savez(path, x=x, y=y, notes=np.arange(3))  # an extra array is ignored
    a = load_npz_split(path, 0.2, seed=5, world_size=2)
    b = load_npz_split(path, 0.2, seed=5, world_size=2)
    c = load_npz_split(path, 0.2, seed=6, world_size=2)
    assert a.train_x.shape == (80, 2, 3) and a.val_x.shape == (20, 2, 3)
    assert a.train_x.dtype == torch.float32 and a.train_y.dtype == torch.int64
    assert a.num_classes == 4
    assert all(torch.equal(p, q) for p, q in zip(a[:4], b[:4], strict=True))
    assert not torch.equal(a.val_y, c.val_y) or not torch.equal(a.val_x, c.val_x)
    assert a.content_fingerprint == c.content_fingerprint  # same file, different split
    assert torch.bincount(a.val_y).tolist() == [5, 5, 5, 5]
    # Every sample lands in exactly one split, features and label together.
    pairs = {(row.tobytes(), int(label)) for row, label in zip(x.astype(np.float32), y, strict=True)}
    split = torch.cat([a.train_x, a.val_x]).numpy()
    assert {(row.tobytes(), int(label)) for row, label in zip(split, torch.cat([a.train_y, a.val_y]), strict=True)} \
        == pairs


def test_npz_given_split_is_used_in_stored_order(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"x_train": rng.normal(size=(10, 5)).astype(np.float32), "y_train": np.arange(10) % 2,
              "x_val": rng.integers(0, 255, (4, 5), dtype=np.uint8), "y_val": np.array([0.0, 1.0, 2.0, 1.0])}
    path = str(tmp_path / "given.npz")
    np.savez_compressed(path, **arrays)
    data = load_npz_split(path, 0.2, seed=0, world_size=4)
    assert torch.equal(data.train_x, torch.from_numpy(arrays["x_train"]))
    assert torch.equal(data.train_y, torch.from_numpy(arrays["y_train"]))
    assert torch.equal(data.val_x, torch.from_numpy(arrays["x_val"].astype(np.float32)))  # integers become float32
    assert data.val_y.tolist() == [0, 1, 2, 1]  # integral floats are accepted as labels
    assert data.num_classes == 3  # the largest label over train and validation, plus one


def test_npz_fortran_ordered_and_big_endian_arrays_load_as_their_values(tmp_path):
    x, y = _xy(n=20, classes=2)
    path = str(tmp_path / "layouts.npz")
    np.savez(path, x_train=np.asfortranarray(x), y_train=y.astype(">i4"), x_val=x.astype(">f8"), y_val=y)
    data = load_npz_split(path, 0.2, seed=0, world_size=1)
    assert torch.equal(data.train_x, torch.from_numpy(x.astype(np.float32)))
    assert torch.equal(data.val_x, data.train_x)
    assert data.train_y.tolist() == y.tolist() and data.train_y.dtype == torch.int64


def test_npz_fingerprint_covers_values_dtypes_and_shapes(tmp_path):
    x, y = _xy()

    def fingerprint(name: str, **arrays) -> str:
        np.savez(tmp_path / name, **arrays)
        return load_npz_split(str(tmp_path / name), 0.2, seed=0, world_size=1).content_fingerprint

    base = fingerprint("a.npz", x=x, y=y)
    assert fingerprint("b.npz", x=x, y=y) == base  # a copy of the file: same arrays, same fingerprint
    changed = x.copy()
    changed[7, 1, 2] += 1e-9
    assert fingerprint("c.npz", x=changed, y=y) != base
    assert fingerprint("d.npz", x=x.astype(np.float32), y=y) != base
    assert fingerprint("e.npz", x=x.reshape(60, 3, 2), y=y) != base


# ---------------------------------------------------------------- npz: refusals


def _write_npy_header_only(archive: zipfile.ZipFile, key: str, shape: tuple[int, ...], descr: str) -> None:
    """A member whose header claims `shape` but that holds no data: reading the data would fail."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    archive.writestr(key + ".npy", buf.getvalue())  # magic, then the header dict


class _RunsCode:
    """Unpickling this creates the file `marker`: proof that a pickle ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


_X, _Y = _xy()


def _savez(**arrays):
    def write(path):
        np.savez(path, **arrays)
        return path
    return write


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    return path


def _plain_npy(path):
    np.save(path.with_suffix(".npy"), _X)
    return path.with_suffix(".npy")


def _damaged_data(path):
    np.savez(path, x=_X, y=_Y)  # stored, not compressed: flip one byte inside x's data
    raw = bytearray(path.read_bytes())
    raw[raw.index(_X[0, 0].tobytes()) + 3] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def _header_claims_huge_arrays(path):
    with zipfile.ZipFile(path, "w") as archive:
        _write_npy_header_only(archive, "x", (10**10, 100), "<f8")
        _write_npy_header_only(archive, "y", (10**10,), "<i8")
    return path


def _object_array(path):
    np.savez(path, x=np.array([_RunsCode(str(path.parent / "pickle-ran")), 1.0], dtype=object), y=np.arange(2))
    return path


def _with(value, at):
    x = _X.copy()
    x[at] = value
    return x


# (name, writer(path) -> the path to load, words the message must contain)
BAD_FILES = [
    ("missing file", lambda path: path, ["no such file"]),
    ("directory", lambda path: (path.mkdir(), path)[1], ["directory"]),
    ("random bytes", _random_bytes, ["not an .npz archive"]),
    ("plain npy", _plain_npy, ["single .npy array", "not an .npz archive"]),
    ("missing y", _savez(x=_X, labels=_Y), ["missing key(s) y", "arrays found: labels, x"]),
    ("missing y_val", _savez(x_train=_X, y_train=_Y, x_val=_X), ["missing key(s) y_val", "x_train, x_val, y_train"]),
    ("no arrays", lambda path: (zipfile.ZipFile(path, "w").close(), path)[1], ["missing key(s) x, y", "none"]),
    ("both layouts", _savez(x=_X, y=_Y, x_train=_X, y_train=_Y, x_val=_X, y_val=_Y), ["both"]),
    ("lengths differ", _savez(x=_X, y=_Y[:-1]), ["x has 60 samples but y has 59 labels"]),
    ("val lengths differ", _savez(x_train=_X, y_train=_Y, x_val=_X[:5], y_val=_Y[:4]), ["x_val has 5 samples"]),
    ("sample shapes differ", _savez(x_train=_X, y_train=_Y, x_val=_X[:, 0], y_val=_Y), ["x_train samples have"]),
    ("fractional labels", _savez(x=_X, y=np.where(_Y == 2, 1.5, _Y)), ["non-integer labels", "1.5"]),
    ("nan labels", _savez(x=_X, y=np.where(_Y == 2, np.nan, _Y)), ["non-integer labels"]),
    ("bool labels", _savez(x=_X, y=_Y == 1), ["booleans"]),
    ("string labels", _savez(x=_X, y=_Y.astype(str)), ["dtype <U", "labels must be integers"]),
    ("negative labels", _savez(x=_X, y=_Y - 1), ["negative label (-1 at index 0)"]),
    ("labels are ids", _savez(x=_X, y=_Y * 1000), ["labels go up to 2000 with only 60 samples"]),
    ("one class", _savez(x=_X, y=np.zeros_like(_Y)), ["at least two classes"]),
    ("one-hot labels", _savez(x=_X, y=np.eye(3)[_Y]), ["1-D array of class indices"]),
    ("flat features", _savez(x=_X[:, 0, 0], y=_Y), ["at least one feature dimension"]),
    ("string features", _savez(x=_X.astype(str), y=_Y), ["features must be real numbers"]),
    ("no features", _savez(x=np.zeros((60, 0)), y=_Y), ["shape (60, 0): its samples hold no features"]),
    ("nan features", _savez(x=_with(np.nan, (4, 0, 0)), y=_Y), ["non-finite", "1 sample(s), the first at index 4"]),
    ("inf features", _savez(x=_with(-np.inf, (9, 1, 1)), y=_Y), ["non-finite values", "the first at index 9"]),
    ("beyond float32", _savez(x=_with(1e39, (2, 0, 0)), y=_Y), ["beyond float32's range", "index 2"]),
    ("object array", _object_array, ["Python objects", "pickle"]),
    ("damaged data", _damaged_data, ["array x is damaged"]),
    ("too big for memory", _header_claims_huge_arrays, ["the dataset needs", "available"]),
]


@pytest.mark.parametrize("name, write, words", [pytest.param(*case, id=case[0]) for case in BAD_FILES])
def test_npz_refusals_are_one_line_naming_the_file(tmp_path, name, write, words):
    path = str(write(tmp_path / "bad.npz"))
    started = time.perf_counter()
    with pytest.raises(UsageError) as caught:
        load_npz_split(path, 0.2, seed=0, world_size=1)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"--dataset npz:{path}: "), message
    for word in words:
        assert word in message, message
    assert time.perf_counter() - started < 2  # headers first: the 10**10-sample file is refused unread
    assert not (tmp_path / "pickle-ran").exists()


@pytest.mark.parametrize("n, world, layout", [(5, 2, "x, y"), (40, 9, "x, y"), (4, 2, "given")])
def test_npz_refuses_fewer_samples_than_ranks(tmp_path, n, world, layout):
    x, y = _xy(n=n, classes=2)
    path = str(tmp_path / "small.npz")
    if layout == "given":  # 4 training samples but a single validation one
        np.savez(path, x_train=x, y_train=y, x_val=x[:1], y_val=y[:1])
    else:  # 5 samples at 0.2 -> 1 validation sample; 40 -> 32 + 8, one short of 9 ranks
        np.savez(path, x=x, y=y)
    with pytest.raises(UsageError, match=r"for \d+ rank\(s\): every rank needs at least one of each") as caught:
        load_npz_split(path, 0.2, seed=0, world_size=world)
    assert path in str(caught.value)
    load_npz_split(path, 0.2, seed=0, world_size=1)  # one rank is fine


def test_npz_memory_estimate_comes_from_headers_alone(tmp_path):
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        _write_npy_header_only(archive, "x", (1000, 8), "<f8")
        _write_npy_header_only(archive, "y", (1000,), "<i8")
    headers = read_headers(str(path))
    assert headers["x"].shape == (1000, 8) and headers["y"].dtype == np.int64
    # stored x + float32 copy + split copies + labels (stored + 40 B each) + the finiteness check's slices
    assert peak_bytes(headers) == 64000 + 32000 + 32000 + 8000 + 40000 + 16 * 2**20
    assert headers["x"].nbytes == 64000 and not headers["x"].fortran_order


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


# ---------------------------------------------------------------- CNN


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 5, 7), (2, 4, 4), (1, 28, 28)])
def test_cnn_maps_images_to_logits(shape):
    model = CNN(shape, num_classes=10)
    logits = model(torch.randn(6, *shape))
    assert logits.shape == (6, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cnn_batchnorm_and_dropout_make_train_and_eval_differ():
    torch.manual_seed(0)
    model = CNN((1, 8, 8), 10, hidden=(4, 8), batchnorm=True)
    x = torch.rand(16, 1, 8, 8)
    model.train()
    out_train = model(x)
    model.eval()
    assert not torch.allclose(out_train, model(x))
    kinds = [type(m).__name__ for m in model.modules()]
    assert kinds.count("BatchNorm2d") == 2 and "Dropout" not in kinds
    assert "Dropout" in {type(m).__name__ for m in CNN((1, 8, 8), 10, dropout=0.3).modules()}


@pytest.mark.parametrize("kwargs, words", [
    ({"input_shape": (1, 8, 8), "hidden": (8, 16, 32)}, "exactly two positive channel counts"),
    ({"input_shape": (1, 8, 8), "hidden": (8,)}, "exactly two positive channel counts"),
    ({"input_shape": (64,)}, "(channels, height, width)"),
    ({"input_shape": (1, 3, 8)}, "at least 4"),
    ({"input_shape": (1, 8, 8), "activation": "swish"}, "unknown activation"),
])
def test_cnn_refuses_what_it_cannot_build(kwargs, words):
    with pytest.raises(ValueError) as caught:
        CNN(num_classes=10, **kwargs)
    assert words in str(caught.value)
