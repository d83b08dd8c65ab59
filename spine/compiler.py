"""--compile: torch.compile the module the training steps call, and turn a compile failure into one line.

What is compiled is the training forward (through DDP at world > 1: torch.compile(DDP(model)) lets dynamo split the
graph at DDP's bucket boundaries, so the all-reduce still overlaps backward). Validation, the initial-loss
evaluation and checkpoints use the plain module: eval mode would be a second graph to compile (dynamo guards on
`training`), and the state_dict keeps its keys (no `_orig_mod.` prefix).

Compilation is lazy: torch.compile returns at once and the first forward compiles, so a failure (no C compiler,
an op inductor cannot lower) surfaces inside the first step. train.run catches it there: `failure_line` makes it
one line, exit 1, instead of pages of traceback.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

# dynamic=False: one static graph per batch shape. The epoch's last, partial batch is a second shape: with the
# default (dynamic=None) dynamo recompiles it as a dynamic-shape graph, which then serves every batch; static
# graphs are the faster kernels and the shapes here are two (full and last batch). README: the measured compiles.
DYNAMIC = False


def compiled(module: nn.Module) -> nn.Module:
    """The module torch.compile'd for CPU inductor (or the GPU's default backend)."""
    return torch.compile(module, dynamic=DYNAMIC)


def failure_line(error: BaseException) -> str | None:
    """One line for an error torch.compile raised (dynamo, inductor, the C compiler), None for any other error."""
    exc = sys.modules.get("torch._dynamo.exc")  # loaded whenever something was compiled; else not a compile error
    if exc is None or not isinstance(error, exc.TorchDynamoException):
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    cause = next((line for line in lines if "Error" in line or "error" in line), lines[0] if lines else "")
    return f"torch.compile failed ({type(error).__name__}): {cause[:300]}; run without --compile"
