"""Launch train.py through the project's one runner, and spawn real gloo ranks of a function, always with a timeout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.multiprocessing as mp

from launch.runner import ROOT, TORCHRUN, TRAIN, RunRecord, run

__all__ = ["ROOT", "TORCHRUN", "TRAIN", "WORLD2_RUNS", "free_port", "own_session", "run_train", "spawn_ranks",
           "stop_rank_server", "world2_run"]

# Plain world-2 runs the test modules declare at import; conftest's `world2` fixture runs them all, in this order,
# as ONE torchrun job (one start of torchrun and the process group instead of one per test): label -> (args, name).
WORLD2_RUNS: dict[str, tuple[list[str], str]] = {}


def world2_run(label: str, args: list[str], name: str | None = None) -> str:
    """Declare a world-2 run for the session's shared torchrun job; returns its label (a key of `world2`)."""
    WORLD2_RUNS[label] = (list(args), name or label)
    return label


def run_train(tmp: Path, args: list[str], world: int = 1, name: str = "run", timeout: float = 120,
              extra_env: dict | None = None, torchrun_args: tuple[str, ...] = (),
              in_process: bool | None = None) -> RunRecord:
    """train.py with outputs under `tmp` (run in `tmp`): world 1 in this process unless a fault is injected (a
    SIGKILL must not take pytest with it) or in_process=False; world > 1 through torchrun --standalone."""
    if in_process is None:
        in_process = world == 1 and not extra_env and not torchrun_args
    return run(args, tmp, name, world, in_process=in_process, torchrun_args=tuple(torchrun_args), env=extra_env,
               cwd=tmp, timeout=timeout)


def assert_ddp_matches_single_process(ddp: RunRecord, single: RunRecord, steps: int, tolerance: dict) -> None:
    """A DDP run against one process on the same global batch: both ran `steps` steps, their weights agree within
    `tolerance` (torch.testing.assert_close's rtol/atol), and DDP's replicas are bitwise identical."""
    assert ddp.returncode == 0, ddp.output
    assert single.returncode == 0, single.output
    assert ddp.summary["global_step"] == single.summary["global_step"] == steps
    a, b = ddp.weights(), single.weights()
    for name in a:
        torch.testing.assert_close(a[name], b[name], **tolerance, msg=name)
    checksums = ddp.summary["replica_checksums"]  # DDP applies the same averaged gradient on every rank
    assert len(checksums) == 2 and checksums[0] == checksums[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def own_session(cmd: list[str], cwd: Path = ROOT) -> Iterator[subprocess.Popen]:
    """`cmd` started in a session of its own, stdout and stderr together as text; on the way out, whatever of it is
    still running is SIGKILLed as a group (torchrun's agent and its workers alike)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _rank_entry(rank: int, world: int, port: int, fn, args, queue, stdio: tuple[int, int],
                environ: dict[str, str]) -> None:
    for fd, target in zip(stdio, (1, 2), strict=True):  # write where the test's own output goes (capfd reads it)
        os.dup2(fd, target)
        os.close(fd)
    os.environ.clear()  # the caller's environment now, not the server's from when it started
    os.environ.update(environ)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        queue.put((rank, "ok", fn(rank, world, *args)))
    except BaseException as e:  # report, so the parent fails with the reason instead of a timeout
        queue.put((rank, "error", f"{type(e).__name__}: {e}"))


# Ranks are forked from one server process per pytest worker (multiprocessing's forkserver), which has imported
# train.py (so OMP_WAIT_POLICY is set before torch loads, as in a real run), torch and torch._dynamo (which the
# first optimizer loads): seconds of imports once per worker instead of once per rank. The server has run no
# tensor op and started no thread pool, so each fork begins as fresh as a new process; it takes the caller's
# environment and stdout/stderr as a spawned process would (only what a library read at import is the server's).
RANK_SERVER_PRELOAD = ["train", "torch._dynamo"]


class _CallersStdio:
    """Pickled as the calling process's fds 1 and 2, which multiprocessing sends along to the forked rank (a child
    of the server would otherwise write to whatever the server's stdout was when it started)."""

    def __reduce__(self):
        from multiprocessing.reduction import DupFd

        return _detached, (DupFd(1), DupFd(2))


def _detached(*fds) -> tuple[int, ...]:
    return tuple(fd.detach() for fd in fds)


def stop_rank_server() -> None:
    """Stop the forkserver by its pid, if this process started one (it would also exit with this process)."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    if server._forkserver_pid is not None:
        server._stop()  # closes the server's lifeline and waits for its pid


class _PortTaken(Exception):
    """free_port's port was taken before rank 0 bound it (another xdist worker's job got there first)."""


def spawn_ranks(fn, world: int, *args, timeout: float = 60, attempts: int = 3) -> list:
    """Run fn(rank, world, *args) in `world` fresh processes with torchrun-style env; return results by rank.
    A free port is only free until someone binds it: a store that lost that race is retried on a new port."""
    for attempt in range(attempts):
        try:
            return _spawn_once(fn, world, args, timeout)
        except _PortTaken:
            if attempt == attempts - 1:
                raise AssertionError(f"no free port after {attempts} attempts") from None
    raise AssertionError("unreachable")


def _spawn_once(fn, world: int, args: tuple, timeout: float) -> list:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(RANK_SERVER_PRELOAD)  # read when the server starts, at the first spawn
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world, port, fn, args, queue, _CallersStdio(), dict(os.environ)))
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                if "EADDRINUSE" in value:
                    raise _PortTaken(value)
                raise AssertionError(f"rank {rank} failed: {value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [results[r] for r in range(world)]
