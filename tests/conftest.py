"""Every test belongs to exactly one group, so a developer can run one: `pytest -m unit`, `-m distributed`,
`-m experiment`. An unmarked test is a unit test; `make test` runs them all, on three xdist workers
(`--dist loadgroup`) on a 2-core machine: most of a test's time is a child process starting, and some tests
mostly wait (on Slurm's scheduler, on a process-group timeout), so a third worker keeps both cores busy."""

from __future__ import annotations

import pytest

from launch.runner import RunRecord, run_many
from tests.helpers import WORLD2_RUNS, stop_rank_server

GROUPS = ("unit", "distributed", "experiment")


def shared_fixtures(item: pytest.Item) -> list[str]:
    """The module- or session-scoped fixtures of this suite that the test needs, directly or through another
    fixture; autouse ones (a thread setting) are cheap and left out. Read from item._fixtureinfo: no public pytest
    API gives a requested fixture's scope."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    autouse = set(info.initialnames) - set(info.argnames)
    names = []
    for name in info.names_closure:
        defs = info.name2fixturedefs.get(name)
        if name not in autouse and defs and defs[-1].scope in ("module", "session") \
                and defs[-1].baseid.startswith("tests"):
            names.append(name)
    return names


# tryfirst: xdist's own hook turns xdist_group marks into the node ids that --dist loadgroup schedules by; run
# after it, the marks added here would never be seen.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        groups = {m.name for m in item.iter_markers() if m.name in GROUPS}
        if len(groups) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {sorted(groups)}: one group per test")
        if not groups:
            item.add_marker(pytest.mark.unit)
    # make test runs several xdist workers. A shared fixture (the world-2 job, a module's reference run) is built once
    # on each worker that needs it, so the tests that use one go to one worker: the world-2 job's users to one,
    # each module's users of its own shared runs to one, and a module whose tests need both to the world-2 one.
    shared = {item: shared_fixtures(item) for item in items}
    with_world2 = {item.module.__name__ for item, names in shared.items() if "world2" in names and len(names) > 1}
    for item, names in shared.items():
        if "world2" in names or (names and item.module.__name__ in with_world2):
            item.add_marker(pytest.mark.xdist_group("world2"))
        elif names:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope="session")
def world2(tmp_path_factory) -> dict[str, RunRecord]:
    """Every world-2 run the collected modules declared (tests.helpers.world2_run), in one torchrun job."""
    out = tmp_path_factory.mktemp("world2")
    labels = list(WORLD2_RUNS)
    records = run_many([WORLD2_RUNS[label] for label in labels], out, world=2, overwrite=False, timeout=900)
    return dict(zip(labels, records, strict=True))


@pytest.fixture(scope="session", autouse=True)
def rank_server():
    """spawn_ranks' forkserver (tests/helpers.py) is stopped at the end of the session."""
    yield
    stop_rank_server()
