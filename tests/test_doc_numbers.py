"""Every measured number in the write-ups' prose comes from a committed report file.

The generated blocks are copies of report files (launch/render_docs.py); this checks the rest: each decimal,
exponent or percentage in the prose of the DOCUMENTS below must equal, at the precision
it is written with, some number in a file under reports/. Integers (epochs, steps, seeds, sizes) are not
checked: too many are definitions (batch 32, 40 epochs) rather than measurements. Constants that come from
arithmetic, not from a run, are listed below with where they come from.
"""

from __future__ import annotations

import bisect
import math
import re

import pytest

from tests.helpers import ROOT

# The write-ups and the appendices moved out of them; another docs/ file joins this list once its numbers have a
# report table behind them.
DOCUMENTS = ["experiments.md", "postmortem.md", "docs/performance.md", "docs/distributed.md"]
REPORT_SUFFIXES = {".md"}  # the tables a reader can open; raw per-step and per-run files feed them
# Arithmetic, not measurement: each is checked here instead of against a report.
CONSTANTS = {
    "0.693": math.log(2),  # ln 2, the initial loss of a 2-class model with uniform output
    "1.39": math.log(4),  # ln 4
    "0.313": -math.log(math.e / (math.e + 1)),  # the floor of cross-entropy on softmax outputs, K = 2
    "0.1": 0.1, "0.9": 0.9, "0.01": 0.01, "0.05": 0.05, "0.001": 0.001, "1e-3": 1e-3,  # flags: lr, momentum, ...
    "0.08": 0.08, "0.64": 0.64, "2.56": 2.56, "0.16": 0.16, "0.04": 0.04,  # lr 0.01 x batch / 16
    "0.35": 0.35, "0.3": 0.3, "0.2": 0.2, "0.5": 0.5, "1.9": 1.9, "3.8": 3.8,  # flags; 1 + momentum, 2 x 1.9
}
NUMBER = re.compile(r"(?<![\w.\-/])(\d+(?:\.\d+)?(?:e[+-]?\d+)?%?)(?![\w.])")
GENERATED = re.compile(r"<!-- generated: .*? -->.*?<!-- end generated -->", re.S)


def prose(text: str) -> str:
    """The text a reader reads as prose: without generated blocks, code, tables, links' targets and headings' ids."""
    text = GENERATED.sub("", text)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("|"))


def measured(token: str) -> str | None:
    """The token if it is a number this test checks (a decimal, an exponent or a percentage), else None."""
    return token if ("." in token or "e" in token or token.endswith("%")) else None


def report_numbers() -> list[float]:
    values: set[float] = set()
    for path in (ROOT / "reports").rglob("*"):
        if path.suffix in REPORT_SUFFIXES and path.is_file() and "-runs" not in str(path.relative_to(ROOT)):
            for m in re.finditer(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:e[+-]?\d+)?", path.read_text(errors="replace")):
                try:
                    values.add(abs(float(m.group().replace(",", ""))))
                except ValueError:
                    continue
    return sorted(values)


def matches(token: str, values: list[float]) -> bool:
    """Some report value rounds to the token at the token's own precision."""
    percent = token.endswith("%")
    text = token.rstrip("%")
    x = float(text)
    mantissa = text.split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    exponent = int(text.split("e")[1]) if "e" in text else 0
    half = 0.5 * 10 ** (exponent - decimals)  # half a unit in the last written digit
    candidates = [(x - half, x + half)]
    if percent:
        candidates.append(((x - half) / 100, (x + half) / 100))
    for lo, hi in candidates:
        i = bisect.bisect_left(values, lo - 1e-12 * max(1.0, abs(lo)))
        if i < len(values) and values[i] <= hi + 1e-12 * max(1.0, abs(hi)):
            return True
    return False


@pytest.fixture(scope="module")
def values() -> list[float]:
    return report_numbers()


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_every_measured_number_in_the_prose_is_in_a_report_file(doc, values):
    text = prose((ROOT / doc).read_text())
    unmatched = []
    for m in NUMBER.finditer(text):
        token = measured(m.group(1))
        if token is None or token in CONSTANTS:
            continue
        if not matches(token, values):
            line = text[:m.start()].count("\n") + 1
            unmatched.append(f"{token} (prose line {line}: …{text[max(0, m.start() - 50):m.end() + 20]!r}…)")
    assert not unmatched, f"{doc}: numbers in the prose that no report file holds:\n" + "\n".join(unmatched)


def test_the_constants_are_what_they_say():
    for token, value in CONSTANTS.items():
        assert matches(token, [value]), token


def test_the_checker_catches_a_number_no_report_holds(values):
    assert matches("0.0009223", [0.0009223])
    assert matches("66%", [0.6612])
    assert not matches("123.456789", values)
