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


def table(base: str, head: str, case: str, rounds: int, rows: dict[str, list[dict]]) -> str:
    (base_pairs, base_runs), (head_pairs, head_runs) = ratios(rows["base"]), ratios(rows["head"])
    moved = outside(head_runs, base_runs)
    lines = [f"# train.py / bare loop with validation, {base} against {head}: {CASES[case].label}", "",
             f"Command: `python -m launch.bench_ab {base} --case {case} --rounds {rounds} --repeats "
             f"{len(rows['base']) // rounds}`; the two sides took turns, {rounds} rounds.", "",
             "| side | pairs | median over every pair | the runs' medians: median (min–max) |", "|---|---:|---:|---:|"]
    for side, name, pairs, runs in (("base", base, base_pairs, base_runs), ("head", head, head_pairs, head_runs)):
        lines.append(f"| {side} ({name}) | {len(pairs)} | {statistics.median(pairs):.3f} | "
                     f"{statistics.median(runs):.3f} ({min(runs):.3f}–{max(runs):.3f}) |")
    lines += ["", "The head's median of its runs' medians, against the base's runs: "
              + {1: "above every one of them", -1: "below every one of them",
                 0: "within their spread (not distinguishable)"}[moved] + "."]
    return "\n".join(lines) + "\n"


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
    sizes = [*(["--epochs", str(opts.epochs)] if opts.epochs else []),
             *(["--block", str(opts.block)] if opts.block else [])]
    if opts.rounds < 1 or opts.repeats < 1:
        p.error("--rounds and --repeats must be at least 1")
    try:
        base = git("rev-parse", "--short", f"{opts.base}^{{commit}}")
    except subprocess.CalledProcessError:
        p.error(f"no commit {opts.base!r} in this repository")
    head = git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain") else "")
    out = opts.out or ROOT / "reports" / "bench" / f"ab-{opts.case}.md"
    rows: dict[str, list[dict]] = {"base": [], "head": []}
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        tree = Path(tmp) / "base"
        git("worktree", "add", "--detach", str(tree), base)
        try:
            for round_ in range(opts.rounds):
                for side, code in (("base", tree), ("head", ROOT)):
                    for row in run_side(code, opts.case, opts.repeats, Path(tmp) / f"{side}.jsonl", sizes):
                        rows[side].append(dict(row, side=side, round=round_))
                    print(f"bench_ab: round {round_ + 1}/{opts.rounds}, {side} done", flush=True)
        finally:
            git("worktree", "remove", "--force", str(tree))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table(base, head, opts.case, opts.rounds, rows))
    with open(out.with_suffix(".jsonl"), "w") as f:
        for side_rows in rows.values():
            f.writelines(json.dumps(row) + "\n" for row in side_rows)
    print(out.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
