"""One benchmark process (world 1) or rank (world 2 under torchrun): interleaved timed runs of each loop.

    python -m launch.bench_worker --out results.jsonl --hidden 64,64 --epochs 100 --repeats 5
    torchrun --standalone --nproc_per_node=2 launch/bench_worker.py --out ... (bare DDP vs train.py)

Every loop runs in this same process, one after the other, repeat after repeat (the order rotates each
repeat), so they share the machine's load. What is timed:
  - bare / tutorial: the loop only (model and optimizer are built first, untimed);
  - train.py: `loop_seconds` of train() (summary.json): every epoch with all it does, i.e. steps,
    bookkeeping, metric reduction, validation, logging, TensorBoard and checkpoints at the default cadence,
    including the final checkpoint; not the set-up before the first epoch nor the summary after the last.
    The whole train() call is recorded too (`call_seconds`).
Rank 0 appends one JSON line per timed run to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import train as train_py
from launch.bench_loops import bare_loop, build_problem, tutorial_loop
from spine import checkpoint as ckpt
from spine.config import parse_config
from spine.distributed import DistContext, barrier, default_threads, distributed_session, launch_env

ROOT = Path(__file__).resolve().parents[1]

# train.py with its TensorBoard, per-step logging and console lines switched off: the bookkeeping baseline.
QUIET = ["--no-tensorboard", "--log-every", "1000000000", "--print-every", "1000000000"]


class CheckpointClock:
    """Seconds spent inside spine.checkpoint.save_checkpoint (rank 0's writes), without editing it."""

    def __enter__(self) -> CheckpointClock:
        self.seconds, self.saves = 0.0, 0
        self._save = ckpt.save_checkpoint
        ckpt.save_checkpoint = self._timed
        return self

    def __exit__(self, *exc) -> None:
        ckpt.save_checkpoint = self._save

    def _timed(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self._save(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t
            self.saves += 1

    def reset(self) -> None:
        self.seconds, self.saves = 0.0, 0


def run_train_py(args: list[str], ctx: DistContext, scratch: Path, name: str, clock: CheckpointClock) -> dict:
    cfg = parse_config(args + ["--runs-dir", str(scratch / "runs"), "--checkpoints-dir", str(scratch / "ckpt"),
                               "--run-name", name, "--overwrite"], world_size=ctx.world_size)
    clock.reset()
    with open(scratch / f"{name}.log", "w") as log, contextlib.redirect_stdout(log):
        t = time.perf_counter()
        summary = train_py.train(cfg, ctx)
        call = time.perf_counter() - t
    return {"seconds": summary["loop_seconds"], "call_seconds": call, "steps": summary["global_step"],
            "first_loss": summary["first_step_loss"], "last_loss": summary["final"]["train_loss"],
            "checkpoint_seconds": clock.seconds, "checkpoints": clock.saves,
            "process_threads": psutil.Process().num_threads()}


def run_reference(kind: str, args: list[str], ctx: DistContext, scratch: Path) -> dict:
    cfg = parse_config(args, world_size=ctx.world_size)
    data, model, optimizer = build_problem(cfg)
    x, y = data.train_x, data.train_y
    if ctx.world_size > 1:
        model = DDP(model)  # wrapped before the clock starts, as train.py does
    barrier()
    t = time.perf_counter()
    if kind == "tutorial":
        with open(scratch / "tutorial.log", "w") as log:
            first, last = tutorial_loop(model, optimizer, x, y, cfg.batch_size, cfg.epochs, log, cfg.seed)
    else:
        first, last = bare_loop(model, optimizer, x, y, cfg.batch_size, cfg.epochs, ctx.rank, ctx.world_size,
                                cfg.seed)
    seconds = time.perf_counter() - t
    steps = cfg.epochs * math.ceil(math.ceil(len(x) / ctx.world_size) / cfg.batch_size)
    return {"seconds": seconds, "steps": steps, "first_loss": first, "last_loss": last}


def run_kind(kind: str, args: list[str], ctx: DistContext, scratch: Path, clock: CheckpointClock) -> dict:
    if kind == "bare default threads":  # the bare loop at the thread count train.py would pick by default
        threads = torch.get_num_threads()
        torch.set_num_threads(default_threads(ctx.local_world_size))
        try:
            return dict(run_reference("bare", args, ctx, scratch), threads=torch.get_num_threads())
        finally:
            torch.set_num_threads(threads)
    if kind == "train.py":
        return run_train_py(args, ctx, scratch, "default", clock)
    if kind == "train.py quiet":
        return run_train_py(args + QUIET, ctx, scratch, "quiet", clock)
    return run_reference(kind, args, ctx, scratch)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON lines are appended here (rank 0)")
    p.add_argument("--label", required=True, help="name of the model size in the table, e.g. tiny")
    p.add_argument("--hidden", default="64,64")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--slow-kind-epochs", type=int, default=20,
                   help="epochs for 'bare default threads', which can be very slow on a shared machine")
    p.add_argument("--kinds", default="bare,tutorial,train.py,train.py quiet")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank for every loop; 0 = train.py's "
                   "default (physical cores // ranks)")
    opts = p.parse_args()
    kinds = opts.kinds.split(",")
    world = launch_env()[2]
    with (distributed_session("cpu", opts.threads, 120.0) as ctx, CheckpointClock() as clock,
          tempfile.TemporaryDirectory(prefix="bench-") as tmp):
        scratch = Path(tmp) / f"rank{ctx.rank}"
        scratch.mkdir()
        for kind in kinds:  # warm-up, untimed: lazy imports, allocator, first optimizer step
            run_kind(kind, ["--hidden", opts.hidden, "--epochs", "2"], ctx, scratch, clock)
        for repeat in range(opts.repeats):
            shift = repeat % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:
                barrier()
                epochs = opts.slow_kind_epochs if kind == "bare default threads" else opts.epochs
                result = run_kind(kind, ["--hidden", opts.hidden, "--epochs", str(epochs)], ctx, scratch, clock)
                if ctx.is_main:
                    result.update(label=opts.label, hidden=opts.hidden, world=world, kind=kind, repeat=repeat,
                                  epochs=epochs, backend=ctx.backend, physical_cores=default_threads(1),
                                  default_threads=default_threads(ctx.local_world_size),
                                  threads_per_rank=result.get("threads", ctx.threads))
                    with open(opts.out, "a") as f:
                        f.write(json.dumps(result) + "\n")
        barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
