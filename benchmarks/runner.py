"""Per-task overhead of RayDogTaskRunner against prefect_ray.RayTaskRunner on the path users take.

`python benchmarks/runner.py --json` prints one JSON object; `--quick` is a small smoke run.
One cluster is provisioned on an embedded local platform; both runners attach to it through
Ray Client (`ray://HEAD:10001`), in alternating rounds, and report to one Prefect server that
the nodes reach through a relay on the platform's host-side bridge address. Ray never runs on
this machine's own network. `first_task_after_ready_s` provisions a second cluster through the
runner itself (not in the `--quick` smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import statistics
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, task  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402
from prefect.events.worker import EventsWorker  # noqa: E402
from prefect.logging.handlers import APILogWorker  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402
from prefect_ray import RayTaskRunner  # noqa: E402

from prefect_raydog.blocks import RayDogClusterConfig  # noqa: E402
from prefect_raydog.cluster import RayDogCluster, wait_for_ray_nodes  # noqa: E402
from prefect_raydog.local import LocalPlatform  # noqa: E402
from prefect_raydog.runner.relay import _TcpRelay  # noqa: E402
from prefect_raydog.runner.session import _connect  # noqa: E402
from prefect_raydog.task_runners import RayDogTaskRunner  # noqa: E402

WARM_UP = 20
WORKER_NODES = 2


@task
def add_one(x: int) -> int:
    return x + 1


@task
def started_at() -> float:
    return time.time()


def _timed_map(runner: Any, n: int) -> tuple[float, str]:
    """Seconds from the start of a map of `n` trivial tasks until all results are back."""

    @flow(task_runner=runner)
    def mapped() -> tuple[float, str]:
        add_one.map(range(WARM_UP)).result()
        start = time.perf_counter()
        results = add_one.map(range(n)).result()
        elapsed = time.perf_counter() - start
        assert results == [x + 1 for x in range(n)]
        return elapsed, str(flow_run.id)

    return mapped()


def _completed_count(flow_run_id: str) -> int:
    with get_client(sync_client=True) as client:
        filter_ = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        count, offset = 0, 0
        while True:
            page = client.read_task_runs(flow_run_filter=filter_, limit=200, offset=offset)
            count += sum(1 for run in page if run.state and run.state.is_completed())
            offset += len(page)
            if len(page) < 200:
                return count


def _until_states_saved(runner: Any, n: int) -> tuple[float, float]:
    """(results-back seconds, seconds until every task run's final state is in the API)."""
    start = time.perf_counter()
    elapsed, flow_run_id = _timed_map(runner, n)
    map_started = start + (time.perf_counter() - start) - elapsed
    deadline = time.perf_counter() + 300
    while _completed_count(flow_run_id) < n + WARM_UP and time.perf_counter() < deadline:
        time.sleep(0.2)
    return elapsed, time.perf_counter() - map_started


def _first_task_at(runner: Any) -> float:
    """When (epoch seconds) the first task of a new flow run started on a node."""

    @flow(task_runner=runner)
    def first() -> float:
        return started_at.submit().result()

    return first()


def _first_task_after_start(runner: Any) -> float:
    start = time.time()
    return _first_task_at(runner) - start


def _first_task_after_platform_ready(platform: LocalPlatform, config: RayDogClusterConfig
                                     ) -> float:
    """Seconds from the platform running every node task to the first Prefect task running,
    for a cluster the runner provisions: the runner's own start-up cost."""
    from yellowdog_client.model import TaskSearch, WorkRequirementSearch

    runner = RayDogTaskRunner(cluster=config, api_relay_address=platform.host_address)
    first_task = _first_task_at(runner)
    work = platform.client.work_client
    requirements = list(work.get_work_requirements(
        WorkRequirementSearch(namespace=config.namespace)).iterate())
    newest = max(requirements, key=lambda requirement: requirement.createdTime)
    tasks = work.get_tasks(TaskSearch(workRequirementId=newest.id)).iterate()
    ready = max(task.startedTime.timestamp() for task in tasks)
    return first_task - ready


def _rss_kib() -> int:
    """Resident memory of this process once garbage is collected and free heap pages returned,
    so that the figure counts what is held, not what a peak left behind."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _driver_rss_kib(runner: Any, n: int) -> int:
    """The driver's resident memory while a flow holds the futures of `n` finished tasks."""

    @flow(task_runner=runner)
    def many() -> int:
        futures = add_one.map(range(n))
        futures.wait()
        return _rss_kib()

    return many()


@contextlib.contextmanager
def _api_for_nodes(host: str) -> Iterator[str]:
    """Relay the loopback Prefect API on `host` (reached by this process and by the nodes),
    and make that the API URL of this process and of every task run."""
    api_url = PREFECT_API_URL.value()
    parts = urlsplit(api_url)
    with _TcpRelay(host, (parts.hostname, parts.port or 80)) as relay:
        relayed = urlunsplit(parts._replace(netloc=f"{host}:{relay.port}"))
        with temporary_settings(updates={PREFECT_API_URL: relayed}):
            try:
                yield relayed
            finally:
                # Send what is queued for the relayed URL while the relay is open: left queued,
                # it would be retried against the closed relay until the harness gives up.
                EventsWorker.drain_all()
                APILogWorker.drain_all()


@contextlib.contextmanager
def _provisioned(platform: LocalPlatform, config: RayDogClusterConfig) -> Iterator[str]:
    """One cluster on the platform, its Ray workers joined; yields its Ray Client address."""
    import ray

    spec = config.to_spec(config.cluster_name())
    with RayDogCluster(spec, client=config.credentials.get_client()) as cluster:
        address = f"ray://{cluster.head_node_private_ip}:10001"
        _connect(address, {}, logging.getLogger("benchmark"))  # retries while the head starts
        try:
            wait_for_ray_nodes(1 + WORKER_NODES, timeout=180)
        finally:
            ray.shutdown()
        yield address


def _client_figures(address: str, quick: bool) -> dict[str, Any]:
    """Both runners through Ray Client to the same cluster, alternating round by round."""
    n, rounds = (20, 1) if quick else (500, 2)
    runners = {"ours": RayDogTaskRunner(address=address),
               "theirs": RayTaskRunner(address=address)}
    results: dict[str, list[float]] = {"ours": [], "theirs": []}
    saved: dict[str, list[float]] = {"ours": [], "theirs": []}
    for _ in range(rounds):
        for name, runner in runners.items():
            elapsed, until_saved = _until_states_saved(runner, n)
            results[name].append(elapsed)
            saved[name].append(until_saved)
    ours, theirs = statistics.median(results["ours"]), statistics.median(results["theirs"])
    ours_saved = statistics.median(saved["ours"])
    theirs_saved = statistics.median(saved["theirs"])
    figures = {
        "tasks": n,
        "rounds": rounds,
        "client_per_task_ms": round(1000 * ours / n, 2),
        "client_prefect_ray_per_task_ms": round(1000 * theirs / n, 2),
        "client_ratio_vs_prefect_ray": round(ours / theirs, 3),
        "client_states_saved_per_task_ms": round(1000 * ours_saved / n, 2),
        "client_prefect_ray_states_saved_per_task_ms": round(1000 * theirs_saved / n, 2),
        "client_states_saved_ratio_vs_prefect_ray": round(ours_saved / theirs_saved, 3),
    }
    if not quick:
        figures["first_task_attached_s"] = round(_first_task_after_start(runners["ours"]), 3)
    return figures


def _memory_figures(address: str, quick: bool) -> dict[str, Any]:
    small, large = (50, 200) if quick else (1000, 10000)
    runner = RayDogTaskRunner(address=address)
    if not quick:
        _driver_rss_kib(runner, small)  # warm up: imports, connections, caches
    before = _driver_rss_kib(runner, small)
    after = _driver_rss_kib(runner, large)
    return {
        f"driver_rss_mib_{small}": round(before / 1024, 1),
        f"driver_rss_mib_{large}": round(after / 1024, 1),
        "driver_kb_per_task": round(max(0, after - before) * 1.024 / (large - small), 2),
    }


def run(quick: bool) -> dict[str, Any]:
    """Every figure, on clusters provisioned on one local platform."""
    with LocalPlatform() as platform:
        config = RayDogClusterConfig.local(platform.url, platform.key_id, platform.key_secret,
                                           worker_nodes=WORKER_NODES)
        first_task_after_ready = (  # a cluster of its own: the smoke run skips it
            None if quick else _first_task_after_platform_ready(platform, config))
        with _api_for_nodes(platform.host_address), _provisioned(platform, config) as address:
            figures = _client_figures(address, quick)
            figures.update(_memory_figures(address, quick))
    if first_task_after_ready is not None:
        figures["first_task_after_ready_s"] = round(first_task_after_ready, 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    args = parser.parse_args()
    with prefect_test_harness(server_startup_timeout=120):
        figures = run(args.quick)
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:45} {value}")


if __name__ == "__main__":
    main()
