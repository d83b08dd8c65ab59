"""launch/inside_optimizer.py: its statistics on data with known answers, and the write-up against its report files."""

from __future__ import annotations

import json
import math
import random
import re
import statistics

import pytest

from launch.inside_optimizer import (
    DOC,
    PARTS,
    eos_metrics,
    fit_critical_batch,
    main,
    overlap,
    spread,
    steps_to_target,
    working_range,
)
from launch.render_docs import render
from launch.runner import ROOT

REPORTS = ROOT / "reports" / "optimizer"


@pytest.mark.parametrize(("s_min", "b_crit"), [(120.0, 250.0), (40.0, 30.0), (1000.0, 2000.0)])
def test_fit_recovers_known_critical_batch_exactly(s_min: float, b_crit: float) -> None:
    batches = [16, 32, 64, 128, 256, 512, 1024]
    fitted_s, fitted_b = fit_critical_batch(batches, [s_min * (1 + b_crit / b) for b in batches])
    assert fitted_s == pytest.approx(s_min, rel=1e-4)
    assert fitted_b == pytest.approx(b_crit, rel=1e-4)


def test_fit_recovers_critical_batch_under_noise() -> None:
    rng = random.Random(0)
    batches = [16, 32, 64, 128, 256, 512, 1024]
    errors = []
    for _ in range(20):  # 10% multiplicative noise per point: the fit must land near the truth on average
        steps = [100 * (1 + 200 / b) * math.exp(rng.gauss(0, 0.1)) for b in batches]
        errors.append(math.log(fit_critical_batch(batches, steps)[1] / 200))
    assert abs(statistics.median(errors)) < math.log(1.25)


def test_fit_refuses_too_few_points() -> None:
    with pytest.raises(ValueError):
        fit_critical_batch([32], [100])


def test_steps_to_target_uses_a_window_of_samples() -> None:
    losses = [1.0] * 10 + [0.1] * 10
    # batch 512: window of one step, so the first low loss counts
    assert steps_to_target(losses, 512, 0.3) == 11
    # batch 128: window of 4 steps; with three low losses the mean is 0.325, with four 0.1
    assert steps_to_target(losses, 128, 0.3) == 14
    assert steps_to_target(losses, 512, 0.05) is None
    assert steps_to_target([1.0, math.nan, 0.0], 512, 0.3) is None


def test_eos_metrics_on_a_known_trace() -> None:
    lr = 0.5  # 2/lr = 4
    trace = [[0, 1.0], [10, 3.7], [20, 4.2], [30, 3.9], [40, 2.0], [50, 1.0]]
    m = eos_metrics(trace, lr)
    assert m["step_reached"] == 10 and m["last_step_near"] == 30 and m["hover_steps"] == 20
    assert m["hover_median_ratio"] == pytest.approx(3.9 / 4)
    assert m["peak_ratio"] == pytest.approx(4.2 / 4) and m["final_ratio"] == pytest.approx(0.25)
    assert eos_metrics([[0, 1.0], [10, 2.0]], lr)["step_reached"] is None


def test_spread_and_overlap() -> None:
    s = spread([3.0, None, 1.0, 2.0, math.inf])
    assert s == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert overlap(s, spread([2.5, 9.0])) and not overlap(s, spread([3.5, 9.0]))
    assert spread([])["n"] == 0 and not overlap(spread([]), s)


def test_working_range_reads_the_study_table(tmp_path) -> None:
    study = tmp_path / "study.md"
    study.write_text("| learning rate (Adam) | lr 0.001 | too slow for the budget | 34 |\n"
                     "| learning rate (Adam) | lr 0.01 | converges (epoch 21) | 6 |\n"
                     "| learning rate (Adam) | lr 1 | converges (epoch 22) | 18 |\n"
                     "| learning rate (SGD) | lr 1 | converges (epoch 62) | 11 |\n")
    assert working_range(study) == {"tried": [0.001, 0.01, 1.0], "converged": [0.01, 1.0], "low": 0.01, "high": 1.0}


def test_unknown_part_is_a_usage_error(tmp_path, capsys) -> None:
    assert main(["--out", str(tmp_path), "--parts", "eos,nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err and all(p in err for p in PARTS)
    assert not any(tmp_path.iterdir())


def test_doc_blocks_equal_the_report_files() -> None:
    """Every table the write-up shows is a generated block: rendering it again from reports/optimizer/ changes
    nothing, so no number in those blocks can drift from the files the launcher wrote."""
    text = DOC.read_text()
    blocks = re.findall(r"<!-- generated: (\S+) -->", text)
    assert {f"reports/optimizer/{p}.md" for p in PARTS} | {"reports/optimizer/findings.md"} <= set(blocks)
    assert render(text) == text


def test_prose_numbers_come_from_the_report_files() -> None:
    """Numbers the prose quotes outside the generated blocks (marked `[n]`...) are found in a report file."""
    text = re.sub(r"<!-- generated: .*?<!-- end generated -->", "", DOC.read_text(), flags=re.S)
    reports = "".join(p.read_text() for p in sorted(REPORTS.glob("*.md")))
    quoted = re.findall(r"\*\*([0-9][0-9.e+\-–\[\] ]*)\*\*", text)
    for number in quoted:
        assert number in reports, f"the doc quotes {number!r}, which no reports/optimizer/*.md contains"


def test_report_files_are_consistent() -> None:
    batch = json.loads((REPORTS / "batch.json").read_text())
    fit = batch["fit_of_medians"]
    assert fit["s_min"] > 0 and fit["b_crit"] > 0
    for b, d in batch["per_batch"].items():  # the tuned lr is one of the grid's and the best of seed 0's
        seed0 = [g for g in batch["grid"] if str(g["batch"]) == b and g["steps"] is not None]
        assert d["lr"] == min(seed0, key=lambda g: (g["steps"], g["lr"]))["lr"]
    world = json.loads((REPORTS / "world.json").read_text())
    assert len(world["layouts"]) == 2 and all(len(d["seeds"]) >= 3 for d in world["layouts"].values())
    eos = json.loads((REPORTS / "eos.json").read_text())
    assert len(eos["lrs"]) >= 2 and all(len(d["seeds"]) >= 5 for d in eos["lrs"].values())


def test_doc_prose_stays_within_1500_words() -> None:
    text = re.sub(r"<!-- generated: .*?<!-- end generated -->", "", DOC.read_text(), flags=re.S)
    text = re.sub(r"!\[.*?\]\(.*?\)", "", re.sub(r"```.*?```", "", text, flags=re.S))
    assert len(text.split()) <= 1500
