"""Fault injection for the reliability tests: real crashes, hangs and bad writes at a chosen step.

Set one environment variable; unset, every hook here is a no-op:

    SPINE_FAULT="kill:rank=1:step=7"                      SIGKILL rank 1 right after its optimizer step 7
    SPINE_FAULT="raise:rank=0:step=12"                    raise InjectedFault there (a traceback, exit 1)
    SPINE_FAULT="hang:rank=1:step=7"                      stop responding there (the others must time out)
    SPINE_FAULT="nan:rank=1:step=7"                       rank 1's logits, hence its loss, are NaN at step 7
    SPINE_FAULT="tear-checkpoint:step=10"                 SIGKILL rank 0 half-way through writing step 10's file
    SPINE_FAULT="disk-full:step=10"                       writing step 10's file fails with ENOSPC
    SPINE_FAULT="kill:rank=1:step=7,kill:rank=0:step=13:attempt=1"   several faults, one per restart

`rank` defaults to 0 (checkpoints are written by rank 0), `attempt` to 0: a fault fires only in the
attempt whose TORCHELASTIC_RESTART_COUNT matches, so by default only in the first one, and a restarted
group runs clean. A malformed value is a usage error (exit 2), never silently ignored.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from spine.errors import UsageError

ENV = "SPINE_FAULT"
KINDS = ("kill", "raise", "hang", "nan", "tear-checkpoint", "disk-full")
STEP_KINDS = ("kill", "raise", "hang")  # fire after the optimizer step
WRITE_KINDS = ("tear-checkpoint", "disk-full")  # fire inside the checkpoint write


class InjectedFault(RuntimeError):
    """The exception of a `raise` fault: deliberately not a TrainingError, so it crashes like a real bug."""


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int = 0
    attempt: int = 0

    def describe(self) -> str:
        return f"{self.kind} on rank {self.rank} at step {self.step} (attempt {self.attempt})"


def parse(text: str) -> list[Fault]:
    """`kind:key=value:...[,kind:...]` -> faults; raises UsageError naming what is wrong."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, *pairs = item.split(":")
        if kind not in KINDS:
            raise UsageError(f"{ENV}: unknown fault {kind!r} in {text!r} (choose from {', '.join(KINDS)})")
        fields: dict[str, int] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in ("rank", "step", "attempt") or not value.isdigit():
                raise UsageError(f"{ENV}: expected rank=N, step=N or attempt=N, got {pair!r} in {text!r}")
            fields[key] = int(value)
        if fields.get("step", 0) < 1:
            raise UsageError(f"{ENV}: {kind} needs step=N with N >= 1, in {text!r}")
        faults.append(Fault(kind, **fields))
    return faults


def _active() -> list[Fault]:
    """Faults meant for this process and this attempt."""
    rank = int(os.environ.get("RANK", "0"))
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return [f for f in parse(os.environ.get(ENV, "")) if f.rank == rank and f.attempt == attempt]


def _announce(fault: Fault) -> None:
    print(f"{ENV}: injecting {fault.describe()}", file=sys.stderr, flush=True)
    sys.stdout.flush()


def _fire(fault: Fault) -> None:
    _announce(fault)
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.kind == "raise":
        raise InjectedFault(f"injected by {ENV}: {fault.describe()}")
    while fault.kind == "hang":
        time.sleep(3600)


def install(model: torch.nn.Module, optimizer: torch.optim.Optimizer, start_step: int) -> None:
    """Arm this process's step faults; `start_step` is the global step the loop starts from."""
    faults = _active()
    if not any(f.kind in STEP_KINDS or f.kind == "nan" for f in faults):
        return
    done = [start_step]  # optimizer steps completed, counted by the hook below (micro-batches do not count)
    announced: set[Fault] = set()

    def after_optimizer_step(*_) -> None:
        done[0] += 1
        for fault in faults:
            if fault.kind in STEP_KINDS and fault.step == done[0]:
                _fire(fault)

    def poison_logits(module: torch.nn.Module, _inputs, output: torch.Tensor) -> torch.Tensor | None:
        for fault in faults:
            if fault.kind == "nan" and module.training and fault.step == done[0] + 1:
                if fault not in announced:  # once, though every micro-batch of the step is poisoned
                    _announce(fault)
                    announced.add(fault)
                return output * float("nan")
        return None

    optimizer.register_step_post_hook(after_optimizer_step)
    model.register_forward_hook(poison_logits)


def during_checkpoint_write(file: BinaryIO, path: Path) -> None:
    """Called with the temp file that holds the serialized `path` (step-XXXXXXXX.pt), before fsync and rename."""
    step = re.fullmatch(r"step-(\d+)\.pt", path.name)
    for fault in _active():
        if fault.kind in WRITE_KINDS and step and fault.step == int(step[1]):
            _announce(fault)
            size = file.tell()
            file.truncate(size // 2)  # what a crash half-way through the write leaves on disk
            file.flush()
            os.fsync(file.fileno())
            if fault.kind == "tear-checkpoint":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV})")
