"""Every test belongs to exactly one group, so a developer can run one: `pytest -m unit`, `-m distributed`,
`-m experiment`. An unmarked test is a unit test; `make test` runs them all, on two xdist workers
(`--dist loadgroup`: most of a test's time is a child process starting, so two workers fill two cores)."""

from __future__ import annotations

import pytest

from launch.runner import RunRecord, run_many
from tests.helpers import WORLD2_RUNS

GROUPS = ("unit", "distributed", "experiment")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        groups = {m.name for m in item.iter_markers() if m.name in GROUPS}
        if len(groups) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {sorted(groups)}: one group per test")
        if not groups:
            item.add_marker(pytest.mark.unit)
        if "world2" in getattr(item, "fixturenames", ()):
            # make test runs two xdist workers; the shared world-2 job should run once, on one of them.
            item.add_marker(pytest.mark.xdist_group("world2"))


@pytest.fixture(scope="session")
def world2(tmp_path_factory) -> dict[str, RunRecord]:
    """Every world-2 run the collected modules declared (tests.helpers.world2_run), in one torchrun job."""
    out = tmp_path_factory.mktemp("world2")
    labels = list(WORLD2_RUNS)
    records = run_many([WORLD2_RUNS[label] for label in labels], out, world=2, overwrite=False, timeout=900)
    return dict(zip(labels, records, strict=True))
