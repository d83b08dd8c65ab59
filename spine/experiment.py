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
    metrics: list[dict]  # one row per completed epoch
    output: str
    partial: dict | None = None  # the steps of an epoch that a divergence cut short

    @classmethod
    def from_dir(cls, name: str, args: list[str], returncode: int, run_dir: Path, output: str) -> RunRecord:
        summary, rows = read_run(run_dir)
        partial = [m for m in rows if m.get("partial")]
        return cls(name, args, returncode, summary, completed_epochs(rows), output, partial[-1] if partial else None)

    def curve(self, key: str) -> list[float]:
        return [m[key] for m in self.metrics]

    def step_losses(self) -> list[float]:
        """Every logged step, including those of an epoch a divergence cut short."""
        rows = self.metrics + ([self.partial] if self.partial else [])
        return [loss for m in rows for loss in m["step_losses"]]


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """summary.json and the rows of metrics.jsonl: one per completed epoch, then at most one row marked
    "partial" holding the steps of an epoch that a divergence stopped (no epoch metrics in it)."""
    summary_file, metrics_file = run_dir / "summary.json", run_dir / "metrics.jsonl"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    metrics = [json.loads(ln) for ln in metrics_file.read_text().splitlines() if ln] if metrics_file.exists() else []
    return summary, metrics


def completed_epochs(metrics: list[dict]) -> list[dict]:
    return [m for m in metrics if not m.get("partial")]


def run_in_process(args: list[str], out_dir: Path, name: str) -> RunRecord:
    """One world-1 run of train.py with its console output captured; replaces an earlier run of the same name."""
    import train  # imported here so that importing this module stays cheap

    full = args + ["--runs-dir", str(out_dir / "runs"), "--checkpoints-dir", str(out_dir / "checkpoints"),
                   "--run-name", name, "--overwrite"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = train.main(full) or 0
    return RunRecord.from_dir(name, args, code, out_dir / "runs" / name, buffer.getvalue())


def min_median_max(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)
