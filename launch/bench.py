"""`make bench`: train.py's loop next to a bare loop, a tutorial loop and bare DDP, in one table.

    python -m launch.bench [--out reports/bench] [--repeats 5]

Every pair is measured side by side: the loops of one model size run in one process (world 1) or one
torchrun group (world 2), interleaved repeat after repeat (launch/bench_worker.py); the table shows
medians of steps per second and, per pair, the median of the per-repeat ratios (min-max). Targets come
from issue 6; a missed one says by how much. Writes <out>/bench.md and <out>/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from launch.bench_table import Sizes, build_table

ROOT = Path(__file__).resolve().parents[1]

WORKER = ["-m", "launch.bench_worker"]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# A process that imports torch and takes one Adam step: what any training run pays before its first epoch.
FLOOR = ("import torch; m = torch.nn.Linear(2, 2); o = torch.optim.Adam(m.parameters()); "
         "m(torch.zeros(1, 2)).sum().backward(); o.step()")
OVERFIT = ["train.py", "--run-name", "overfit", "--overwrite", "--print-every", "10"]  # make overfit's command


NOTES = [
    "What is timed. Cells: median over repeats (min–max). Every loop trains the same model on the same data "
    "(moons, 160 train / 40 validation samples, Adam lr 0.01, batch 32 per rank) for the same epochs and optimizer "
    "steps; model and optimizer are built before the clock starts.",
    "",
    "- (a) and the world-2 bare DDP loop: ~15 lines over in-memory tensors (`launch/bench_loops.py`), nothing else.",
    "- (b): `DataLoader` (default collate) over a `TensorDataset` with `DistributedSampler`, `.item()` and a log "
    "line to a file every step.",
    "- (c): train.py's `loop_seconds`, from the first epoch's start to the end of the last epoch's checkpoint: the "
    "steps and everything train.py does per epoch (shuffle, grad norm, LR schedule, bookkeeping, non-finite "
    "checks, metric reduction, validation, metrics.jsonl, TensorBoard, console, checkpoints at the default "
    "cadence including the final save). Not included: process start, imports and train()'s set-up and summary "
    "(their own row, `train() outside the epoch loop`), which the end-to-end rows do include.",
    "- TensorBoard + logging row: (c) against the same loop with `--no-tensorboard`, `--log-every` and "
    "`--print-every` set beyond the run (so also without the every-10-steps non-finite check); its spread shows "
    "how noisy a few-percent difference is on a shared machine.",
    "- Checkpoint row: seconds inside `spine.checkpoint.save_checkpoint` (torch.save, fsync, rename) over (c)'s "
    "loop seconds.",
    "- World 1 runs every loop at 1 intra-op thread; train.py's default on this machine is the physical core "
    "count, and the `default threads / 1 thread` row shows what that costs here. World 2 uses train.py's "
    "default (1 thread per rank). The end-to-end rows run `make overfit`'s command as a fresh process, at its "
    "default threads and at `--threads 1`.",
]


def run_workers(sizes: Sizes, repeats: int, results: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    for label, hidden, epochs in sizes:
        common = ["--out", str(results), "--label", label, "--hidden", hidden, "--epochs", str(epochs),
                  "--repeats", str(repeats)]
        kinds = "bare,tutorial,train.py,train.py quiet" + (",bare default threads" if label == sizes[0][0] else "")
        print(f"bench: world 1, {label} MLP {hidden}: {kinds}", flush=True)
        subprocess.run([sys.executable, *WORKER, *common, "--kinds", kinds], check=True, cwd=ROOT, env=env)
        print(f"bench: world 2 (gloo), {label} MLP {hidden}: bare DDP, train.py", flush=True)
        subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node=2", *WORKER, *common, "--kinds", "bare,train.py",
                        "--threads", "0"], check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


def time_end_to_end(repeats: int, overfit_args: list[str], results: Path) -> None:
    """Wall time of make overfit's command and of the floor, interleaved, as fresh processes."""
    with tempfile.TemporaryDirectory(prefix="bench-overfit-") as tmp:
        overfit = [sys.executable, *OVERFIT, "--runs-dir", f"{tmp}/runs", "--checkpoints-dir", f"{tmp}/ckpt",
                   *overfit_args]
        floor = [sys.executable, "-c", FLOOR]
        kinds = [("make overfit", overfit), ("make overfit --threads 1", overfit + ["--threads", "1"]),
                 ("floor", floor)]
        print(f"bench: end to end, {repeats} x (make overfit's command, the same at 1 thread, floor)", flush=True)
        for repeat in range(repeats):
            for kind, cmd in kinds[repeat % 3:] + kinds[:repeat % 3]:
                t = time.perf_counter()
                subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
                row = {"label": "end to end", "world": 1, "kind": kind, "repeat": repeat,
                       "seconds": time.perf_counter() - t}
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")


# (title, train.py flags) profiled for profile.md; the second is the cadence before time-based checkpoints.
PROFILES = [
    ("tiny, defaults", ["--hidden", "64,64"]),
    ("tiny, a checkpoint every epoch (the old default)", ["--hidden", "64,64", "--checkpoint-every-epochs", "1"]),
    ("medium, defaults", ["--hidden", "1024,1024", "--epochs", "10"]),
]


def write_profiles(path: Path) -> None:
    """cProfile of train.py's epoch loop grouped by phase (launch/bench_profile.py), one section per setting."""
    print("bench: profiles", flush=True)
    sections = ["# Where train.py's epoch loop spends its time", "",
                "cProfile of one in-process world-1 run after a warm-up run, 1 thread; regenerated by `make bench` "
                "(`launch/bench_profile.py`). Phases are cumulative times of the functions named, so nested ones "
                "overlap (save contains save_checkpoint; the non-finite checks contain per_rank_values). "
                "cProfile's own overhead inflates the many small calls of the step loop.", ""]
    for title, flags in PROFILES:
        out = subprocess.run([sys.executable, "-m", "launch.bench_profile", "--title", title,
                              "--run-name", "profile", *flags], check=True, cwd=ROOT, capture_output=True, text=True)
        sections += [out.stdout.strip(), ""]
    path.write_text("\n".join(sections))


def machine() -> dict:
    import psutil
    import torch

    return {"cores": f"{psutil.cpu_count(logical=False)} physical / {psutil.cpu_count()} logical",
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "python": platform.python_version(), "gpu": "none (CPU only, gloo)" if not torch.cuda.is_available()
            else torch.cuda.get_device_name(0)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/bench")
    p.add_argument("--repeats", type=int, default=7, help="interleaved repeats per pair")
    p.add_argument("--tiny", default="64,64:100", help="hidden widths:epochs of the tiny MLP (the default recipe)")
    p.add_argument("--medium", default="1024,1024:10", help="hidden widths:epochs of the ~1M-parameter MLP")
    p.add_argument("--end-to-end-repeats", type=int, default=3)
    p.add_argument("--overfit-args", default="", help="extra train.py flags for the end-to-end run (tests only)")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip writing profile.md")
    opts = p.parse_args()
    out = ROOT / opts.out if not Path(opts.out).is_absolute() else Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    results.unlink(missing_ok=True)
    sizes: Sizes = [(label, *spec.split(":")) for label, spec in (("tiny", opts.tiny), ("medium", opts.medium))]
    sizes = [(label, hidden, int(epochs)) for label, hidden, epochs in sizes]

    load_start, t0 = os.getloadavg(), time.perf_counter()
    run_workers(sizes, opts.repeats, results)
    time_end_to_end(opts.end_to_end_repeats, shlex.split(opts.overfit_args), results)
    load_end = os.getloadavg()
    if opts.profile:
        write_profiles(out / "profile.md")

    rows = [json.loads(line) for line in results.read_text().splitlines() if line]
    info = machine()
    command = "make bench  (" + " ".join(["python", "-m", "launch.bench", *sys.argv[1:]]) + ")"
    header = [
        f"Machine: {info['cores']} cores ({info['cpu']}), {info['gpu']}; torch {info['torch']}, "
        f"Python {info['python']}.",
        f"Load average (1/5/15 min) at start {' / '.join(f'{v:.2f}' for v in load_start)}, at end "
        f"{' / '.join(f'{v:.2f}' for v in load_end)}; the benchmark took {time.perf_counter() - t0:.0f} s.",
        f"Command: `{command}`; {opts.repeats} interleaved repeats per pair, "
        f"{opts.end_to_end_repeats} end to end.",
        "",
    ]
    text = "\n".join(header) + build_table(rows, sizes) + "\n\n" + "\n".join(NOTES) + "\n"
    (out / "bench.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
