"""The RayDog Builder with real processes on the local platform's open process nodes, which a
driver in the cluster's network reaches at their private addresses: the scripts' dashboard on
the head's loopback only, a head that ends its cluster once its driver left, and a driver killed
with SIGKILL whose cluster is ended by the platform-side backstop or by sweep. (The Builder on a
YellowDog account's path, sealed nodes behind a firewall: tests/test_cluster_sealed.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from cluster_helpers import NAMESPACE, assert_nothing_left, fast_client, unique_name
from conftest import wait_for

from prefect_raydog.cluster import RayDogCluster, sweep, wait_for_ray_nodes
from prefect_raydog.spec import ClusterSpec, NodeGroupSpec, WorkerPoolSpec


def _connect_ray(address: str):
    import ray

    for attempt in range(3):
        try:
            return ray.init(address, logging_level="WARNING")
        except ConnectionError:
            if attempt == 2:
                raise
            time.sleep(2)


_DRIVER = textwrap.dedent(
    """
    import os, sys, time
    from datetime import timedelta
    from prefect_raydog.cluster import RayDogCluster
    from prefect_raydog.spec import ClusterSpec, NodeGroupSpec, WorkerPoolSpec

    script = "trap 'exit 0' TERM; sleep 600 & wait"
    group = {"template_id": "local/process", "script": script}
    spec = ClusterSpec(
        name=sys.argv[1], namespace=sys.argv[2], tag=sys.argv[3],
        head=NodeGroupSpec(**group), worker_pools=[WorkerPoolSpec(**group)],
        cluster_lifetime=timedelta(seconds=float(sys.argv[4])),
        idle_node_shutdown=timedelta(seconds=1), idle_pool_shutdown=timedelta(seconds=1),
        workers_to_join=1,
    )
    cluster = RayDogCluster(
        spec, key_id=os.environ["YD_KEY_ID"], key_secret=os.environ["YD_KEY_SECRET"],
        url=os.environ["YD_URL"],
    )
    cluster.build()
    print("built", flush=True)
    time.sleep(3600)
    """
)


def _build_in_a_driver_then_kill_it(platform, tag: str, lifetime_s: float) -> None:
    env = {
        **os.environ,
        "YD_KEY_ID": platform.key_id,
        "YD_KEY_SECRET": platform.key_secret,
        "YD_URL": platform.url,
    }
    driver = subprocess.Popen(
        [sys.executable, "-c", _DRIVER, unique_name("killed"), NAMESPACE, tag, str(lifetime_s)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert driver.stdout.readline().strip() == "built"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert platform.live_entities()["processes"]


def test_a_killed_driver_s_cluster_is_ended_by_the_platform_backstop(platform):
    _build_in_a_driver_then_kill_it(platform, "backstop", lifetime_s=3)
    # Task timeout (cluster lifetime) ends the node tasks, idle node and pool shutdown the rest.
    assert_nothing_left(platform, timeout=30)


def test_sweep_all_ends_a_killed_driver_s_cluster_at_once(platform):
    # Its head still runs Ray, so a plain sweep counts it healthy; --all ends it at once.
    _build_in_a_driver_then_kill_it(platform, "swept", lifetime_s=3600)
    assert not sweep(fast_client(platform), NAMESPACE, "swept").ended
    started = time.monotonic()
    report = sweep(fast_client(platform), NAMESPACE, "swept", everything=True)
    assert len(report.ended) == 1 + 2 * 2
    assert_nothing_left(platform, timeout=20)
    assert time.monotonic() - started < 20


@pytest.mark.ray
def test_the_scripts_defaults_serve_the_dashboard_on_the_heads_loopback_only(platform):
    """The package's head.sh and worker.sh with their YellowDog defaults: the dashboard answers
    on the head itself, and a job submission from the host to the head's address finds nothing
    listening."""
    import urllib.error
    import urllib.request

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def dashboard_version() -> bytes:  # nested: shipped by value, run on the head
        with urllib.request.urlopen("http://127.0.0.1:8265/api/version", timeout=10) as answer:
            return answer.read()

    node = {"template_id": "local/process", "environment": {"RAYDOG_VENV": sys.prefix}}
    spec = ClusterSpec(
        name=unique_name("defaults"),
        namespace=NAMESPACE,
        head=NodeGroupSpec(**node),
        worker_pools=[WorkerPoolSpec(**node)],
        workers_to_join=1,
    )
    with RayDogCluster(spec, client=fast_client(platform)) as cluster:
        head_ip = cluster.head_node_private_ip
        _connect_ray(f"ray://{head_ip}:10001")
        try:
            wait_for_ray_nodes(2, timeout=120)
            (head,) = [n["NodeID"] for n in ray.nodes() if n["NodeManagerAddress"] == head_ip]
            on_head = NodeAffinitySchedulingStrategy(head, soft=False)
            version = ray.remote(num_cpus=0)(dashboard_version)
            assert b"ray_version" in ray.get(version.options(scheduling_strategy=on_head).remote())
        finally:
            ray.shutdown()
        submission = urllib.request.Request(
            f"http://{head_ip}:8265/api/jobs/", data=b'{"entrypoint": "id"}', method="POST",
            headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.URLError) as refused:
            urllib.request.urlopen(submission, timeout=10)
        assert isinstance(refused.value.reason, ConnectionRefusedError)


# Short, so the test waits for the watch with time to spare; the runner's default is 60 s.
_GRACE_S = 4.0


def _node_task_statuses(platform, cluster: RayDogCluster) -> list[str]:
    from yellowdog_client.model import TaskSearch

    tasks = platform.client.work_client.get_tasks(
        TaskSearch(workRequirementId=cluster.work_requirement_id)).iterate()
    return sorted(str(task.status.value) for task in tasks)


@pytest.mark.ray
def test_a_watched_head_outlives_an_idle_driver_then_ends_the_cluster_once_it_left(platform):
    """A head started with the runner's driver watch: a connected driver idle for several grace
    periods keeps every node task running; once it disconnects, the head task ends after the
    grace, and the worker tasks with it."""
    import ray

    from prefect_raydog.runner.guardian import with_driver_watch

    spec = ClusterSpec.for_local_platform(unique_name("watched"), NAMESPACE, workers_to_join=1)
    spec = with_driver_watch(spec, grace_s=_GRACE_S, first_within_s=300)
    with RayDogCluster(spec, client=fast_client(platform)) as cluster:
        _connect_ray(f"ray://{cluster.head_node_private_ip}:10001")
        try:
            wait_for_ray_nodes(2, timeout=120)
            time.sleep(3 * _GRACE_S)  # idle, connected
            assert _node_task_statuses(platform, cluster) == ["EXECUTING", "EXECUTING"]
        finally:
            ray.shutdown()
        left = time.monotonic()
        wait_for(lambda: all(s in ("COMPLETED", "FAILED", "ABORTED", "CANCELLED")
                             for s in _node_task_statuses(platform, cluster)),
                 timeout=120, interval=0.2, what="the node tasks to end")
        print(f"node tasks ended {time.monotonic() - left:.1f} s after the "
              f"driver left (grace {_GRACE_S:g} s)")
