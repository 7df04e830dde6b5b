"""What adaptive pools and eager provisioning save, measured on a local platform of process nodes.

`python benchmarks/adaptive.py --json` prints one JSON object; `--quick` is a short run (two
flow runs, not four: the fixed pool's run is also the lazy one, the adaptive pool's the eager one);
`--smoke` proves the benchmark runs: the same two runs on pools of one node that boots from a
template of its own, with bursts of one task, no pause between them, and cooldowns and idle
timeouts under a second (its figures mean nothing). Each stage's time goes to stderr.
- `adaptive_node_seconds_ratio`, `adaptive_wall_ratio`: a bursty flow (60 one-second tasks, a
  pause, 60 more) on a worker pool of 0 to 3 nodes over the same flow on a fixed pool of 3;
  node-seconds are the worker nodes' registered-to-deregistered times in the platform's records.
- `eager_saved_s`: a flow that prepares for 20 s before its first submission, on nodes that take
  20 s to boot: seconds to its first task result with lazy provisioning minus with eager.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, task  # noqa: E402
from prefect.settings import PREFECT_LOGGING_TO_API_BATCH_INTERVAL, temporary_settings  # noqa: E402
from yellowdog_client.model import NodeSearch  # noqa: E402

from prefect_raydog.blocks import RayDogClusterConfig  # noqa: E402
from prefect_raydog.local import LocalPlatform  # noqa: E402
from prefect_raydog.runner import adaptive  # noqa: E402
from prefect_raydog.spec import WorkerPoolSpec  # noqa: E402
from prefect_raydog.task_runners import RayDogTaskRunner  # noqa: E402

import api_server  # noqa: E402
from stages import stage  # noqa: E402
from stopping import stop_in_order_on_sigterm  # noqa: E402

SLOW_BOOT = "bench/slow-boot"
# `workers`: the fixed pool's nodes and the adaptive pool's most; `idle_s`: the adaptive pool's
# idle node shutdown. A smoke run does not pause between its bursts: a pool that shrinks and grows
# again within seconds sends the burst to the node it shrank, which Ray finds dead only after
# about 20 s.
FULL = {"tasks": 60, "pause_s": 60.0, "boot_s": 20.0, "prepare_s": 20.0, "workers": 3,
        "idle_s": 2.0}
QUICK = {"tasks": 6, "pause_s": 4.0, "boot_s": 2.0, "prepare_s": 2.0, "cooldown_s": 1.0,
         "workers": 3, "idle_s": 2.0}
SMOKE = {"tasks": 1, "pause_s": 0.0, "boot_s": 0.2, "prepare_s": 0.2, "cooldown_s": 0.5,
         "workers": 1, "idle_s": 0.5}


@task
def one_second(_: int) -> None:
    time.sleep(1.0)


@task
def nothing() -> None:
    return None


def _config(platform: LocalPlatform, pool: dict[str, Any], template: str | None = None,
            **fields: Any) -> RayDogClusterConfig:
    config = RayDogClusterConfig.local(platform.url, platform.key_id, platform.key_secret)
    base = config.worker_pools[0].model_dump(exclude={"count"})
    head = config.head
    if template:
        base["template_id"] = template
        head = head.model_copy(update={"template_id": template})
    return config.model_copy(update={
        "head": head, "worker_pools": [WorkerPoolSpec(**{**base, **pool})],
        "build_timeout": timedelta(minutes=10), **fields,
    })


def _runner(platform: LocalPlatform, config: RayDogClusterConfig, **options: Any) -> Any:
    return RayDogTaskRunner(cluster=config, api_relay_address=platform.host_address, **options)


def _worker_node_seconds(platform: LocalPlatform, known: set[str]) -> float:
    """Registered-to-deregistered seconds of the worker nodes not in `known` (head excluded)."""
    client = platform.client.worker_pool_client
    total = 0.0
    for node in client.get_nodes(NodeSearch()).iterate():
        if node.id in known or node.registeredTime is None:
            continue
        pool = client.get_worker_pool_by_id(node.workerPoolId)
        if "wrkrs" not in pool.name:
            continue
        end = node.deregisteredTime or node.statusChangedTime
        total += (end - node.registeredTime).total_seconds()
    return total


def _node_ids(platform: LocalPlatform) -> set[str]:
    nodes = platform.client.worker_pool_client.get_nodes(NodeSearch())
    return {node.id for node in nodes.iterate()}


def _flow_run(platform: LocalPlatform, pool: dict[str, Any], size: dict[str, Any],
              provision: str, prepare_s: float, bursts: int,
              template: str | None = None) -> tuple[float, float, float]:
    """Wall seconds, worker node-seconds and seconds to the first result of one flow run that
    prepares for `prepare_s`, submits one task, then runs `bursts` bursts with pauses between."""
    # Adaptive: shrunk nodes stop 2 s (in full) after their task is aborted. Fixed: the
    # default, as a node that boots before the head is ready sits idle until its task arrives.
    adaptive = "min_count" in pool
    idle = {"idle_node_shutdown": timedelta(seconds=size["idle_s"])} if adaptive else {}
    joined = pool.get("count", 0)
    config = _config(platform, pool, template=template, workers_to_join=joined, **idle)

    @flow(task_runner=_runner(platform, config, provision=provision))
    def bursty() -> float:
        started = time.monotonic()
        time.sleep(prepare_s)
        nothing.submit().result()
        first = time.monotonic() - started
        for burst in range(bursts):
            time.sleep(size["pause_s"] if burst else 0.0)
            one_second.map(range(size["tasks"])).result()
        return first

    known = _node_ids(platform)
    started = time.monotonic()
    first = bursty()
    wall = time.monotonic() - started
    stage(f"{'adaptive' if adaptive else 'fixed'} pool, {provision}: flow run")
    _wait_until_nothing_live(platform)
    stage("nothing live")
    return wall, _worker_node_seconds(platform, known), first


def _wait_until_nothing_live(platform: LocalPlatform, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while any(platform.live_entities().values()) and time.monotonic() < deadline:
        time.sleep(0.2)


def measure(size: dict[str, Any], prefect_api_url: str | None = None) -> dict[str, float]:
    fixed = {"name": "workers", "count": size["workers"]}
    adaptive_pool = {"name": "workers", "min_count": 0, "max_count": size["workers"]}
    if "cooldown_s" in size:
        adaptive.COOLDOWN_S = size["cooldown_s"]
    with tempfile.TemporaryDirectory() as tmp:
        templates = Path(tmp) / "templates.toml"
        templates.write_text(
            f'[templates."{SLOW_BOOT}"]\nmode = "process"\nboot_delay_s = {size["boot_s"]}\n'
        )
        with api_server.prefect_server(prefect_api_url), \
                LocalPlatform(templates=templates) as platform:
            stage("Prefect server and platform up")
            if size is not FULL:
                # Two builds instead of four: the fixed pool's run is also the lazy one and the
                # adaptive pool's the eager one (the figures of a short run are not kept). A
                # smoke run boots them from the slow-boot template, as the full run's last two.
                template = SLOW_BOOT if size is SMOKE else None
                fixed_wall, fixed_ns, lazy = _flow_run(
                    platform, fixed, size, "lazy", size["prepare_s"], 2, template)
                adaptive_wall, adaptive_ns, eager = _flow_run(
                    platform, adaptive_pool, size, "eager", size["prepare_s"], 2, template)
            else:
                fixed_wall, fixed_ns, _ = _flow_run(platform, fixed, size, "eager", 0.0, 2)
                adaptive_wall, adaptive_ns, _ = _flow_run(
                    platform, adaptive_pool, size, "eager", 0.0, 2)
                one = {"name": "workers", "count": 1}
                _, _, lazy = _flow_run(platform, one, size, "lazy", size["prepare_s"], 0, SLOW_BOOT)
                _, _, eager = _flow_run(
                    platform, one, size, "eager", size["prepare_s"], 0, SLOW_BOOT)
    return {
        "adaptive_node_seconds_ratio": round(adaptive_ns / fixed_ns, 3),
        "adaptive_wall_ratio": round(adaptive_wall / fixed_wall, 3),
        "eager_saved_s": round(lazy - eager, 2),
        "fixed_worker_node_seconds": round(fixed_ns, 1),
        "adaptive_worker_node_seconds": round(adaptive_ns, 1),
        "fixed_wall_s": round(fixed_wall, 1),
        "adaptive_wall_s": round(adaptive_wall, 1),
        "lazy_first_result_s": round(lazy, 2),
        "eager_first_result_s": round(eager, 2),
        "cooldown_s": adaptive.COOLDOWN_S,
    }


def main() -> None:
    stop_in_order_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", action="store_true", help="a short run: two flow runs")
    modes.add_argument("--smoke", action="store_true",
                       help="the short run's two flow runs at the smallest sizes: proves the "
                            "benchmark runs, its figures mean nothing")
    api_server.add_argument(parser)
    args = parser.parse_args()
    # A smoke run's flows wait less for the nodes' last batch of logs when they end.
    batches = {PREFECT_LOGGING_TO_API_BATCH_INTERVAL: 0.2} if args.smoke else {}
    with temporary_settings(updates=batches):
        figures = measure(SMOKE if args.smoke else QUICK if args.quick else FULL,
                          args.prefect_api_url)
    stage("Prefect server and platform down")
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:32} {value}")


if __name__ == "__main__":
    main()
