"""One benchmark process (world 1) or rank (world 2 under torchrun): train.py's runs, each alternating with the bare
loop block by block, so that every block of train.py is timed next to the bare loop's blocks on either side.

    python -m launch.bench_worker --case default --out results.jsonl --repeats 5
    torchrun --standalone --nproc_per_node=2 -m launch.bench_worker --case world2 ...

The machine's speed drifts by tens of percent within a second on these shared VMs (make bench measures it: the
drift rows), so two whole runs one after the other are a poor pair. Here, while train.py runs, its logger's epoch
call hands over to the bare loop (launch/bench_loops.py: the same model, optimizer, data and per-epoch validation,
built apart) every `block` epochs: `block` epochs of train.py, then `block` of the bare loop, and again. A pair is a
train.py block, timed next to the mean of the bare blocks just before and just after it (a steady drift cancels);
train.py's first block is warm-up, and the bare loop's warm-up epoch comes before the run. A train.py block runs
from the end of the bare block before it to the end of its last epoch's logger call: its steps, validation, the
all-reduce, logging, and any checkpoint on the way (the final one comes after the last epoch row: its own clocked
row). The kinds:
  train.py       train.run() with its defaults
  train.py quiet the same without TensorBoard, per-step scalars or console lines (the logging row)
  train.py noise-scale  the same with --noise-scale (world 2: the cost of the instrument's hooks)
Clocks inside the train.py runs (FunctionClock) give rank 0's seconds in checkpoint writes, the non-finite checks,
the logging calls and --noise-scale's own code, as a share of train.py's own loop (the bare blocks taken out):
costs smaller than the noise of two whole runs. Rank 0 appends one JSON line per repeat and kind to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch.nn.parallel import DistributedDataParallel as DDP

import train
from launch.bench_loops import bare_epochs, build_problem
from spine import checkpoint as ckpt
from spine.config import parse_config
from spine.distributed import DistContext, barrier, distributed_session
from spine.guard import NonFiniteGuard
from spine.instruments.loop import Instruments
from spine.instruments.noise_scale import DDPGradNoise
from spine.logger import RunLogger, read_run
from spine.metrics import GradNorm

# The logging row's baseline: TensorBoard, per-step scalars and console lines off.
QUIET = ["--no-tensorboard", "--log-every", "1000000000", "--print-every", "1000000000"]
KIND_FLAGS = {"train.py": [], "train.py quiet": QUIET, "train.py noise-scale": ["--noise-scale"]}


@dataclass(frozen=True)
class Case:
    label: str
    flags: tuple[str, ...]  # train.py flags of the recipe
    epochs: int  # per run of train.py; its first block, and the bare loop's, are warm-up and not counted
    world: int = 1
    kinds: tuple[str, ...] = ("train.py", "train.py quiet")  # train.py's runs, each alternating with the bare loop
    block: int = 1  # epochs of train.py, then of the bare loop, in turn (0.05 s for the default recipe, ~1 s medium)


CASES = {
    # 100 epochs: make overfit's own run, so its one final checkpoint is weighed against the run it ends. Blocks of
    # 10 of its 3-5 ms epochs: each loop runs warm, as in a run of its own, and a pair spans a tenth of a second.
    "default": Case("default recipe (make overfit: moons 200, MLP 64-64, batch 32, 5 steps/epoch)", (), 100,
                    block=10),
    "rule20k": Case("rule 20,000 samples, 8-d, 4 classes, MLP 64-64, batch 64 (250 steps/epoch)",
                    ("--dataset", "rule", "--dim", "8", "--classes", "4", "--n-samples", "20000",
                     "--batch-size", "64"), 12),
    "medium": Case("medium MLP 1024-1024, moons 4,000, batch 32 (100 steps/epoch)",
                   ("--hidden", "1024,1024", "--n-samples", "4000"), 3),
    "world2": Case("world 2 (gloo): rule 20,000, MLP 64-64, 32 per rank (250 steps/epoch)",
                   ("--dataset", "rule", "--dim", "8", "--classes", "4", "--n-samples", "20000",
                    "--batch-size", "32"), 5, world=2,
                   kinds=("train.py", "train.py quiet", "train.py noise-scale")),
}

THREAD_CASES = {"default": 60, "medium": 2}  # case -> epochs of each timed run in make bench's thread study


class FunctionClock:
    """Seconds spent inside some functions of the code under test, without editing it: while the clock is
    entered, each (owner, attribute) is replaced by a timed wrapper. Looked up at call time (a module's
    function, a class's method), the wrapper is what the loop calls. A timed function called from another one
    is counted once, in the outer one (`by_function` names the outer one too)."""

    def __init__(self, *targets: tuple[object, str]) -> None:
        self.targets, self.originals = targets, []
        self._local = threading.local()  # per thread: the timed calls under way there (only the outermost counts)
        self.reset()

    def __enter__(self) -> FunctionClock:
        self.originals = [getattr(owner, name) for owner, name in self.targets]
        for (owner, name), fn in zip(self.targets, self.originals, strict=True):
            setattr(owner, name, self._timed(fn))
        return self

    def __exit__(self, *exc) -> None:
        for (owner, name), fn in zip(self.targets, self.originals, strict=True):
            setattr(owner, name, fn)

    def _timed(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if getattr(self._local, "depth", 0):  # inside another timed call, which counts this one's time
                return fn(*args, **kwargs)
            self._local.depth = 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - t
                self._local.depth = 0
                self.seconds += seconds
                self.calls += 1
                self.by_function[fn.__qualname__] = self.by_function.get(fn.__qualname__, 0.0) + seconds
        return timed

    def reset(self) -> None:
        self.seconds, self.calls, self.by_function = 0.0, 0, {}


def logging_clock() -> FunctionClock:
    """Rank 0's TensorBoard and console logging, beyond the metrics.jsonl rows the quiet runs write too: the
    --log-every steps' scalars and console lines (RunLogger.step, which reads the step's values), the epoch rows'
    TensorBoard scalars and console lines, the batches written to the event file (RunLogger._handoff; no other
    thread writes it) and the flushes before checkpoints."""
    return FunctionClock((RunLogger, "step"), (RunLogger, "_scalars"), (RunLogger, "table_row"),
                         (RunLogger, "_handoff"), (RunLogger, "flush"))


def grad_norm_clock() -> FunctionClock:
    """The grad norm, which by default only the logged steps measure (every step with --grad-clip)."""
    return FunctionClock((GradNorm, "__call__"))


def checkpoint_clock() -> FunctionClock:
    """Rank 0's checkpoint writes."""
    return FunctionClock((ckpt, "save_checkpoint"))


def guard_clock() -> FunctionClock:
    """Rank 0's non-finite checks: at --log-every, at each epoch's end and before each save, with the waits for
    their collectives (an all-reduce under way on gloo's own threads is not in it: a lower bound)."""
    return FunctionClock((NonFiniteGuard, "check_steps"), (NonFiniteGuard, "end_of_epoch"),
                         (NonFiniteGuard, "check_before_save"))


def noise_scale_clock() -> FunctionClock:
    """--noise-scale's own code at world 2: hooks registered and removed on a measured step, each hook call (a
    dot product), step_done, and after_update (the flush's all-reduce and the noise/* scalars; the other
    instruments that would share it are off in the bench)."""
    return FunctionClock((DDPGradNoise, "_register_hooks"), (DDPGradNoise, "_remove_hooks"),
                         (DDPGradNoise, "_see"), (DDPGradNoise, "step_done"), (Instruments, "after_update"))


def all_clocks() -> dict[str, FunctionClock]:
    return {"checkpoint": checkpoint_clock(), "noise": noise_scale_clock(), "guard": guard_clock(),
            "logging": logging_clock(), "grad norm": grad_norm_clock()}


def always_on(clocks: dict) -> contextlib.ExitStack:
    """Every clock but the noise scale's, which wraps functions every step calls and is entered only around the
    runs it measures. The others wrap calls of the logged steps, epoch ends and saves, in every train.py run."""
    stack = contextlib.ExitStack()
    for name, clock in clocks.items():
        if name != "noise":
            stack.enter_context(clock)
    return stack


class Handover:
    """While entered, every `block`-th epoch row of train.py (RunLogger.epoch, on every rank) is followed by `block`
    epochs of the bare loop `bare`, each side timed: a train.py block from the end of the bare block before it to
    the end of its last epoch's logger call, a bare block from there to its end. Each train.py block but the first
    (its warm-up) is paired with the mean of the bare blocks on either side of it, so a drift of the machine's
    speed that is steady over the three cancels out."""

    def __init__(self, bare: Iterator[tuple[float, float]], block: int) -> None:
        self.bare, self.block = bare, block
        self.train_blocks: list[float] = []  # from the second block on (the first is warm-up)
        self.bare_blocks: list[float] = []  # every block (the caller warms the bare loop up beforehand)
        self.bare_losses = (float("nan"), float("nan"))  # the bare loop's first step loss, last validation loss
        self._resumed: float | None = None

    def __enter__(self) -> Handover:
        self._original = RunLogger.epoch
        handover = self

        def epoch(logger: RunLogger, record: dict, elapsed: float) -> None:
            handover._original(logger, record, elapsed)
            if record["epoch"] % handover.block == 0:
                handover._bare_block()

        RunLogger.epoch = epoch
        return self

    def __exit__(self, *exc) -> None:
        RunLogger.epoch = self._original

    def _bare_block(self) -> None:
        t = time.perf_counter()
        if self._resumed is not None:
            self.train_blocks.append(t - self._resumed)
        for _ in range(self.block):
            self.bare_losses = next(self.bare)
        self._resumed = time.perf_counter()
        self.bare_blocks.append(self._resumed - t)

    @property
    def pairs(self) -> list[tuple[float, float]]:
        """(bare seconds, train.py seconds): each timed train.py block with the mean of its two bare neighbours."""
        return [((before + after) / 2, ours)
                for before, after, ours in zip(self.bare_blocks[:-1], self.bare_blocks[1:], self.train_blocks,
                                                strict=True)]


def run_paired(args: list[str], ctx: DistContext, scratch: Path, name: str, block: int,
               clocks: dict[str, FunctionClock]) -> dict:
    """One train.py run with `args`, alternating with the bare loop block by block (Handover)."""
    cfg = parse_config(args, world_size=ctx.world_size)
    data, model, optimizer = build_problem(cfg, ctx.device)
    if ctx.world_size > 1:
        model = DDP(model)  # bare DDP, wrapped before anything is timed, as train.py does
    bare = bare_epochs(model, optimizer, data, cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed,
                       cfg.eval_batch_size)
    next(bare)  # its warm-up epoch, untimed: its first timed block comes after train.py's first
    argv = args + ["--runs-dir", str(scratch / "runs"), "--checkpoints-dir", str(scratch / "ckpt"),
                   "--run-name", name, "--overwrite", "--threads", str(ctx.threads)]
    for clock in clocks.values():
        clock.reset()
    barrier()
    with open(scratch / f"{name}.log", "w") as log, contextlib.redirect_stdout(log), Handover(bare, block) as run:
        code = train.run(argv, ctx)
    if code != 0:
        raise SystemExit(f"bench: train.py {' '.join(argv)} exited {code}; see {scratch / f'{name}.log'}")
    if not ctx.is_main:  # only rank 0 writes the run's files, and only rank 0 records the row
        return {}
    summary, epochs = read_run(scratch / "runs" / name)
    pairs = run.pairs
    timed_epochs = len(pairs) * block
    own_loop = summary["loop_seconds"] - sum(run.bare_blocks)  # train.py's own time: the bare blocks taken out
    return {"pairs": pairs, "seconds": sum(t for _, t in pairs), "bare_seconds": sum(b for b, _ in pairs),
            "epochs": timed_epochs, "steps": epochs[block - 1 + timed_epochs]["step"] - epochs[block - 1]["step"],
            "loop_seconds": own_loop, "first_loss": summary["first_step_loss"],
            "last_loss": summary["final"]["val_loss"], "bare_first_loss": run.bare_losses[0],
            "bare_last_loss": run.bare_losses[1],
            "checkpoint_seconds": clocks["checkpoint"].seconds, "checkpoints": clocks["checkpoint"].calls,
            "guard_seconds": clocks["guard"].seconds, "logging_seconds": clocks["logging"].seconds,
            "logging_parts": dict(clocks["logging"].by_function), "grad_norm_seconds": clocks["grad norm"].seconds,
            "noise_seconds": clocks["noise"].seconds, "noise_parts": dict(clocks["noise"].by_function)}


def run_kind(kind: str, args: list[str], ctx: DistContext, scratch: Path, block: int,
             clocks: dict[str, FunctionClock]) -> dict:
    # The noise clock wraps functions every step calls: entered only around the runs it measures, so its own
    # wrappers add nothing to the others.
    with clocks["noise"] if kind == "train.py noise-scale" else contextlib.nullcontext():
        return run_paired(args + KIND_FLAGS[kind], ctx, scratch, kind.replace(" ", "-"), block, clocks)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", required=True, choices=CASES)
    p.add_argument("--out", required=True, help="JSON lines are appended here (rank 0)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--kinds", default="", help="comma-separated (default: the case's own)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--epochs", type=int, default=0, help="epochs per run instead of the case's (tests only)")
    p.add_argument("--block", type=int, default=0, help="epochs per block instead of the case's (tests only)")
    opts = p.parse_args()
    case = CASES[opts.case]
    kinds = opts.kinds.split(",") if opts.kinds else list(case.kinds)
    epochs, block = opts.epochs or case.epochs, opts.block or case.block
    if epochs % block or epochs < 2 * block:
        p.error(f"--epochs {epochs} must be a multiple of the block ({block}), at least two blocks")
    clocks = all_clocks()
    with (distributed_session(opts.device, 1, 120.0) as ctx, always_on(clocks),
          tempfile.TemporaryDirectory(prefix="bench-") as tmp):
        scratch = Path(tmp) / f"rank{ctx.rank}"
        scratch.mkdir()
        base = [*case.flags, "--device", opts.device]
        for kind in kinds:  # warm-up, untimed: lazy imports, allocator, first optimizer step
            run_kind(kind, base + ["--epochs", "2"], ctx, scratch, 1, clocks)
        for repeat in range(opts.repeats):
            shift = repeat % len(kinds)
            for kind in kinds[shift:] + kinds[:shift]:
                gc.collect()  # the garbage of earlier runs in this process must not land in this one's time
                timed = run_kind(kind, base + ["--epochs", str(epochs)], ctx, scratch, block, clocks)
                if ctx.is_main:
                    row = dict(timed, case=opts.case, world=ctx.world_size, kind=kind, repeat=repeat,
                               device=opts.device)
                    with open(opts.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
        barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
