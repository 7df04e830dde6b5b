"""Shared fixtures: one local YellowDog platform for the session, and a per-test view of it
that checks the test used every fault it injected and left nothing live behind."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import scheduling
import system_packages
from shared_prefect import SharedServer, prefect_server
from yellowdog_client.common.server_sent_events.sse4python.event_source import EventSource

from prefect_raydog.local import LocalPlatform

# Tests send traffic only to loopback and the platform's own namespaces: no usage reports from
# Prefect's server or Ray, and no token auth left over from an earlier local Ray on this machine.
for _name, _value in {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ.setdefault(_name, _value)

# Launched in the background (`&`, nohup, some CI runners) a process inherits SIGINT as ignored:
# then `_thread.interrupt_main` does nothing and children started here ignore Ctrl-C too. A
# Python handler is reset to the default at exec, so children get Ctrl-C back as well.
signal.signal(signal.SIGINT, signal.default_int_handler)


# A test's time is part CPU (Ray and Prefect starting in a dozen processes a cluster) and part
# waiting (nodes booting, timers ending): three pytest-xdist workers keep two cores busy where
# two left a fifth of them idle. Which tests share a worker: scheduling.py.
_SHARED_PREFECT = pytest.StashKey[SharedServer]()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Install the Debian packages the tests drive, once, before pytest-xdist starts workers;
    start the workers' shared Prefect server on its way."""
    config = session.config
    if not hasattr(config, "workerinput"):
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        system_packages.install_for_workers(reporter.write_line if reporter else print)
        if config.pluginmanager.has_plugin("dsession") and SharedServer.wanted():
            config.stash[_SHARED_PREFECT] = SharedServer()
            config.stash[_SHARED_PREFECT].start()


def pytest_unconfigure(config: pytest.Config) -> None:
    if (server := config.stash.get(_SHARED_PREFECT, None)) is not None:
        server.stop()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--store-durations", action="store_true",
                     help="write each test's seconds to tests/durations.json (see scheduling.py)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("store_durations") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(scheduling.DurationRecorder(), "raydog-durations")


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """`--dist loadscope` (pyproject.toml's default) with scheduling.py's groups as scopes."""
    if config.getvalue("dist") != "loadscope":
        return None
    return scheduling.GroupScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        needed = [name for mark in item.iter_markers("system_packages") for name in mark.args]
        if reasons := list(filter(None, map(system_packages.why_missing, needed))):
            item.add_marker(pytest.mark.skip(reason="; ".join(reasons)))
    scheduling.longest_groups_first(items)


def assert_nothing_left(platform: LocalPlatform, timeout: float = 30.0) -> None:
    """Wait until the platform holds no live work requirement, worker pool, compute
    requirement, node, instance or node process. If something stays live, end it all (so later
    tests start clean) and fail saying what was left."""
    deadline = time.monotonic() + timeout
    while True:
        live = {kind: items for kind, items in platform.live_entities().items() if items}
        if not live:
            return
        if time.monotonic() > deadline:
            platform.end_everything()
            pytest.fail(f"Left live on the local platform after {timeout:g} s: {live}")
        time.sleep(0.05)


def wait_for(condition, timeout: float = 10.0, interval: float = 0.02, what: str = ""):
    """Poll `condition()` until it returns something truthy; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"Timed out after {timeout:g} s waiting for {what or condition}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One temporary Prefect server for the whole run (see shared_prefect.py): each start costs
    10-40 s on a 2-core machine. Tests tell their runs apart by id or name."""
    with prefect_server() as url:
        yield url


@pytest.fixture(scope="session")
def local_platform() -> Iterator[LocalPlatform]:
    with LocalPlatform() as platform:
        yield platform


def sdk_event_streams() -> set[threading.Thread]:
    def source(thread: threading.Thread) -> object:
        return getattr(getattr(thread, "_target", None), "__self__", None)

    return {t for t in threading.enumerate() if t.is_alive() and isinstance(source(t), EventSource)}


@pytest.fixture(autouse=True)
def no_sdk_event_stream_left() -> Iterator[None]:
    """The SDK's event source reads on at 100% CPU, holding the GIL, once a stream it follows
    ends: a test (or the code under test) that leaves one running slows every later test in
    its process. Fail the test that does."""
    before = sdk_event_streams()
    yield
    # A stream still open ends with its entity's final event, which may be on its way (seconds
    # behind under load).
    deadline = time.monotonic() + 30
    while (left := sdk_event_streams() - before) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        pytest.fail(f"Left {len(left)} yellowdog-sdk event stream thread(s) running: {left}")


@contextmanager
def checked_use(platform: LocalPlatform) -> Iterator[LocalPlatform]:
    """One test's use of a platform: API calls counted from zero; at the end, every fault the
    test injected was used up (one that no call got means its path pattern no longer matches
    the call it was meant for) and nothing is left live."""
    platform.reset_api_calls()
    platform.faults.forget()
    try:
        yield platform
    finally:
        pending, never_taken = platform.faults.pending(), platform.faults.never_taken()
        platform.clear_faults()
    assert_nothing_left(platform)
    assert not pending, f"Injected faults not used up by the end of the test: {pending}"
    assert not never_taken, f"Injected faults that no call got: {never_taken}"


@pytest.fixture
def platform(local_platform: LocalPlatform) -> Iterator[LocalPlatform]:
    with checked_use(local_platform) as platform:
        yield platform
