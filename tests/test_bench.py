"""Smoke test of the benchmark machinery: every loop it times really trains, and the table has its shape.

Timings are never asserted: they depend on the machine and its load.
"""

from __future__ import annotations

import pytest

from launch.bench_table import build_table
from launch.bench_worker import CheckpointClock, run_kind
from spine.distributed import distributed_session
from tests.helpers import spawn_ranks

WORLD1_KINDS = ["bare", "tutorial", "train.py", "train.py quiet", "bare default threads"]
TINY_RUN = ["--hidden", "16", "--epochs", "2"]


def _run(kinds: list[str], label: str, scratch, world: int) -> list[dict]:
    rows = []
    with distributed_session("cpu", 1, 60.0) as ctx, CheckpointClock() as clock:
        for kind in kinds:
            r = run_kind(kind, TINY_RUN, ctx, scratch, clock)
            r.update(label=label, world=world, kind=kind, repeat=0, epochs=2, physical_cores=2, default_threads=1,
                     threads_per_rank=r.get("threads", ctx.threads))
            rows.append(r)
    return rows


def _world2(rank: int, world: int, scratch: str) -> list[dict]:
    from pathlib import Path

    folder = Path(scratch) / f"rank{rank}"
    folder.mkdir()
    return _run(["bare", "train.py"], "tiny", folder, world)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_every_timed_loop_trains_and_the_table_has_every_row(tmp_path):
    rows = _run(WORLD1_KINDS, "tiny", tmp_path, 1)
    rows += _world2_rows(tmp_path)
    for r in rows:
        assert r["seconds"] > 0 and r["steps"] > 0, r
        assert r["last_loss"] < r["first_loss"], f"{r['kind']} at world {r['world']} did not train: {r}"
    train_py = [r for r in rows if r["kind"] == "train.py"]
    assert all(r["checkpoints"] >= 1 for r in train_py if r["world"] == 1)  # the final save is always timed
    rows += [{"label": "end to end", "world": 1, "kind": k, "repeat": 0, "seconds": s}
             for k, s in (("make overfit", 3.0), ("floor", 1.5))]

    table = build_table(rows, [("tiny", "16", 2)]).splitlines()
    assert table[0].startswith("| measurement | tiny MLP 16 (2 epochs) | target | verdict |")
    assert all(line.count("|") == table[0].count("|") for line in table), "ragged table"
    text = "\n".join(table)
    for name in ("(a) bare loop", "(b) tutorial loop", "(c) train.py", "**(c)/(a)**", "**(c)/(b)**",
                 "TensorBoard + per-step logging", "checkpoint writing", "(d) world 2 (gloo), bare DDP",
                 "**(d) train.py / bare DDP, world 2**", "threads at train.py's default", "end to end"):
        assert name in text, name
    assert "n/a" not in text
    for line in table[2:]:
        verdict = line.split("|")[-2].strip()
        assert verdict in ("", "met") or (verdict.startswith("**missed**") and " by " in verdict), line
    assert "2.00×" in text  # end to end: 3.0 s over a 1.5 s floor


def _world2_rows(tmp_path) -> list[dict]:
    return spawn_ranks(_world2, 2, str(tmp_path), timeout=90)[0]  # rank 0's measurements
