"""Bad input: one line naming the flag, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import TRAIN, run_train, spawn_ranks
from train import main

BAD_INPUTS = [
    (["--lr", "0"], "--lr"),
    (["--lr", "-0.1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "ten"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "500"], "--batch-size"),  # larger than the 160-sample training shard
    (["--global-batch-size", "33"], None),  # fine at world 1; the world-2 test below refuses it
    (["--val-fraction", "0"], "--val-fraction"),
    (["--val-fraction", "1"], "--val-fraction"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--model", "resnet"], "--model"),
    (["--dataset", "mnist"], "--dataset"),
    (["--optimizer", "lbfgs"], "--optimizer"),
    (["--hidden", "64,x"], "--hidden"),
    (["--dropout", "1"], "--dropout"),
    (["--momentum", "0.9"], "--momentum"),  # momentum without SGD would be silently ignored
    (["--dim", "5"], "--dim"),  # moons is 2-d; --dim is for the rule dataset
    (["--run-name", "../escape"], "--run-name"),
    (["--resume", "does/not/exist.pt"], "--resume"),
    (["--no-such-flag"], "unrecognized"),
    (["--break", "no-loss"], "--break"),
    (["--break", "no-grad-sync"], "--break no-grad-sync needs several ranks"),  # a no-op at world 1
]


@pytest.mark.parametrize("args,flag", [b for b in BAD_INPUTS if b[1]],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, flag):
    outputs = ["--runs-dir", str(tmp_path / "runs"), "--checkpoints-dir", str(tmp_path / "ck"), "--epochs", "1"]
    assert main(outputs + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error:"), err
    assert flag in err[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ck").exists()


def test_unreadable_resume_file_is_a_usage_error(tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert main(["--runs-dir", str(tmp_path / "runs"), "--resume", str(garbage)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and str(garbage) in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["--device", "cuda", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "--device cuda" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_an_existing_run_is_never_overwritten_silently(tmp_path):
    first = run_train(tmp_path, ["--epochs", "1"], name="keep")
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in sorted(first.ckpt_dir.iterdir())}
    again = run_train(tmp_path, ["--epochs", "1"], name="keep")
    assert again.returncode == 2 and "already exists" in again.stderr
    assert {p: p.read_bytes() for p in sorted(first.ckpt_dir.iterdir())} == before


@pytest.mark.timeout(60)
def test_real_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, TRAIN, "--lr", "-1"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "train.py: error: --lr must be a positive number, got -1.0"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(60)
def test_torchrun_fails_with_one_message(tmp_path):
    r = run_train(tmp_path, ["--global-batch-size", "33"], world=2)
    assert r.returncode != 0
    # torchrun stops the other workers as soon as one exits: each shows exit 2, or SIGTERM from torchrun.
    codes = re.findall(r"exitcode\s+:\s*(-?\d+) \(pid", r.stderr)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, r.stderr
    assert r.stderr.count("train.py: error: --global-batch-size 33") == 1  # only rank 0 speaks
    assert "Traceback (most recent call last):\n  File \"" + TRAIN not in r.stderr
    assert not (tmp_path / "runs").exists()


def _main_with_bad_flag(rank: int, world: int, tmp: str) -> int:
    return main(["--global-batch-size", "33", "--runs-dir", f"{tmp}/runs"])


@pytest.mark.timeout(60)
def test_every_rank_exits_2_on_its_own(tmp_path):
    """Without torchrun killing the slower rank, each rank reaches exit code 2 by itself."""
    assert spawn_ranks(_main_with_bad_flag, 2, str(tmp_path)) == [2, 2]
    assert not (tmp_path / "runs").exists()


def test_help_documents_every_flag(capsys):
    assert main(["--help"]) in (0, None)  # @record turns argparse's SystemExit(0) into a plain return
    text = capsys.readouterr().out
    for flag in ("--dataset --n-samples --val-fraction --noise --dim --classes --model --hidden --dropout --batchnorm "
                 "--optimizer --lr --momentum --weight-decay --schedule --warmup-steps --grad-clip --epochs "
                 "--batch-size --global-batch-size --seed --device --threads --run-name --runs-dir "
                 "--checkpoints-dir --resume --checkpoint-every-steps --log-every").split():
        assert re.search(rf"{flag}\b", text), flag


def test_readme_documents_every_flag():
    from spine.config import build_parser
    from tests.helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    flags = [s for a in build_parser()._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    missing = [f for f in flags if f"`{f}" not in readme]
    assert not missing, f"README does not mention {missing}"
