"""Measure the peak memory of building each dataset and compare it with data.memory's estimates.

    python -m data.measure_memory               # every case, n = 4,000,000 synthetic / 5,000,000 npz samples
    python -m data.measure_memory --n 1000000   # smaller and faster

Rerun it after changing a generator in data/synthetic.py or the npz loader: the guard in data/memory.py is
only as good as its bytes-per-sample constants. Each case runs in a fresh process and reports its peak RSS
(ru_maxrss) above the RSS just before the call, after a small warm-up build; a case whose measured peak
exceeds the estimate is marked UNDER, and the exit status is 1. The npz files are written by child processes
too: a child inherits its parent's RSS at fork as its starting ru_maxrss (exec keeps it), so a parent that
held the arrays would set a floor under every measurement.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import psutil

SYNTHETIC_CASES = [("moons", 2, 2), ("circles", 2, 2), ("xor", 2, 2), ("spirals", 2, 2), ("linear", 2, 2),
                   ("rule", 2, 2), ("rule", 16, 2), ("rule", 64, 2), ("rule", 2, 10), ("rule", 16, 10),
                   ("rule", 8, 64)]
NPZ_CASES = ["x float64 (N, 8)", "x float32 (N, 8)", "x uint8 (N, 64)", "x_train/x_val float64 (N, 8), compressed"]


def _write_npz(case: str, n: int, path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, n)
    if case == NPZ_CASES[0]:
        np.savez(path, x=rng.normal(size=(n, 8)), y=y)
    elif case == NPZ_CASES[1]:
        np.savez(path, x=rng.normal(size=(n, 8)).astype(np.float32), y=y)
    elif case == NPZ_CASES[2]:
        np.savez(path, x=rng.integers(0, 255, (n, 64), dtype=np.uint8), y=y)
    else:
        n_train = 4 * n // 5
        np.savez_compressed(path, x_train=rng.normal(size=(n_train, 8)), y_train=y[:n_train],
                            x_val=rng.normal(size=(n - n_train, 8)), y_val=y[n_train:])


def _measure(spec: dict) -> dict:
    """Runs inside the child process: build once small (warm-up), then once at full size."""
    import torch

    from data import build_dataset
    from data.memory import synthetic_dataset_bytes
    from data.npz import load_npz_split, peak_bytes, read_headers

    torch.set_num_threads(1)
    if spec["kind"] == "synthetic":
        name, n, dim, classes = spec["name"], spec["n"], spec["dim"], spec["classes"]
        build_dataset(name, 1000, 0.2, 0.1, dim, classes, 0)
        estimate = synthetic_dataset_bytes(name, n, dim, classes)
        rss = psutil.Process().memory_info().rss
        build_dataset(name, n, 0.2, 0.1, dim, classes, 0)
    else:
        small = Path(spec["path"]).with_name("warm-up.npz")
        np.savez(small, x=np.random.default_rng(0).normal(size=(50, 8)), y=np.arange(50) % 3)
        load_npz_split(str(small), 0.2, 0, 1)
        estimate = peak_bytes(read_headers(spec["path"]))
        rss = psutil.Process().memory_info().rss
        load_npz_split(spec["path"], 0.2, 0, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"measured": peak - rss, "estimate": estimate}


def _run_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "data.measure_memory", "--child", json.dumps(spec)],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=0, help="samples per case (default 4M synthetic, 5M npz)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        if spec["kind"] == "write":
            _write_npz(spec["case"], spec["n"], Path(spec["path"]))
            print("{}")
        else:
            print(json.dumps(_measure(spec)))
        return 0
    under = False
    print(f"{'case':45s} {'measured':>10s} {'estimate':>10s} {'B/sample':>9s} {'ratio':>6s}")
    rows = [({"kind": "synthetic", "name": name, "n": args.n or 4_000_000, "dim": dim, "classes": classes},
             f"{name} dim {dim} classes {classes}") for name, dim, classes in SYNTHETIC_CASES]
    with tempfile.TemporaryDirectory() as tmp:
        for case in NPZ_CASES:
            path = Path(tmp) / f"case{NPZ_CASES.index(case)}.npz"
            _run_child({"kind": "write", "case": case, "n": args.n or 5_000_000, "path": str(path)})
            rows.append(({"kind": "npz", "path": str(path), "n": args.n or 5_000_000}, f"npz {case}"))
        for spec, label in rows:
            r = _run_child(spec)
            ratio = r["measured"] / r["estimate"]
            under |= ratio > 1
            print(f"{label:45s} {r['measured'] / 2**20:8.1f}Mi {r['estimate'] / 2**20:8.1f}Mi "
                  f"{r['measured'] / spec['n']:9.1f} {ratio:6.2f}{'  UNDER' if ratio > 1 else ''}", flush=True)
    return 1 if under else 0


if __name__ == "__main__":
    sys.exit(main())
