"""Exact resume: stopping and continuing must not change a single bit of the run."""

from __future__ import annotations

import shutil

import pytest
import torch

from launch.runner import RunRecord, run_many
from spine.checkpoint import load_checkpoint
from tests.helpers import run_train, spawn_ranks, world2_run

# Dropout and BatchNorm on purpose: the resume must restore RNG streams and running statistics too.
COMMON = ["--dataset", "moons", "--n-samples", "200", "--dropout", "0.2", "--batchnorm", "--seed", "1"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# At world 2, the three runs in sequence in the session's one torchrun job (tests/conftest.py).
for _label, _extra, _name in (("resume-straight", ["--epochs", "6"], "straight"), ("resume-first", ["--epochs", "3"],
                              "split"), ("resume-second", ["--epochs", "6", "--resume", "auto"], "split")):
    world2_run(_label, COMMON + ["--batch-size", "16"] + _extra, _name)


def assert_three_then_three_more_equals_six(straight: RunRecord, first: RunRecord, second: RunRecord) -> None:
    for r in (straight, first, second):
        assert r.returncode == 0, r.stderr
    assert "resumed from" in second.stdout
    assert_same_weights(straight.weights(), second.weights())
    assert straight.step_losses() == second.step_losses()
    assert [m["epoch"] for m in second.metrics] == [1, 2, 3, 4, 5, 6]


@pytest.mark.timeout(180)
def test_three_then_three_more_equals_six(tmp_path):
    batch = ["--batch-size", "32"]
    straight = run_train(tmp_path, COMMON + batch + ["--epochs", "6"], name="straight")
    first = run_train(tmp_path, COMMON + batch + ["--epochs", "3"], name="split")
    second = run_train(tmp_path, COMMON + batch + ["--epochs", "6", "--resume", "auto"], name="split")
    assert_three_then_three_more_equals_six(straight, first, second)


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_three_then_three_more_equals_six_at_world_2(world2):
    # The fixture is named in the signature, not fetched inside: tests/conftest.py sends its users to one worker.
    assert_three_then_three_more_equals_six(world2["resume-straight"], world2["resume-first"], world2["resume-second"])


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
    epoch_steps = _scalar_steps(run.run_dir, "loss/train")
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
    assert data.returncode == 2 and "checkpoint has --n-samples 200, this run has --n-samples 100" in data.stderr


# No dropout and no BatchNorm: at another world size the dropout streams are new, and BatchNorm normalises with
# per-rank batches, so only the float tolerance of DDP against one process remains. 160 training samples, a global
# batch of 32: 5 steps per epoch, no padding.
PLAIN = ["--dataset", "moons", "--n-samples", "200", "--epochs", "4", "--global-batch-size", "32", "--seed", "4",
         "--optimizer", "sgd", "--lr", "0.1", "--momentum", "0.9", "--no-tensorboard", "--threads", "1"]
FIRST_PART = ["--epochs", "2", "--checkpoint-every-steps", "7", "--keep-checkpoints", "10"]  # step 7: mid-epoch 2


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_a_resume_may_change_the_world_size_both_ways_from_epoch_end_and_mid_epoch(tmp_path):
    """1 -> 2 and 2 -> 1 ranks at the same global batch, from an epoch-end (step 10) and a mid-epoch (step 7)
    checkpoint: each continues the same run, to the uninterrupted run's weights and epoch metrics."""
    straight = run_train(tmp_path, PLAIN, name="straight")
    first1 = run_train(tmp_path, PLAIN + FIRST_PART, name="first-w1")
    assert straight.returncode == 0 and first1.returncode == 0, straight.output + first1.output
    resume_args = {f"{kind}-{step}": PLAIN + ["--resume", str(run.ckpt_dir / f"step-{step:08d}.pt")]
                   for kind, run in (("from-w1", first1),) for step in (7, 10)}
    w2 = {r.name: r for r in run_many([(PLAIN + FIRST_PART, "first-w2")] + [(a, n) for n, a in resume_args.items()],
                                      tmp_path, world=2, overwrite=False)}
    first2 = w2["first-w2"]
    assert first2.returncode == 0, first2.output
    resumed = {n: w2[n] for n in resume_args}
    for step in (7, 10):
        resumed[f"from-w2-{step}"] = run_train(
            tmp_path, PLAIN + ["--resume", str(first2.ckpt_dir / f"step-{step:08d}.pt")], name=f"from-w2-{step}")
    for name, run in resumed.items():
        assert run.returncode == 0, (name, run.output)
        assert "resumed from" in run.stdout, name
        for k, v in straight.weights().items():
            torch.testing.assert_close(run.weights()[k], v, rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
        # The epoch the resume landed in reduces the saved partial epoch and the new steps to the same metrics.
        for mine, ref in zip(run.metrics, straight.metrics[-len(run.metrics):], strict=True):
            assert mine["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5), name
            assert mine["train_acc"] == ref["train_acc"] and mine["val_acc"] == ref["val_acc"], name
    assert load_checkpoint(first1.ckpt_dir / "step-00000007.pt")["progress"]["step_in_epoch"] == 2


@pytest.mark.parametrize("flag,value", [("--lr", "0.5"), ("--momentum", "0.5"), ("--schedule", "cosine"),
                                        ("--warmup-steps", "3")])
def test_a_changed_optimizer_setting_on_resume_is_refused_and_nothing_is_written(tmp_path, flag, value):
    """The restored optimizer and scheduler would keep the old value while the header printed the new one."""
    first = run_train(tmp_path, PLAIN + ["--epochs", "2"], name="opt")
    assert first.returncode == 0, first.output
    before = {p.name: p.read_bytes() for p in first.ckpt_dir.iterdir()}
    again = run_train(tmp_path, PLAIN + ["--epochs", "3", "--resume", "auto", flag, value], name="opt")
    assert again.returncode == 2
    err = again.stderr.strip().splitlines()
    assert len(err) == 1 and f"checkpoint has {flag} " in err[0] and f"this run has {flag} {value}" in err[0], err
    assert {p.name: p.read_bytes() for p in first.ckpt_dir.iterdir()} == before


def test_more_epochs_under_a_cosine_schedule_are_refused_but_allowed_under_a_constant_one(tmp_path):
    cosine = run_train(tmp_path, PLAIN + ["--epochs", "2", "--schedule", "cosine"], name="cos")
    longer = run_train(tmp_path, PLAIN + ["--epochs", "3", "--schedule", "cosine", "--resume", "auto"], name="cos")
    assert cosine.returncode == 0 and longer.returncode == 2
    assert "--epochs 2 under --schedule cosine" in longer.stderr
    constant = run_train(tmp_path, PLAIN + ["--epochs", "2"], name="const")
    extended = run_train(tmp_path, PLAIN + ["--epochs", "3", "--resume", "auto"], name="const")
    assert constant.returncode == 0 and extended.returncode == 0, extended.output
    assert [m["epoch"] for m in extended.metrics] == [1, 2, 3]


def _resume_in_own_folder(rank: int, world: int, tmp: str) -> int:
    """Each rank in its own working directory: the same relative --checkpoints-dir, two views of it."""
    import os

    from train import main

    os.chdir(f"{tmp}/rank{rank}")
    return main(PLAIN + ["--resume", "auto", "--runs-dir", "runs", "--checkpoints-dir", "ck", "--run-name", "r"])


@pytest.mark.distributed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("view", ["stale", "missing"])
def test_ranks_never_resume_from_different_checkpoints(tmp_path, capfd, view):
    """Rank 0 picks the checkpoint; a rank whose view of the folder holds another file of that name (a stale
    network file system) or none is a clear error on every rank, never a hang or a silent divergence."""
    run = run_train(tmp_path, PLAIN + ["--epochs", "3", "--checkpoint-every-epochs", "1", "--keep-checkpoints", "5"],
                    name="r")
    assert run.returncode == 0, run.output
    for rank in (0, 1):
        (tmp_path / f"rank{rank}").mkdir()
    shutil.copytree(tmp_path / "checkpoints", tmp_path / "rank0" / "ck")
    if view == "stale":  # rank 1 sees the folder as it was one epoch earlier: last.pt is step 10's file
        stale = tmp_path / "rank1" / "ck" / "r"
        shutil.copytree(tmp_path / "checkpoints" / "r", stale)
        (stale / "last.pt").unlink()
        shutil.copy(stale / "step-00000010.pt", stale / "last.pt")
    codes = spawn_ranks(_resume_in_own_folder, 2, str(tmp_path), timeout=90)
    assert codes == [1, 1]
    err = capfd.readouterr().err
    expected = "rank 1 read another last.pt than rank 0" if view == "stale" else "rank 1 cannot read ck/r/last.pt"
    assert expected in err and "every rank must see the same --checkpoints-dir" in err, err
