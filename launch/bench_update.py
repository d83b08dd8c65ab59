"""The optimizer update, side by side: torch's per-tensor loop (its default on the CPU) against the multi-tensor
(foreach) update that spine/optim.py's build_optimizer asks for, on the default recipe's model and batch.

    python -m launch.bench_update [--repeats 9] [--steps 200]

Each repeat trains a fresh copy of the model for `--steps` steps with each implementation, in rotating order, and
times only `optimizer.step()`. Both end at the same weights (checked here on every repeat, and bit for bit in
tests/test_optim.py). make bench runs it and tabulates the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from launch.bench_loops import build_problem
from spine.config import parse_config

KINDS = {"per-tensor": False, "foreach": True}


def train_timing_updates(foreach: bool, steps: int) -> tuple[float, list[torch.Tensor]]:
    """(seconds inside optimizer.step() over `steps` steps, the final weights) of the default recipe at one
    thread, the optimizer's implementation set by `foreach`."""
    cfg = parse_config([], world_size=1)
    data, model, optimizer = build_problem(cfg, torch.device("cpu"))
    for group in optimizer.param_groups:
        group["foreach"] = foreach
    x, y, seconds = data.train_x, data.train_y, 0.0
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    batches = len(x) // cfg.batch_size
    for step in range(steps):
        idx = order[(step % batches) * cfg.batch_size:(step % batches + 1) * cfg.batch_size]
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        t = time.perf_counter()
        optimizer.step()
        seconds += time.perf_counter() - t
        optimizer.zero_grad(set_to_none=True)
    return seconds, [p.detach().clone() for p in model.parameters()]


def compare(repeats: int, steps: int) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the default recipe's thread count
    rows = []
    try:
        train_timing_updates(True, steps)  # warm-up
        kinds = list(KINDS)
        for repeat in range(repeats):
            weights = {}
            for kind in kinds[repeat % 2:] + kinds[:repeat % 2]:
                seconds, weights[kind] = train_timing_updates(KINDS[kind], steps)
                rows.append({"case": "optimizer update", "kind": kind, "repeat": repeat, "steps": steps,
                             "seconds": seconds})
            if not all(torch.equal(a, b) for a, b in zip(*weights.values(), strict=True)):
                raise RuntimeError("the foreach and per-tensor updates ended at different weights")
    finally:
        torch.set_num_threads(threads)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--steps", type=int, default=200)
    opts = p.parse_args()
    for row in compare(opts.repeats, opts.steps):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
