"""Where train.py's epoch time goes: cProfile of one in-process world-1 run, grouped by the loop's phases.

    python -m launch.bench_profile [--hidden 64,64] [--epochs 100] [--threads 1] [train.py flags...]

Prints a markdown table (phase, seconds, % of the epoch loop) and the top functions by own time.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import sys
import tempfile
from pathlib import Path

import torch

import train as train_py
from spine.config import parse_config
from spine.distributed import distributed_session

ROOT = Path(__file__).resolve().parents[1]

# (phase, function that is that phase's entry point: file suffix, function name). Cumulative times.
PHASES = [
    ("checkpoint: check + gather RNG + write + barrier (Checkpointer.save)", "spine/checkpointer.py", "save"),
    ("  of which torch.save + fsync + rename (save_checkpoint)", "spine/checkpoint.py", "save_checkpoint"),
    ("validation forwards (Validation.sums)", "train.py", "sums"),
    ("epoch-end all-reduce: metrics, non-finite check, fingerprints (EpochMeter.end_of_epoch)", "spine/metrics.py",
     "end_of_epoch"),
    ("per-step bookkeeping (EpochMeter.record)", "spine/metrics.py", "record"),
    ("non-finite checks at --log-every (NonFiniteGuard.check_steps)", "spine/guard.py", "check_steps"),
    ("live guards and instruments, per step (Instruments.step_start)", "spine/instruments/loop.py", "step_start"),
    ("per-step TensorBoard + console (RunLogger.step)", "spine/logger.py", "step"),
    ("epoch row: jsonl + TensorBoard (RunLogger.epoch)", "spine/logger.py", "epoch"),
    ("order fingerprints (data.fingerprint)", "data/__init__.py", "fingerprint"),
    ("epoch order (epoch_indices)", "spine/distributed.py", "epoch_indices"),
    ("forward + loss + backward (forward_backward)", "train.py", "forward_backward"),
    ("grad norm (get_total_norm)", "torch/nn/utils/clip_grad.py", "_get_total_norm"),
    ("lr schedule (LRSchedule.step)", "spine/optim.py", "step"),
    ("optimizer.step", "torch/optim/optimizer.py", "wrapper"),
]


def profile_run(args: list[str], threads: int) -> tuple[pstats.Stats, float]:
    with distributed_session("cpu", threads, 60.0) as ctx, tempfile.TemporaryDirectory() as tmp:
        cfg = parse_config(args + ["--runs-dir", f"{tmp}/runs", "--checkpoints-dir", f"{tmp}/ckpt", "--overwrite"],
                           world_size=1)
        warm = parse_config(["--epochs", "2", "--runs-dir", f"{tmp}/runs", "--checkpoints-dir", f"{tmp}/ckpt",
                             "--run-name", "warm"], world_size=1)
        with contextlib.redirect_stdout(io.StringIO()):
            train_py.train(warm, ctx)  # lazy imports and first-step costs stay out of the profile
            profiler = cProfile.Profile()
            summary = profiler.runcall(train_py.train, cfg, ctx)
    return pstats.Stats(profiler), summary["loop_seconds"]


def cumulative(stats: pstats.Stats, file_suffix: str, name: str) -> float:
    return sum(v[3] for (path, _, func), v in stats.stats.items() if func == name and path.endswith(file_suffix))


def report(stats: pstats.Stats, loop_seconds: float, title: str, top: int = 12) -> str:
    lines = [f"### {title}", "", f"Epoch loop (`loop_seconds`, under cProfile): {loop_seconds:.3f} s", "",
             "| phase | seconds | % of loop |", "|---|---:|---:|"]
    for label, suffix, name in PHASES:
        seconds = cumulative(stats, suffix, name)
        lines.append(f"| {label} | {seconds:.3f} | {100 * seconds / loop_seconds:.1f}% |")
    lines += ["", "Top functions by own time:", "", "```"]
    buffer = io.StringIO()
    stats.stream = buffer
    stats.sort_stats("tottime").print_stats(top)
    body = buffer.getvalue()
    lines += [ln.replace(str(ROOT) + "/", "") for ln in body[body.index("ncalls"):].rstrip().splitlines()]
    lines.append("```")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--title", default="train.py")
    opts, extra = p.parse_known_args()
    torch.set_num_threads(opts.threads)
    stats, loop = profile_run(extra, opts.threads)
    print(report(stats, loop, f"{opts.title}: `train.py {' '.join(extra)}` at {opts.threads} thread(s)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
