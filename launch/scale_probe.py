"""Where a distributed step's time goes: compute vs all-reduce, each measured, per global batch size.

    torchrun --standalone --nproc_per_node=2 launch/scale_probe.py --out probe-w2.json [--batches 64,512,4096]
    python -m launch.scale_probe --out probe-w1.json          # world 1: compute only

Run by launch/scale.py (make scale). Each timed step, on every rank, with a barrier before each timed block so
that no block includes waiting for the other rank to arrive:
  compute    forward + backward under DDP's no_sync(): the gradients stay local, no communication at all
  synced     forward + backward as training does it: DDP all-reduces the gradient buckets during backward
  allreduce  one explicit all-reduce of a flat buffer holding every gradient (the bytes DDP sends), alone
The difference synced - compute is what communication (and DDP's bucket bookkeeping) adds to a step.
The model and input size match the sweep's recipe; the inputs are random (timing does not depend on them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from models import build_model
from spine.distributed import all_reduce_sum, barrier, distributed_session, grad_sync

ROOT = Path(__file__).resolve().parents[1]


def _ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def probe(global_batch: int, steps: int, warmup: int, dim: int, classes: int, hidden: tuple[int, ...],
          ctx) -> dict:
    per_rank = global_batch // ctx.world_size
    torch.manual_seed(0)
    model = build_model("mlp", dim, classes, hidden, "relu", 0.0, False).to(ctx.device)
    ddp_model = DDP(model) if ctx.world_size > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(per_rank, dim, device=ctx.device)
    y = torch.randint(0, classes, (per_rank,), device=ctx.device)
    times: dict[str, list[float]] = {"compute": [], "synced": [], "allreduce": [], "optimizer": []}

    def timed(key: str, record: bool, fn, *args) -> None:
        barrier()  # both ranks start the block together: waiting for the other rank is not counted
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        if record:
            times[key].append(time.perf_counter() - start)

    def forward_backward(sync: bool) -> None:
        with grad_sync(ddp_model, sync):
            F.cross_entropy(ddp_model(x), y).backward()

    def optimizer_step() -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for step in range(warmup + steps):
        record = step >= warmup
        timed("compute", record, forward_backward, False)
        optimizer.zero_grad(set_to_none=True)
        timed("synced", record, forward_backward, True)
        flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        timed("allreduce", record, all_reduce_sum, flat)
        timed("optimizer", record, optimizer_step)
    result = {f"{k}_ms": _ms(v) for k, v in times.items()}
    result.update(world=ctx.world_size, threads_per_rank=ctx.threads, global_batch=global_batch,
                  per_rank_batch=per_rank, parameters=sum(p.numel() for p in model.parameters()),
                  gradient_bytes=flat.numel() * flat.element_size(), steps=steps)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file written by rank 0")
    p.add_argument("--batches", default="64,512,4096", help="global batch sizes, comma-separated")
    p.add_argument("--steps", type=int, default=60, help="timed steps per batch size (medians are reported)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--hidden", default="64,64")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    args = p.parse_args()
    hidden = tuple(int(w) for w in args.hidden.split(","))
    with distributed_session(args.device, args.threads, 120) as ctx:
        batches = [int(b) for b in args.batches.split(",")]
        bad = [b for b in batches if b % ctx.world_size]
        if bad:
            print(f"scale_probe: error: --batches {bad} do not divide by the world size {ctx.world_size}",
                  file=sys.stderr)
            return 2
        results = [probe(b, args.steps, args.warmup, args.dim, args.classes, hidden, ctx) for b in batches]
    if ctx.is_main:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
