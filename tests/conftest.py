"""Every test belongs to exactly one group, so a developer can run one: `pytest -m unit`, `-m distributed`,
`-m experiment`. An unmarked test is a unit test; `make test` runs them all."""

from __future__ import annotations

import pytest

GROUPS = ("unit", "distributed", "experiment")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        groups = {m.name for m in item.iter_markers() if m.name in GROUPS}
        if len(groups) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {sorted(groups)}: one group per test")
        if not groups:
            item.add_marker(pytest.mark.unit)
