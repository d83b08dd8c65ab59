"""Part 2 of the assignment as tests: the default recipe overfits, every seed, from a sane start."""

from __future__ import annotations

import math

import pytest
import torch

from launch.runner import ROOT, run
from spine.symptoms import outcome


@pytest.fixture(scope="module")
def ten_seeds(tmp_path_factory):
    from launch.overfit_seeds import seed_table

    out = tmp_path_factory.mktemp("seeds")
    table, ok = seed_table(out, 10, [])
    return out, table, ok


@pytest.mark.timeout(240)
def test_all_ten_seeds_reach_100_percent_and_the_loss_target(ten_seeds):
    _, table, ok = ten_seeds
    assert ok, table
    assert "10/10 seeds reached both targets" in table


@pytest.mark.timeout(240)
def test_initial_loss_is_ln_k(ten_seeds):
    """Logits near zero at initialisation give loss ln K; far from it means a broken head or labels."""
    import json

    out, _, _ = ten_seeds
    for seed in range(10):
        summary = json.loads((out / "runs" / f"seed{seed}" / "summary.json").read_text())
        assert abs(summary["initial_loss"] - math.log(2)) < 0.1, (seed, summary["initial_loss"])
        assert abs(summary["first_step_loss"] - math.log(2)) < 0.15, (seed, summary["first_step_loss"])


@pytest.mark.timeout(60)
def test_a_single_batch_is_memorised_within_a_few_dozen_steps(tmp_path):
    r = run(["--limit-samples", "8", "--batch-size", "8", "--epochs", "40", "--no-tensorboard"],
                       tmp_path, "one-batch")
    assert r.returncode == 0, r.output
    assert r.summary["global_step"] == 40
    assert r.summary["final"]["train_loss"] < 0.01 and r.summary["final"]["train_acc"] == 1.0


def test_the_committed_checkpoint_still_memorises_the_committed_data():
    """Rebuilds model and data from the config inside it: a silent change to either fails here."""
    from spine.checkpoint import load_for_eval

    model, _, data, state = load_for_eval(ROOT / "checkpoints" / "overfit.pt")
    assert data.fingerprint == state["dataset_fingerprint"], "data generation changed since the checkpoint"
    with torch.no_grad():
        logits = model(data.train_x)
    assert torch.nn.functional.cross_entropy(logits, data.train_y).item() <= 1e-3
    assert (logits.argmax(1) == data.train_y).float().mean().item() == 1.0


@pytest.mark.timeout(60)
def test_study_outcomes_name_divergence_and_underfitting(tmp_path):
    diverging = run(["--optimizer", "sgd", "--lr", "10", "--epochs", "20", "--no-tensorboard"],
                               tmp_path, "huge-lr")
    assert diverging.returncode == 3
    assert outcome(diverging.summary, diverging.metrics) == "diverges"
    narrow = run(["--hidden", "1,1", "--epochs", "40", "--no-tensorboard"], tmp_path, "narrow")
    assert outcome(narrow.summary, narrow.metrics).startswith("underfits")
    healthy = run(["--epochs", "40", "--no-tensorboard"], tmp_path, "healthy")
    assert outcome(healthy.summary, healthy.metrics).startswith("converges")
