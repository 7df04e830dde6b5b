"""The order in which pytest-xdist hands out the tests' groups: longest first, so that the run does
not end with one worker busy on a long module while the other waits (xdist's own order is by
number of tests, which puts the README's one long test last). How long each test takes comes
from earlier runs, kept in `durations.json`; `pytest --store-durations` updates it with this
run's tests. A test the file does not know counts as a typical test of its kind."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest

DURATIONS = Path(__file__).with_name("durations.json")
_UNKNOWN_RAY_S = 25.0  # boots nodes and starts Ray on them
_UNKNOWN_S = 1.0


def longest_groups_first(items: list[pytest.Item], group_of: Callable[[pytest.Item], str]) -> None:
    """Sort `items` in place, groups with the most expected seconds first; a group keeps the
    order of its own tests."""
    known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    totals: dict[str, float] = defaultdict(float)
    for item in items:
        totals[group_of(item)] += _expected_s(item, known)
    items.sort(key=lambda item: -totals[group_of(item)])


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
