"""make faults: inject every fault for real and check that nothing saved is ever lost.

    python -m launch.faults [--out reports/reliability] [--only NAME ...] [--repeat N]

Each fault runs train.py for real (torchrun with 2 gloo ranks, or one process) with SPINE_FAULT
(spine/faults.py) or a damaged file, then checks the outcome against an uninterrupted run of the same
command: every checkpoint left on disk must load and equal the uninterrupted run's file of the same step,
and a run that finished (after torchrun's restart, or after re-running the same command) must end with
bit-identical weights and per-step losses. Writes <out>/faults.md (the table the README's Reliability
section cites) and <out>/faults.json. Exit code 1 if any run lost data or behaved otherwise than expected.
"""

from __future__ import annotations

import argparse
import builtins
import json
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from launch.runner import ROOT, TORCHRUN, RunRecord, command, outputs, run
from spine.checkpoint import load_checkpoint, step_files
from spine.errors import TrainingError
from spine.logger import read_run

# 10 steps per epoch at world 2 (8 per rank) and at world 1 (16): 30 steps; checkpoints every 4 steps and at
# each epoch end. Dropout and BatchNorm make an exact resume depend on restored RNG streams and statistics.
RECIPE = ["--n-samples", "200", "--epochs", "3", "--dropout", "0.1", "--batchnorm", "--seed", "3", "--threads", "1",
          "--checkpoint-every-steps", "4", "--checkpoint-every-epochs", "1", "--log-every", "1", "--print-every", "100",
          "--resume", "auto", "--keep-checkpoints", "100", "--pg-timeout", "10"]
TIMEOUT = 300


@dataclass
class Outcome:
    fault: str
    injected: str
    expected: str
    survived: str
    data_lost: int
    ok: bool
    seconds: float
    command: str
    detail: str = ""
    record: RunRecord | None = field(default=None, repr=False)  # the last run, for the tests' own checks


class Bench:
    """Runs under one scratch folder; one uninterrupted reference run per world size."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.refs: dict[int, Path] = {}

    def args(self, world: int, extra: list[str] = ()) -> list[str]:
        return [*RECIPE, "--batch-size", "8" if world == 2 else "16", *extra]

    def run(self, name: str, world: int, torchrun: list[str] = (), extra: list[str] = (),
            fault: str = "") -> RunRecord:
        """The command for `name`: world 1 without a fault in this process, anything else as real processes (a
        SIGKILL must not reach the caller)."""
        return run(self.args(world, extra), self.scratch, name, world, in_process=world == 1 and not fault,
                   torchrun_args=tuple(torchrun), env={"SPINE_FAULT": fault}, cwd=self.scratch, timeout=TIMEOUT)

    def command(self, name: str, world: int, torchrun: list[str] = (), extra: list[str] = ()) -> list[str]:
        return command(self.args(world, extra) + outputs(self.scratch, name), world, tuple(torchrun))

    def reference(self, world: int) -> Path:
        if world not in self.refs:
            name = f"reference-world{world}"
            ref = self.run(name, world)
            if ref.returncode:
                raise SystemExit(f"the uninterrupted world-{world} run failed:\n{ref.stderr[-3000:]}")
            self.refs[world] = ref.ckpt_dir
        return self.refs[world]

    def lost(self, name: str, world: int, finished: bool) -> tuple[int, list[str]]:
        """Checkpoints of `name` that do not load or differ from the reference's same step, plus (when the run
        finished) final weights, per-step losses or TensorBoard steps that differ: each mismatch is data lost."""
        ref, folder, problems = self.reference(world), self.scratch / "checkpoints" / name, []
        for path in step_files(folder) + [folder / "last.pt"]:
            if not path.exists():
                problems.append(f"{path.name} missing")
                continue
            try:
                state = load_checkpoint(path)
            except TrainingError as e:
                problems.append(str(e))
                continue
            twin = ref / f"step-{state['progress']['global_step']:08d}.pt"
            if not same_weights(state["model"], load_checkpoint(twin)["model"]):
                problems.append(f"{path.name} differs from the uninterrupted run's {twin.name}")
        if finished:
            final, reference = load_checkpoint(folder / "last.pt"), load_checkpoint(ref / "last.pt")
            if not same_weights(final["model"], reference["model"]):
                problems.append("final weights differ from the uninterrupted run")
            runs = self.scratch / "runs"
            if step_losses(runs / name) != step_losses(runs / ref.name):
                problems.append("per-step losses differ from the uninterrupted run")
            for tag in ("step/train_loss", "loss/train"):
                if tensorboard_scalars(runs / name, tag) != tensorboard_scalars(runs / ref.name, tag):
                    problems.append(f"TensorBoard's {tag} differs from the uninterrupted run (or repeats a step)")
        return len(problems), problems


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def step_losses(run_dir: Path) -> list[float]:
    return [loss for row in read_run(run_dir)[1] for loss in row["step_losses"]]


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar series as TensorBoard reads it (a resumed run's purged steps left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def shown(cmd: list[str], fault: str = "") -> str:
    text = " ".join(shlex.quote(c) for c in cmd).replace(sys.executable, "python").replace(TORCHRUN, "torchrun")
    text = text.replace(str(ROOT) + "/", "")
    return (f"SPINE_FAULT={fault} " if fault else "") + text


def resumes(stdout: str) -> list[int]:
    return [int(s) for s in re.findall(r"resumed from \S+ at epoch \d+, step (\d+)", stdout)]


def restarts(stderr: str) -> int:
    return len(re.findall(r"failed \(exitcode: -?\d+\) local_rank", stderr))


# --- the faults -------------------------------------------------------------------------------------------------


def elastic(bench: Bench, name: str, fault: str, max_restarts: int, expect_resumes: list[int], what: str) -> Outcome:
    """A fault under torchrun with restarts: the job must finish exactly like the uninterrupted run."""
    torchrun = [f"--max-restarts={max_restarts}"]
    t = time.perf_counter()
    proc = bench.run(name, 2, torchrun, fault=fault)
    seconds = time.perf_counter() - t
    finished = proc.returncode == 0
    lost, problems = bench.lost(name, 2, finished)
    got = resumes(proc.stdout)
    ok = finished and lost == 0 and got == expect_resumes and restarts(proc.stderr) == len(expect_resumes)
    survived = (f"yes: {restarts(proc.stderr)} restart(s), resumed at step {', '.join(map(str, got))}, "
                "bit-identical to the uninterrupted run") if finished else f"no: exit {proc.returncode}"
    detail = "; ".join(problems) or ("" if ok else proc.stderr[-400:])
    return Outcome(what, f"`SPINE_FAULT={fault}`", f"restart, resume at {expect_resumes}", survived, lost, ok,
                   seconds, shown(bench.command(name, 2, torchrun), fault), detail, proc)


def exhausted(bench: Bench) -> Outcome:
    name, fault, torchrun = "exhausted", "raise:rank=1:step=9", ["--max-restarts=0"]
    t = time.perf_counter()
    proc = bench.run(name, 2, torchrun, fault=fault)
    root = proc.stderr[proc.stderr.find("Root Cause"):]
    named = bool(re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root)) and "InjectedFault" in root
    lost_before, problems = bench.lost(name, 2, finished=False)
    again = bench.run(name, 2, torchrun)  # the same command once the cause is gone
    seconds = time.perf_counter() - t
    lost, more = bench.lost(name, 2, finished=again.returncode == 0)
    ok = proc.returncode != 0 and named and again.returncode == 0 and resumes(again.stdout) == [8] and lost == 0
    return Outcome("rank 1 raises, no restarts left", f"`SPINE_FAULT={fault}`, `--max-restarts=0`",
                   "exit non-zero, summary names rank 1 with its traceback, last.pt intact",
                   f"stopped (exit {proc.returncode}, root cause rank 1 with traceback: {'yes' if named else 'NO'}); "
                   f"the same command again resumed at step 8 and finished bit-identical", lost + lost_before, ok,
                   seconds, shown(bench.command(name, 2, torchrun), fault), "; ".join(problems + more), proc)


def nan_one_rank(bench: Bench) -> Outcome:
    name, fault, torchrun, extra = "nan", "nan:rank=1:step=7", ["--max-restarts=0"], ["--log-every", "100"]
    t = time.perf_counter()
    proc = bench.run(name, 2, torchrun, extra, fault=fault)
    seconds = time.perf_counter() - t
    codes = re.findall(r"exitcode\s+:\s*(-?\d+) \(pid", proc.stderr)
    message = "stopped: non-finite loss at step 7 on rank 1" in proc.stdout
    lost, problems = bench.lost(name, 2, finished=False)
    kept = [p.name for p in step_files(bench.scratch / "checkpoints" / name)]
    ok = "3" in codes and set(codes) <= {"3", "-15"} and message and kept == ["step-00000004.pt"] and lost == 0
    return Outcome("NaN loss on rank 1 only", f"`SPINE_FAULT={fault}`", "every rank stops (exit 3), named step "
                   "and rank, no checkpoint after the NaN", f"stopped as designed (exit codes {', '.join(codes)}); "
                   f"message names step 7, rank 1: {'yes' if message else 'NO'}; checkpoints left: {', '.join(kept)}",
                   lost, ok, seconds, shown(bench.command(name, 2, torchrun, extra), fault), "; ".join(problems), proc)


def hostile_file(marker: Path) -> object:
    """An object whose unpickling calls open(marker, "w"): code execution with a visible side effect."""
    class CreatesAFile:
        def __reduce__(self):
            return builtins.open, (str(marker), "w")

    return CreatesAFile()


def damaged(bench: Bench, what: str, damage: str) -> Outcome:
    """World 1: a finished run's newest checkpoint is damaged, then the run continues with --resume auto."""
    name = f"damaged-{damage}"
    folder = bench.scratch / "checkpoints" / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(bench.scratch / "runs" / name, ignore_errors=True)
    ref = bench.reference(1)
    first = bench.run(name, 1, extra=["--epochs", "2"])  # 2 of the 3 epochs: checkpoints 4, 8, 10, 12, 16, 20
    newest = step_files(folder)[-1]
    injected = ""
    if damage == "truncate":
        data = newest.read_bytes()
        newest.write_bytes(data[:len(data) // 2])  # last.pt is the same file
        injected = "newest checkpoint cut to half its size (`last.pt` and its step file: one inode)"
    elif damage == "hostile":
        (folder / "last.pt").unlink()
        torch.save({"model": hostile_file(bench.scratch / "PWNED"), "progress": {}}, folder / "last.pt")
        injected = "`last.pt` replaced by a pickle whose loading would create the file PWNED"
    elif damage == "temp":
        (folder / ".step-00000024.pt.tmp-99999").write_bytes(b"half a checkpoint")
        injected = "a crashed write's temp file left in the folder"
    t = time.perf_counter()
    proc = bench.run(name, 1)
    seconds = time.perf_counter() - t
    lost, problems = 0, []
    if proc.returncode == 0:
        ok_final = same_weights(load_checkpoint(folder / "last.pt")["model"], load_checkpoint(ref / "last.pt")["model"])
        lost, problems = (0, []) if ok_final else (1, ["final weights differ from the uninterrupted run"])
    warned = "warning: checkpoint" in proc.stdout and "falling back" in proc.stdout
    expect = {"truncate": 16, "hostile": 20, "temp": 20}[damage]
    ok = first.returncode == 0 and proc.returncode == 0 and resumes(proc.stdout) == [expect] and lost == 0
    if damage == "hostile":
        ok = ok and warned and not (bench.scratch / "PWNED").exists()
    if damage == "truncate":
        ok = ok and warned
    if damage == "temp":
        ok = ok and "removed" in proc.stdout and not [p for p in folder.iterdir() if ".tmp-" in p.name]
    survived = f"yes: resumed at step {', '.join(map(str, resumes(proc.stdout)))}, finished bit-identical"
    if damage == "hostile":
        survived += f"; payload ran: {'YES' if (bench.scratch / 'PWNED').exists() else 'no'}"
    if damage == "temp":
        survived += "; temp file removed"
    return Outcome(what, injected, "said so, fell back / cleaned up, finished", survived if proc.returncode == 0
                   else f"no: exit {proc.returncode}", lost, ok, seconds, shown(bench.command(name, 1)),
                   "; ".join(problems), proc)


def unwritable(bench: Bench) -> Outcome:
    blocker = bench.scratch / "a-file"
    blocker.write_text("in the way")
    t = time.perf_counter()
    proc = run([], blocker, "unwritable", in_process=False, cwd=bench.scratch)  # outputs under a regular file
    seconds = time.perf_counter() - t
    ok = proc.returncode == 2 and "--checkpoints-dir: cannot create" in proc.stderr
    return Outcome("checkpoint folder cannot be written", "`--checkpoints-dir` under a regular file",
                   "one-line error before training, exit 2", f"refused before training (exit {proc.returncode}): "
                   f"{proc.stderr.strip()[:120]}", 0, ok, seconds, shown(command(outputs(blocker, "unwritable"))),
                   record=proc)


def scenarios(repeat: int) -> dict:
    kill_steps = [7, 13, 18, 26, 5][:max(1, repeat)]
    last_ckpt = {5: 4, 7: 4, 13: 12, 18: 16, 26: 24}
    runs = {
        f"kill-rank1-step{s}": lambda b, s=s: elastic(
            b, f"kill-rank1-step{s}", f"kill:rank=1:step={s}", 1, [last_ckpt[s]], f"rank 1 SIGKILLed after step {s}")
        for s in kill_steps
    }
    runs.update({
        "kill-rank0": lambda b: elastic(b, "kill-rank0", "kill:rank=0:step=6", 1, [4], "rank 0 SIGKILLed after step 6"),
        "three-restarts": lambda b: elastic(
            b, "three-restarts", "kill:rank=0:step=6,tear-checkpoint:step=12:attempt=1,kill:rank=1:step=23:attempt=2",
            3, [4, 10, 20], "three faults, one per attempt (kill, torn write, kill)"),
        "tear-checkpoint": lambda b: elastic(b, "tear", "tear-checkpoint:step=12", 1, [10],
                                             "rank 0 SIGKILLed half-way through writing a checkpoint"),
        "disk-full": lambda b: elastic(b, "disk-full", "disk-full:step=12", 1, [10],
                                       "disk full (ENOSPC) while writing a checkpoint"),
        "hang": lambda b: elastic(b, "hang", "hang:rank=1:step=9", 1, [8],
                                  "rank 1 hangs after step 9 (--pg-timeout 10)"),
        "raise-no-restarts": exhausted,
        "nan": nan_one_rank,
        "truncated": lambda b: damaged(b, "truncated newest checkpoint", "truncate"),
        "hostile": lambda b: damaged(b, "hostile checkpoint (code in the pickle)", "hostile"),
        "leftover-temp": lambda b: damaged(b, "leftover temp file of a crashed write", "temp"),
        "unwritable": unwritable,
    })
    return runs


def write_report(out: Path, outcomes: list[Outcome]) -> str:
    survived = sum(o.ok for o in outcomes)
    lost = [o for o in outcomes if o.data_lost]
    lines = [
        "# Faults injected for real (`make faults`)",
        "",
        "Generated by `python -m launch.faults` (`make faults`). Each row ran train.py for real (torchrun, 2 gloo "
        "ranks on CPU, or one "
        "process) and compared what was left against an uninterrupted run of the same command. *Data lost* counts "
        "checkpoints that no longer load or differ from the uninterrupted run's file of the same step, and, for "
        "runs that finished, final weights or per-step losses that differ. Work since the last checkpoint is "
        "redone, not lost.",
        "",
        f"**{len(outcomes)} faults injected, {survived} handled as expected, {len(lost)} runs lost data.**",
        "",
        "| fault | how injected | survived? | data lost | as expected | seconds | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        lines.append(f"| {o.fault} | {o.injected} | {o.survived} | {o.data_lost} | {'yes' if o.ok else '**NO**'} | "
                     f"{o.seconds:.0f} | `{o.command}` |")
    problems = [o for o in outcomes if not o.ok or o.detail]
    if problems:
        lines += ["", "## Details", ""] + [f"- {o.fault}: {o.detail}" for o in problems if o.detail]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.md").write_text(text)
    (out / "faults.json").write_text(json.dumps([{k: v for k, v in asdict(o).items() if k != "record"}
                                                     for o in outcomes], indent=2) + "\n")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/reliability")
    parser.add_argument("--only", nargs="*", help="run only these faults")
    parser.add_argument("--repeat", type=int, default=5, help="SIGKILLed-rank restarts at different steps (1-5)")
    args = parser.parse_args()
    out = Path(args.out)
    scratch = out / "faults-runs"  # ignored by git
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    bench = Bench(scratch.resolve())
    runs = scenarios(args.repeat)
    unknown = set(args.only or []) - set(runs)
    if unknown:
        parser.error(f"unknown fault(s) {sorted(unknown)}; choose from {', '.join(runs)}")
    outcomes = []
    for name, fn in runs.items():
        if args.only and name not in args.only:
            continue
        o = fn(bench)
        verdict = "ok " if o.ok else "BAD"
        print(f"{verdict} {name}: {o.survived} (data lost {o.data_lost}, {o.seconds:.0f}s)", flush=True)
        outcomes.append(o)
    print(write_report(out, outcomes))
    return 0 if all(o.ok and not o.data_lost for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
