"""make report's machinery on one small, fast producer: what runs, what gets filled, what is refused."""

import pytest

from launch.report import DOCUMENTS, PRODUCERS, REPO, Producer, cited_files, owner, plan, regenerate

QUICK_OVERFITTING = Producer("overfitting", "overfitting", "reports/overfitting", ("reports/overfitting/",),
                             ("--epochs", "12", "--seeds", "2"))
DOC = """# Doc
Prose the report must not touch.
<!-- generated: reports/overfitting/overfitting.md -->
stale table
<!-- end generated -->
![curves](reports/overfitting/overfitting.png)
Closing prose.
"""


@pytest.mark.timeout(180)
def test_missing_outputs_are_regenerated_blocks_filled_and_a_second_pass_is_a_no_op(tmp_path):
    (tmp_path / "experiments.md").write_text(DOC)
    ran = regenerate(tmp_path, ("experiments.md",), (QUICK_OVERFITTING,))
    assert ran == ["overfitting"]
    text = (tmp_path / "experiments.md").read_text()
    assert "stale table" not in text
    assert "| seed | lowest val loss: epoch |" in text and "--epochs 12" in text and "seeds 0-1" in text
    assert text.startswith("# Doc\nProse the report must not touch.\n") and text.endswith("Closing prose.\n")
    assert (tmp_path / "reports/overfitting/overfitting.png").stat().st_size > 0

    assert regenerate(tmp_path, ("experiments.md",), (QUICK_OVERFITTING,)) == []
    assert (tmp_path / "experiments.md").read_text() == text

    (tmp_path / "reports/overfitting/overfitting.png").unlink()  # a missing figure alone brings its producer back
    assert plan(tmp_path, ("experiments.md",), (QUICK_OVERFITTING,), force=False, only=None) == [QUICK_OVERFITTING]


def test_a_cited_file_that_nothing_produces_is_refused(tmp_path):
    (tmp_path / "experiments.md").write_text("![x](reports/nobody/owns.png)\n")
    with pytest.raises(LookupError, match="reports/nobody/owns.png"):
        regenerate(tmp_path, ("experiments.md",), (QUICK_OVERFITTING,))


def test_every_file_the_real_documents_cite_has_exactly_one_producer():
    cited = [c for doc in DOCUMENTS for c in cited_files((REPO / doc).read_text())]
    assert len(cited) > 10
    for path in cited:
        owner(path, PRODUCERS)


def test_spread_and_the_noise_verdict():
    from launch.stats import outside, spread, verdict

    assert spread([3, 1, 2, None, 5]) == "3 [1–not reached]"
    assert spread([None, None]) == "not reached"
    assert outside([30, 31, 32], [10, 20, 25]) == 1 and outside([5, 6], [10, 20]) == -1
    assert outside([12, 40, 41], [10, 20, 25]) == 1  # the median decides, not one outlier seed
    assert outside([15, 16], [10, 20]) == 0
    assert verdict({"epochs": ([15], [10, 20])}) == "no (not distinguishable from noise)"
    assert verdict({"epochs": ([None], [10, 20]), "loss": ([0.1], [0.2, 0.3])}) == "yes: epochs ↑, loss ↓"


def test_regeneration_writes_no_absolute_paths():
    producer = PRODUCERS[0]
    assert all(not part.startswith("/") for part in producer.command(REPO)[1:])
    for report in (REPO / "reports").rglob("*.json"):
        if "-runs" not in str(report):
            assert str(REPO) not in report.read_text(), report
