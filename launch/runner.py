"""Run train.py at world N and read back what it wrote: the one runner of every launcher and of the tests.

    run(args, out, name)                   world 1, in this process (saves ~1.5 s of imports per run)
    run(args, out, name, world=2)          torchrun --standalone --nproc_per_node=2 train.py ...
    run(args, out, name, in_process=False) world 1 as its own `python train.py` process
    run_many([(args, name), ...], out, world=2)   several runs in ONE torchrun job (one process group)

Outputs go to <out>/runs/<name>/ and <out>/checkpoints/<name>/; the result is a RunRecord. As a module,
`python -m launch.runner --worker SPECS.json` is the rank program of run_many.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from spine.logger import completed_epochs, read_run

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "train.py")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


@dataclass
class RunRecord:
    name: str
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    run_dir: Path
    ckpt_dir: Path
    summary: dict = field(init=False)
    metrics: list[dict] = field(init=False)  # one row per completed epoch
    partial: dict | None = field(init=False)  # the steps of an epoch that a divergence cut short

    def __post_init__(self) -> None:
        self.summary, rows = read_run(self.run_dir)
        self.metrics = completed_epochs(rows)
        partial = [m for m in rows if m.get("partial")]
        self.partial = partial[-1] if partial else None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def curve(self, key: str) -> list[float]:
        return [m[key] for m in self.metrics]

    def step_losses(self) -> list[float]:
        """Every logged step, including those of an epoch a divergence cut short."""
        rows = self.metrics + ([self.partial] if self.partial else [])
        return [loss for m in rows for loss in m["step_losses"]]

    def step_grad_norms(self) -> list[float]:
        rows = self.metrics + ([self.partial] if self.partial else [])
        return [v for m in rows for v in m["step_grad_norms"]]

    def weights(self, checkpoint: str = "last.pt") -> dict:
        import torch

        return torch.load(self.ckpt_dir / checkpoint, weights_only=True)["model"]


def outputs(out: Path, name: str, overwrite: bool = False) -> list[str]:
    return (["--runs-dir", str(out / "runs"), "--checkpoints-dir", str(out / "checkpoints"), "--run-name", name]
            + (["--overwrite"] if overwrite else []))


def command(args: list[str], world: int = 1, torchrun_args: tuple[str, ...] = ()) -> list[str]:
    """The command line that runs train.py with `args` at `world` ranks on this machine."""
    if world == 1:
        return [sys.executable, TRAIN, *args]
    return [TORCHRUN, "--standalone", f"--nproc_per_node={world}", *torchrun_args, TRAIN, *args]


def run(args: list[str], out: Path, name: str, world: int = 1, *, in_process: bool | None = None,
        overwrite: bool = False, torchrun_args: tuple[str, ...] = (), env: dict[str, str] | None = None,
        cwd: Path | None = None, timeout: float = 600) -> RunRecord:
    """One run of train.py; its outputs under `out`. World 1 runs in this process unless in_process=False."""
    full = list(args) + outputs(out, name, overwrite)
    if in_process is None:
        in_process = world == 1 and not torchrun_args
    if in_process:
        if world != 1:
            raise ValueError("only world 1 runs in this process")
        code, stdout, stderr = _in_process(full, env or {})
    else:
        code, stdout, stderr = _subprocess(command(full, world, torchrun_args), env, cwd, timeout)
    return RunRecord(name, list(args), code, stdout, stderr, out / "runs" / name, out / "checkpoints" / name)


def run_many(runs: list[tuple[list[str], str]], out: Path, world: int, *, overwrite: bool = True,
             threads: int = 1, timeout: float = 1800) -> list[RunRecord]:
    """Several runs, one after the other, at `world` ranks in one torchrun job (world 1: in this process), so the
    ~3 s start of torchrun and the process group is paid once. A run that kills its job fails the ones after it."""
    if world == 1:
        return [run(args, out, name, overwrite=overwrite) for args, name in runs]
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # Log files by position: a run may resume an earlier one of the same name in the same batch.
    specs = [{"name": name, "log": f"{i:03d}-{name}", "argv": list(args) + outputs(out, name, overwrite)}
             for i, (args, name) in enumerate(runs)]
    for spec in specs:  # an exit file left by an earlier batch must not pass for this one's
        (logs / f"{spec['log']}.exit").unlink(missing_ok=True)
    spec_file = logs / f"batch-{os.getpid()}-{specs[0]['name']}.json"
    spec_file.write_text(json.dumps({"threads": threads, "runs": specs, "logs": str(logs)}))
    code, stdout, stderr = _subprocess([TORCHRUN, "--standalone", f"--nproc_per_node={world}", "-m", "launch.runner",
                                        "--worker", str(spec_file)], {"OMP_NUM_THREADS": str(threads)}, ROOT, timeout)
    records = []
    for (args, name), spec in zip(runs, specs, strict=True):
        result, own_out, own_err = (logs / f"{spec['log']}{suffix}" for suffix in (".exit", ".out", ".err"))
        finished = result.exists()  # else the job died in this run or before it: its output tells why
        records.append(RunRecord(name, list(args), int(result.read_text()) if finished else (code or 1),
                                 own_out.read_text() if own_out.exists() else "",
                                 (own_err.read_text() if own_err.exists() else "") + ("" if finished else stderr),
                                 out / "runs" / name, out / "checkpoints" / name))
    return records


def _subprocess(cmd: list[str], env: dict[str, str] | None, cwd: Path | None, timeout: float) -> tuple[int, str, str]:
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    full_env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py sets it, for children that import torch first
    full_env.pop("WORLD_SIZE", None)  # a runner inside a torchrun job must not hand its own world to the child
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return 124, _text(e.stdout), _text(e.stderr) + f"\nrunner: timed out after {timeout:.0f} s"
    return proc.returncode, proc.stdout, proc.stderr


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


@contextlib.contextmanager
def _environment(extra: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _in_process(argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    import train  # imported here: importing the runner stays cheap

    out, err = io.StringIO(), io.StringIO()
    with _environment(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.run(argv)
    return code, out.getvalue(), err.getvalue()


def _worker(spec_file: Path) -> int:
    """One rank of run_many: join the process group once, then run each spec in it, one after the other."""
    import train
    from spine.distributed import distributed_session

    spec = json.loads(spec_file.read_text())
    logs = Path(spec["logs"])
    with distributed_session("auto", spec["threads"], 120.0) as ctx:
        for one in spec["runs"]:
            suffix = "" if ctx.is_main else f".rank{ctx.rank}"
            with (open(logs / f"{one['log']}.out{suffix}", "w") as out, open(logs / f"{one['log']}.err{suffix}", "w")
                  as err, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)):
                code = train.run(one["argv"], ctx)
            if ctx.is_main:
                (logs / f"{one['log']}.exit").write_text(str(code))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, required=True, help="a run_many spec file")
    sys.exit(_worker(parser.parse_args().worker))
