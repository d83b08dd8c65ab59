"""Process-group set-up and the few collectives the loop needs.

One code path serves `python train.py` (world 1, no process group) and
`torchrun` (world N): every helper here is a no-op at world 1, so train.py
never branches on the launcher.
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

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


# Multiply-adds per optimizer step per rank above which a rank uses all its cores (below it, one thread): small
# steps gain nothing from more threads and lose to their synchronisation; measured by make bench
# (reports/bench/bench.md, "threads"), where the crossover on this 2-core machine lay between 2M and 34M.
MULTI_THREAD_MACS = 10_000_000


def cores_per_rank(local_world_size: int) -> int:
    """Physical cores this process may use (its CPU affinity and any cgroup CPU quota of a container), split
    evenly between the ranks on this node. More threads than cores makes ranks fight for them."""
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    try:
        cores = min(cores, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        pass
    quota = cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, quota)
    return max(1, cores // local_world_size)


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> int | None:
    """The CPUs a container's cgroup allows (quota / period, rounded up), or None when unlimited or unknown."""
    try:
        quota, period = open(f"{root}/cpu.max").read().split()[:2]  # cgroup v2: "max 100000" or "200000 100000"
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota = int(open(f"{root}/cpu/cpu.cfs_quota_us").read())
        period = int(open(f"{root}/cpu/cpu.cfs_period_us").read())
        return max(1, math.ceil(quota / period)) if quota > 0 else None
    except (OSError, ValueError):
        return None


def default_threads(local_world_size: int, macs_per_step: int, probe_seconds: float = 0.1) -> int:
    """One thread for a small step; for a large one (MULTI_THREAD_MACS) the rank's cores that are idle now.

    Extra threads of a small step only wait on each other, and on a busy machine a preempted thread stalls the
    whole step (measured: 2 threads at 0.41x of 1 on a tiny MLP under load). train.py also sets
    OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP, so waiting threads sleep instead of spinning: that keeps
    many threads from falling behind one thread on a loaded machine (measured 1.35x of 1 thread instead of 0.5x).
    A large step alone on its node first samples, for `probe_seconds`, how many cores other processes keep
    busy, and leaves them out: a thread on a busy core runs at the other process's pace and the step waits for
    it. With several ranks on the node the probe would count the sibling ranks' own start-up as load, so there
    the cores are split evenly instead.
    """
    if macs_per_step < MULTI_THREAD_MACS:
        return 1
    cores = cores_per_rank(local_world_size)
    if local_world_size > 1 or probe_seconds <= 0:
        return cores
    return max(1, min(cores, round(cores - busy_cores(probe_seconds))))


def busy_cores(seconds: float) -> float:
    """Cores' worth of CPU time that other processes used during `seconds` (this one sleeps meanwhile), in
    physical cores: the machine's busy fraction times its physical core count."""
    def used(t) -> float:  # CPU seconds not spent idle, summed over the CPUs
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    before, own_before = psutil.cpu_times(), time.process_time()
    time.sleep(seconds)
    after, own = psutil.cpu_times(), time.process_time() - own_before
    total = sum(after) - sum(before)
    if total <= 0:
        return 0.0
    physical = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    return max(0.0, (used(after) - used(before) - own) / total) * physical


@contextmanager
def distributed_session(device: str, threads: int, timeout_s: float) -> Iterator[DistContext]:
    """Join the process group (when launched with several ranks) and always leave it."""
    rank, local_rank, world, local_world = launch_env()
    dev = pick_device(device, local_rank)
    n_threads = threads or cores_per_rank(local_world)  # train.py settles the default once the model exists
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


def start_all_reduce_sum(t: torch.Tensor) -> dist.Work:
    """Starts an in-place sum over ranks and returns at once; `.wait()` on the result completes it. Every rank
    must start it at the same point, as any collective."""
    return dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True)


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


NO_CONTEXT = nullcontext()  # reusable: one object instead of a new one on every step


def grad_sync(model: torch.nn.Module, sync: bool) -> AbstractContextManager:
    """Context for one forward + backward: DDP all-reduces the gradients only if `sync`.

    `no_sync()` must cover the forward too, or DDP still prepares the all-reduce.
    Without DDP (world 1) there is nothing to skip.
    """
    if sync:
        return NO_CONTEXT
    model = getattr(model, "_orig_mod", model)  # --compile: the DDP module inside torch.compile's wrapper
    if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return NO_CONTEXT
    return model.no_sync()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def epoch_indices(sampler: DistributedSampler, device: torch.device) -> torch.Tensor:
    """This rank's indices for the sampler's current epoch, exactly as iterating the sampler yields them (its
    permutation of seed + epoch, padded by repeating the front, every world-th from this rank's position), but
    built with tensor ops: a list of 100k Python ints per epoch costs milliseconds."""
    n = len(sampler.dataset)  # type: ignore[arg-type]
    if sampler.shuffle:
        generator = torch.Generator()
        generator.manual_seed(sampler.seed + sampler.epoch)
        indices = torch.randperm(n, generator=generator)
    else:
        indices = torch.arange(n)
    if sampler.drop_last:
        indices = indices[:sampler.total_size]
    elif sampler.total_size > n:
        padding = sampler.total_size - n
        indices = torch.cat([indices, indices.repeat(math.ceil(padding / n))[:padding]])
    return indices[sampler.rank:sampler.total_size:sampler.num_replicas].to(device)
