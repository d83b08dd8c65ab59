"""Reliability: killed ranks, restarts, torn/corrupt/hostile checkpoints, hangs, NaNs, full disks.

Faults are injected for real through SPINE_FAULT (spine/faults.py): processes are SIGKILLed, ranks hang
or raise, checkpoint writes are cut in half. The scenarios are make faults' own (launch/faults.py), run here
against the same uninterrupted references; every multi-rank run is real gloo, under torchrun or as plain
processes without an agent (so nothing but the harness itself can stop a hang).
"""

from __future__ import annotations

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

from launch import faults as scenarios
from launch.faults import RECIPE, Bench
from spine import faults
from spine.checkpoint import load_checkpoint, step_files
from spine.errors import UsageError
from tests.helpers import ROOT, TRAIN, free_port
from train import main

WORLD2 = RECIPE + ["--batch-size", "8"]  # make faults' world-2 command: 10 steps per epoch, checkpoints every 4


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Bench:
    """make faults' scratch folder and its uninterrupted references, shared by every scenario here."""
    return Bench(tmp_path_factory.mktemp("faults"))


def weights_of(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def assert_handled(outcome: scenarios.Outcome) -> None:
    assert outcome.ok and outcome.data_lost == 0, (outcome.survived, outcome.detail,
                                                    outcome.record.output[-3000:] if outcome.record else "")


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


# --- elastic restarts under torchrun: make faults' scenarios ----------------------------------------------------


@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_repeated_restarts_kill_tear_kill_all_resume_bit_identical(bench):
    """Three restarts in one job: after each, gloo must find the new attempt's peers, not the dead ones.

    Attempt 0: rank 0 SIGKILLed after step 6 -> resume from 4. Attempt 1: rank 0 SIGKILLed half-way through
    writing step 12's file -> resume from 10, the torn temp file removed. Attempt 2: rank 1 SIGKILLed after
    step 23 -> resume from 20. Attempt 3 finishes.
    """
    outcome = scenarios.scenarios(1)["three-restarts"](bench)
    assert_handled(outcome)  # every checkpoint, the weights, per-step losses, TensorBoard steps (each once)
    run = outcome.record
    # --resume auto: the first attempt found nothing and started fresh; each restart found the last checkpoint.
    assert f"--resume auto: no checkpoint in {run.ckpt_dir}, starting fresh" in run.stdout
    assert re.search(r"removed \S+/\.step-00000012\.pt\.tmp-\d+, left by a checkpoint write that crashed", run.stdout)
    assert not [p for p in run.ckpt_dir.iterdir() if ".tmp-" in p.name]


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_restarts_exhausted_exit_nonzero_name_the_rank_and_keep_the_checkpoint(bench):
    """torchrun's error summary names rank 1 with train.py's traceback (@record on main); last.pt (step 8) stays
    intact, and the same command then finishes bit-identical."""
    assert_handled(scenarios.exhausted(bench))


@pytest.mark.distributed
@pytest.mark.timeout(200)
def test_non_finite_loss_on_one_rank_stops_every_rank_together_and_saves_nothing_bad(bench):
    """NaN logits on rank 1 at step 7: every rank exits 3 naming step 7 and rank 1; only step 4's checkpoint."""
    outcome = scenarios.nan_one_rank(bench)
    assert_handled(outcome)
    assert "stopped: non-finite loss at step 7 on rank 1; no checkpoint written after the last finite one" in \
        outcome.record.stdout


# --- ranks that raise or hang: plain processes, no agent to clean up after them ---------------------------------


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


@pytest.mark.distributed
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
        # gloo names it from the op that waited ("Timed out"), or, when an op in flight timed out first (the
        # guard's all-reduce, read at the next check) and closed the connection, from the next op.
        timed_out = ("Timed out", "Application timeout caused pair closure")
        assert any(m in survivor["output"] for m in timed_out), survivor["output"]
    assert load_checkpoint(out["ckpt_dir"] / "last.pt")["progress"]["global_step"] == 4


def test_non_finite_message_names_the_rank_whose_loss_went_bad():
    from spine.guard import non_finite_message as _non_finite_message

    # Rank 1's loss is NaN at step 7; DDP made rank 0's gradient NaN at the same step (7.5: gradient only).
    assert _non_finite_message([7.5, 7.0]) == "non-finite loss at step 7 on rank 1"
    assert _non_finite_message([0, 9.5]) == "non-finite gradient at step 9 on rank 1"
    assert _non_finite_message([0.0, 0.0]) is None


# --- torn, corrupt, hostile checkpoints, full disks: world 1 --------------------------------------------------


@pytest.mark.timeout(200)
@pytest.mark.parametrize("damage", ["truncate", "hostile"])
def test_damaged_newest_checkpoint_is_reported_skipped_and_the_run_finishes_bit_identical(bench, damage):
    """The newest checkpoint cut in half (last.pt and its step file are one inode, tried once), or replaced by a
    pickle that would run code (it never does): --resume auto says so, falls back, and ends bit-identical."""
    outcome = scenarios.damaged(bench, damage, damage)
    assert_handled(outcome)
    assert "warning: checkpoint" in outcome.record.stdout and "falling back" in outcome.record.stdout
    if damage == "truncate":
        assert outcome.record.stdout.count("is corrupt or truncated") == 1


def copy_checkpoints(folder: Path, tmp: Path, name: str) -> Path:
    """A finished run's checkpoints under a new run name; last.pt a hard link to the newest, as train.py makes."""
    copy = tmp / "checkpoints" / name
    shutil.copytree(folder, copy)
    for link in ("last.pt", "best.pt"):
        (copy / link).unlink(missing_ok=True)
    os.link(step_files(copy)[-1], copy / "last.pt")
    return copy


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.timeout(120)
def test_no_readable_checkpoint_is_an_error_and_nothing_is_overwritten(tmp_path, bench, capsys):
    folder = copy_checkpoints(bench.reference(1), tmp_path, "allbad")
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
def test_truncated_checkpoint_given_by_path_is_one_line_naming_the_file(tmp_path, bench, capsys):
    bad = tmp_path / "half.pt"
    shutil.copy(bench.reference(1) / "step-00000010.pt", bad)
    truncate(bad)
    assert main(["--runs-dir", str(tmp_path / "runs"), "--resume", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {bad} is corrupt or truncated" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_hostile_checkpoint_given_by_path_is_refused_and_its_code_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pt"
    torch.save({"model": scenarios.hostile_file(marker), "progress": {"epoch": 0}}, hostile)
    assert main(["--runs-dir", str(tmp_path / "runs"), "--resume", str(hostile)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"checkpoint {hostile} refused: not a weights-only file" in err[0], err
    assert not marker.exists()
    # The proof that the payload is live: loading it the unsafe way does create the file.
    torch.load(hostile, weights_only=False)
    assert marker.exists()


@pytest.mark.timeout(120)
def test_disk_full_is_a_clear_error_and_the_previous_checkpoint_survives(tmp_path, bench, capsys, monkeypatch):
    args = RECIPE + ["--batch-size", "16", "--runs-dir", str(tmp_path / "runs"), "--checkpoints-dir",
                     str(tmp_path / "ck"), "--run-name", "full"]
    monkeypatch.setenv("SPINE_FAULT", "disk-full:step=8")  # ENOSPC half-way through writing step 8
    assert main(args) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("SPINE_FAULT:")]
    folder = tmp_path / "ck" / "full"
    assert len(err) == 1 and f"could not write checkpoint {folder / 'step-00000008.pt'}: No space left" in err[0], err
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt", "step-00000004.pt"] or \
        sorted(p.name for p in folder.iterdir()) == ["last.pt", "step-00000004.pt"]  # no temp file left either
    assert_same_weights(weights_of(bench.reference(1) / "step-00000004.pt"), weights_of(folder / "last.pt"))
    # Space is back: the same command continues from step 4 to the uninterrupted result.
    monkeypatch.delenv("SPINE_FAULT")
    assert main(args) == 0
    assert_same_weights(weights_of(bench.reference(1) / "last.pt"), weights_of(folder / "last.pt"))


@pytest.mark.timeout(60)
def test_keep_checkpoints_prunes_to_the_newest_and_last_pt_is_the_newest(tmp_path):
    args = ["--epochs", "3", "--checkpoint-every-epochs", "1", "--keep-checkpoints", "2", "--no-tensorboard",
            "--runs-dir", str(tmp_path / "runs"), "--checkpoints-dir", str(tmp_path / "ck")]
    assert main(args) == 0
    folder = tmp_path / "ck" / "moons-mlp-seed0"
    kept = step_files(folder)
    assert [p.name for p in kept] == ["step-00000010.pt", "step-00000015.pt"]
    assert os.path.samefile(kept[-1], folder / "last.pt")


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


@pytest.mark.experiment
@pytest.mark.timeout(300)
def test_make_faults_script_runs_and_reports_no_data_lost(tmp_path):
    """The script behind the README's closing note, on its cheapest fault, so it cannot rot unnoticed."""
    proc = subprocess.run([sys.executable, "-m", "launch.faults", "--out", str(tmp_path), "--only", "unwritable"],
                          cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = (tmp_path / "faults.md").read_text()
    assert "**1 faults injected, 1 handled as expected, 0 runs lost data.**" in report
    assert "| checkpoint folder cannot be written |" in report
