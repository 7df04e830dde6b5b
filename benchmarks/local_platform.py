"""Figures for the local YellowDog platform, measured through the unmodified SDK over loopback
against a platform started with `prefect-raydog local start` in a subprocess (so its memory is
its own): task read latency, adding 1000 tasks, and 100 pools of 100 simulated nodes.

    python benchmarks/local_platform.py --json      # full figures
    python benchmarks/local_platform.py --quick     # a quick run in seconds
    python benchmarks/local_platform.py --smoke     # proves it runs: the smallest sizes (its
                                                    # figures mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from yellowdog_client import PlatformClient
from yellowdog_client.model import (
    ComputeRequirementTemplateUsage,
    ProvisionedWorkerPoolProperties,
    RunSpecification,
    Task,
    TaskGroup,
    WorkerPoolSearch,
    WorkerPoolStatus,
    WorkRequirement,
)

from prefect_raydog.cluster import create_client

from stopping import stop_in_order_on_sigterm

START_COMMAND = "from prefect_raydog.cli import app; app()"


@dataclass(frozen=True)
class Scale:
    task_reads: int
    tasks: int
    pools: int
    nodes_per_pool: int


FULL = Scale(task_reads=500, tasks=1000, pools=100, nodes_per_pool=100)
QUICK = Scale(task_reads=50, tasks=100, pools=5, nodes_per_pool=10)
SMOKE = Scale(task_reads=20, tasks=10, pools=2, nodes_per_pool=2)


@contextmanager
def platform_process() -> Iterator[tuple[subprocess.Popen[str], PlatformClient]]:
    """Start `prefect-raydog local start` and connect a client to the URL and key it prints."""
    environment = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "RAY_AUTH_MODE": "disabled"}
    process = subprocess.Popen(
        [sys.executable, "-c", START_COMMAND, "local", "start", "--network", "loopback"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
    )
    try:
        printed = _read_until(process, "Press Ctrl-C")
        url = re.search(r"(http://\S+)", printed).group(1)
        key_id = re.search(r"key id:\s+(\S+)", printed).group(1)
        key_secret = re.search(r"key secret:\s+(\S+)", printed).group(1)
        client = create_client(
            key_id, key_secret, url, max_attempts=1, initial_retry_interval=timedelta(seconds=0.1)
        )
        yield process, client
    finally:
        process.terminate()  # stops in order, as Ctrl-C does
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _read_until(process: subprocess.Popen[str], marker: str) -> str:
    assert process.stdout is not None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            return "".join(lines)
    raise RuntimeError("The local platform did not start:\n" + "".join(lines))


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"No VmRSS for process {pid}")


def wait_until(condition: Callable[[], bool], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def measure_tasks(client: PlatformClient, scale: Scale) -> dict[str, float]:
    work = client.work_client
    group = TaskGroup(
        name="g", runSpecification=RunSpecification(taskTypes=["bash"], workerTags=["nobody"])
    )
    requirement = work.add_work_requirement(
        WorkRequirement(namespace="bench", name=f"wr-{uuid.uuid4().hex[:8]}", taskGroups=[group])
    )
    tasks = [
        Task(
            name=f"task-{n}",
            taskType="bash",
            arguments=["taskdata.txt"],
            taskData="#!/bin/bash\necho hello\n",
            environment={"N": str(n)},
        )
        for n in range(scale.tasks)
    ]
    started = time.perf_counter()
    added = work.add_tasks_to_task_group_by_id(requirement.taskGroups[0].id, tasks)
    add_s = time.perf_counter() - started
    latencies = []
    for n in range(scale.task_reads):
        started = time.perf_counter()
        work.get_task_by_id(added[n % len(added)].id)
        latencies.append((time.perf_counter() - started) * 1000)
    work.cancel_work_requirement_by_id(requirement.id, abort=True)
    cuts = statistics.quantiles(latencies, n=20)
    return {
        "get_task_p50_ms": round(statistics.median(latencies), 2),
        "get_task_p95_ms": round(cuts[18], 2),
        "add_1000_tasks_s": round(add_s, 3),
    }


def measure_nodes(
    client: PlatformClient, process: subprocess.Popen[str], scale: Scale
) -> dict[str, float]:
    pools = client.worker_pool_client
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    total = scale.pools * scale.nodes_per_pool

    def summaries():
        return pools.get_worker_pools(WorkerPoolSearch(namespace=namespace)).list_all()

    started = time.perf_counter()
    created = [
        pools.provision_worker_pool(
            ComputeRequirementTemplateUsage(
                templateId="local/simulated",
                requirementName=f"pool-{n}",
                requirementNamespace=namespace,
                targetInstanceCount=scale.nodes_per_pool,
            ),
            ProvisionedWorkerPoolProperties(workerTag=f"pool-{n}", maxNodes=scale.nodes_per_pool),
        )
        for n in range(scale.pools)
    ]
    wait_until(lambda: sum(s.registeredNodeCount for s in summaries()) == total)
    provision_s = time.perf_counter() - started
    memory = rss_mib(process.pid)
    started = time.perf_counter()
    for pool in created:
        pools.shutdown_worker_pool_by_id(pool.id)
    wait_until(lambda: all(s.status == WorkerPoolStatus.TERMINATED for s in summaries()))
    shutdown_s = time.perf_counter() - started
    return {
        "provision_10000_nodes_s": round(provision_s, 3),
        "shutdown_10000_nodes_s": round(shutdown_s, 3),
        "platform_rss_mib_10000_nodes": round(memory, 1),
        "nodes": total,
    }


def main() -> None:
    stop_in_order_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", action="store_true", help="a quick run")
    modes.add_argument("--smoke", action="store_true",
                       help="the smallest sizes: proves the benchmark runs, its figures mean "
                            "nothing")
    arguments = parser.parse_args()
    scale = SMOKE if arguments.smoke else QUICK if arguments.quick else FULL
    with platform_process() as (process, client):
        figures = {
            **measure_tasks(client, scale),
            **measure_nodes(client, process, scale),
            "quick": arguments.quick,
            "smoke": arguments.smoke,
            "rss_measured": "platform subprocess (prefect-raydog local start), VmRSS",
        }
    if arguments.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:32} {value}")


if __name__ == "__main__":
    main()
