"""A user's own arrays: `--dataset npz:PATH`, a file written by numpy.savez or numpy.savez_compressed.

Two layouts are accepted:

- `x`, `y`: split here into train and validation by `val_fraction` and the seed, stratified by label (the same
  split as digits: each class held out in the same proportion, within one sample);
- `x_train`, `y_train`, `x_val`, `y_val`: used as given, in stored order.

x holds real numbers of any shape (N, ...), converted to float32; y holds integer class indices 0..K-1, with K
the largest label plus one over train and validation. Anything else is refused with a UsageError of one line
naming the file and the problem, before training starts. The archive is read member by member with
allow_pickle=False, so a pickle inside it is never run. Other arrays in the file are ignored (never read).
"""

from __future__ import annotations

import hashlib
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from data.memory import check_fits
from data.split import stratified_split, validation_size
from spine.errors import UsageError

PLAIN_KEYS = ("x", "y")
SPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val")
_NPY_MAGIC = b"\x93NUMPY"


class NpzData(NamedTuple):
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    content_fingerprint: str  # sha256 (16 hex digits) of the arrays used: names, dtypes, shapes and bytes


@dataclass(frozen=True)
class ArrayHeader:
    """What an .npy member's header says, read without loading its data."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


def _fail(path: str, problem: str) -> UsageError:
    return UsageError(f"--dataset npz:{path}: {problem}")


def _open_archive(path: str) -> zipfile.ZipFile:
    """The archive, or a UsageError saying why this file is not one."""
    file = Path(path)
    if not file.exists():
        raise _fail(path, "no such file")
    if file.is_dir():
        raise _fail(path, "is a directory, not an .npz file")
    try:
        with open(file, "rb") as f:
            start = f.read(len(_NPY_MAGIC))
        if start == _NPY_MAGIC:
            raise _fail(path, "is a single .npy array, not an .npz archive: write one with "
                              "numpy.savez(path, x=..., y=...)")
        if not zipfile.is_zipfile(file):
            raise _fail(path, "is not an .npz archive (not a zip file); write one with numpy.savez(path, x=..., y=...)")
        return zipfile.ZipFile(file)
    except OSError as e:  # unreadable file; BadZipFile (a damaged archive) is not an OSError
        raise _fail(path, f"cannot be read: {e.strerror or e}") from None
    except zipfile.BadZipFile as e:
        raise _fail(path, f"is a damaged zip archive ({e})") from None


def _layout(path: str, keys: set[str]) -> tuple[str, ...]:
    """The keys this file provides, in the order the loader reads them; refuses an incomplete or mixed file."""
    has_plain, has_split = set(PLAIN_KEYS) <= keys, set(SPLIT_KEYS) <= keys
    if has_plain and has_split:
        raise _fail(path, "holds both x, y and x_train, y_train, x_val, y_val; keep one layout")
    if has_split:
        return SPLIT_KEYS
    if has_plain:
        return PLAIN_KEYS
    # Name the keys of the layout the file seems to attempt: the split one if any of its keys is there.
    wanted = SPLIT_KEYS if keys & set(SPLIT_KEYS) else PLAIN_KEYS
    missing = [k for k in wanted if k not in keys]
    shown = sorted(keys)
    found = ", ".join(shown[:10]) + (f" and {len(shown) - 10} more" if len(shown) > 10 else "") if shown else "none"
    raise _fail(path, f"missing key(s) {', '.join(missing)} (arrays found: {found}); expected x and y, "
                      "or x_train, y_train, x_val and y_val")


def _read_header(path: str, archive: zipfile.ZipFile, key: str) -> ArrayHeader:
    try:
        with archive.open(key + ".npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            elif version in ((2, 0), (3, 0)):  # 3.0 differs only in allowing utf-8 field names
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # small members are read whole, CRC check included
        raise _fail(path, f"array {key} is damaged ({e})") from None
    except (ValueError, OSError) as e:
        raise _fail(path, f"array {key} is not a readable .npy array ({e})") from None
    return ArrayHeader(key, tuple(shape), dtype, fortran_order)


def _check_headers(path: str, headers: dict[str, ArrayHeader]) -> None:
    """Every refusal that needs only shapes and dtypes, before any array is read."""
    for h in headers.values():
        if h.dtype.hasobject:
            raise _fail(path, f"array {h.key} holds Python objects (dtype object); refused, since loading it would "
                              "run pickle: store a numeric array")
        is_labels = h.key.startswith("y")
        if is_labels:
            if h.dtype.kind == "b":
                raise _fail(path, f"{h.key} holds booleans; labels must be integers 0..K-1 (store y.astype(int))")
            if h.dtype.kind not in "iuf":
                raise _fail(path, f"{h.key} has dtype {h.dtype}; labels must be integers 0..K-1")
            if len(h.shape) != 1:
                raise _fail(path, f"{h.key} has shape {h.shape}; labels must be a 1-D array of class indices "
                                  "(not one-hot)")
        else:
            if h.dtype.kind not in "iuf":
                raise _fail(path, f"{h.key} has dtype {h.dtype}; features must be real numbers (float or integer)")
            if len(h.shape) < 2:
                raise _fail(path, f"{h.key} has shape {h.shape}; features must be (samples, ...) with at least one "
                                  "feature dimension (for one feature per sample: x[:, None])")
            if 0 in h.shape[1:]:
                raise _fail(path, f"{h.key} has shape {h.shape}: its samples hold no features")
    for x_key, y_key in (("x", "y"), ("x_train", "y_train"), ("x_val", "y_val")):
        if x_key in headers and headers[x_key].shape[0] != headers[y_key].shape[0]:
            raise _fail(path, f"{x_key} has {headers[x_key].shape[0]} samples but {y_key} has "
                              f"{headers[y_key].shape[0]} labels")
    if "x_train" in headers and headers["x_train"].shape[1:] != headers["x_val"].shape[1:]:
        raise _fail(path, f"x_train samples have shape {headers['x_train'].shape[1:]} but x_val samples "
                          f"{headers['x_val'].shape[1:]}")


def split_sizes_from_headers(headers: dict[str, ArrayHeader], val_fraction: float) -> tuple[int, int]:
    if "x" in headers:
        n = headers["x"].shape[0]
        n_val = validation_size(n, val_fraction)
        return max(0, n - n_val), n_val
    return headers["x_train"].shape[0], headers["x_val"].shape[0]


def peak_bytes(headers: dict[str, ArrayHeader]) -> int:
    """Upper bound on the memory load_npz_split uses for these arrays, from their headers alone.

    Per feature array: the stored array (alive while it is hashed and converted) plus its float32 copy, and
    for layout x, y the train/val copies (another float32 size); per label array: the stored one plus 40
    bytes per label (an int64 copy, the split's index tensors and the train/val copies); a Fortran-ordered
    array is copied to C order once more for its hash. A sum over the arrays, so it over-counts what is
    freed between them. Measured peak RSS over the estimate, 5M samples (python -m data.measure_memory):
    x float64 (N, 8) 0.54, float32 0.68, uint8 (N, 64) 0.88, x_train/x_val float64 compressed 0.53.
    """
    total = 16 * 2**20  # the finiteness check's slices
    for h in headers.values():
        if h.key.startswith("x"):
            as_float32 = h.count * 4
            total += h.nbytes + as_float32 + (as_float32 if h.key == "x" else 0)
        else:
            total += h.nbytes + h.count * 40
        if h.fortran_order:
            total += h.nbytes
    return total


def read_headers(path: str) -> dict[str, ArrayHeader]:
    """Shapes and dtypes of the arrays the loader would use, checked, without reading their data."""
    with _open_archive(path) as archive:
        keys = {name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")}
        headers = {key: _read_header(path, archive, key) for key in _layout(path, keys)}
    _check_headers(path, headers)
    return headers


def _read_array(path: str, archive: zipfile.ZipFile, key: str) -> np.ndarray:
    try:
        with archive.open(key + ".npy") as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # truncated data, bad CRC
        raise _fail(path, f"array {key} is damaged ({e})") from None


def _first_non_finite(x: np.ndarray) -> tuple[int, int]:
    """(number of samples with a NaN or inf, index of the first), checked in slices of about 16 MiB.

    torch.isfinite on a float tensor allocates a float copy and several masks of the whole array (measured:
    3x the array's size at its peak); slices keep the check's memory small and fixed.
    """
    rows = max(1, (16 * 2**20) // max(1, x[0].nbytes))
    bad_count, first = 0, -1
    for start in range(0, len(x), rows):
        finite = np.isfinite(x[start:start + rows]).reshape(min(rows, len(x) - start), -1).all(1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            bad_count += len(bad)
            first = start + int(bad[0]) if first < 0 else first
    return bad_count, first


def _features(path: str, key: str, stored: np.ndarray) -> torch.Tensor:
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, which the check below names
        x = np.ascontiguousarray(stored, dtype=np.float32)  # no copy if it already is float32
    bad_count, first = _first_non_finite(x)
    if bad_count:
        raise _fail(path, f"{key} has non-finite values (NaN, inf, or beyond float32's range) in {bad_count} "
                          f"sample(s), the first at index {first}")
    return torch.from_numpy(x)


def _labels(path: str, key: str, stored: np.ndarray) -> torch.Tensor:
    if stored.dtype.kind == "f":
        integral = np.isfinite(stored) & (stored == np.round(stored))
        if not integral.all():
            first = int(np.flatnonzero(~integral)[0])
            raise _fail(path, f"{key} holds non-integer labels (e.g. {stored[first]} at index {first}); labels must "
                              "be integers 0..K-1")
    if len(stored) and stored.min() < 0:
        first = int(np.flatnonzero(stored < 0)[0])
        raise _fail(path, f"{key} holds a negative label ({stored[first]} at index {first}); labels must be "
                          "integers 0..K-1")
    if len(stored) and stored.max() > np.iinfo(np.int64).max:  # uint64 beyond int64; caught as too large below too
        raise _fail(path, f"{key} holds a label ({stored.max()}) too large for a class index")
    return torch.from_numpy(stored.astype(np.int64, copy=False))


def load_npz_split(path: str, val_fraction: float, seed: int, world_size: int, ranks_on_node: int = 1) -> NpzData:
    """Load and check the arrays in `path`, split them if the file holds x and y, and fingerprint them.

    Refusals (UsageError, one line naming the file): missing file, not an npz, missing keys, object arrays,
    wrong dtypes or shapes, x and y of different lengths, non-integer, negative or out-of-range labels, a single
    class, NaN or infinite features, fewer train or validation samples than `world_size`, and data that would
    not fit in memory (`ranks_on_node` processes each holding a copy). Keys, dtypes, shapes, the rank count and
    the memory are checked from the headers, before any array's data is read.
    """
    headers = read_headers(path)
    n_train, n_val = split_sizes_from_headers(headers, val_fraction)
    if min(n_train, n_val) < world_size:
        raise _fail(path, f"{n_train} training and {n_val} validation samples for {world_size} rank(s): every rank "
                          "needs at least one of each")
    check_fits(peak_bytes(headers), f"--dataset npz:{path}", copies=ranks_on_node)

    digest = hashlib.sha256()
    tensors: dict[str, torch.Tensor] = {}
    with _open_archive(path) as archive:
        for key in headers:
            stored = _read_array(path, archive, key)
            # Name, dtype (byte order included) and shape go in with the bytes: equal hashes mean equal arrays.
            digest.update(f"{key}:{stored.dtype.str}:{stored.shape};".encode())
            digest.update(np.ascontiguousarray(stored).data)
            tensors[key] = _labels(path, key, stored) if key.startswith("y") else _features(path, key, stored)
            del stored  # the float32 copy is all that is kept

    labels = [t for k, t in tensors.items() if k.startswith("y")]
    num_classes = max(int(t.max()) for t in labels) + 1
    n_samples = sum(len(t) for t in labels)
    if num_classes > n_samples:
        raise _fail(path, f"labels go up to {num_classes - 1} with only {n_samples} samples; labels must be class "
                          "indices 0..K-1, not ids")
    if num_classes < 2:
        raise _fail(path, "every label is 0; a classifier needs at least two classes")

    if "x" in tensors:
        train_idx, val_idx = stratified_split(tensors["y"], val_fraction, torch.Generator().manual_seed(seed))
        x, y = tensors.pop("x"), tensors.pop("y")
        tensors = {"x_train": x[train_idx], "y_train": y[train_idx], "x_val": x[val_idx], "y_val": y[val_idx]}
        del x, y
    return NpzData(tensors["x_train"], tensors["y_train"], tensors["x_val"], tensors["y_val"], num_classes,
                   digest.hexdigest()[:16])
