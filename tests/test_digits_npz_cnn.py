"""Digits, a user's npz arrays, the memory guard and the CNN: shapes, determinism and every refusal; then the same
through train.py with --precision, --compile and DDP (issue 16)."""

from __future__ import annotations

import io
import time
import zipfile

import numpy as np
import pytest
import torch

import train
from data import build_dataset
from data.digits import DIGITS_CLASSES, DIGITS_SAMPLES, DIGITS_SHAPE, load_digits_split
from data.memory import RUNTIME_RESERVE_BYTES, check_fits, synthetic_dataset_bytes
from data.npz import load_npz_split, peak_bytes, read_headers
from data.split import per_class_validation_counts
from launch.runner import run_many
from models import build_model
from models.cnn import CNN
from models.mlp import MLP
from spine.config import parse_config
from spine.distributed import DistContext
from spine.errors import UsageError
from spine.guard import NonFiniteGuard
from spine.metrics import EpochMeter
from spine.precision import Precision, autocast_runs
from tests.helpers import assert_ddp_matches_single_process, run_train, world2_run

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


# ================================================================ through train.py (issue 16)

QUIET = ["--no-tensorboard", "--threads", "1", "--print-every", "1000"]
# A small digits CNN run: 320 training images (10 steps of 32), the 359 validation images, 3 epochs.
SMALL = ["--dataset", "digits", "--model", "cnn", "--hidden", "8,16", "--optimizer", "adam", "--lr", "3e-3",
         "--limit-samples", "320", "--epochs", "3", "--seed", "4", *QUIET]
DDP_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}

# World 2 at 16 per rank: the same global batch of 32 as world 1 at 32, in the session's shared torchrun job.
world2_run("digits-cnn", SMALL + ["--batch-size", "16"])
world2_run("digits-cnn-bn", SMALL + ["--batchnorm", "--batch-size", "16"])


def _train(tmp_path, args, name="run"):
    r = run_train(tmp_path, args, name=name)
    assert r.returncode == 0, r.output
    return r


def _max_difference(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def test_digits_and_npz_go_through_build_dataset_with_their_input_shape(tmp_path):
    d = build_dataset("digits", 200, 0.2, 0.1, 2, 2, seed=0)
    assert d.input_shape == (1, 8, 8) and d.in_dim == 64 and d.num_classes == 10
    assert (len(d.train_x), len(d.val_x)) == (1438, 359)
    assert build_dataset("digits", 200, 0.2, 0.1, 2, 2, seed=0).fingerprint == d.fingerprint
    assert build_dataset("digits", 200, 0.2, 0.1, 2, 2, seed=1).fingerprint != d.fingerprint
    x, y = _xy(n=50, classes=2, features=(3, 5))
    np.savez(tmp_path / "a.npz", x=x, y=y)
    changed = x.copy()
    changed[0, 0, 0] += 1e-3  # one value of one sample
    np.savez(tmp_path / "b.npz", x=changed, y=y)
    a = build_dataset(f"npz:{tmp_path / 'a.npz'}", 0, 0.2, 0.0, 2, 2, seed=0)
    b = build_dataset(f"npz:{tmp_path / 'b.npz'}", 0, 0.2, 0.0, 2, 2, seed=0)
    assert a.input_shape == (3, 5) and a.in_dim == 15 and a.num_classes == 2
    assert a.fingerprint != b.fingerprint  # one value of the file differs: the ranks' check would tell
    assert build_dataset(f"npz:{tmp_path / 'a.npz'}", 0, 0.2, 0.0, 2, 2, seed=0).fingerprint == a.fingerprint


def test_the_mlp_flattens_images_without_new_keys_or_other_weights():
    torch.manual_seed(0)
    flat = MLP(64, 10, hidden=(16,))
    torch.manual_seed(0)
    image = build_model("mlp", (1, 8, 8), 10, hidden=(16,))
    assert list(flat.state_dict()) == list(image.state_dict())
    assert all(torch.equal(flat.state_dict()[k], image.state_dict()[k]) for k in flat.state_dict())
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(image(x), flat(x.reshape(5, 64)))


def test_digits_mlp_and_cnn_train_and_the_header_and_summary_record_precision(tmp_path):
    mlp = _train(tmp_path, ["--dataset", "digits", "--epochs", "2", *QUIET], name="mlp")
    assert mlp.summary["final"]["val_acc"] > 0.85  # an MLP on flattened pixels learns digits
    assert "1x8x8, 10 classes" in mlp.stdout and "precision     fp32, eager" in mlp.stdout
    assert mlp.summary["precision"] == "fp32" and mlp.summary["compile"] is False
    assert mlp.summary["config"]["precision"] == "fp32"


def test_bf16_lands_within_one_accuracy_point_of_fp32_on_the_same_seed(tmp_path):
    args = SMALL + ["--limit-samples", "0", "--epochs", "3", "--hidden", "16,32", "--batchnorm"]
    fp32 = _train(tmp_path, args, name="fp32")
    bf16 = _train(tmp_path, args + ["--precision", "bf16"], name="bf16")
    assert bf16.summary["precision"] == "bf16" and "precision     bf16 (torch.autocast)" in bf16.stdout
    a, b = fp32.summary["final"]["val_acc"], bf16.summary["final"]["val_acc"]
    assert a > 0.95 and abs(a - b) <= 0.01, (a, b)
    assert _max_difference(fp32.weights(), bf16.weights()) > 0  # bf16 really ran: the weights differ


def test_cpu_autocast_runs_bf16_and_fp16_in_this_torch():
    # torch.autocast on a dtype its device cannot run warns and computes in fp32; autocast_runs checks the result.
    assert autocast_runs(torch.device("cpu"), torch.bfloat16)
    assert autocast_runs(torch.device("cpu"), torch.float16)


def test_a_precision_the_device_cannot_run_is_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("spine.precision.autocast_runs", lambda device, dtype: False)
    code = train.run(SMALL + ["--precision", "fp16", "--runs-dir", str(tmp_path / "runs"),
                              "--checkpoints-dir", str(tmp_path / "ck")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "--precision fp16: torch" in err and "cannot run autocast in fp16 on cpu" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ck").exists()


def _one_step_ctx() -> DistContext:
    return DistContext(0, 0, 1, 1, torch.device("cpu"), "none", 1)


def test_a_step_the_fp16_scaler_skips_is_not_a_divergence_but_a_non_finite_loss_is():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = Precision("fp16", torch.device("cpu"), optimizer)
    amp.scaler = torch.amp.GradScaler("cpu", init_scale=1e38)  # the scaled gradients overflow: a step to skip
    meter = EpochMeter()
    guard = NonFiniteGuard(_one_step_ctx(), list(model.parameters()), meter)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.rand(8, 4), torch.randint(0, 2, (8,))
    with amp.autocast():
        loss = torch.nn.functional.cross_entropy(model(x), y)
    amp.backward(loss)
    amp.unscale()
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert not torch.isfinite(norm)  # the gradient the scaler saw was inf
    skipped = amp.step()
    assert skipped and amp.scaler.get_scale() < 1e38
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))  # nothing applied
    meter.record(loss.detach(), torch.zeros(8, 2), y, norm, skipped)
    assert guard.check_steps(1) is None and guard.check_before_save(1) is None  # a skip, not a divergence
    totals = meter.end_of_epoch(_one_step_ctx(), 0, "0" * 16, False)
    assert totals.bad == [0.0] and totals.skipped_steps == 1
    # The same non-finite gradient on a step that was NOT skipped is a divergence, and so is a non-finite loss.
    meter.record(loss.detach(), torch.zeros(8, 2), y, norm, False)
    assert guard.check_steps(2) == "non-finite gradient at step 2 on rank 0"
    meter.record(torch.tensor(float("nan")), torch.zeros(8, 2), y, None, True)
    assert guard.check_steps(3) == "non-finite loss at step 3 on rank 0"


def test_fp16_resume_from_a_mid_epoch_checkpoint_is_exact_and_keeps_the_scaler(tmp_path):
    args = SMALL + ["--precision", "fp16", "--checkpoint-every-steps", "13", "--keep-checkpoints", "50"]
    full = _train(tmp_path, args, name="full")
    mid = full.ckpt_dir / "step-00000013.pt"
    saved = torch.load(mid, weights_only=True)
    assert saved["progress"]["step_in_epoch"] == 3 and saved["scaler"]["scale"] > 0
    assert "precision     fp16 (torch.autocast, GradScaler)" in full.stdout
    resumed = _train(tmp_path, SMALL + ["--precision", "fp16", "--resume", str(mid)], name="from-mid")
    a, b = full.weights(), resumed.weights()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.step_losses() == [loss for m in full.metrics[1:] for loss in m["step_losses"]]
    assert torch.load(resumed.ckpt_dir / "last.pt", weights_only=True)["scaler"] == \
        torch.load(full.ckpt_dir / "last.pt", weights_only=True)["scaler"]
    # Another precision cannot continue it: the scale and the rounding would not be those of the run.
    other = run_train(tmp_path, SMALL + ["--resume", str(mid)], name="other")
    assert other.returncode == 2 and "checkpoint has --precision fp16, this run has --precision fp32" in other.stderr


@pytest.mark.parametrize("args, words", [
    (["--dataset", "npz:{tmp}/missing.npz"], "--dataset npz:{tmp}/missing.npz: no such file"),
    (["--dataset", "npz:{tmp}/bad.npz"], "is not an .npz archive"),
    (["--dataset", "npz:{tmp}/nan.npz"], "non-finite values"),
    (["--dataset", "npz:{tmp}/labels.npz"], "negative label"),
    (["--dataset", "moons", "--n-samples", "10000000000"], "--n-samples 10000000000: the dataset needs 596.0 GiB"),
    (["--dataset", "moons", "--model", "cnn"], "--model cnn needs images"),
    (["--dataset", "npz:{tmp}/flat.npz", "--model", "cnn"], "samples of shape (6,)"),
    (["--dataset", "digits", "--model", "cnn", "--batchnorm", "--sync-batchnorm"], "SyncBatchNorm layers only work"),
    (["--dataset", "digits", "--sync-batchnorm"], "--sync-batchnorm needs --batchnorm"),
    (["--dataset", "mnist"], "--dataset must be one of moons"),
])
def test_bad_data_flags_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, args, words):
    x, y = _xy(n=60, classes=3)
    np.savez(tmp_path / "nan.npz", x=_with(np.nan, (3, 0, 0)), y=_Y)
    np.savez(tmp_path / "labels.npz", x=x, y=y - 1)
    np.savez(tmp_path / "few.npz", x_train=x[:1], y_train=np.array([0]), x_val=x[:1], y_val=np.array([1]))
    np.savez(tmp_path / "flat.npz", x=x.reshape(60, 6), y=y)
    (tmp_path / "bad.npz").write_bytes(b"not a zip file at all")
    args = [a.format(tmp=tmp_path) for a in args]
    started = time.perf_counter()
    code = train.run(args + QUIET + ["--device", "cpu", "--runs-dir", str(tmp_path / "runs"),
                                     "--checkpoints-dir", str(tmp_path / "ck")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert words.format(tmp=tmp_path) in err, err
    assert "available" in err or "n-samples" not in words
    assert time.perf_counter() - started < 10  # refused from sizes: nothing is generated or read whole
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ck").exists()


def test_an_npz_file_with_fewer_samples_than_ranks_is_refused_by_the_flag_checks(tmp_path):
    x, y = _xy(n=3, classes=2)
    path = tmp_path / "few.npz"
    np.savez(path, x_train=x[:2], y_train=np.array([0, 1]), x_val=x[:1], y_val=np.array([1]))
    args = ["--dataset", f"npz:{path}", "--batch-size", "1"]
    parse_config(args, world_size=1)  # one rank: one validation sample is enough
    with pytest.raises(UsageError, match=r"2 training and 1 validation samples for 2 rank\(s\): every rank needs"):
        parse_config(args, world_size=2)


def test_an_npz_run_is_named_after_the_file_and_trains(tmp_path):
    x, y = _xy(n=120, classes=3, features=(1, 6, 6))
    np.savez(tmp_path / "my-images.npz", x=x, y=y)
    r = run_train(tmp_path, ["--dataset", f"npz:{tmp_path / 'my-images.npz'}", "--model", "cnn", "--hidden", "4,4",
                             "--epochs", "2", "--batch-size", "16", *QUIET], name="")
    assert r.returncode == 0, r.output
    assert (tmp_path / "runs" / "npz-my-images-cnn-seed0" / "summary.json").exists()


def _boom(graph_module, example_inputs):
    raise RuntimeError("this backend always fails")


def test_a_compile_failure_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "compiled", lambda module: torch.compile(module, backend=_boom))
    code = train.run(["--dataset", "moons", "--epochs", "1", "--compile", *QUIET, "--runs-dir",
                      str(tmp_path / "runs"), "--checkpoints-dir", str(tmp_path / "ck")])
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.count("\n") == 1 and err.startswith("train.py: error on rank 0: torch.compile failed "
                                                   "(BackendCompilerFailed)") and "without --compile" in err, err


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_digits_cnn_world2_equals_world1_at_the_same_global_batch_without_batchnorm(tmp_path, world2):
    ddp = world2["digits-cnn"]
    single = _train(tmp_path, SMALL + ["--batch-size", "32"], name="single")
    assert_ddp_matches_single_process(ddp, single, 30, DDP_TOLERANCE)


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_digits_cnn_world2_with_batchnorm_differs_because_each_rank_normalises_its_own_half(tmp_path, world2):
    """BatchNorm in train mode normalises with the statistics of the batch it sees: at world 2 that is each rank's
    16 samples, at world 1 all 32, so the forward itself differs (the gradients are still averaged exactly). The
    difference is measured here against the no-BatchNorm pair, which agrees to float rounding."""
    ddp, plain = world2["digits-cnn-bn"], world2["digits-cnn"]
    single = _train(tmp_path, SMALL + ["--batchnorm", "--batch-size", "32"], name="single-bn")
    single_plain = _train(tmp_path, SMALL + ["--batch-size", "32"], name="single")
    assert ddp.returncode == 0, ddp.output
    with_bn = _max_difference(ddp.weights(), single.weights())
    without_bn = _max_difference(plain.weights(), single_plain.weights())
    assert without_bn < 1e-5 and with_bn > 1e-3, (with_bn, without_bn)
    # The first step already differs: its loss is computed on differently normalised activations.
    assert ddp.summary["first_step_loss"] != pytest.approx(single.summary["first_step_loss"], abs=1e-6)
    # Per-rank statistics are an implementation difference, not a failure: both learn digits.
    assert ddp.summary["final"]["val_acc"] > 0.8 and single.summary["final"]["val_acc"] > 0.8


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_digits_cnn_world2_resumes_exactly_from_a_mid_epoch_checkpoint(tmp_path):
    # 10 steps per epoch; a checkpoint every 13 steps lands in epoch 2, after its 3rd step. Both runs in one job.
    args = SMALL + ["--batchnorm", "--dropout", "0.2", "--batch-size", "16"]
    mid = tmp_path / "checkpoints" / "full" / "step-00000013.pt"
    full, resumed = run_many([(args + ["--checkpoint-every-steps", "13", "--keep-checkpoints", "50"], "full"),
                              (args + ["--resume", str(mid)], "from-mid")], tmp_path, world=2, timeout=200)
    assert full.returncode == 0, full.output
    assert resumed.returncode == 0, resumed.output
    assert torch.load(mid, weights_only=True)["progress"]["step_in_epoch"] == 3
    a, b = full.weights(), resumed.weights()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["step_losses"] for m in resumed.metrics] == [m["step_losses"] for m in full.metrics[1:]]
    assert resumed.summary["final"] == full.summary["final"]


# ---------------------------------------------------------------- --compile (slow: `make test-slow`)
# A cold CPU inductor compile of this small CNN took minutes on the 2 shared cores here (reports/digits/digits.md):
# too long for make test's ~5 minutes, so these run under `pytest -m slow` (make test-slow).

COMPILE_ARGS = SMALL + ["--limit-samples", "330", "--epochs", "2"]  # 330 = 10 x 32 + 10: a partial last batch


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compiled_training_matches_eager_and_compiles_one_graph_per_batch_shape(tmp_path):
    import torch._dynamo.utils

    eager = _train(tmp_path, COMPILE_ARGS + ["--batch-size", "32"], name="eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _train(tmp_path, COMPILE_ARGS + ["--batch-size", "32", "--compile"], name="compiled")
    # dynamic=False: the full batch and the last partial one are two static graphs; validation runs eager, so
    # eval mode adds none, and a second epoch reuses both.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert compiled.summary["compile"] is True and "torch.compile (training forward" in compiled.stdout
    a, b = eager.weights(), compiled.weights()
    for name in a:  # inductor fuses and reorders float arithmetic: close, not bitwise
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4, msg=name)
    assert abs(eager.summary["final"]["val_acc"] - compiled.summary["final"]["val_acc"]) <= 0.01


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(1200)
def test_compiled_ddp_world2_equals_eager_world1_at_the_same_global_batch(tmp_path):
    (ddp,) = run_many([(COMPILE_ARGS + ["--batch-size", "16", "--compile"], "ddp-compiled")], tmp_path, world=2,
                      timeout=1100)
    single = _train(tmp_path, COMPILE_ARGS + ["--batch-size", "32"], name="single")
    assert ddp.returncode == 0, ddp.output
    a, b = ddp.weights(), single.weights()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4, msg=name)
    checksums = ddp.summary["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]


@pytest.mark.experiment
@pytest.mark.timeout(300)
def test_make_digits_launcher_writes_its_report_and_checks_its_targets(tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT

    proc = subprocess.run([sys.executable, "-m", "launch.digits", "--out", str(tmp_path), "--seeds", "1",
                           "--precisions", "fp32", "--no-world2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = (tmp_path / "digits.md").read_text()
    assert "| fp32 | 1/1 |" in report  # the seed reached 97% validation accuracy
    assert "- 100% train accuracy first reached at epoch" in report
    assert "every fp32 seed ends at >= 97% validation accuracy: yes" in report


def _sync_batchnorm_under_ddp(rank: int, world: int) -> str:
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(CNN((1, 8, 8), 10, hidden=(4, 8), batchnorm=True))
        try:
            torch.nn.parallel.DistributedDataParallel(model)
        except ValueError as e:
            return str(e)
        return "accepted"
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(90)
def test_torch_refuses_sync_batchnorm_on_cpu_under_ddp_which_is_why_the_flag_is_gpu_only():
    from tests.helpers import spawn_ranks

    # If a later torch accepts it, this fails: then --sync-batchnorm can be allowed on CPU (spine/config.py).
    refusal = "SyncBatchNorm layers only work with GPU modules"
    assert spawn_ranks(_sync_batchnorm_under_ddp, 2, timeout=60) == [refusal] * 2
