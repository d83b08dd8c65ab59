"""Reliability: killed ranks, restarts, torn/corrupt/hostile checkpoints, hangs, NaNs, full disks.

Faults are injected for real through SPINE_FAULT (spine/faults.py): processes are SIGKILLed, ranks hang
or raise, checkpoint writes are cut in half. Every multi-rank run is real gloo, under torchrun or as
plain processes without an agent (so nothing but the harness itself can stop a hang).
"""

from __future__ import annotations

import builtins
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from spine import faults
from spine.checkpoint import load_checkpoint, step_files
from spine.errors import UsageError
from tests.helpers import ROOT, TRAIN, free_port, run_train
from train import main

# World 2: 160 training samples, 8 per rank -> 10 steps per epoch, 30 steps; a checkpoint every 4 steps and at
# each epoch end (4, 8, 10, 12, 16, 20, 24, 28, 30). Dropout and BatchNorm so that a resume must restore RNG
# streams and running statistics to stay bit-identical.
WORLD2 = ["--n-samples", "200", "--epochs", "3", "--batch-size", "8", "--dropout", "0.1", "--batchnorm",
          "--seed", "3", "--threads", "1", "--checkpoint-every-steps", "4", "--checkpoint-every-epochs", "1",
          "--log-every", "1", "--print-every", "100", "--resume", "auto"]
# World 1: 10 steps of 16 per epoch, 20 steps; checkpoints at 5, 10, 15, 20.
WORLD1 = ["--n-samples", "200", "--epochs", "2", "--batch-size", "16", "--dropout", "0.1", "--seed", "3",
          "--threads", "1", "--checkpoint-every-steps", "5", "--log-every", "100", "--print-every", "100",
          "--resume", "auto"]
TORCHRUN_TIMEOUT = 240  # subprocess limit: a hang fails the test instead of blocking the suite


@pytest.fixture(scope="module")
def ref2(tmp_path_factory):
    """The uninterrupted world-2 run every restarted run must reproduce bit for bit."""
    run = run_train(tmp_path_factory.mktemp("ref2"), WORLD2 + ["--keep-checkpoints", "100"], world=2, name="ref",
                    timeout=TORCHRUN_TIMEOUT)
    assert run.returncode == 0, run.stderr
    return run


@pytest.fixture(scope="module")
def ref1(tmp_path_factory):
    run = run_train(tmp_path_factory.mktemp("ref1"), WORLD1 + ["--keep-checkpoints", "100"], name="ref")
    assert run.returncode == 0, run.stderr
    return run


def weights_of(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def assert_reproduces(run, ref) -> None:
    """Same final weights, same per-step losses, and TensorBoard shows every step once with the same value."""
    assert_same_weights(ref.weights(), run.weights())
    assert run.step_losses() == ref.step_losses()
    assert [m["epoch"] for m in run.metrics] == [1, 2, 3]
    for key in ("train_loss", "train_acc", "val_loss"):  # epoch metrics reduce every rank's partial epoch
        assert [m[key] for m in run.metrics] == [m[key] for m in ref.metrics], key
    for tag in ("step/train_loss", "train/loss"):
        steps = [s for s, _ in tensorboard_scalars(run.run_dir, tag)]
        assert len(steps) == len(set(steps)), f"{tag}: duplicated steps {steps}"
        assert tensorboard_scalars(run.run_dir, tag) == tensorboard_scalars(ref.run_dir, tag)


def resumed_steps(stdout: str) -> list[int]:
    return [int(s) for s in re.findall(r"resumed from \S+ at epoch \d+, step (\d+)", stdout)]


def restarts_of(stderr: str) -> int:
    """torchrun logs one 'failed (exitcode: ...)' line per failed worker group attempt."""
    return len(re.findall(r"failed \(exitcode: -?\d+\) local_rank", stderr))


# --- the fault module itself ---------------------------------------------------------------------------------


def test_fault_spec_parses_and_bad_specs_are_usage_errors():
    assert faults.parse("kill:rank=1:step=7,tear-checkpoint:step=12:attempt=1") == [
        faults.Fault("kill", 7, rank=1), faults.Fault("tear-checkpoint", 12, rank=0, attempt=1)]
    assert faults.parse("") == []
    for bad in ("explode:step=1", "kill:rank=1", "kill:step=0", "kill:step=x", "kill:when=3:step=1", "kill:step"):
        with pytest.raises(UsageError, match="SPINE_FAULT"):
            faults.parse(bad)


def test_faults_are_a_no_op_when_unset_and_fire_only_in_their_attempt(monkeypatch):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.delenv("SPINE_FAULT", raising=False)
    faults.install(model, opt, 0)
    assert not model._forward_hooks and not opt._optimizer_step_post_hooks
    monkeypatch.setenv("SPINE_FAULT", "raise:step=2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restarted attempt: the default attempt=0 is spent
    faults.install(model, opt, 0)
    assert not opt._optimizer_step_post_hooks
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    faults.install(model, opt, 0)
    opt.step()  # step 1: nothing
    with pytest.raises(faults.InjectedFault, match="step 2"):
        opt.step()


def test_bad_fault_spec_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SPINE_FAULT", "kill:rank=1:stpe=7")
    assert main(["--epochs", "1", "--runs-dir", str(tmp_path / "runs"), "--checkpoints-dir", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SPINE_FAULT" in err[0] and "stpe=7" in err[0], err


# --- elastic restarts under torchrun -------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_killed_rank_restarts_from_the_last_checkpoint_bit_identical(tmp_path, ref2):
    """The README's launch line; rank 1 SIGKILLed mid-epoch 1 after step 7; the last complete checkpoint is step 4."""
    run = run_train(tmp_path, WORLD2 + ["--keep-checkpoints", "2"], world=2, name="killed",
                    torchrun_args=["--max-restarts=1"], extra_env={"SPINE_FAULT": "kill:rank=1:step=7"},
                    timeout=TORCHRUN_TIMEOUT)
    assert run.returncode == 0, run.stderr
    assert "injecting kill on rank 1 at step 7" in run.stderr and restarts_of(run.stderr) == 1, run.stderr
    # --resume auto: the first attempt found nothing and started fresh; the restart found step 4.
    assert f"--resume auto: no checkpoint in {run.ckpt_dir}, starting fresh" in run.stdout
    assert resumed_steps(run.stdout) == [4]
    assert_reproduces(run, ref2)
    # --keep-checkpoints 2: the two newest step files, last.pt the newest of them.
    kept = step_files(run.ckpt_dir)
    assert [p.name for p in kept] == ["step-00000028.pt", "step-00000030.pt"]
    assert os.path.samefile(kept[-1], run.ckpt_dir / "last.pt")


@pytest.mark.timeout(400)
def test_repeated_restarts_kill_tear_kill_all_resume_bit_identical(tmp_path, ref2):
    """Three restarts in one job: after each, gloo must find the new attempt's peers, not the dead ones.

    Attempt 0: rank 0 SIGKILLed after step 6 -> resume from 4. Attempt 1: rank 0 SIGKILLed half-way through
    writing step 12's file -> resume from 10, the torn temp file removed. Attempt 2: rank 1 SIGKILLed after
    step 23 -> resume from 20. Attempt 3 finishes.
    """
    spec = "kill:rank=0:step=6,tear-checkpoint:step=12:attempt=1,kill:rank=1:step=23:attempt=2"
    run = run_train(tmp_path, WORLD2 + ["--keep-checkpoints", "2"], world=2, name="again",
                    torchrun_args=["--max-restarts=3"], extra_env={"SPINE_FAULT": spec}, timeout=TORCHRUN_TIMEOUT)
    assert run.returncode == 0, run.stderr
    assert restarts_of(run.stderr) == 3, run.stderr
    assert resumed_steps(run.stdout) == [4, 10, 20], run.stdout
    assert re.search(r"removed \S+/\.step-00000012\.pt\.tmp-\d+, left by a checkpoint write that crashed", run.stdout)
    assert not [p for p in run.ckpt_dir.iterdir() if ".tmp-" in p.name]
    assert_reproduces(run, ref2)


@pytest.mark.timeout(300)
def test_restarts_exhausted_exit_nonzero_name_the_rank_and_keep_the_checkpoint(tmp_path, ref2):
    run = run_train(tmp_path, WORLD2 + ["--keep-checkpoints", "2"], world=2, name="exhausted",
                    torchrun_args=["--max-restarts=0"], extra_env={"SPINE_FAULT": "raise:rank=1:step=9"},
                    timeout=TORCHRUN_TIMEOUT)
    assert run.returncode != 0
    # torchrun's error summary: the root cause is rank 1, with train.py's traceback (@record on main).
    root_cause = run.stderr[run.stderr.index("Root Cause"):]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root_cause), run.stderr
    assert "Traceback (most recent call last)" in root_cause and "InjectedFault: injected by SPINE_FAULT" in root_cause
    # The last checkpoint (step 8) is intact: it loads and equals the uninterrupted run's step 8 bit for bit.
    last = run.ckpt_dir / "last.pt"
    assert load_checkpoint(last)["progress"]["global_step"] == 8
    assert_same_weights(weights_of(ref2.ckpt_dir / "step-00000008.pt"), weights_of(last))


# --- ranks that raise, hang or go non-finite: plain processes, no agent to clean up after them -------------------


def launch_ranks(tmp: Path, args: list[str], fault: str, world: int = 2, timeout: float = 120) -> dict:
    """Start `world` plain `python train.py` ranks (env:// rendezvous, no torchrun); wait for the ranks that were
    not told to hang; return per rank: exit code, output, and seconds from the fault's announcement to its exit."""
    port = free_port()
    outputs = ["--runs-dir", str(tmp / "runs"), "--checkpoints-dir", str(tmp / "ck"), "--run-name", "run"]
    procs, readers, fault_time, lines = [], [], [], {r: [] for r in range(world)}

    def read(rank: int, stream) -> None:
        for line in stream:
            if line.startswith("SPINE_FAULT: injecting"):
                fault_time.append(time.monotonic())
            lines[rank].append(line)

    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   SPINE_FAULT=fault, PYTHONUNBUFFERED="1")
        p = subprocess.Popen([sys.executable, TRAIN, *outputs, *args], cwd=tmp, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        readers.append(threading.Thread(target=read, args=(rank, p.stdout), daemon=True))
        readers[-1].start()
        procs.append(p)
    hangs = [f.rank for f in faults.parse(fault) if f.kind == "hang"]
    results = {}
    try:
        for rank, p in enumerate(procs):
            if rank in hangs:
                continue
            code = p.wait(timeout=timeout)
            results[rank] = {"code": code, "after_fault": time.monotonic() - fault_time[0] if fault_time else None}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
    for reader in readers:  # the pipes are closed once the processes are gone: the readers finish
        reader.join(timeout=30)
    for rank in results:
        results[rank]["output"] = "".join(lines[rank])
    results["ckpt_dir"] = tmp / "ck" / "run"
    return results


@pytest.mark.timeout(200)
@pytest.mark.parametrize("kind", ["raise", "hang"])
def test_a_rank_that_raises_or_hangs_stops_the_others_within_the_pg_timeout(tmp_path, kind):
    pg_timeout, margin = 10, 20
    out = launch_ranks(tmp_path, WORLD2 + ["--pg-timeout", str(pg_timeout)], f"{kind}:rank=1:step=6")
    survivor = out[0]
    assert survivor["after_fault"] is not None, survivor["output"]
    assert survivor["code"] != 0, survivor["output"]
    assert survivor["after_fault"] < pg_timeout + margin, survivor
    if kind == "raise":
        assert out[1]["code"] != 0 and "InjectedFault" in out[1]["output"]
    else:  # nothing but the timeout could have stopped it: the hung rank never closed its connections
        assert "Timed out" in survivor["output"], survivor["output"]
    assert load_checkpoint(out["ckpt_dir"] / "last.pt")["progress"]["global_step"] == 4


@pytest.mark.timeout(200)
def test_non_finite_loss_on_one_rank_stops_every_rank_together_and_saves_nothing_bad(tmp_path, ref2):
    # --log-every 100: the first check after the NaN at step 7 is the one guarding step 8's checkpoint.
    out = launch_ranks(tmp_path, WORLD2 + ["--log-every", "100"], "nan:rank=1:step=7")
    assert out[0]["code"] == 3 and out[1]["code"] == 3, out
    assert "stopped: non-finite loss at step 7 on rank 1; no checkpoint written after the last finite one" in \
        out[0]["output"]
    ckpt_dir = out["ckpt_dir"]
    assert [p.name for p in step_files(ckpt_dir)] == ["step-00000004.pt"]
    assert_same_weights(weights_of(ref2.ckpt_dir / "step-00000004.pt"), weights_of(ckpt_dir / "last.pt"))


def test_non_finite_message_names_the_rank_whose_loss_went_bad():
    from train import _non_finite_message

    # Rank 1's loss is NaN at step 7; DDP made rank 0's gradient NaN at the same step (7.5: gradient only).
    assert _non_finite_message([7.5, 7.0]) == "non-finite loss at step 7 on rank 1"
    assert _non_finite_message([0, 9.5]) == "non-finite gradient at step 9 on rank 1"
    assert _non_finite_message([0.0, 0.0]) is None


# --- torn, corrupt, hostile checkpoints -----------------------------------------------------------------------


@pytest.mark.timeout(200)
def test_torn_write_keeps_the_previous_checkpoint_and_the_resume_cleans_up(tmp_path, ref1):
    crashed = run_train(tmp_path, WORLD1 + ["--keep-checkpoints", "100"], name="torn",
                        extra_env={"SPINE_FAULT": "tear-checkpoint:step=15"})
    assert crashed.returncode == -9, crashed.stderr  # SIGKILL in the middle of the write
    temp = [p for p in crashed.ckpt_dir.iterdir() if ".tmp-" in p.name]
    assert len(temp) == 1 and temp[0].name.startswith(".step-00000015.pt.tmp-")
    assert 0 < temp[0].stat().st_size < (ref1.ckpt_dir / "step-00000015.pt").stat().st_size  # really half-written
    assert [p.name for p in step_files(crashed.ckpt_dir)] == ["step-00000005.pt", "step-00000010.pt"]
    assert_same_weights(weights_of(ref1.ckpt_dir / "step-00000010.pt"), weights_of(crashed.ckpt_dir / "last.pt"))

    resumed = run_train(tmp_path, WORLD1 + ["--keep-checkpoints", "100"], name="torn")
    assert resumed.returncode == 0, resumed.stderr
    assert f"removed {temp[0]}" in resumed.stdout and resumed_steps(resumed.stdout) == [10]
    assert not temp[0].exists()
    assert_same_weights(ref1.weights(), resumed.weights())
    assert resumed.step_losses() == ref1.step_losses()


def copy_checkpoints(ref, tmp: Path, name: str) -> Path:
    """The reference run's checkpoints under a new run name; last.pt a hard link to the newest, as train.py makes."""
    folder = tmp / "checkpoints" / name
    shutil.copytree(ref.ckpt_dir, folder)
    for link in ("last.pt", "best.pt"):
        (folder / link).unlink()
    os.link(step_files(folder)[-1], folder / "last.pt")
    return folder


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.timeout(120)
def test_corrupt_last_checkpoint_falls_back_to_the_previous_one_and_says_so(tmp_path, ref1, capsys):
    folder = copy_checkpoints(ref1, tmp_path, "corrupt")
    truncate(folder / "last.pt")  # and step-00000020.pt: the same file
    args = WORLD1 + ["--runs-dir", str(tmp_path / "runs"), "--checkpoints-dir", str(tmp_path / "checkpoints"),
                     "--run-name", "corrupt"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"warning: checkpoint {folder / 'last.pt'} is corrupt or truncated" in out
    assert "falling back to an older checkpoint" in out
    assert f"resumed from {folder / 'step-00000015.pt'} at epoch 1, step 15" in out
    assert "step-00000020.pt is corrupt" not in out  # the same inode as last.pt: not tried twice
    assert_same_weights(ref1.weights(), weights_of(folder / "last.pt"))  # continued from 15 to the same end


@pytest.mark.timeout(120)
def test_no_readable_checkpoint_is_an_error_and_nothing_is_overwritten(tmp_path, ref1, capsys):
    folder = copy_checkpoints(ref1, tmp_path, "allbad")
    for p in step_files(folder):
        truncate(p)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    args = ["--runs-dir", str(tmp_path / "runs"), "--checkpoints-dir", str(tmp_path / "checkpoints"),
            "--run-name", "allbad", "--resume", "auto"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no readable checkpoint in {folder}" in err[0], err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # starting fresh would have replaced them


@pytest.mark.timeout(60)
def test_truncated_checkpoint_given_by_path_is_one_line_naming_the_file(tmp_path, ref1, capsys):
    bad = tmp_path / "half.pt"
    shutil.copy(ref1.ckpt_dir / "step-00000010.pt", bad)
    truncate(bad)
    assert main(["--runs-dir", str(tmp_path / "runs"), "--resume", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {bad} is corrupt or truncated" in err[0], err
    assert not (tmp_path / "runs").exists()


class _CreatesAFile:
    """Unpickling this calls open(marker, "w"): code execution, with a visible side effect."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


@pytest.mark.timeout(120)
def test_hostile_checkpoint_is_refused_and_its_code_never_runs(tmp_path, ref1, capsys):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pt"
    torch.save({"model": _CreatesAFile(marker), "progress": {"epoch": 0}}, hostile)

    assert main(["--runs-dir", str(tmp_path / "runs"), "--resume", str(hostile)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {hostile} refused: not a weights-only file" in err[0], err
    assert not marker.exists()

    # Planted as last.pt of a run: --resume auto refuses it too and falls back to the newest good step file.
    folder = copy_checkpoints(ref1, tmp_path, "planted")
    (folder / "last.pt").unlink()
    shutil.copy(hostile, folder / "last.pt")
    args = WORLD1 + ["--epochs", "3", "--runs-dir", str(tmp_path / "runs"),
                     "--checkpoints-dir", str(tmp_path / "checkpoints"), "--run-name", "planted"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"warning: checkpoint {folder / 'last.pt'} refused" in out and "resumed from" in out
    assert not marker.exists()

    # The proof that the payload is live: loading it the unsafe way does create the file.
    torch.load(hostile, weights_only=False)
    assert marker.exists()


# --- full disk, unwritable folders ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_disk_full_is_a_clear_error_and_the_previous_checkpoint_survives(tmp_path, ref1, capsys, monkeypatch):
    args = WORLD1 + ["--keep-checkpoints", "100", "--runs-dir", str(tmp_path / "runs"),
                     "--checkpoints-dir", str(tmp_path / "ck"), "--run-name", "full"]
    monkeypatch.setenv("SPINE_FAULT", "disk-full:step=10")  # ENOSPC half-way through writing step 10
    assert main(args) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("SPINE_FAULT:")]
    folder = tmp_path / "ck" / "full"
    assert len(err) == 1 and f"could not write checkpoint {folder / 'step-00000010.pt'}: No space left" in err[0], err
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step-00000005.pt"]  # no temp file left either
    assert_same_weights(weights_of(ref1.ckpt_dir / "step-00000005.pt"), weights_of(folder / "last.pt"))
    # Space is back: the same command continues from step 5 to the uninterrupted result.
    monkeypatch.delenv("SPINE_FAULT")
    assert main(args) == 0
    assert_same_weights(ref1.weights(), weights_of(folder / "last.pt"))


def test_unwritable_output_folders_are_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for flag in ("--checkpoints-dir", "--runs-dir"):
        assert main(["--epochs", "1", "--runs-dir", str(tmp_path / "runs"), "--checkpoints-dir",
                     str(tmp_path / "ck"), flag, str(blocker / "sub")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"train.py: error: {flag}: cannot create"), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ck").exists()
    if os.geteuid() != 0:  # permission bits do not stop root; the file-in-the-path case above does
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert main(["--epochs", "1", "--runs-dir", str(tmp_path / "runs"), "--checkpoints-dir", str(locked)]) == 2
        assert "not writable" in capsys.readouterr().err


@pytest.mark.parametrize("args,flag", [
    (["--keep-checkpoints", "0"], "--keep-checkpoints"),
    (["--pg-timeout", "0"], "--pg-timeout"),
    (["--pg-timeout", "-5"], "--pg-timeout"),
    (["--checkpoint-every-steps", "-1"], "--checkpoint-every-steps"),
    (["--checkpoint-every-epochs", "-1"], "--checkpoint-every-epochs"),  # 0 is valid: off
    (["--checkpoint-every-seconds", "-1"], "--checkpoint-every-seconds"),
    (["--checkpoint-every-seconds", "nan"], "--checkpoint-every-seconds"),
    (["--resume", "."], "--resume: no checkpoint file at ."),  # a folder, not a file
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_reliability_flags_are_one_line_exit_2(tmp_path, capsys, args, flag):
    assert main(["--epochs", "1", "--runs-dir", str(tmp_path / "runs"), "--checkpoints-dir", str(tmp_path / "ck"),
                 *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error:") and flag in err[0], err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ck").exists()


def test_a_weights_only_file_that_is_not_a_checkpoint_is_refused(tmp_path, capsys):
    foreign = tmp_path / "state_dict.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), foreign)  # loads fine with weights_only, but is not ours
    assert main(["--runs-dir", str(tmp_path / "runs"), "--resume", str(foreign)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {foreign} is not a checkpoint written by train.py" in err[0], err


# --- incompatible resumes that only a multi-rank checkpoint can show ------------------------------------------


def test_mid_epoch_checkpoint_cannot_change_world_size_or_global_batch(tmp_path, ref2, capsys):
    mid = ref2.ckpt_dir / "step-00000004.pt"  # world 2, 8 per rank, 4 steps into epoch 1
    base = ["--runs-dir", str(tmp_path / "runs"), "--resume", str(mid), "--dropout", "0.1", "--batchnorm",
            "--seed", "3", "--epochs", "3"]
    assert main(base + ["--batch-size", "16"]) == 2
    assert "mid-epoch checkpoint from world size 2 cannot continue at world size 1" in capsys.readouterr().err
    assert main(base + ["--batch-size", "8"]) == 2
    assert "global batch of 16, this run 8" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# --- the README's table of invalid inputs is backed by tests ---------------------------------------------------


def test_readme_reliability_table_names_existing_tests():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Reliability"):]
    section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) >= 20, "the invalid-input table lost rows"
    defined = set(re.findall(r"^def (test_\w+)", "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py")),
                             re.M))
    for row in rows:
        named = re.findall(r"`(test_\w+)`", row)
        assert named, f"row without a test: {row}"
        assert set(named) <= defined, f"{row}: {set(named) - defined} do not exist"


@pytest.mark.timeout(300)
def test_make_faults_script_runs_and_reports_no_data_lost(tmp_path):
    """A cheap slice of `make faults`, so the script behind the README's closing note cannot rot unnoticed."""
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "faults.py"), "--out", str(tmp_path),
                           "--only", "leftover-temp", "unwritable"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (tmp_path / "faults.md").read_text()
    assert "**2 faults injected, 2 handled as expected, 0 runs lost data.**" in report
    assert "| leftover temp file of a crashed write |" in report and "| checkpoint folder cannot be written |" in report
