"""Per-task overhead of RayDogTaskRunner against prefect_ray.RayTaskRunner on the same Ray cluster.

`python benchmarks/runner.py --json` prints one JSON object; `--quick` is a small smoke run.
Both runners attach to one local Ray instance started here, and report to one Prefect server;
`first_task_after_ready_s` provisions a cluster on an embedded local platform.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import ray  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402
from prefect_ray import RayTaskRunner  # noqa: E402

from prefect_raydog.task_runners import RayDogTaskRunner  # noqa: E402

WARM_UP = 20


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


def _first_task_after_start(runner: Any) -> float:
    @flow(task_runner=runner)
    def first() -> float:
        return started_at.submit().result()

    start = time.time()
    return first() - start


def _first_task_after_platform_ready() -> float:
    """Seconds from the platform running every node task to the first Prefect task running,
    for a cluster provisioned on the local platform: the runner's own start-up cost."""
    from yellowdog_client.model import TaskSearch, WorkRequirementSearch

    from prefect_raydog.blocks import RayDogClusterConfig
    from prefect_raydog.local import LocalPlatform

    with LocalPlatform() as platform:
        RayDogClusterConfig.local(platform.url, platform.key_id, platform.key_secret).save(
            "benchmark-local", overwrite=True
        )
        runner = RayDogTaskRunner(cluster="benchmark-local",
                                  api_relay_address=platform.host_address)

        @flow(task_runner=runner)
        def first() -> float:
            return started_at.submit().result()

        first_task = first()
        work = platform.client.work_client
        requirement = next(iter(work.get_work_requirements(
            WorkRequirementSearch(namespace="local")).iterate()))
        tasks = work.get_tasks(TaskSearch(workRequirementId=requirement.id)).iterate()
        ready = max(task.startedTime.timestamp() for task in tasks)
    return first_task - ready


def _driver_rss_mib(runner: Any, n: int) -> float:
    @flow(task_runner=runner)
    def many() -> None:
        add_one.map(range(n)).wait()

    many()
    with open("/proc/self/status") as status:
        rss_kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss_kib / 1024


def run(quick: bool) -> dict[str, Any]:
    """Every figure; the provisioned cluster comes first, before this process attaches to Ray."""
    first_task_after_ready = _first_task_after_platform_ready()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        figures = run_attached(quick)
    finally:
        ray.shutdown()
    figures["first_task_after_ready_s"] = round(first_task_after_ready, 2)
    return figures


def run_attached(quick: bool) -> dict[str, Any]:
    n = 50 if quick else 500
    raydog, prefect_ray = RayDogTaskRunner(address="local"), RayTaskRunner(address="local")
    ours_results, ours_saved = _until_states_saved(raydog, n)
    theirs_results, theirs_saved = _until_states_saved(prefect_ray, n)
    figures = {
        "tasks": n,
        "per_task_ms": round(1000 * ours_results / n, 2),
        "prefect_ray_per_task_ms": round(1000 * theirs_results / n, 2),
        "ratio_vs_prefect_ray": round(ours_results / theirs_results, 3),
        "states_saved_per_task_ms": round(1000 * ours_saved / n, 2),
        "prefect_ray_states_saved_per_task_ms": round(1000 * theirs_saved / n, 2),
        "states_saved_ratio_vs_prefect_ray": round(ours_saved / theirs_saved, 3),
        "first_task_attached_s": round(_first_task_after_start(raydog), 3),
    }
    for label, count in (("1000", 100 if quick else 1000), ("10000", 200 if quick else 10000)):
        figures[f"driver_rss_mib_{label}"] = round(_driver_rss_mib(raydog, count), 1)
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
            print(f"{key:40} {value}")


if __name__ == "__main__":
    main()
