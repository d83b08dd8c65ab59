"""Exact resume: stopping and continuing must not change a single bit of the run."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.helpers import run_train

# Dropout and BatchNorm on purpose: the resume must restore RNG streams and running statistics too.
COMMON = ["--dataset", "moons", "--n-samples", "200", "--dropout", "0.2", "--batchnorm", "--seed", "1"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [1, 2])
def test_three_then_three_more_equals_six(tmp_path, world):
    batch = ["--batch-size", str(32 // world)]
    straight = run_train(tmp_path, COMMON + batch + ["--epochs", "6"], world=world, name="straight")
    first = run_train(tmp_path, COMMON + batch + ["--epochs", "3"], world=world, name="split")
    second = run_train(tmp_path, COMMON + batch + ["--epochs", "6", "--resume", "auto"], world=world, name="split")
    for r in (straight, first, second):
        assert r.returncode == 0, r.stderr
    assert "resumed from" in second.stdout
    assert_same_weights(straight.weights(), second.weights())
    assert straight.step_losses() == second.step_losses()
    assert [m["epoch"] for m in second.metrics] == [1, 2, 3, 4, 5, 6]


@pytest.mark.timeout(120)
def test_resume_from_a_mid_epoch_checkpoint(tmp_path):
    # 5 steps per epoch; a checkpoint every 7 steps lands mid-epoch (epoch 2, after its 2nd step).
    args = COMMON + ["--epochs", "4", "--checkpoint-every-steps", "7", "--keep-checkpoints", "50"]
    full = run_train(tmp_path, args, name="full")
    assert full.returncode == 0, full.stderr
    mid = full.ckpt_dir / "step-00000007.pt"
    assert torch.load(mid, weights_only=True)["progress"]["step_in_epoch"] == 2
    resumed = run_train(tmp_path, COMMON + ["--epochs", "4", "--resume", str(mid)], name="from-mid")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(full.weights(), resumed.weights())
    # The resumed run's epoch 2 carries the 2 steps taken before the checkpoint: identical lines.
    assert [m["step_losses"] for m in resumed.metrics] == [m["step_losses"] for m in full.metrics[1:]]
    assert [m["train_loss"] for m in resumed.metrics] == [m["train_loss"] for m in full.metrics[1:]]


def _scalar_steps(run_dir, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.timeout(120)
def test_tensorboard_has_no_duplicated_steps_after_a_resume(tmp_path):
    args = COMMON + ["--epochs", "6", "--keep-checkpoints", "10", "--log-every", "1", "--checkpoint-every-epochs", "1"]
    run = run_train(tmp_path, args, name="tb")
    assert run.returncode == 0, run.stderr
    # Pretend the run died after epoch 6 had been logged but before its checkpoint: go back to epoch 4.
    back = tmp_path / "step-00000020.pt"
    shutil.copy(run.ckpt_dir / "step-00000020.pt", back)
    again = run_train(tmp_path, COMMON + ["--epochs", "6", "--log-every", "1", "--resume", str(back)], name="tb")
    assert again.returncode == 0, again.stderr
    epoch_steps = _scalar_steps(run.run_dir, "train/loss")
    step_steps = _scalar_steps(run.run_dir, "step/train_loss")
    assert epoch_steps == [5, 10, 15, 20, 25, 30]
    assert step_steps == list(range(1, 31))
    assert [m["epoch"] for m in again.metrics] == [1, 2, 3, 4, 5, 6]


@pytest.mark.timeout(60)
def test_resume_into_another_model_names_the_mismatch(tmp_path):
    run = run_train(tmp_path, ["--epochs", "1"], name="a")
    assert run.returncode == 0, run.stderr
    other = run_train(tmp_path, ["--epochs", "2", "--hidden", "32", "--resume", "auto"], name="a")
    assert other.returncode == 2
    assert "hidden" in other.stderr and "Traceback" not in other.stderr
    data = run_train(tmp_path, ["--epochs", "2", "--n-samples", "100", "--resume", "auto"], name="a")
    assert data.returncode == 2 and "n_samples" in data.stderr
