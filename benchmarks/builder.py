"""Figures of the RayDog Builder on the local platform's simulated nodes: how soon build() returns
after the head task runs, how many API requests a build makes while its nodes boot, how long
shutdown takes, and how API calls grow with a cluster's size.

    python benchmarks/builder.py --json      # full figures
    python benchmarks/builder.py --quick     # a quick run of a few seconds
    python benchmarks/builder.py --smoke     # proves it runs: the smallest sizes, under the
                                             # full run's keys (its figures mean nothing)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect_raydog.cluster import RayDogCluster
from prefect_raydog.local import LocalPlatform
from prefect_raydog.spec import ClusterSpec, NodeGroupSpec, WorkerPoolSpec

from stopping import stop_in_order_on_sigterm

FULL = (5, 100, 100, 30)  # builds timed for the overhead, pools, nodes a pool, seconds of a boot
SIMULATED = "local/simulated"
SLOW_BOOT = "benchmark/slow-boot"
TEMPLATES_TOML = f"""
[templates."{SLOW_BOOT}"]
mode = "simulated"
boot_delay_s = {{boot_s}}
"""


def _spec(name: str, pools: int, nodes: int, template: str = SIMULATED) -> ClusterSpec:
    return ClusterSpec(
        name=name,
        namespace="benchmark",
        head=NodeGroupSpec(template_id=template, script="sleep infinity"),
        worker_pools=[
            WorkerPoolSpec(template_id=template, count=nodes, script="sleep infinity")
            for _ in range(pools)
        ],
    )


def _wait_until_nothing_live(platform: LocalPlatform, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while any(platform.live_entities().values()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"still live after {timeout} s: {platform.live_entities()}")
        time.sleep(0.05)


def build_overhead_s(platform: LocalPlatform, repeats: int) -> float:
    """build() return time minus the moment the platform set the head task EXECUTING."""
    lags = []
    for number in range(repeats):
        cluster = RayDogCluster(_spec(f"overhead-{number}", 1, 1), client=_client(platform))
        cluster.build()
        returned = datetime.now(timezone.utc)
        lags.append((returned - cluster.head_node_started_time).total_seconds())
        cluster.shut_down()
        _wait_until_nothing_live(platform)
    return statistics.median(lags)


def build_api_requests(platform: LocalPlatform) -> int:
    """API requests made by build() of a head and two pools whose nodes take a while to boot."""
    cluster = RayDogCluster(_spec("slow-boot", 2, 1, SLOW_BOOT), client=_client(platform))
    platform.reset_api_calls()
    cluster.build()
    calls = sum(platform.api_calls().values())
    cluster.shut_down()
    _wait_until_nothing_live(platform)
    return calls


def shutdown_s(platform: LocalPlatform, pools: int) -> float:
    cluster = RayDogCluster(_spec(f"shutdown-{pools}", pools, 1), client=_client(platform))
    cluster.build()
    started = time.monotonic()
    cluster.shut_down()
    elapsed = time.monotonic() - started
    _wait_until_nothing_live(platform)
    return elapsed


def large_cluster(platform: LocalPlatform, pools: int, nodes: int) -> dict[str, float]:
    cluster = RayDogCluster(_spec("large", pools, nodes), client=_client(platform))
    platform.reset_api_calls()
    started = time.monotonic()
    cluster.build()
    build_s = time.monotonic() - started
    started = time.monotonic()
    cluster.shut_down()
    shutdown = time.monotonic() - started
    calls = sum(platform.api_calls().values())
    _wait_until_nothing_live(platform, timeout=600)
    return {"calls": calls, "build_s": build_s, "shutdown_s": shutdown}


def _client(platform: LocalPlatform):
    return platform.make_client(max_attempts=1, initial_interval=0.05, max_interval=0.1)


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
    args = parser.parse_args()
    repeats, pools, nodes, boot_s = (
        (1, 2, 2, 0.1) if args.smoke else (2, 10, 10, 1) if args.quick else FULL)
    with tempfile.TemporaryDirectory() as data_dir:
        templates = Path(data_dir) / "templates.toml"
        templates.write_text(TEMPLATES_TOML.format(boot_s=boot_s))
        with LocalPlatform(
            network="loopback", data_dir=Path(data_dir), templates=templates
        ) as platform:
            figures = _figures(platform, repeats, pools, nodes, boot_s,
                               named=FULL[1:] if args.smoke else None)
    if not args.json:
        print(
            f"RayDog Builder on simulated nodes ({pools} pools x {nodes} nodes):", file=sys.stderr
        )
    print(json.dumps(figures))


def _figures(
    platform: LocalPlatform, repeats: int, pools: int, nodes: int, boot_s: float,
    named: tuple[int, int, float] | None = None,
) -> dict[str, float]:
    """The figures, under keys that name the sizes measured, or `named` (pools, nodes, boot
    seconds): a smoke run's keys are the full run's."""
    key_pools, key_nodes, key_boot_s = named or (pools, nodes, boot_s)
    figures = {
        "build_overhead_s": round(build_overhead_s(platform, repeats), 4),
        f"build_api_requests_{key_boot_s}s_boot": build_api_requests(platform),
        "shutdown_s_1_pool": round(shutdown_s(platform, 1), 4),
        "shutdown_s_10_pools": round(shutdown_s(platform, 10), 4),
    }
    large = large_cluster(platform, pools, nodes)
    total = key_pools * key_nodes
    return figures | {
        f"api_calls_{total}_nodes": large["calls"],
        f"build_s_{total}_nodes": round(large["build_s"], 3),
        f"shutdown_s_{total}_nodes": round(large["shutdown_s"], 3),
    }


if __name__ == "__main__":
    main()
