"""Bad input: one line naming the flag, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

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
    (["--sharpness-every", "-1"], "--sharpness-every"),
    (["--sharpness-every", "0"], "--sharpness-every"),  # off is leaving the flag out
    (["--histograms-every", "0"], "--histograms-every"),
    (["--sharpness-samples", "0"], "--sharpness-samples"),
    (["--noise-scale"], "--noise-scale needs two batch sizes"),  # world 1 without accumulation
    (["--noise-scale", "--grad-accum-steps", "2", "--batch-size", "16", "--precision", "fp16"],
     "--noise-scale with --precision fp16"),
    (["--noise-scale-every", "5"], "--noise-scale-every needs --noise-scale"),
    (["--noise-scale", "--grad-accum-steps", "2", "--batch-size", "16", "--noise-scale-every", "0"],
     "--noise-scale-every"),
    (["--layer-stats", "--no-tensorboard"], "--layer-stats"),
    (["--lr-find", "--resume", "auto"], "--lr-find"),
    (["--lr-find", "--lr-find-min", "1", "--lr-find-max", "0.1"], "--lr-find-min"),
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


@pytest.mark.distributed
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


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_every_rank_exits_2_on_its_own(tmp_path):
    """Without torchrun killing the slower rank, each rank reaches exit code 2 by itself."""
    assert spawn_ranks(_main_with_bad_flag, 2, str(tmp_path)) == [2, 2]
    assert not (tmp_path / "runs").exists()


def _declared_flags() -> list[str]:
    from spine.config import build_parser

    return [s for a in build_parser()._actions for s in a.option_strings if s.startswith("--") and s != "--help"]


def test_help_documents_every_flag(capsys):
    assert main(["--help"]) in (0, None)  # @record turns argparse's SystemExit(0) into a plain return
    text = capsys.readouterr().out
    flags = _declared_flags()
    assert len(flags) > 40 and "--config" in flags and "--no-tensorboard" in flags
    for flag in flags:
        assert re.search(rf"{flag}\b", text), flag


def test_readme_documents_every_flag():
    from tests.helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    flags = _declared_flags()
    missing = [f for f in flags if f"`{f}" not in readme]
    assert not missing, f"README does not mention {missing}"


@pytest.mark.parametrize("world", [1, 2])
def test_batchnorm_refuses_a_one_sample_batch_at_every_world_size(world):
    from spine.config import parse_config
    from spine.errors import UsageError

    # 201 samples: 161 training samples. World 1, steps of 32: the last holds 1. World 2, 16 per rank: 81 per
    # rank (one padded), the last step holds 1 on each rank.
    with pytest.raises(UsageError, match="--batchnorm: a training micro-batch would hold 1 sample"):
        parse_config(["--batchnorm", "--n-samples", "201", "--global-batch-size", "32"], world_size=world)
    parse_config(["--n-samples", "201", "--global-batch-size", "32"], world_size=world)  # fine without BatchNorm
    parse_config(["--batchnorm", "--n-samples", "205", "--global-batch-size", "32"], world_size=world)
    # Accumulation: 160 per rank in micro-batches of 3 leaves a last micro-batch of 1.
    with pytest.raises(UsageError, match="micro-batches of 3"):
        parse_config(["--batchnorm", "--n-samples", "200", "--batch-size", "3", "--grad-accum-steps", "2"], 1)


def test_batchnorm_on_a_one_sample_tail_is_exit_2_and_writes_nothing(tmp_path, capsys):
    assert main(["--batchnorm", "--n-samples", "201", "--runs-dir", str(tmp_path / "runs"), "--checkpoints-dir",
                 str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "BatchNorm cannot normalise one sample" in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content,expected", [
    (None, "no such file"),
    ("lr = = 3", "not valid TOML"),
    ("learning-rate = 0.1", "unknown key 'learning-rate'"),
    ("lr = 'fast'", "key 'lr': expected a number, got 'fast'"),
    ("epochs = 2.5", "key 'epochs': expected an integer, got 2.5"),
    ("batchnorm = 1", "key 'batchnorm': expected true or false, got 1"),
    ("hidden = [64, -1]", "key 'hidden': expected a list of positive integers"),
    ("lr = -1.0", "--lr must be a positive number, got -1.0"),
], ids=["missing", "not-toml", "unknown-key", "string-for-float", "float-for-int", "int-for-bool", "bad-list",
        "checked-like-a-flag"])
def test_bad_config_files_are_one_line_exit_2_naming_file_and_key(tmp_path, capsys, content, expected):
    path = tmp_path / "cfg.toml"
    if content is not None:
        path.write_text(content + "\n")
    assert main(["--config", str(path), "--runs-dir", str(tmp_path / "runs"), "--checkpoints-dir",
                 str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    if "must be" not in expected:
        assert str(path) in err[0]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "ck").exists()


def test_a_runs_config_toml_replays_it_bit_identically_and_flags_win_over_the_file(tmp_path):
    args = ["--epochs", "3", "--dropout", "0.1", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9",
            "--hidden", "16,8", "--no-tensorboard", "--threads", "1"]
    first = run_train(tmp_path, args, name="A")
    assert first.returncode == 0, first.output
    config = first.run_dir / "config.toml"
    assert 'hidden = [16, 8]' in config.read_text() and "tensorboard = false" in config.read_text()
    replay = run_train(tmp_path, ["--config", str(config)], name="B")
    assert replay.returncode == 0, replay.output
    a, b = first.weights(), replay.weights()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert replay.summary["config"] == dict(first.summary["config"], **{"run-name": "B"})
    changed = run_train(tmp_path, ["--config", str(config), "--lr", "0.02"], name="C")
    assert changed.returncode == 0 and changed.summary["config"]["lr"] == 0.02
    assert not all(torch.equal(a[k], changed.weights()[k]) for k in a)


def test_config_keys_are_the_flag_names():
    from spine.config import Config

    keys = set(Config().to_dict())
    flags = set(_declared_flags())
    assert all(f"--{key}" in flags for key in keys)
    assert {"break", "tensorboard", "batch-size"} <= keys and "mistake" not in keys


def test_readme_loop_tables_point_at_lines_of_train_py():
    from tests.helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The loop, step by step"):readme.index("### The parts behind the loop")]
    source = (ROOT / "train.py").read_text()
    snippets = [re.match(r"\| [^|]+ \| `([^`]+)`", line)[1] for line in section.splitlines()
                if re.match(r"\| [^|]+ \| `", line)]
    assert len(snippets) >= 15
    for snippet in snippets:
        assert snippet in source, f"README's loop table cites a line train.py no longer has: {snippet}"


def test_readme_break_table_is_the_registry():
    from spine.breaks import BREAKS
    from tests.helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### `--break NAME`"):readme.index("## Scaling")]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    expected = [f"| `{m.name}` | {m.mistake} | {m.ranks} | {', '.join(f'`{x}`' for x in sorted(m.symptoms))} |"
                for m in BREAKS.values()]
    assert rows == expected


def test_help_lists_every_mistake_of_the_registry(capsys):
    from spine.breaks import BREAKS

    main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in BREAKS)
