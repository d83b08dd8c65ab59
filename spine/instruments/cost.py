"""What the always-on and the hot-path instruments cost, measured: `python -m spine.instruments.cost`.

- the noise scale at world 2 (gloo, real processes): step time of plain DDP, and with DDPGradNoise (its
  parameter hooks, step_done, one flush per 10 steps) measuring every step and one in 10 (the loop's default
  cadence); for reference, torch's averaging communication hook in Python, which an earlier version of the
  instrument was built on; interleaved blocks;
- DDPGradNoise at world 3 leaves the weights bit-identical to plain DDP;
- the micro-batch source at world 1 with 4 accumulation steps;
- the guards' per-step calls, against a world-1 step.

Not imported by anything: a measurement to rerun when the loop or the instruments change.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from spine.distributed import all_reduce_sum
from spine.instruments.guards import Guards
from spine.instruments.noise_scale import DDPGradNoise, MicroBatchGradNoise, NoiseScaleEstimator


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(32, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def _rank_main(rank: int, world: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        queue.put((rank, fn(rank, world, *args)))
    finally:
        dist.destroy_process_group()


def on_ranks(fn: Callable, world: int, *args: object, timeout: float = 600) -> list:
    """fn(rank, world, *args) on `world` fresh gloo processes; every process joined, or killed by its pid."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict(queue.get(timeout=timeout) for _ in range(world))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def _hook_timing(rank: int, world: int, hidden: int, batch: int, block: int, blocks: int) -> dict:
    torch.manual_seed(0)
    every = {"plain": 0, "python comm hook": 0, "measured every step": 1, "measured one in 10": 10}
    modules = {name: mlp(hidden) for name in every}
    for module in modules.values():
        module.load_state_dict(modules["plain"].state_dict())
    models = {name: DistributedDataParallel(module) for name, module in modules.items()}
    models["python comm hook"].register_comm_hook(None, allreduce_hook)  # torch's averaging hook in Python
    noises = {name: DDPGradNoise(modules[name].parameters()) for name, n in every.items() if n}
    estimator = NoiseScaleEstimator()
    g = torch.Generator().manual_seed(rank)
    x, y = torch.randn(batch, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)

    def run(name: str) -> tuple[float, float]:
        model, noise = models[name], noises.get(name)
        params = list(model.module.parameters())
        optimizer = torch.optim.SGD(params, lr=1e-3)
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        for step in range(1, block + 1):
            loss = F.cross_entropy(model(x), y)
            if noise is None:
                loss.backward()
            else:
                noise.measure = step % every[name] == 0
                with noise.backward():
                    loss.backward()
            if noise is not None and noise.measure:  # the loop computes the norm on these steps anyway
                noise.step_done(torch.nn.utils.get_total_norm([p.grad for p in params]), batch, batch * world)
            if noise is not None and step % 10 == 0:
                noise.flush_into(estimator, all_reduce_sum)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) / block, (time.process_time() - cpu_start) / block

    for name in models:  # warm-up: the first iterations build and rebuild the buckets
        run(name)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    for i in range(blocks):  # interleaved, alternating the order, so drift hits every variant alike
        for name in list(models) if i % 2 == 0 else list(models)[::-1]:
            times[name].append(run(name))
    # The fastest block: other processes only ever add time, so the minimum is the cost without them.
    return {name: (min(v[0] for v in values), min(v[1] for v in values)) for name, values in times.items()}


def _bit_identity(rank: int, world: int, steps: int) -> bool:
    weights = {}
    for variant in ("plain", "measured"):
        torch.manual_seed(0)
        module = mlp(64)
        model = DistributedDataParallel(module, bucket_cap_mb=0.01)
        noise = DDPGradNoise(module.parameters()) if variant == "measured" else None
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1 + rank)
        for _ in range(steps):
            x, y = torch.randn(32, 32, generator=g), torch.randint(0, 10, (32,), generator=g)
            loss = F.cross_entropy(model(x), y)
            if noise is None:
                loss.backward()
            else:
                with noise.backward():
                    loss.backward()
                noise.step_done(torch.nn.utils.get_total_norm([p.grad for p in module.parameters()]), 32, 32 * world)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        weights[variant] = [p.detach().clone() for p in module.parameters()]
    return all(torch.equal(a, b) for a, b in zip(weights["plain"], weights["measured"], strict=True))


def _world1_step_times(hidden: int, batch: int, steps: int, repeats: int) -> dict[str, float]:
    """Median per-step seconds: a plain step, with the guards, and with 4 micro-batches with/without the source."""
    torch.manual_seed(0)
    model = mlp(hidden)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-3)
    guards = Guards(warn=lambda message: None)
    sources = {1: MicroBatchGradNoise(params), 4: MicroBatchGradNoise(params)}
    x, y = torch.randn(batch, 32), torch.randint(0, 10, (batch,))

    def step(guarded: bool, micro: int, every: int, index: int) -> None:
        noise = sources.get(every)
        if noise is not None:
            noise.measure = index % every == 0  # one step in `every`
        if guarded:
            guards.training_forward(model, index)
            guards.grads_cleared(params, index)
        for xm, ym in zip(x.split(batch // micro), y.split(batch // micro), strict=True):
            loss = F.cross_entropy(model(xm), ym) * (len(xm) / batch)
            if noise is not None:
                with noise.micro_batch(len(xm) / batch, len(xm)):
                    loss.backward()
            else:
                loss.backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if noise is not None:
            noise.step_done(grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    variants = {"plain": (False, 1, 0), "guards": (True, 1, 0), "accumulate4": (False, 4, 0),
                "accumulate4+noise": (False, 4, 1), "accumulate4+noise every 4": (False, 4, 4)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, args in variants.items():
            start = time.perf_counter()
            for i in range(steps):
                step(*args, i)
            times[name].append((time.perf_counter() - start) / steps)
        for noise in sources.values():
            noise.collect()
    result = {name: min(values) for name, values in times.items()}
    calls, pair = 20_000, []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(calls):
            guards.training_forward(model, i)
            guards.grads_cleared(params, i)
        pair.append((time.perf_counter() - start) / calls)
    result["guards_call_pair"] = min(pair)
    return result


def _additions_cost(hidden: int, batch: int) -> dict[str, float]:
    """Seconds of the work the noise sources add to a measured step, timed alone (the fastest of repeated
    batches); robust on a busy machine where whole-step differences of a few percent drown in noise. The DDP
    source: one hook call (a dot product) per parameter tensor and step_done's two adds. The micro-batch
    source: a sum of squares per micro-batch and one add, for 4 micro-batches, and step_done.
    """
    import timeit

    torch.manual_seed(0)
    model = mlp(hidden)
    x, y = torch.randn(batch, 32), torch.randint(0, 10, (batch,))
    F.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    grads = [p.grad for p in params]
    grad_norm = torch.nn.utils.get_total_norm(grads)
    ddp_noise, micro_noise = DDPGradNoise(params), MicroBatchGradNoise([])

    def ddp_additions() -> None:
        for p in params:
            ddp_noise._see(p)  # what the post-accumulate-grad hooks do
        ddp_noise._complete = True
        ddp_noise.step_done(grad_norm, batch, 2 * batch)

    def micro_additions() -> None:
        for _ in range(4):
            with micro_noise.micro_batch(0.25, batch // 4):
                micro_noise._grads = list(grads)  # what the parameter hooks would have collected
        micro_noise.step_done(grad_norm)

    def fastest(fn: Callable[[], None]) -> float:
        return min(timeit.repeat(fn, number=200, repeat=7)) / 200

    return {"ddp": fastest(ddp_additions), "micro": fastest(micro_additions)}


def main() -> None:
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.1f}; per step, the fastest of "
          "interleaved blocks (other processes only add time)\n")
    print("world 3, 20 SGD steps measured by DDPGradNoise: bit-identical to plain DDP:",
          all(on_ranks(_bit_identity, 3, 20)))
    for hidden, batch, block in ((64, 32, 50), (512, 64, 20)):
        params = sum(p.numel() for p in mlp(hidden).parameters())
        rank0 = on_ranks(_hook_timing, 2, hidden, batch, block, 16)[0]
        wall, cpu = rank0["plain"]
        print(f"world 2, MLP {params:,} params, batch {batch}/rank, rank 0, plain DDP: "
              f"{wall * 1e3:.3f} ms wall, {cpu * 1e3:.3f} ms CPU per step")
        for name in ("python comm hook", "measured every step", "measured one in 10"):
            other_wall, other_cpu = rank0[name]
            print(f"    {name:>19}: {other_wall * 1e3:.3f} ms wall ({other_wall / wall - 1:+.1%}), "
                  f"{other_cpu * 1e3:.3f} ms CPU ({other_cpu / cpu - 1:+.1%})")
    for hidden, batch in ((64, 32), (512, 64)):
        extra = _additions_cost(hidden, batch)
        print(f"hidden {hidden}, batch {batch}: work the sources add, timed alone: DDP hooks + step_done "
              f"{extra['ddp'] * 1e6:.1f} us per step, micro-batch source {extra['micro'] * 1e6:.1f} us per step "
              "of 4 micro-batches")
    for hidden, batch, steps in ((64, 32, 50), (512, 64, 20)):
        t = _world1_step_times(hidden, batch, steps, 16)
        print(f"world 1, hidden {hidden}, batch {batch}: step {t['plain'] * 1e3:.3f} ms, guards "
              f"{t['guards_call_pair'] * 1e6:.2f} us per step ({t['guards_call_pair'] / t['plain']:.2%}; "
              f"timed in the loop: {t['guards'] / t['plain'] - 1:+.1%}); 4 micro-batches "
              f"{t['accumulate4'] * 1e3:.3f} ms, with the micro-batch source "
              f"{t['accumulate4+noise'] * 1e3:.3f} ms ({t['accumulate4+noise'] / t['accumulate4'] - 1:+.1%}), "
              f"every 4: {t['accumulate4+noise every 4'] / t['accumulate4'] - 1:+.1%}")


if __name__ == "__main__":
    main()
