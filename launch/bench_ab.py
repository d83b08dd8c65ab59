"""Two commits' train.py, each against the bare loop, in one run: does a change to the loop move its ratio?

    python -m launch.bench_ab BASE [--case rule20k] [--rounds 3] [--repeats 3] [--out reports/bench/ab-CASE.md]

BASE is checked out in a temporary git worktree. The working tree and BASE then take turns, round by round, each
running launch/bench_worker.py's case (the train.py kind: each train.py block paired with the bare blocks on either
side of it, in one process) from its own copy of the code, so that both sides meet the same drift of this machine.
Writes the table to --out and every worker row, marked with its side, to the same path with .jsonl. A difference of
the two sides counts only outside the spread of the runs' own medians (launch/stats.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from launch.bench_worker import CASES
from launch.runner import ROOT, TORCHRUN
from launch.stats import outside


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def run_side(code: Path, case: str, repeats: int, out: Path, sizes: list[str]) -> list[dict]:
    """One worker run of `case` from the code at `code`; its rows (rank 0 writes them)."""
    out.unlink(missing_ok=True)
    worker = ["-m", "launch.bench_worker", "--case", case, "--kinds", "train.py", "--repeats", str(repeats),
              "--out", str(out), *sizes]
    launcher = [sys.executable] if CASES[case].world == 1 else [TORCHRUN, "--standalone",
                                                                f"--nproc_per_node={CASES[case].world}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    subprocess.run(launcher + worker, cwd=code, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in out.read_text().splitlines()]


def ratios(rows: list[dict]) -> tuple[list[float], list[float]]:
    """(every pair's bare/train.py ratio, each run's median of its pairs)."""
    per_run = [[bare / ours for bare, ours in row["pairs"]] for row in rows]
    return [r for run in per_run for r in run], [statistics.median(run) for run in per_run]


def table(base: str, head: str, case: str, rounds: int, rows: dict[str, list[dict]], sizes: list[str]) -> str:
    (base_pairs, base_runs), (head_pairs, head_runs) = ratios(rows["base"]), ratios(rows["head"])
    moved = outside(head_runs, base_runs)
    command = " ".join(["python -m launch.bench_ab", base, "--case", case, "--rounds", str(rounds), "--repeats",
                        str(len(rows["base"]) // rounds), *sizes])
    lines = [f"# train.py / bare loop with validation, {base} against {head}: {CASES[case].label}", "",
             f"Command: `{command}`; the two sides took turns, {rounds} rounds.", "",
             "| side | pairs | median over every pair | the runs' medians: median (min–max) |", "|---|---:|---:|---:|"]
    for side, name, pairs, runs in (("base", base, base_pairs, base_runs), ("head", head, head_pairs, head_runs)):
        lines.append(f"| {side} ({name}) | {len(pairs)} | {statistics.median(pairs):.3f} | "
                     f"{statistics.median(runs):.3f} ({min(runs):.3f}–{max(runs):.3f}) |")
    lines += ["", "The head's median of its runs' medians, against the base's runs: "
              + {1: "above every one of them", -1: "below every one of them",
                 0: "within their spread (not distinguishable)"}[moved] + "."]
    return "\n".join(lines) + "\n"


def take_turns(base: str, case: str, rounds: int, repeats: int, sizes: list[str]) -> dict[str, list[dict]]:
    """`rounds` rounds of a worker run from BASE's worktree, then one from the working tree; each side's rows."""
    rows: dict[str, list[dict]] = {"base": [], "head": []}
    git("worktree", "prune")  # forgets any worktree a run killed outright (SIGKILL) left registered
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        tree = Path(tmp) / "base"
        git("worktree", "add", "--detach", str(tree), base)
        try:
            for round_ in range(rounds):
                for side, code in (("base", tree), ("head", ROOT)):
                    for row in run_side(code, case, repeats, Path(tmp) / f"{side}.jsonl", sizes):
                        rows[side].append(dict(row, side=side, round=round_))
                    print(f"bench_ab: round {round_ + 1}/{rounds}, {side} done", flush=True)
        finally:  # never check=True here: a failed removal must not hide the error that brought us here
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)
            subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", help="the commit to compare the working tree against")
    p.add_argument("--case", default="rule20k", choices=CASES)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="runs of train.py per side and round")
    p.add_argument("--out", type=Path, help="default reports/bench/ab-CASE.md")
    p.add_argument("--epochs", type=int, default=0, help="epochs per run instead of the case's (tests only)")
    p.add_argument("--block", type=int, default=0, help="epochs per block instead of the case's (tests only)")
    opts = p.parse_args()
    if min(opts.rounds, opts.repeats) < 1 or min(opts.epochs, opts.block) < 0:
        p.error("--rounds and --repeats must be at least 1, --epochs and --block at least 0")
    sizes = [*(["--epochs", str(opts.epochs)] if opts.epochs else []),
             *(["--block", str(opts.block)] if opts.block else [])]
    try:
        base = git("rev-parse", "--short", f"{opts.base}^{{commit}}")
    except subprocess.CalledProcessError:
        p.error(f"no commit {opts.base!r} in this repository")
    # The code's changes, not the reports this tool and make bench write.
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)reports")
    head = git("rev-parse", "--short", "HEAD") + ("+changes" if changed else "")
    out = opts.out or ROOT / "reports" / "bench" / f"ab-{opts.case}.md"
    try:  # before any run: a folder that cannot be written would lose them all
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"cannot write to {out.parent}: {e.strerror}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still removes the worktree (finally, below)
    try:
        rows = take_turns(base, opts.case, opts.rounds, opts.repeats, sizes)
    except subprocess.CalledProcessError as e:
        print(f"bench_ab.py: error: {' '.join(map(str, e.cmd))} exited {e.returncode}", file=sys.stderr)
        return 1
    out.write_text(table(base, head, opts.case, opts.rounds, rows, sizes))
    with open(out.with_suffix(".jsonl"), "w") as f:
        for side_rows in rows.values():
            f.writelines(json.dumps(row) + "\n" for row in side_rows)
    print(out.read_text(), end="")
    return 0

if __name__ == "__main__":
    sys.exit(main())
