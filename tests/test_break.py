"""Part 3 of the assignment as tests: each deliberate bug is caught by the harness, the baseline is clean."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch.break_all import experiments, shows
from tests.helpers import ROOT, spawn_ranks


@pytest.mark.experiment
@pytest.mark.timeout(420)
def test_every_break_shows_its_expected_symptom_and_the_baselines_none(tmp_path):
    # One seed and 15 epochs instead of make break's 5 seeds and 40: every symptom shows by then (the test checks
    # the machinery, not the results).
    proc = subprocess.run([sys.executable, "-m", "launch.break_all", "--out", str(tmp_path), "--seeds", "1",
                           "--epochs", "15", "--figures", "no-shuffle"],
                          capture_output=True, text=True, timeout=400, cwd=ROOT)
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == list(experiments())
    for name, r in results.items():
        (one,) = r["seeds"]
        seen = set(one["summary"]["symptoms"])
        if r["expected"] is not None:
            assert shows(frozenset(r["expected"]), seen), (name, seen)
        if name.startswith("baseline"):
            assert seen == set(), (name, seen)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert results["huge-lr"]["seeds"][0]["returncode"] == 3  # diverged: recorded, and the target still succeeds
    assert (tmp_path / "no-shuffle.png").stat().st_size > 10_000
    table = (tmp_path / "break.md").read_text()
    assert "| no-grad-sync |" in table and "outside baseline spread?" in table
    steps = json.loads((tmp_path / "steps.json").read_text())["runs"]
    assert len(steps["baseline"][0]["loss"]) == len(steps["baseline"][0]["grad_norm"]) > 100  # every step logged
    assert "| grad norm at step 1 / baseline's | sum-loss | 32" in (tmp_path / "steps.md").read_text()


def _diverge(rank: int, world: int, tmp: str, log_every: int) -> int:
    from train import main

    return main(["--optimizer", "sgd", "--lr", "30", "--epochs", "20", "--no-tensorboard", "--log-every",
                 str(log_every), "--runs-dir", f"{tmp}/runs", "--checkpoints-dir", f"{tmp}/ck", "--run-name", "nan"])


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("log_every", [1, 3])
def test_divergence_stops_every_rank_at_the_same_step_and_saves_nothing_non_finite(tmp_path, capfd, log_every):
    """Every step's gradient is checked at --log-every 1, so the message names the step and the rank; at a sparser
    cadence the weights can go non-finite between checks, and the validation loss stops the run instead."""
    assert spawn_ranks(_diverge, 2, str(tmp_path), log_every) == [3, 3]
    out = capfd.readouterr().out
    assert "stopped: non-finite" in out
    if log_every == 1:
        assert "on rank" in out and "at step" in out
    summary = json.loads((tmp_path / "runs" / "nan" / "summary.json").read_text())
    assert summary["diverged"] and "diverged" in summary["symptoms"]
    for path in Path(tmp_path / "ck" / "nan").glob("*.pt"):
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values()), path
