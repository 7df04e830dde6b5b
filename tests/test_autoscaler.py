"""The RayDog Autoscaler end to end on the local platform: `ray up` from the example YAML in
`docs/examples`, Ray's own autoscaler on the head node using RayDogNodeProvider, `ray submit`,
scale-up and idle scale-down, no secret in any YellowDog document, and `ray down` leaving
nothing. One cluster serves the tests of this module, in order."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from autoscaler_helpers import RayCluster
from conftest import assert_nothing_left, wait_for
from process_nodes import node_networking
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    STATUS_UP_TO_DATE,
    TAG_RAY_LAUNCH_CONFIG,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_STATUS,
)
from yellowdog_client.model import (
    NodeSearch,
    NodeStatus,
    TaskSearch,
    TaskStatus,
    WorkerPoolSearch,
    WorkRequirementSearch,
)

from prefect_raydog.local import LocalPlatform

pytestmark = pytest.mark.ray

RESTARTED_MONITORS_VIEW = """
import json, os, yaml
from prefect_raydog.autoscaler import RayDogNodeProvider

config = yaml.safe_load(open(os.path.expanduser("~/ray_bootstrap_config.yaml")))
provider = RayDogNodeProvider(config["provider"], config["cluster_name"])
print("VIEW", json.dumps({n: provider.node_tags(n) for n in provider.non_terminated_nodes({})}))
"""

NEEDS_THREE_CPUS = """
import time
import ray

ray.init()

@ray.remote(num_cpus=1)
def hold():
    time.sleep(20)
    return ray.get_runtime_context().get_node_id()

print("NODES", len(set(ray.get([hold.remote() for _ in range(3)]))))
"""


@pytest.fixture(scope="module")
def cluster(local_platform: LocalPlatform, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[RayCluster]:
    if local_platform.runner is None or local_platform.runner.network.mode != "bridge":
        pytest.fail("the autoscaler tests need process nodes on a bridge (root)")
    bridge = local_platform.runner.network.bridge
    ray_cluster = RayCluster(local_platform, tmp_path_factory.mktemp("autoscaler"))
    try:
        ray_cluster.up()
        yield ray_cluster
    finally:
        if _live_requirements(ray_cluster):
            ray_cluster.down()
    assert_nothing_left(local_platform, timeout=60)
    wait_for(lambda: node_networking(bridge) == [], 30, what="the nodes' namespaces to go")


def _live_requirements(cluster: RayCluster) -> list:
    work = cluster.platform.client.work_client
    return [summary for summary in work.get_work_requirements(
        WorkRequirementSearch(namespace=cluster.namespace)).iterate()
        if not summary.status.finished]


def _pools(cluster: RayCluster) -> dict[str, str]:
    """Live pool name -> id in the cluster's namespace."""
    pools = cluster.platform.client.worker_pool_client
    return {pool.name: pool.id for pool in pools.get_worker_pools(
        WorkerPoolSearch(namespace=cluster.namespace)).iterate() if not pool.status.finished}


def _running_nodes(cluster: RayCluster, pool_id: str) -> int:
    pools = cluster.platform.client.worker_pool_client
    return sum(1 for node in pools.get_nodes(NodeSearch(workerPoolId=pool_id)).iterate()
               if node.status == NodeStatus.RUNNING)


def test_ray_up_makes_one_work_requirement_whose_head_runs_rays_autoscaler(
        cluster: RayCluster) -> None:
    (requirement,) = _live_requirements(cluster)
    assert requirement.name.startswith("raydog-local-") and len(requirement.name) == 21
    cluster_id = requirement.name[-8:]
    assert list(_pools(cluster)) == [f"raydog-local-{cluster_id}-head"]
    # `ray up` returns once the head node runs; its task starts Ray a few seconds later.
    wait_for(lambda: "Node status" in cluster.ray("exec", str(cluster.path), "ray status",
                                                  check=False).stdout,
             120, interval=2.0, what="ray status to answer on the head")
    monitor = cluster.exec("cat /tmp/ray/session_latest/logs/monitor.log")
    assert "prefect_raydog.autoscaler.RayDogNodeProvider" in monitor


def test_a_job_needing_three_cpus_scales_workers_up_then_idle_ones_down(
        cluster: RayCluster, tmp_path: Path) -> None:
    script = tmp_path / "needs_three_cpus.py"
    script.write_text(NEEDS_THREE_CPUS)
    result = cluster.ray("submit", str(cluster.path), str(script), timeout=300)
    assert "NODES 3" in result.stdout

    work = cluster.platform.client.work_client
    (requirement,) = _live_requirements(cluster)
    workers = [task for task in work.get_tasks(TaskSearch(
        workRequirementId=requirement.id)).iterate() if task.name.startswith("cpu-")]
    assert len(workers) >= 3
    pool_id = next(pid for name, pid in _pools(cluster).items() if name.endswith("-cpu"))

    def scaled_down() -> bool:
        tasks = work.get_tasks(TaskSearch(workRequirementId=requirement.id)).iterate()
        live = [t for t in tasks if t.name.startswith("cpu-") and not t.status.finished]
        return not live and _running_nodes(cluster, pool_id) == 0

    wait_for(scaled_down, 120, interval=1.0, what="idle workers to be removed, pool to shrink")
    ended = [work.get_task_by_id(task.id).status for task in workers]
    assert all(status == TaskStatus.ABORTED for status in ended), ended


def test_no_secret_in_any_yellowdog_document(cluster: RayCluster) -> None:
    client = cluster.platform.client
    secret = cluster.platform.key_secret
    (requirement,) = _live_requirements(cluster)
    documents = [client.work_client.get_work_requirement_by_id(requirement.id)]
    documents += list(client.work_client.get_tasks(
        TaskSearch(workRequirementId=requirement.id)).iterate())
    for pool_id in _pools(cluster).values():
        pool = client.worker_pool_client.get_worker_pool_by_id(pool_id)
        documents += [pool, client.compute_client.get_compute_requirement_by_id(
            pool.computeRequirementId)]
    text = json.dumps([repr(document) for document in documents])
    assert cluster.platform.key_id in cluster.exec("cat ~/.raydog/credentials.json")
    assert secret not in text
    assert "-rw-------" in cluster.exec("ls -l ~/.raydog/credentials.json")


def test_a_second_ray_up_reattaches_to_the_running_cluster(cluster: RayCluster) -> None:
    (before,) = _live_requirements(cluster)
    result = cluster.up()
    assert "No head node found" not in result.stdout + result.stderr
    (after,) = _live_requirements(cluster)
    assert after.id == before.id


def test_a_restarted_monitor_finds_the_same_nodes_and_tags(
        cluster: RayCluster, tmp_path: Path) -> None:
    script = tmp_path / "view.py"
    script.write_text(RESTARTED_MONITORS_VIEW)
    output = cluster.ray("submit", str(cluster.path), str(script)).stdout
    view = json.loads(output.split("VIEW ", 1)[1].splitlines()[0])
    work = cluster.platform.client.work_client
    (requirement,) = _live_requirements(cluster)
    head_tasks = [task.id for task in work.get_tasks(TaskSearch(
        workRequirementId=requirement.id)).iterate() if not task.status.finished]
    assert sorted(view) == sorted(head_tasks), (view, head_tasks)
    (tags,) = view.values()
    # Written by `ray up` on this machine, read by a new provider on the head.
    assert tags[TAG_RAY_NODE_KIND] == NODE_KIND_HEAD
    assert tags[TAG_RAY_NODE_STATUS] == STATUS_UP_TO_DATE and tags[TAG_RAY_LAUNCH_CONFIG]


def test_ray_down_leaves_nothing(cluster: RayCluster) -> None:
    cluster.down()
    assert not _live_requirements(cluster)
    deadline = time.monotonic() + 60
    while _pools(cluster) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _pools(cluster) == {}
