"""Leak-free failure of the RayDog Builder: whatever goes wrong in build(), add_worker_pool() or
shut_down(), the error says what failed and nothing is left live on the platform."""

from __future__ import annotations

import _thread
import threading
import time

import pytest
from cluster_helpers import (
    SIMULATED,
    SLOW_BOOT,
    fast_client,
    simulated_spec,
    start_platform,
)
from conftest import assert_nothing_left, checked_use, wait_for
from yellowdog_client import PlatformClient
from yellowdog_client.model import ApiKey, RetryProperties, ServicesSchema

from prefect_raydog.cluster import RayDogCluster
from prefect_raydog.errors import (
    ClusterBuildError,
    ClusterBuildTimeout,
    ClusterShutdownError,
    KeyRefusedError,
    NodeTaskFailed,
)
from prefect_raydog.spec import NodeGroupSpec, WorkerPoolSpec

# Every call build() makes, as (method, path pattern) for fault injection.
BUILD_CALL_SITES = [
    ("POST", "/workerPools/provisioned/template"),
    ("POST", "/work/requirements"),
    ("POST", "/work/taskGroups/*/tasks"),
    ("GET", "/work/tasks/*"),
    ("GET", "/workerPools/nodes/*"),
]
SHUTDOWN_CALL_SITES = [
    ("PUT", "/work/requirements/*/transition/CANCELLING"),
    ("PUT", "/compute/requirements/*/transition/TERMINATED"),
    ("DELETE", "/workerPools/*"),
]


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    local = start_platform(tmp_path_factory.mktemp("platform"))
    yield local
    local.stop()


@pytest.fixture
def client(platform):
    with checked_use(platform):
        yield fast_client(platform)


def test_an_unknown_template_for_the_second_pool_fails_the_build_and_ends_the_rest(
    platform, client
):
    spec = simulated_spec(
        pools=1,
        worker_pools=[
            WorkerPoolSpec(template_id=SIMULATED, script="x"),
            WorkerPoolSpec(template_id="nowhere/nothing", name="gpu", script="x"),
        ],
    )
    cluster = RayDogCluster(spec, client=client)
    with pytest.raises(ClusterBuildError) as failure:
        cluster.build()
    message = str(failure.value)
    assert "pool 'gpu' from template 'nowhere/nothing'" in message
    assert "Unknown compute requirement template 'nowhere/nothing'" in message
    assert "Cleaned up: " in message and f"{cluster.build_name}-00-head" in message
    assert len(failure.value.cleaned_up) == 2 * 2 and not failure.value.not_cleaned_up
    # A shutdown after the failed build ends again only what the build's cleanup ended.
    report = cluster.shut_down()
    assert sorted(report.ended + report.already_gone) == sorted(failure.value.cleaned_up)
    assert not report.failed, report


def test_a_wrong_key_secret_fails_the_build_with_one_line_that_says_the_key_is_wrong(platform):
    schema = ServicesSchema(defaultUrl=platform.url, retry=RetryProperties(maxAttempts=1))
    wrong = PlatformClient.create(schema, ApiKey(platform.key_id, "not-the-secret"))
    cluster = RayDogCluster(simulated_spec(), client=wrong)
    with pytest.raises(KeyRefusedError) as failure:
        cluster.build()
    message = str(failure.value)
    assert "refused the application key" in message and "\n" not in message
    assert "COULD NOT" not in message and "not-the-secret" not in message
    assert cluster.shut_down() is not None
    assert_nothing_left(platform)


def test_a_build_timeout_ends_everything_and_says_what_it_waited_for(client):
    spec = simulated_spec(head=NodeGroupSpec(template_id=SLOW_BOOT, script="x"))
    cluster = RayDogCluster(spec, client=client)
    started = time.monotonic()
    with pytest.raises(
        ClusterBuildTimeout, match="head node .* did not start within 0:00:00.500000"
    ):
        cluster.build(timeout=0.5)
    # Far from the head's 600 s boot, with room for teardown on a loaded machine.
    assert time.monotonic() - started < 20
    assert isinstance(ClusterBuildTimeout("x"), TimeoutError)


def test_workers_that_never_join_time_out_the_build(client):
    spec = simulated_spec(
        worker_pools=[WorkerPoolSpec(template_id=SLOW_BOOT, count=2, script="x")], workers_to_join=1
    )
    with pytest.raises(ClusterBuildTimeout, match="Only 0 of the 1 required worker nodes"):
        RayDogCluster(spec, client=client).build(timeout=0.5)


@pytest.mark.parametrize("kind", ["503", "drop"])
@pytest.mark.parametrize(("method", "path"), BUILD_CALL_SITES)
def test_a_persistent_fault_at_any_build_call_fails_the_build_leaving_nothing(
    platform, client, kind, method, path
):
    platform.faults.add(kind, path, method, count=1000)
    cluster = RayDogCluster(simulated_spec(pools=2), client=client)
    with pytest.raises(ClusterBuildError, match="Cleaned up: |Nothing had been created") as failure:
        cluster.build()
    assert "503" in str(failure.value) or "Connection" in str(failure.value)
    assert " failed while " in str(failure.value) or "Provisioning the" in str(failure.value)
    platform.clear_faults()


@pytest.mark.parametrize(("method", "path"), BUILD_CALL_SITES)
def test_a_transient_fault_at_any_build_call_is_retried(platform, client, method, path):
    platform.faults.add("503", path, method, count=1)
    with RayDogCluster(simulated_spec(pools=2), client=client) as cluster:
        assert cluster.head_node_private_ip


@pytest.mark.parametrize("kind", ["503", "drop"])
@pytest.mark.parametrize(("method", "path"), SHUTDOWN_CALL_SITES)
def test_transient_faults_at_any_shutdown_call_still_end_everything(
    platform, client, kind, method, path
):
    cluster = RayDogCluster(simulated_spec(pools=2), client=client)
    cluster.build()
    # The SDK tries each call twice and the teardown three times: five faults are absorbed.
    platform.faults.add(kind, path, method, count=5)
    report = cluster.shut_down()
    assert not report.failed


def test_when_no_call_can_end_a_pool_shutdown_says_so_and_a_later_shutdown_finishes(
    platform, client
):
    cluster = RayDogCluster(simulated_spec(pools=1), client=client)
    cluster.build()
    for method, path in SHUTDOWN_CALL_SITES[1:]:
        platform.faults.add("503", path, method, count=1000)
    with pytest.raises(ClusterShutdownError, match="Could not end everything") as failure:
        cluster.shut_down()
    assert len(failure.value.not_ended) == 2 * 2
    assert "sweep()" in str(failure.value)
    platform.clear_faults()
    assert not cluster.shut_down().failed


def _when(condition, action) -> None:
    """Run `action` on another thread as soon as `condition()` holds."""

    def run() -> None:
        wait_for(condition, timeout=120, what="the moment to act")
        action()

    threading.Thread(target=run, daemon=True).start()


def _requirement_submitted(platform, cluster) -> bool:
    live = platform.live_entities()["workRequirements"]
    return any(r["name"] == cluster.build_name for r in live)


def test_keyboard_interrupt_during_build_ends_everything_then_propagates(platform, client):
    spec = simulated_spec(head=NodeGroupSpec(template_id=SLOW_BOOT, script="x"))
    cluster = RayDogCluster(spec, client=client)
    _when(lambda: _requirement_submitted(platform, cluster), _thread.interrupt_main)
    with pytest.raises(KeyboardInterrupt):
        cluster.build(timeout=30)
    assert cluster.work_requirement_id is not None


def test_keyboard_interrupt_while_pools_are_being_provisioned_ends_the_late_ones_too(
    platform, client
):
    # The interrupt lands while every provisioning call waits out a throttle; the calls still
    # in flight finish and are torn down with the rest.
    platform.faults.add(
        "429", "/workerPools/provisioned/template", "POST", count=3, retry_after_s=1
    )
    cluster = RayDogCluster(simulated_spec(pools=2), client=client)
    route = "POST /workerPools/provisioned/template"
    before = platform.api_calls().get(route, 0)
    _when(lambda: platform.api_calls().get(route, 0) >= before + 3, _thread.interrupt_main)
    with pytest.raises(KeyboardInterrupt):
        cluster.build(timeout=30)
    assert cluster.head_node_worker_pool_id is not None


def test_shut_down_from_another_thread_stops_a_build_in_progress(platform, client):
    spec = simulated_spec(head=NodeGroupSpec(template_id=SLOW_BOOT, script="x"))
    cluster = RayDogCluster(spec, client=client)
    _when(lambda: _requirement_submitted(platform, cluster), cluster.shut_down)
    with pytest.raises(ClusterBuildError, match="was shut down while being built"):
        cluster.build(timeout=30)


def test_a_failed_add_worker_pool_ends_only_the_new_pool(platform, client):
    with RayDogCluster(simulated_spec(pools=1), client=client) as cluster:
        before = len(platform.live_entities()["workerPools"])
        platform.faults.add("503", "/work/requirements", "PUT", count=1000)
        with pytest.raises(ClusterBuildError, match="Adding worker pool 'extra' failed"):
            cluster.add_worker_pool(template_id=SIMULATED, name="extra", script="x")
        platform.clear_faults()
        assert cluster.worker_pool_internal_names == ["worker-nodes-01"]
        deadline = time.monotonic() + 10
        while len(_live_pools(platform)) != before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_live_pools(platform)) == before


def _live_pools(platform) -> list:
    return [p for p in platform.live_entities()["workerPools"] if p["status"] != "SHUTDOWN"]


def test_a_head_task_that_exits_1_fails_the_build_with_its_exit_code(client):
    spec = simulated_spec(
        head=NodeGroupSpec(template_id="local/process", script="sleep 0.5; exit 1"),
        worker_pools=[WorkerPoolSpec(template_id=SLOW_BOOT, script="x")],
        workers_to_join=1,
    )
    cluster = RayDogCluster(spec, client=client)
    with pytest.raises(NodeTaskFailed, match=r"ended FAILED \(PROCESS_NON_ZERO_EXIT, exit code 1"):
        cluster.build(timeout=60)
    assert cluster.head_node_private_ip is not None


@pytest.mark.parametrize(("method", "path"), SHUTDOWN_CALL_SITES)
def test_a_persistent_fault_at_one_shutdown_call_is_covered_by_the_others(
    platform, client, method, path
):
    # Cancelling the work requirement, terminating a compute requirement and shutting down
    # its pool each end the cluster's nodes, so one of them failing leaves nothing running.
    cluster = RayDogCluster(simulated_spec(pools=1), client=client)
    cluster.build()
    platform.faults.add("503", path, method, count=1000)
    assert not cluster.shut_down().failed
    platform.clear_faults()


def test_aborting_a_node_task_that_ended_meanwhile_leaves_it_as_it_ended(platform, client):
    """`ray down` stops a node's Ray before it ends the node's task: the task may have ended by
    then, and YellowDog refuses to cancel a finished task."""
    from yellowdog_client.model import TaskSearch, TaskStatus

    from prefect_raydog.cluster.nodes import abort_task

    with RayDogCluster(simulated_spec(pools=1, nodes=2), client=client) as cluster:
        tasks = [task for task in client.work_client.get_tasks(
            TaskSearch(workRequirementId=cluster.work_requirement_id)).iterate()
            if task.id != cluster.head_node_task_id]
        ended, live = tasks
        platform.kill_node(client.work_client.get_task_by_id(ended.id).nodeId)
        wait_for(lambda: client.work_client.get_task_by_id(ended.id).status.finished,
                 timeout=30, what="the killed node's task to end")
        abort_task(client, ended.id)
        abort_task(client, live.id)
        assert client.work_client.get_task_by_id(ended.id).status == TaskStatus.FAILED
        wait_for(lambda: client.work_client.get_task_by_id(live.id).status.finished,
                 timeout=30, what="the aborted task to end")
