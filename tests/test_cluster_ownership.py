"""The Builder ends only what it made and waits like a good API citizen: builds of one name do
not touch each other, failed removals and shutdowns can be retried, pools grow again after their
tasks ended, and a failing worker task ends a build at once."""

from __future__ import annotations

import threading
import time

import pytest
from cluster_helpers import (
    NAMESPACE,
    ONE_SECOND_BOOT,
    SIMULATED,
    SLOW_BOOT,
    fast_client,
    simulated_spec,
    start_platform,
)
from conftest import checked_use, wait_for
from yellowdog_client.model import TaskSearch, TaskStatus

from prefect_raydog.cluster import RayDogCluster, RayDogClusterProxy, sweep
from prefect_raydog.errors import (
    ClusterBuildError,
    ClusterBuildTimeout,
    ClusterShutdownError,
    ClusterStateError,
    NodeTaskFailed,
)
from prefect_raydog.spec import NodeGroupSpec, WorkerPoolSpec

POOL_SHUTDOWN = ("DELETE", "/workerPools/*")
COMPUTE_TERMINATION = ("PUT", "/compute/requirements/*/transition/TERMINATED")


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    local = start_platform(tmp_path_factory.mktemp("platform"))
    yield local
    local.stop()


@pytest.fixture
def client(platform):
    with checked_use(platform):
        yield fast_client(platform)


def _live_pool_ids(platform) -> set[str]:
    pools = platform.live_entities()["workerPools"]
    return {p["id"] for p in pools if p["status"] != "SHUTDOWN"}


def _live_tasks(client, cluster) -> list:
    search = TaskSearch(
        workRequirementId=cluster.work_requirement_id,
        statuses=[s for s in TaskStatus if not s.finished],
    )
    return client.work_client.get_tasks(search).list_all()


def test_a_second_build_of_one_name_fails_without_touching_the_first(platform, client):
    spec = simulated_spec(pools=2)
    with RayDogCluster(spec, client=client) as first:
        second = RayDogCluster(spec, client=client)
        # The second build's work requirement is submitted but never answered: its teardown
        # looks for it by its own build's name, not the cluster's name both share.
        platform.faults.add("503", "/work/requirements", "POST", count=1000)
        with pytest.raises(ClusterBuildError, match="submitting the work requirement"):
            second.build()
        platform.clear_faults()
        assert first.build_name != second.build_name
        requirement = client.work_client.get_work_requirement_by_id(first.work_requirement_id)
        assert not requirement.status.finished
        ours = {*first.worker_pool_ids, first.head_node_worker_pool_id}
        assert ours <= _live_pool_ids(platform)
        assert len(_live_tasks(client, first)) == 3


def test_a_failed_pool_removal_keeps_the_pool_for_a_retry_and_for_shut_down(platform, client):
    cluster = RayDogCluster(simulated_spec(pools=2), client=client)
    cluster.build()
    first = cluster.worker_pool_ids[0]
    for method, path in (POOL_SHUTDOWN, COMPUTE_TERMINATION):
        platform.faults.add("503", path, method, count=1000)
    with pytest.raises(ClusterShutdownError):
        cluster.remove_worker_pool(first)
    assert first in cluster.worker_pool_ids
    platform.clear_faults()
    report = cluster.shut_down()
    assert any(first in item for item in report.ended), report


def test_resize_grows_a_pool_whose_worker_tasks_have_all_ended(client):
    spec = simulated_spec(
        pools=0, worker_pools=[WorkerPoolSpec(template_id=SIMULATED, name="e", max_count=3)]
    )
    with RayDogCluster(spec, client=client) as cluster:
        (worker,) = [t for t in _live_tasks(client, cluster) if t.id != cluster.head_node_task_id]
        client.work_client.cancel_task_by_id(worker.id, True)
        wait_for(lambda: len(_live_tasks(client, cluster)) == 1, what="the worker task to end")
        cluster.resize_worker_pool("e", 2)
        workers = wait_for(
            lambda: [
                t
                for t in _live_tasks(client, cluster)
                if t.id != cluster.head_node_task_id and t.status == TaskStatus.EXECUTING
            ]
            if len(_live_tasks(client, cluster)) == 3
            else None,
            timeout=30,
            what="two new worker tasks to run",
        )
        assert len(workers) == 2


def test_a_pool_with_a_range_shrinks_to_nothing_and_grows_back(client):
    pool = WorkerPoolSpec(template_id=SIMULATED, name="r", min_count=0, max_count=2)
    cluster = RayDogCluster(simulated_spec(pools=0, worker_pools=[pool]), client=client)
    with pytest.raises(ClusterStateError, match="resize it after build"):
        cluster.resize_worker_pool("r", 1)

    def executing_workers(count: int) -> bool:
        tasks = [t for t in _live_tasks(client, cluster) if t.id != cluster.head_node_task_id]
        return len(tasks) == count and all(t.status == TaskStatus.EXECUTING for t in tasks)

    with cluster:
        assert executing_workers(0)
        with pytest.raises(ValueError, match="can have 0 to 2 nodes, not 3"):
            cluster.resize_worker_pool("r", 3)
        for size in (2, 0, 1, 0):
            # At once after each other: an aborted node task may still be ending.
            cluster.resize_worker_pool("r", size)
        wait_for(lambda: executing_workers(0), timeout=30, what="the pool's tasks to end")
        cluster.resize_worker_pool("r", 1)
        wait_for(lambda: executing_workers(1), timeout=30, what="a worker task in a new group")
        requirement = client.work_client.get_work_requirement_by_id(cluster.work_requirement_id)
        assert len(requirement.taskGroups) >= 3  # head, the pool's first group, a later one


def test_add_worker_pool_merges_keyword_fields_into_the_spec(client):
    cluster = RayDogCluster(simulated_spec(pools=0), client=client)
    cluster.add_worker_pool(WorkerPoolSpec(template_id=SIMULATED, name="a"), count=2, max_count=4)
    (group,) = cluster._workers
    assert (group.spec.name, group.spec.count, group.node_limit) == ("a", 2, 4)


def test_pools_added_at_once_each_keep_their_task_group(client):
    with RayDogCluster(simulated_spec(pools=0), client=client) as cluster:
        names = [f"p{number}" for number in range(4)]
        threads = [
            threading.Thread(
                target=cluster.add_worker_pool, kwargs={"template_id": SIMULATED, "name": name}
            )
            for name in names
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        requirement = client.work_client.get_work_requirement_by_id(cluster.work_requirement_id)
        assert len(requirement.taskGroups) == 1 + 4
        assert sorted(cluster.worker_pool_internal_names) == names


def test_a_build_timeout_of_zero_is_zero_not_the_spec_s(client):
    spec = simulated_spec(head=NodeGroupSpec(template_id=ONE_SECOND_BOOT, script="x"))
    with pytest.raises(ClusterBuildTimeout, match="did not start within 0:00:00"):
        RayDogCluster(spec, client=client).build(timeout=0)


def test_the_proxy_can_retry_after_a_partial_failure(platform, client):
    cluster = RayDogCluster(simulated_spec(pools=1), client=client)
    cluster.build()
    proxy = RayDogClusterProxy(fast_client(platform))
    proxy.load_saved_state_from_json(cluster.save_state_to_json())
    for method, path in (POOL_SHUTDOWN, COMPUTE_TERMINATION):
        platform.faults.add("503", path, method, count=1000)
    with pytest.raises(ClusterShutdownError):
        proxy.shut_down()
    platform.clear_faults()
    assert not proxy.shut_down().failed


def test_sweep_ends_what_it_can_and_reports_what_it_could_not(platform, client):
    built = RayDogCluster(simulated_spec(tag="sweep-errors"), client=client)
    built.build()
    half_built = RayDogCluster(simulated_spec(tag="sweep-errors"), client=client)
    half_built._provision(half_built._all_groups())
    platform.faults.add("503", "/compute/requirements/*", "GET", count=1000)
    report = sweep(fast_client(platform), NAMESPACE, "sweep-errors", everything=True)
    assert len(report.ended) == 1 + 3 * 2 and len(report.failed) == 3, report
    platform.clear_faults()
    assert len(sweep(fast_client(platform), NAMESPACE, "sweep-errors", everything=True).ended) == 6


def test_a_broken_worker_script_fails_the_build_at_once_with_its_error(client):
    # The other pool's node never boots, so the build would wait out its timeout.
    spec = simulated_spec(
        worker_pools=[
            WorkerPoolSpec(template_id="local/process", script="echo no; exit 3"),
            WorkerPoolSpec(template_id=SLOW_BOOT, script="x"),
        ],
        workers_to_join=2,
    )
    cluster = RayDogCluster(spec, client=client)
    started = time.monotonic()
    failed = r"A worker node .* \(PROCESS_NON_ZERO_EXIT, exit code 3"
    with pytest.raises(NodeTaskFailed, match=failed):
        cluster.build(timeout=600)
    # Far below the 600 s build timeout, however loaded the machine.
    assert time.monotonic() - started < 120


def test_a_build_whose_update_stream_fails_reads_the_requirement_instead(platform, client):
    platform.faults.add("503", "/work/requirements/*/updates", "GET", count=1000)
    with RayDogCluster(simulated_spec(pools=1), client=client) as cluster:
        assert cluster.head_node_private_ip
    platform.clear_faults()
    assert platform.api_calls().get("GET /work/requirements/{requirement_id}", 0) >= 1


def test_a_client_the_cluster_made_is_closed_after_a_failed_build(platform, client):
    spec = simulated_spec(head=NodeGroupSpec(template_id="nowhere/nothing", script="x"))
    cluster = RayDogCluster(
        spec, key_id=platform.key_id, key_secret=platform.key_secret, url=platform.url
    )
    closed = []
    close = cluster.yd_client.close
    cluster.yd_client.close = lambda: (closed.append(True), close())
    with pytest.raises(ClusterBuildError, match="nowhere/nothing"):
        cluster.build()
    assert closed == [True]
