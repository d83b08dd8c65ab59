"""Process-group set-up and the few collectives the loop needs.

One code path serves `python train.py` (world 1, no process group) and
`torchrun` (world N): every helper here is a no-op at world 1, so train.py
never branches on the launcher.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist

from spine.errors import UsageError


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str  # "none" at world 1
    threads: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launch_env() -> tuple[int, int, int, int]:
    """(rank, local_rank, world_size, local_world_size) as torchrun sets them; world 1 otherwise."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", str(rank)))
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    return rank, local_rank, world, local_world


def print0(*args: object) -> None:
    """print on rank 0 only: every rank runs the same code, and one voice is enough."""
    if launch_env()[0] == 0:
        print(*args, flush=True)


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available on this machine (use --device cpu or auto)")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"--device cuda: LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "use --nproc_per_node <= number of GPUs"
            )
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def default_threads(local_world_size: int) -> int:
    """Physical cores this process may use, split evenly between the ranks on this node.

    More threads than cores makes ranks fight for them: on 2 cores, 2 ranks x 2
    threads ran at about 0.4x of 2 ranks x 1 thread.
    """
    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    try:
        physical = min(physical, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        pass
    return max(1, physical // local_world_size)


@contextmanager
def distributed_session(device: str, threads: int, timeout_s: float) -> Iterator[DistContext]:
    """Join the process group (when launched with several ranks) and always leave it."""
    rank, local_rank, world, local_world = launch_env()
    dev = pick_device(device, local_rank)
    n_threads = threads or default_threads(local_world)
    torch.set_num_threads(n_threads)
    backend = "none"
    if world > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        timeout = timedelta(seconds=timeout_s)
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        # torchrun hands restarted workers the same store; without a per-attempt
        # prefix, gloo can read the dead attempt's addresses and fail or hang.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"attempt{attempt}", store)
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
        )
    ctx = DistContext(rank, local_rank, world, local_world, dev, backend, n_threads)
    try:
        yield ctx
    finally:
        if dist.is_initialized():
            # DDP's reducer sits in reference cycles; left to interpreter shutdown, gloo's threads
            # release its tensors after Python is gone and the process aborts ("terminate called
            # without an active exception", seen in ~10% of runs with torch 2.13). Collect it now.
            gc.collect()
            dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks. SUM then divide, because ReduceOp.AVG is unreliable on gloo."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def per_rank_values(value: float, ctx: DistContext) -> list[float]:
    """Every rank's value, on every rank (a sum of one-hot slots)."""
    slots = torch.zeros(ctx.world_size, dtype=torch.float64, device=ctx.device)
    slots[ctx.rank] = value
    return all_reduce_sum(slots).tolist()


def gather_objects(obj: object, ctx: DistContext) -> list[object]:
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running stats) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last
    training step every rank holds stats updated by its own batch; evaluating
    without this would give each rank a slightly different model.
    """
    if dist.is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, src=0)


def grad_sync(model: torch.nn.Module, sync: bool) -> AbstractContextManager:
    """Context for one forward + backward: DDP all-reduces the gradients only if `sync`.

    `no_sync()` must cover the forward too, or DDP still prepares the all-reduce.
    Without DDP (world 1) there is nothing to skip.
    """
    if sync or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
