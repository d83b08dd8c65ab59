"""Launch train.py as a real process (python or torchrun) and spawn real gloo ranks, always with a timeout."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path
    ckpt_dir: Path

    @property
    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    @property
    def metrics(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "metrics.jsonl").read_text().splitlines() if line]

    def step_losses(self) -> list[float]:
        return [loss for m in self.metrics for loss in m["step_losses"]]

    def weights(self, name: str = "last.pt") -> dict:
        return torch.load(self.ckpt_dir / name, weights_only=True)["model"]


def run_train(tmp: Path, args: list[str], world: int = 1, name: str = "run", timeout: float = 120,
              extra_env: dict | None = None, torchrun_args: list[str] = ()) -> Result:
    """Run train.py with outputs under `tmp`; world > 1 goes through torchrun --standalone (plus `torchrun_args`)."""
    outputs = ["--runs-dir", str(tmp / "runs"), "--checkpoints-dir", str(tmp / "checkpoints"), "--run-name", name]
    if world == 1:
        cmd = [sys.executable, TRAIN]
    else:
        cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={world}", *torchrun_args, TRAIN]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd + outputs + args, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr, tmp / "runs" / name, tmp / "checkpoints" / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world: int, port: int, fn, args, queue) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        queue.put((rank, "ok", fn(rank, world, *args)))
    except BaseException as e:  # report, so the parent fails with the reason instead of a timeout
        queue.put((rank, "error", f"{type(e).__name__}: {e}"))


def spawn_ranks(fn, world: int, *args, timeout: float = 60) -> list:
    """Run fn(rank, world, *args) in `world` fresh processes with torchrun-style env; return results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    try:
        for _ in range(world):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                raise AssertionError(f"rank {rank} failed: {value}")
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
