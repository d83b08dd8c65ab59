import pytest

from launch.render_docs import render


def test_only_the_generated_block_changes_and_twice_is_the_same(tmp_path):
    (tmp_path / "t.md").write_text("| a |\n|---|\n| 1 |\n")
    doc = "Prose before.\n<!-- generated: t.md -->\nold table\n<!-- end generated -->\nProse after.\n"
    once = render(doc, tmp_path)
    table = "| a |\n|---|\n| 1 |\n"
    assert once == f"Prose before.\n<!-- generated: t.md -->\n{table}<!-- end generated -->\nProse after.\n"
    assert render(once, tmp_path) == once


def test_a_missing_report_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.md"):
        render("<!-- generated: nope.md -->\n<!-- end generated -->", tmp_path)
