"""Which tests pytest-xdist runs on one worker, and in what order it hands the groups out.

A module's tests share its module-scoped clusters and saved blocks, so a module stays on one
worker (Ray on the host's loopback, in test_local_ray_nodes.py, takes fixed ports: its tests must
not overlap); the benchmark smoke runs share nothing and spread. `ray up` sessions run one at a
time: Ray's CLI keeps state of its own under the host's /tmp (SSH control sockets). The groups
come from the node ids (`GroupScheduling`): xdist's `--dist loadgroup` marks them by renaming
items through `_nodeid`, which pytest 9 no longer reads, so its groups silently fell apart.

Groups go out longest first, so that the run does not end with one worker busy on a long module
while the others wait. How long each test takes comes from earlier runs, kept in
`durations.json`; `pytest --store-durations` updates it with this run's tests. A test the file
does not know counts as a typical test of its kind."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from xdist.scheduler import LoadScopeScheduling

DURATIONS = Path(__file__).with_name("durations.json")
_UNKNOWN_RAY_S = 25.0  # boots nodes and starts Ray on them
_UNKNOWN_S = 1.0
_SPREAD_MODULES = {"test_benchmarks_smoke.py"}
_RAY_UP_MODULES = {"test_autoscaler.py", "test_autoscaler_failures.py"}


def group_of(nodeid: str) -> str:
    """The group of the test `nodeid`: its module, `ray-up`, or (spread) the test itself."""
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
    if module in _RAY_UP_MODULES or nodeid.endswith("[autoscaler.py]"):
        return "ray-up"
    return nodeid if module in _SPREAD_MODULES else module


class GroupScheduling(LoadScopeScheduling):
    """xdist's scheduling by scope, with `group_of` as the scope."""

    def _split_scope(self, nodeid: str) -> str:
        return group_of(nodeid)


def longest_groups_first(items: list[pytest.Item]) -> None:
    """Sort `items` in place, groups with the most expected seconds first; a group keeps the
    order of its own tests."""
    known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    totals: dict[str, float] = defaultdict(float)
    for item in items:
        totals[group_of(item.nodeid)] += _expected_s(item, known)
    items.sort(key=lambda item: -totals[group_of(item.nodeid)])


def _expected_s(item: pytest.Item, known: dict[str, float]) -> float:
    if item.nodeid in known:
        return known[item.nodeid]
    return _UNKNOWN_RAY_S if item.get_closest_marker("ray") else _UNKNOWN_S


class DurationRecorder:
    """Sums each test's setup, call and teardown seconds (on xdist's controller, which hears of
    every worker's tests) and writes them into `durations.json` when the run ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] += report.duration

    def pytest_sessionfinish(self) -> None:
        known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
        known.update({nodeid: round(s, 1) for nodeid, s in self.seconds.items()})
        DURATIONS.write_text(json.dumps(dict(sorted(known.items())), indent=0) + "\n")
