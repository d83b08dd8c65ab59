"""Run train.py's main() in this process and read back what the run wrote.

The experiment scripts under launch/ run dozens of short world-1 runs; doing
them in one process saves the ~1.5 s of `import torch` and optimizer set-up
each subprocess would pay. Multi-rank runs go through torchrun instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunRecord:
    name: str
    args: list[str]
    returncode: int
    summary: dict
    metrics: list[dict]
    output: str

    def curve(self, key: str) -> list[float]:
        return [m[key] for m in self.metrics]

    def step_losses(self) -> list[float]:
        return [loss for m in self.metrics for loss in m["step_losses"]]


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    summary_file, metrics_file = run_dir / "summary.json", run_dir / "metrics.jsonl"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    metrics = [json.loads(ln) for ln in metrics_file.read_text().splitlines() if ln] if metrics_file.exists() else []
    return summary, metrics


def run_in_process(args: list[str], out_dir: Path, name: str) -> RunRecord:
    """One world-1 run of train.py with its console output captured; replaces an earlier run of the same name."""
    import train  # imported here so that importing this module stays cheap

    full = args + ["--runs-dir", str(out_dir / "runs"), "--checkpoints-dir", str(out_dir / "checkpoints"),
                   "--run-name", name, "--overwrite"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = train.main(full) or 0
    summary, metrics = read_run(out_dir / "runs" / name)
    return RunRecord(name, args, code, summary, metrics, buffer.getvalue())


def min_median_max(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)
