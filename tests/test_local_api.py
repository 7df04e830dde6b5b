"""The local platform through the unmodified yellowdog-sdk: every call RayDog and the Airflow
provider make (contract section 1), its errors, faults, and the status machines, on simulated
nodes."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from conftest import sdk_event_streams, wait_for
from yellowdog_client import PlatformClient
from yellowdog_client.common.json import Json
from yellowdog_client.common.server_sent_events import SubscriptionEventListener
from yellowdog_client.model import (
    ApiKey,
    AutoShutdown,
    ComputeRequirementStatus,
    ComputeRequirementTemplateUsage,
    InstanceSearch,
    NodeSearch,
    NodeStatus,
    NodeWorkerTarget,
    NodeWorkerTargetType,
    ProvisionedWorkerPool,
    ProvisionedWorkerPoolProperties,
    RunSpecification,
    ServicesSchema,
    SliceReference,
    Task,
    TaskGroup,
    TaskGroupStatus,
    TaskSearch,
    TaskStatus,
    WorkerPoolSearch,
    WorkerPoolStatus,
    WorkRequirement,
    WorkRequirementSearch,
    WorkRequirementStatus,
)
from yellowdog_client.model.exceptions import InvalidRequestException, NotAuthorisedException

from prefect_raydog.local import LocalPlatform

EXAMPLES = Path(__file__).parent / "data" / "yellowdog-examples"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Workspace:
    """Creates pools and work requirements through the SDK and tears them all down."""

    def __init__(self, platform: LocalPlatform, client: PlatformClient) -> None:
        self.platform, self.client = platform, client
        self.namespace = unique("ns")
        self.pools: list[ProvisionedWorkerPool] = []
        self.requirements: list[str] = []

    def provision(
        self,
        count: int = 1,
        tag: str | None = "tag",
        template: str = "local/simulated",
        **properties,
    ) -> ProvisionedWorkerPool:
        properties.setdefault("maxNodes", max(count, 1))
        pool = self.client.worker_pool_client.provision_worker_pool(
            ComputeRequirementTemplateUsage(
                templateId=template,
                requirementName=unique("pool"),
                requirementNamespace=self.namespace,
                targetInstanceCount=count,
            ),
            ProvisionedWorkerPoolProperties(
                createNodeWorkers=NodeWorkerTarget(NodeWorkerTargetType.PER_NODE, 1),
                workerTag=tag,
                **properties,
            ),
        )
        self.pools.append(pool)
        return pool

    def group(self, name: str = "g", tag: str | None = "tag", **options) -> TaskGroup:
        timeout = options.pop("taskTimeout", timedelta(minutes=10))
        return TaskGroup(
            name=name,
            runSpecification=RunSpecification(
                taskTypes=["bash"],
                workerTags=[tag] if tag else None,
                namespaces=[self.namespace],
                taskTimeout=timeout,
            ),
            **options,
        )

    def requirement(self, *groups: TaskGroup) -> WorkRequirement:
        requirement = self.client.work_client.add_work_requirement(
            WorkRequirement(
                namespace=self.namespace, name=unique("wr"), taskGroups=list(groups) or None
            )
        )
        self.requirements.append(requirement.id)
        return requirement

    def add_tasks(self, group_id: str, count: int, **fields) -> list[Task]:
        tasks = [
            Task(
                name=f"task-{n}",
                taskType="bash",
                arguments=["taskdata.txt"],
                taskData="sleep 1000",
                **fields,
            )
            for n in range(count)
        ]
        return self.client.work_client.add_tasks_to_task_group_by_id(group_id, tasks)

    def task(self, task_id: str) -> Task:
        return self.client.work_client.get_task_by_id(task_id)

    def wait_task(self, task_id: str, *statuses: TaskStatus, timeout: float = 10) -> Task:
        return wait_for(
            lambda: (t := self.task(task_id)).status in statuses and t,
            timeout,
            what=f"task {task_id} to be {statuses}",
        )

    def wait_pool(self, pool_id: str, *statuses: WorkerPoolStatus, timeout: float = 10):
        pools = self.client.worker_pool_client
        return wait_for(
            lambda: (p := pools.get_worker_pool_by_id(pool_id)).status in statuses and p,
            timeout,
            what=f"pool {pool_id} to be {statuses}",
        )

    def close(self) -> None:
        for requirement_id in self.requirements:
            status = self.client.work_client.get_work_requirement_by_id(requirement_id).status
            if not status.finished:
                self.client.work_client.cancel_work_requirement_by_id(requirement_id, True)
        for pool in self.pools:
            self.client.worker_pool_client.shutdown_worker_pool_by_id(pool.id)


@pytest.fixture
def yd(platform: LocalPlatform) -> Iterator[Workspace]:
    workspace = Workspace(platform, platform.make_client(max_attempts=3, initial_interval=0.05))
    try:
        yield workspace
    finally:
        workspace.close()


# ---- worker pools, nodes, instances, compute requirements (B1, B5-B8, B12, B13, A16, A17) ----


def test_provisioned_pool_has_running_nodes_whose_instances_match(yd: Workspace) -> None:
    pool = yd.provision(count=2)
    assert isinstance(pool, ProvisionedWorkerPool) and pool.id.startswith("ydid:wrkrpool:000000:")
    pool = yd.wait_pool(pool.id, WorkerPoolStatus.IDLE)
    assert isinstance(pool, ProvisionedWorkerPool)
    nodes = yd.client.worker_pool_client.find_nodes(NodeSearch(workerPoolId=pool.id))
    assert [node.status.name for node in nodes] == ["RUNNING", "RUNNING"]
    instances = yd.client.compute_client.get_instances(
        InstanceSearch(computeRequirementId=pool.computeRequirementId)
    ).list_all()
    by_id = {instance.id.instanceId: instance for instance in instances}
    for node in nodes:
        instance = by_id[node.details.instanceId]
        assert type(instance).__name__ == "SimulatorInstance"
        assert instance.publicIpAddress == node.details.privateIpAddress == "127.0.0.1"
        assert node.workers[0].id == node.id.replace(":node:", ":wrkr:") + ":1"
        assert node.details.supportedTaskTypes == ["bash"]
    same = yd.client.worker_pool_client.get_worker_pool_by_name(yd.namespace, pool.name)
    assert same.id == pool.id
    requirement = yd.client.compute_client.get_compute_requirement_by_id(pool.computeRequirementId)
    assert requirement.status == ComputeRequirementStatus.RUNNING
    assert type(requirement.provisionStrategy).__name__ == "SingleSourceProvisionStrategy"


def test_terminating_the_compute_requirement_terminates_pool_nodes_and_instances(
    yd: Workspace,
) -> None:
    pool = yd.wait_pool(yd.provision(count=2).id, WorkerPoolStatus.IDLE)
    compute = yd.client.compute_client
    compute.terminate_compute_requirement_by_id(pool.computeRequirementId)
    yd.wait_pool(pool.id, WorkerPoolStatus.TERMINATED)
    requirement = compute.get_compute_requirement_by_name(yd.namespace, pool.name)
    assert requirement.status == ComputeRequirementStatus.TERMINATED
    instances = compute.get_instances(
        InstanceSearch(computeRequirementId=pool.computeRequirementId)
    ).list_all()
    assert {instance.status.name for instance in instances} == {"TERMINATED"}
    # RayDog's teardown makes both calls in either order: the second one is accepted.
    yd.client.worker_pool_client.shutdown_worker_pool_by_id(pool.id)
    compute.terminate_compute_requirement_by_id(pool.computeRequirementId)


def test_pool_shutdown_aborts_tasks_and_terminates_its_compute_requirement(yd: Workspace) -> None:
    pool = yd.provision(count=1)
    requirement = yd.requirement(yd.group())
    task = yd.add_tasks(requirement.taskGroups[0].id, 1)[0]
    yd.wait_task(task.id, TaskStatus.EXECUTING)
    yd.client.worker_pool_client.shutdown_worker_pool_by_id(pool.id)
    assert yd.wait_task(task.id, TaskStatus.ABORTED).finishedTime is not None
    yd.wait_pool(pool.id, WorkerPoolStatus.TERMINATED)
    compute = yd.client.compute_client.get_compute_requirement_by_id(pool.computeRequirementId)
    assert compute.status == ComputeRequirementStatus.TERMINATED
    yd.client.worker_pool_client.shutdown_worker_pool_by_id(pool.id)


def test_duplicate_live_pool_name_is_an_invalid_request(yd: Workspace) -> None:
    pool = yd.provision(count=0)
    with pytest.raises(InvalidRequestException, match="already exists"):
        yd.client.worker_pool_client.provision_worker_pool(
            ComputeRequirementTemplateUsage(
                templateId="local/simulated",
                requirementName=pool.name,
                requirementNamespace=yd.namespace,
            ),
            ProvisionedWorkerPoolProperties(),
        )


def test_unknown_template_is_an_invalid_request_naming_it(yd: Workspace) -> None:
    with pytest.raises(InvalidRequestException, match="'yd-demo/nothing'"):
        yd.provision(template="yd-demo/nothing")
    assert yd.platform.live_entities()["workerPools"] == []


def test_search_worker_pools_by_namespace_and_status(yd: Workspace) -> None:
    pools = [yd.provision(count=1) for _ in range(3)]
    for pool in pools:
        yd.wait_pool(pool.id, WorkerPoolStatus.IDLE)
    yd.client.worker_pool_client.shutdown_worker_pool_by_id(pools[0].id)
    yd.wait_pool(pools[0].id, WorkerPoolStatus.TERMINATED)
    usable = [
        WorkerPoolStatus.EMPTY,
        WorkerPoolStatus.IDLE,
        WorkerPoolStatus.PENDING,
        WorkerPoolStatus.RUNNING,
        WorkerPoolStatus.CONFIGURING,
    ]
    found = yd.client.worker_pool_client.get_worker_pools(
        WorkerPoolSearch(namespace=yd.namespace, statuses=usable)
    ).list_all()
    assert [summary.id for summary in found] == [pools[1].id, pools[2].id]
    assert found[0].registeredNodeCount == 1 and found[0].status == WorkerPoolStatus.IDLE


# ---- work requirements and tasks (B2-B4, B9-B11, A1-A3, A6-A15, A18) -------------------------


def test_work_requirement_keeps_task_group_order_and_reads_back_by_id_and_name(
    yd: Workspace,
) -> None:
    names = ["head-node", "worker-nodes-01", "worker-nodes-02"]
    requirement = yd.requirement(*(yd.group(name) for name in names))
    assert requirement.id.startswith("ydid:workreq:000000:")
    assert [group.name for group in requirement.taskGroups] == names
    wr_uuid = requirement.id.split(":")[-1]
    assert [group.id for group in requirement.taskGroups] == [
        f"ydid:taskgrp:000000:{wr_uuid}:{n}" for n in (1, 2, 3)
    ]
    assert requirement.status == WorkRequirementStatus.RUNNING
    assert requirement.taskGroups[0].runSpecification.taskTimeout == timedelta(minutes=10)
    by_name = yd.client.work_client.get_work_requirement_by_name(yd.namespace, requirement.name)
    assert by_name.id == requirement.id
    assert [g.status for g in by_name.taskGroups] == [TaskGroupStatus.PENDING] * 3


def test_tasks_are_returned_in_order_and_reach_executing_on_a_matching_worker(
    yd: Workspace,
) -> None:
    pool = yd.provision(count=2)
    requirement = yd.requirement(yd.group())
    tasks = yd.add_tasks(requirement.taskGroups[0].id, 3)
    assert [task.name for task in tasks] == ["task-0", "task-1", "task-2"]
    assert tasks[0].id == requirement.taskGroups[0].id.replace(":taskgrp:", ":task:") + ":1"
    running = [yd.wait_task(task.id, TaskStatus.EXECUTING) for task in tasks[:2]]
    assert yd.task(tasks[2].id).status == TaskStatus.READY
    node = yd.client.worker_pool_client.get_node_by_worker_id(running[0].workerId)
    assert node.id == running[0].nodeId and node.workerPoolId == pool.id
    assert yd.client.worker_pool_client.get_node_by_id(node.id).details.privateIpAddress
    group = yd.client.work_client.get_work_requirement_by_id(requirement.id).taskGroups[0]
    assert group.status == TaskGroupStatus.RUNNING
    assert group.taskSummary.statusCounts == {TaskStatus.EXECUTING: 2, TaskStatus.READY: 1}


def test_tasks_wait_for_a_pool_with_the_right_worker_tag(yd: Workspace) -> None:
    yd.provision(count=1, tag="other")
    requirement = yd.requirement(yd.group())
    task = yd.add_tasks(requirement.taskGroups[0].id, 1)[0]
    yd.wait_pool(yd.pools[0].id, WorkerPoolStatus.IDLE)
    assert yd.task(task.id).status == TaskStatus.READY


def test_update_appends_a_group_and_keeps_server_statuses(yd: Workspace) -> None:
    yd.provision(count=1)
    requirement = yd.requirement(yd.group("head-node"))
    task = yd.add_tasks(requirement.taskGroups[0].id, 1)[0]
    yd.wait_task(task.id, TaskStatus.EXECUTING)
    current = yd.client.work_client.get_work_requirement_by_id(requirement.id)
    current.taskGroups.append(yd.group("worker-nodes-01", tag="workers"))
    current.status = WorkRequirementStatus.HELD
    updated = yd.client.work_client.update_work_requirement(current)
    assert [g.name for g in updated.taskGroups] == ["head-node", "worker-nodes-01"]
    assert updated.status == WorkRequirementStatus.RUNNING
    assert updated.taskGroups[0].status == TaskGroupStatus.RUNNING
    assert updated.taskGroups[-1].id.endswith(":2")


def test_cancel_with_abort_aborts_executing_and_cancels_waiting_tasks(yd: Workspace) -> None:
    yd.provision(count=1)
    requirement = yd.requirement(yd.group())
    tasks = yd.add_tasks(requirement.taskGroups[0].id, 2)
    yd.wait_task(tasks[0].id, TaskStatus.EXECUTING)
    work = yd.client.work_client
    work.cancel_work_requirement_by_id(requirement.id, abort=True)
    assert yd.task(tasks[0].id).status == TaskStatus.ABORTED
    assert yd.task(tasks[1].id).status == TaskStatus.CANCELLED
    cancelled = work.get_work_requirement_by_id(requirement.id)
    assert cancelled.status == WorkRequirementStatus.CANCELLED
    assert cancelled.taskGroups[0].status == TaskGroupStatus.CANCELLED
    with pytest.raises(requests.HTTPError) as error:
        work.cancel_work_requirement_by_id(requirement.id, abort=True)
    assert error.value.response.status_code == 403
    assert "InvalidWorkRequirementStatusException" in str(error.value)
    assert "invalid transition from cancelled to cancelling" in str(error.value).lower()


def test_cancel_without_abort_waits_for_executing_tasks_then_abort_from_cancelling(
    yd: Workspace,
) -> None:
    yd.provision(count=1)
    requirement = yd.requirement(yd.group())
    task = yd.add_tasks(requirement.taskGroups[0].id, 1)[0]
    yd.wait_task(task.id, TaskStatus.EXECUTING)
    work = yd.client.work_client
    work.cancel_work_requirement_by_id(requirement.id)
    cancelling = work.get_work_requirement_by_id(requirement.id)
    assert cancelling.status == WorkRequirementStatus.CANCELLING
    assert yd.task(task.id).status == TaskStatus.EXECUTING
    work.cancel_work_requirement_by_id(requirement.id, abort=True)
    assert work.get_work_requirement_by_id(requirement.id).status == WorkRequirementStatus.CANCELLED


def test_cancel_task_with_abort(yd: Workspace) -> None:
    yd.provision(count=1)
    requirement = yd.requirement(yd.group(finishIfAllTasksFinished=False))
    task = yd.add_tasks(requirement.taskGroups[0].id, 1)[0]
    yd.wait_task(task.id, TaskStatus.EXECUTING)
    assert yd.client.work_client.cancel_task_by_id(task.id, True).status == TaskStatus.ABORTED
    with pytest.raises(requests.HTTPError, match="Invalid transition from ABORTED"):
        yd.client.work_client.cancel_task_by_id(task.id, True)


def test_hold_start_and_finish_transitions(yd: Workspace) -> None:
    work = yd.client.work_client
    requirement = yd.requirement()
    assert work.hold_work_requirement(requirement).status == WorkRequirementStatus.HELD
    with pytest.raises(requests.HTTPError, match="InvalidWorkRequirementStatusException"):
        work.hold_work_requirement(requirement)
    assert work.start_work_requirement(requirement).status == WorkRequirementStatus.RUNNING
    assert work.finish_work_requirement(requirement).status == WorkRequirementStatus.COMPLETED


def test_adding_tasks_to_a_finished_group_is_an_invalid_request(yd: Workspace) -> None:
    requirement = yd.requirement(yd.group())
    yd.client.work_client.cancel_work_requirement_by_id(requirement.id)
    with pytest.raises(InvalidRequestException, match="CANCELLED"):
        yd.add_tasks(requirement.taskGroups[0].id, 1)


def test_search_work_requirements_by_namespace_and_status_across_slices(yd: Workspace) -> None:
    requirements = [yd.requirement() for _ in range(5)]
    yd.client.work_client.cancel_work_requirement_by_id(requirements[0].id)
    search = WorkRequirementSearch(namespace=yd.namespace, statuses=[WorkRequirementStatus.RUNNING])
    found = yd.client.work_client.get_work_requirements(search).list_all()
    assert [summary.id for summary in found] == [r.id for r in requirements[1:]]
    first = yd.client.work_client.get_work_requirements(search).slice(SliceReference(size=3))
    assert len(first.items) == 3 and first.nextSliceId is not None
    rest = yd.client.work_client.get_work_requirements(search).slice(
        SliceReference(sliceId=first.nextSliceId, size=3)
    )
    assert len(rest.items) == 1 and rest.nextSliceId is None


def test_search_tasks_pages_through_slices_of_the_requested_size(yd: Workspace) -> None:
    requirement = yd.requirement(yd.group())
    group_id = requirement.taskGroups[0].id
    added = yd.add_tasks(group_id, 7)
    search = TaskSearch(
        workRequirementId=requirement.id, taskGroupId=group_id, statuses=[TaskStatus.READY]
    )
    pages, reference = [], SliceReference(size=3)
    while True:
        page = yd.client.work_client.find_tasks_slice(search, reference)
        pages.append([task.id for task in page.items])
        if page.nextSliceId is None:
            break
        reference = SliceReference(sliceId=page.nextSliceId, size=3)
    assert [len(page) for page in pages] == [3, 3, 1]
    assert sum(pages, []) == [task.id for task in added]
    assert (
        yd.client.work_client.find_tasks(search)
        == yd.client.work_client.get_tasks(search).list_all()
    )
    executing = TaskSearch(workRequirementId=requirement.id, statuses=[TaskStatus.EXECUTING])
    assert yd.client.work_client.get_tasks(executing).list_all() == []


def test_large_task_data_is_sent_gzipped_and_kept(yd: Workspace) -> None:
    requirement = yd.requirement(yd.group())
    script = "#!/bin/bash\n" + "echo 'a line of a long RayDog script'\n" * 200
    assert len(script) > 2048
    task = yd.client.work_client.add_tasks_to_task_group_by_id(
        requirement.taskGroups[0].id,
        [Task(name="big", taskType="bash", taskData=script, environment={"A": "1"})],
    )[0]
    assert yd.task(task.id).taskData == script


# ---- Airflow provider calls -----------------------------------------------------------------


def test_airflow_flow_add_groups_by_put_then_tasks_by_name(yd: Workspace) -> None:
    work = yd.client.work_client
    requirement = yd.requirement()
    assert requirement.taskGroups in (None, [])
    requirement.taskGroups = [yd.group("second"), yd.group("first")]
    updated = work.update_work_requirement(requirement)
    assert [g.name for g in updated.taskGroups] == ["second", "first"]
    added = work.add_tasks_to_task_group_by_name(
        yd.namespace, requirement.name, "first", [Task(name="t", taskType="bash")]
    )
    assert added[0].taskGroupId == updated.taskGroups[1].id
    assert work.get_work_requirement_by_name(yd.namespace, requirement.name).id == requirement.id
    work.cancel_work_requirement_by_id(requirement.id, abort=False)
    with pytest.raises(requests.HTTPError, match="(?i)invalid transition"):
        work.cancel_work_requirement_by_id(requirement.id, abort=False)


def test_work_requirement_with_no_groups_stays_running(yd: Workspace) -> None:
    requirement = yd.requirement()
    yd.platform.state.settle()
    current = yd.client.work_client.get_work_requirement_by_id(requirement.id)
    assert current.status == WorkRequirementStatus.RUNNING


# ---- status machines ------------------------------------------------------------------------


def test_task_timeout_fails_the_task_and_finish_if_any_failed_fails_the_group(
    yd: Workspace,
) -> None:
    yd.provision(count=1)
    requirement = yd.requirement(
        yd.group(taskTimeout=timedelta(seconds=0.3), finishIfAnyTaskFailed=True)
    )
    tasks = yd.add_tasks(requirement.taskGroups[0].id, 2)
    failed = yd.wait_task(tasks[0].id, TaskStatus.FAILED, timeout=5)
    assert failed.errors[0].errorType == "TIMED_OUT"
    assert yd.task(tasks[1].id).status == TaskStatus.DISCARDED
    current = yd.client.work_client.get_work_requirement_by_id(requirement.id)
    assert current.taskGroups[0].status == TaskGroupStatus.FAILED
    assert current.status == WorkRequirementStatus.FAILED


def test_per_task_timeout_overrides_the_group_timeout(yd: Workspace) -> None:
    yd.provision(count=1)
    requirement = yd.requirement(yd.group())
    task = yd.add_tasks(requirement.taskGroups[0].id, 1, timeout=timedelta(seconds=0.2))[0]
    assert yd.wait_task(task.id, TaskStatus.FAILED).errors[0].errorType == "TIMED_OUT"


def test_pool_grows_to_waiting_tasks_up_to_max_nodes_and_never_beyond(yd: Workspace) -> None:
    pool = yd.provision(count=0, minNodes=0, maxNodes=3)
    requirement = yd.requirement(yd.group())
    tasks = yd.add_tasks(requirement.taskGroups[0].id, 5)
    for task in tasks[:3]:
        yd.wait_task(task.id, TaskStatus.EXECUTING)
    # Two tasks still wait: a pool that grew beyond maxNodes would do so in this step.
    yd.platform.state.settle()
    nodes = yd.client.worker_pool_client.find_nodes(NodeSearch(workerPoolId=pool.id))
    assert len(nodes) == 3
    assert [yd.task(task.id).status for task in tasks[3:]] == [TaskStatus.READY] * 2
    assert (
        yd.client.worker_pool_client.get_worker_pool_by_id(pool.id).status
        == WorkerPoolStatus.RUNNING
    )


def test_a_max_nodes_above_the_platform_limit_is_accepted_and_caps_the_pool_at_the_limit(
    yd: Workspace,
) -> None:
    # RayDog's autoscaler provisions every worker pool with maxNodes 100000: "this prevents
    # YellowDog imposing a separate limit" (yellowdog_ray/raydog/autoscaler.py:109-113, 879).
    # A pool has at most 10,000 nodes (yellowdog-cli: MAX_WORKER_POOL_NODE_COUNT, "enforced by
    # the platform").
    pool = yd.provision(count=0, minNodes=0, maxNodes=100_000)
    assert pool.properties.maxNodes == 100_000
    requirement = yd.requirement(yd.group())
    for task in yd.add_tasks(requirement.taskGroups[0].id, 2):
        yd.wait_task(task.id, TaskStatus.EXECUTING)
    with pytest.raises(InvalidRequestException, match="maxNodes 10000"):
        yd.client.worker_pool_client.resize_worker_pool_by_id(pool.id, 10_001)


def test_killed_node_fails_its_task_and_the_pool_replaces_it(yd: Workspace) -> None:
    pool = yd.provision(count=1, maxNodes=2)
    requirement = yd.requirement(yd.group())
    first, second = yd.add_tasks(requirement.taskGroups[0].id, 2)
    running = yd.wait_task(first.id, TaskStatus.EXECUTING)
    yd.wait_task(second.id, TaskStatus.EXECUTING)
    yd.platform.kill_node(running.nodeId)
    failed = yd.task(first.id)
    assert failed.status == TaskStatus.FAILED and failed.errors[0].errorType == "ALLOCATION_LOST"
    node = yd.client.worker_pool_client.get_node_by_id(running.nodeId)
    assert node.status.name == "TERMINATED" and node.workers[0].status.name == "LOST"
    third = yd.add_tasks(requirement.taskGroups[0].id, 1)[0]
    assert yd.wait_task(third.id, TaskStatus.EXECUTING).nodeId != running.nodeId
    assert len(yd.client.worker_pool_client.find_nodes(NodeSearch(workerPoolId=pool.id))) == 3


def test_a_node_that_fails_to_boot_never_runs_and_the_pool_still_shuts_down(yd: Workspace) -> None:
    yd.platform.fail_node_boot(1)
    pool = yd.provision(count=2)
    yd.wait_pool(pool.id, WorkerPoolStatus.IDLE)
    instances = yd.client.compute_client.get_instances(
        InstanceSearch(computeRequirementId=pool.computeRequirementId)
    ).list_all()
    assert sorted(i.status.name for i in instances) == ["RUNNING", "TERMINATED"]
    assert len(yd.client.worker_pool_client.find_nodes(NodeSearch(workerPoolId=pool.id))) == 1


def test_a_node_that_fails_to_boot_while_a_task_waits_is_replaced_by_the_pool(
    yd: Workspace,
) -> None:
    yd.platform.fail_node_boot(1)
    pool = yd.provision(count=0, maxNodes=1)
    requirement = yd.requirement(yd.group())
    (task,) = yd.add_tasks(requirement.taskGroups[0].id, 1)
    running = yd.wait_task(task.id, TaskStatus.EXECUTING)
    nodes = yd.client.worker_pool_client.find_nodes(NodeSearch(workerPoolId=pool.id))
    assert [node.id for node in nodes] == [running.nodeId]
    instances = yd.client.compute_client.get_instances(
        InstanceSearch(computeRequirementId=pool.computeRequirementId)
    ).list_all()
    assert sorted(i.status.name for i in instances) == ["RUNNING", "TERMINATED"]


def test_idle_nodes_and_then_the_idle_pool_shut_down(yd: Workspace) -> None:
    quick = AutoShutdown(enabled=True, timeout=timedelta(seconds=0.2))
    pool = yd.provision(
        count=2,
        idleNodeShutdown=quick,
        idlePoolShutdown=AutoShutdown(enabled=True, timeout=timedelta(seconds=1)),
    )
    yd.wait_pool(pool.id, WorkerPoolStatus.EMPTY, WorkerPoolStatus.TERMINATED)
    yd.wait_pool(pool.id, WorkerPoolStatus.TERMINATED)
    nodes = yd.client.worker_pool_client.find_nodes(NodeSearch(workerPoolId=pool.id))
    assert [node.status.name for node in nodes] == ["TERMINATED", "TERMINATED"]


def test_busy_nodes_and_pools_are_not_idle(yd: Workspace) -> None:
    requirement = yd.requirement(yd.group())
    task = yd.add_tasks(requirement.taskGroups[0].id, 1)[0]
    quick = AutoShutdown(enabled=True, timeout=timedelta(seconds=0.3))
    pool = yd.provision(count=1, idleNodeShutdown=quick, idlePoolShutdown=quick)
    yd.wait_task(task.id, TaskStatus.EXECUTING)
    # A pool like it with nothing to do, started later: once it has shut down for idleness,
    # the busy pool's idle timeouts have passed too.
    idle = yd.provision(count=1, tag="no-task-runs-here", idleNodeShutdown=quick,
                        idlePoolShutdown=quick)
    yd.wait_pool(idle.id, WorkerPoolStatus.TERMINATED)
    yd.platform.state.settle()
    current = yd.client.worker_pool_client.get_worker_pool_by_id(pool.id)
    assert current.status == WorkerPoolStatus.RUNNING
    assert (
        yd.client.worker_pool_client.get_node_by_id(yd.task(task.id).nodeId).status
        == NodeStatus.RUNNING
    )


# ---- errors, auth, faults -------------------------------------------------------------------


def test_wrong_key_is_not_authorised(platform: LocalPlatform) -> None:
    client = PlatformClient.create(
        ServicesSchema(defaultUrl=platform.url), ApiKey(platform.key_id, "wrong")
    )
    with pytest.raises(NotAuthorisedException):
        client.work_client.get_work_requirement_by_id("ydid:workreq:000000:x")
    response = requests.get(f"{platform.url}/_local/live", timeout=5)
    assert response.status_code == 401
    assert list(response.json()) == ["errorType", "message"]


def test_unknown_ids_are_404_http_errors(yd: Workspace) -> None:
    with pytest.raises(requests.HTTPError, match="404"):
        yd.client.work_client.get_task_by_id("ydid:task:000000:nothing:1:1")
    with pytest.raises(requests.HTTPError, match="404"):
        yd.client.worker_pool_client.get_node_by_id("ydid:node:000000:nothing")


def test_injected_503_and_429_are_retried_and_the_call_succeeds(yd: Workspace) -> None:
    requirement = yd.requirement()
    yd.platform.faults.add("503", path="/work/requirements/*", method="GET", count=2)
    yd.platform.faults.add(
        "429", path="/work/requirements/*", method="GET", count=1, retry_after_s=1
    )
    yd.platform.reset_api_calls()
    assert yd.client.work_client.get_work_requirement_by_id(requirement.id).id == requirement.id
    assert yd.platform.api_calls() == {"GET /work/requirements/{requirement_id}": 4}


def test_injected_500_after_all_retries_surfaces_as_internal_server_error(yd: Workspace) -> None:
    from yellowdog_client.model.exceptions import InternalServerException

    client = yd.platform.make_client(max_attempts=1, initial_interval=0.01)
    yd.platform.faults.add("500", path="/work/tasks/*", count=2)
    with pytest.raises(InternalServerException):
        client.work_client.get_task_by_id("ydid:task:000000:x:1:1")


def test_dropped_connection_is_a_connection_error_or_retried(yd: Workspace) -> None:
    requirement = yd.requirement()
    no_retries = yd.platform.make_client(max_attempts=0)
    yd.platform.faults.add("drop", path="/work/requirements/*", method="GET", count=1)
    with pytest.raises(requests.ConnectionError):
        no_retries.work_client.get_work_requirement_by_id(requirement.id)
    yd.platform.faults.add("drop", path="/work/requirements/*", method="GET", count=1)
    assert yd.client.work_client.get_work_requirement_by_id(requirement.id).id == requirement.id


def test_control_routes_over_http(platform: LocalPlatform) -> None:
    auth = {"Authorization": f"yd-key {platform.key_id}:{platform.key_secret}"}
    url = f"{platform.url}/_local"
    response = requests.post(
        f"{url}/faults", json={"kind": "503", "path": "/work/tasks"}, headers=auth, timeout=5
    )
    assert response.status_code == 201 and response.json()["count"] == 1
    assert requests.get(f"{platform.url}/work/tasks", headers=auth, timeout=5).status_code == 503
    assert requests.get(f"{url}/live", headers=auth, timeout=5).json()["nodes"] == []
    assert requests.get(f"{url}/api-calls", headers=auth, timeout=5).json() == {
        "GET /work/tasks": 1
    }
    bad = requests.post(f"{url}/faults", json={"kind": "418"}, headers=auth, timeout=5)
    assert bad.status_code == 400 and bad.json()["errorType"] == "InvalidRequestException"


def test_base_path_and_trailing_slashes_are_tolerated() -> None:
    with LocalPlatform(base_path="/api") as platform:
        assert platform.url.endswith("/api")
        client = platform.make_client()
        found = client.worker_pool_client.get_worker_pools(WorkerPoolSearch()).list_all()
        assert found == []
        auth = {"Authorization": f"yd-key {platform.key_id}:{platform.key_secret}"}
        response = requests.get(f"{platform.url}//work/tasks/", headers=auth, timeout=5)
        assert response.json() == {"items": [], "nextSliceId": None}


# ---- the example documents ------------------------------------------------------------------


def _example(name: str, kind):
    return Json.load(json.loads((EXAMPLES / name).read_text()), kind)


def test_example_documents_are_served_and_read_back(yd: Workspace) -> None:
    usage = _example(
        "provision_request.requirementTemplateUsage.json", ComputeRequirementTemplateUsage
    )
    usage.templateId, usage.requirementNamespace = "local/simulated", yd.namespace
    properties = _example(
        "provision_request.provisionedProperties.json", ProvisionedWorkerPoolProperties
    )
    pool = yd.client.worker_pool_client.provision_worker_pool(usage, properties)
    yd.pools.append(pool)
    assert pool.properties.idleNodeShutdown.timeout == timedelta(minutes=3)
    assert pool.properties.workerTag == "raytest-1-00-head"
    submitted = _example("work_requirement_submitted.json", WorkRequirement)
    submitted.namespace = yd.namespace
    for group in submitted.taskGroups:
        group.runSpecification.namespaces = [yd.namespace]
    requirement = yd.client.work_client.add_work_requirement(submitted)
    yd.requirements.append(requirement.id)
    assert requirement.tag == "my-tag"
    assert [g.finishIfAnyTaskFailed for g in requirement.taskGroups] == [True, False]
    tasks = Json.load(json.loads((EXAMPLES / "tasks_submitted.json").read_text()), list[Task])
    returned = yd.client.work_client.add_tasks_to_task_group_by_id(
        requirement.taskGroups[0].id, tasks
    )
    assert returned[0].environment == tasks[0].environment
    running = yd.wait_task(returned[0].id, TaskStatus.EXECUTING)
    assert running.taskData == tasks[0].taskData and running.arguments == ["taskdata.txt"]
    node = yd.client.worker_pool_client.get_node_by_id(running.nodeId)
    assert node.details.workerTag == "raytest-1-00-head"


def test_held_work_requirement_tasks_wait_until_started(yd: Workspace) -> None:
    yd.provision(count=1)
    requirement = yd.requirement(yd.group())
    yd.client.work_client.hold_work_requirement(requirement)
    task = yd.add_tasks(requirement.taskGroups[0].id, 1)[0]
    yd.wait_pool(yd.pools[0].id, WorkerPoolStatus.IDLE)
    assert yd.task(task.id).status == TaskStatus.READY
    yd.client.work_client.start_work_requirement(requirement)
    yd.wait_task(task.id, TaskStatus.EXECUTING)


def test_a_task_type_outside_the_run_specification_is_an_invalid_request(yd: Workspace) -> None:
    requirement = yd.requirement(yd.group())
    with pytest.raises(InvalidRequestException, match="taskType"):
        yd.client.work_client.add_tasks_to_task_group_by_id(
            requirement.taskGroups[0].id, [Task(name="d", taskType="docker")]
        )


def test_resizing_a_pool_adds_nodes_or_stops_idle_ones(yd: Workspace) -> None:
    pools = yd.client.worker_pool_client
    pool = yd.wait_pool(yd.provision(count=1, maxNodes=4).id, WorkerPoolStatus.IDLE)
    assert pools.resize_worker_pool_by_id(pool.id, 3).expectedNodeCount == 3
    wait_for(
        lambda: (
            len(pools.find_nodes(NodeSearch(workerPoolId=pool.id, statuses=[NodeStatus.RUNNING])))
            == 3
        )
    )
    assert pools.resize_worker_pool_by_id(pool.id, 1).expectedNodeCount == 1
    with pytest.raises(InvalidRequestException, match="maxNodes 4"):
        pools.resize_worker_pool_by_id(pool.id, 5)


def test_a_node_shut_down_gracefully_stops_once_its_task_ends(yd: Workspace) -> None:
    pools = yd.client.worker_pool_client
    yd.provision(count=1)
    requirement = yd.requirement(yd.group(finishIfAllTasksFinished=False))
    first, second = yd.add_tasks(requirement.taskGroups[0].id, 2)
    task = yd.wait_task(first.id, TaskStatus.EXECUTING)
    assert pools.shutdown_node_by_id(task.nodeId).status == NodeStatus.RUNNING
    assert yd.task(task.id).status == TaskStatus.EXECUTING
    yd.client.work_client.cancel_task_by_id(task.id, True)
    assert pools.get_node_by_id(task.nodeId).status == NodeStatus.TERMINATED
    assert yd.wait_task(second.id, TaskStatus.EXECUTING).nodeId != task.nodeId


def test_end_everything_cancels_requirements_and_shuts_down_pools(yd: Workspace) -> None:
    yd.provision(count=2)
    requirement = yd.requirement(yd.group())
    task = yd.add_tasks(requirement.taskGroups[0].id, 1)[0]
    yd.wait_task(task.id, TaskStatus.EXECUTING)
    yd.platform.end_everything()
    assert yd.task(task.id).status == TaskStatus.ABORTED
    assert not any(yd.platform.live_entities().values())


def test_kill_boot_failure_and_output_control_routes(yd: Workspace) -> None:
    auth = {"Authorization": f"yd-key {yd.platform.key_id}:{yd.platform.key_secret}"}
    url = f"{yd.platform.url}/_local"
    failing = requests.post(f"{url}/boot-failures", json={"count": 1}, headers=auth, timeout=5)
    assert failing.status_code == 204
    pool = yd.wait_pool(yd.provision(count=2).id, WorkerPoolStatus.IDLE)
    nodes = yd.client.worker_pool_client.find_nodes(NodeSearch(workerPoolId=pool.id))
    assert len(nodes) == 1
    killed = requests.post(f"{url}/nodes/{nodes[0].id}/kill", headers=auth, timeout=5)
    assert killed.status_code == 204
    assert yd.client.worker_pool_client.get_node_by_id(nodes[0].id).status == NodeStatus.TERMINATED
    again = requests.post(f"{url}/nodes/{nodes[0].id}/kill", headers=auth, timeout=5)
    assert again.status_code == 400
    requirement = yd.requirement(yd.group())
    task = yd.add_tasks(requirement.taskGroups[0].id, 1)[0]
    output = requests.get(f"{url}/tasks/{task.id}/output", headers=auth, timeout=5)
    assert output.status_code == 200 and output.text == ""


def test_a_group_whose_tasks_all_finished_completes_and_so_does_its_requirement(
    yd: Workspace,
) -> None:
    requirement = yd.requirement(yd.group("only"))
    task = yd.add_tasks(requirement.taskGroups[0].id, 1)[0]
    yd.client.work_client.cancel_task_by_id(task.id, False)
    current = yd.client.work_client.get_work_requirement_by_id(requirement.id)
    assert current.taskGroups[0].status == TaskGroupStatus.COMPLETED
    assert current.status == WorkRequirementStatus.COMPLETED
    with pytest.raises(InvalidRequestException, match="COMPLETED"):
        yd.add_tasks(requirement.taskGroups[0].id, 1)


# The SDK's event source reads on at 100% CPU once a stream it follows ends (it never checks for
# the end of the stream), and the platform ends a stream once its entity has finished, as
# YellowDog's does: the helpers wait in a child process, so that their threads end with it.
HELPERS_IN_A_CHILD = """
import sys
from yellowdog_client.model import (
    ComputeRequirementStatus, WorkerPoolStatus, WorkRequirementStatus)
from prefect_raydog.cluster import create_client

url, key_id, secret, pool_id, compute_id, requirement_id = sys.argv[1:]
client = create_client(key_id, secret, url)
idle = client.worker_pool_client.get_worker_pool_helper_by_id(
    pool_id).when_worker_pool_status_is(WorkerPoolStatus.IDLE)
print(idle.result(timeout=30).status.name, flush=True)
cancelled = client.work_client.get_work_requirement_helper_by_id(
    requirement_id).when_requirement_status_is(WorkRequirementStatus.CANCELLED)
terminated = client.compute_client.get_compute_requirement_helper_by_id(
    compute_id).when_requirement_status_is(ComputeRequirementStatus.TERMINATED)
print("WAITING", flush=True)
print(cancelled.result(timeout=30).status.name, terminated.result(timeout=30).status.name,
      flush=True)
"""


def test_sdk_helpers_follow_server_sent_updates(yd: Workspace) -> None:
    pool = yd.provision(count=1, maxNodes=1)
    requirement = yd.requirement(yd.group())
    platform = yd.platform
    child = subprocess.Popen(
        [sys.executable, "-c", HELPERS_IN_A_CHILD, platform.url, platform.key_id,
         platform.key_secret, pool.id, pool.computeRequirementId, requirement.id],
        stdout=subprocess.PIPE, text=True,
    )
    with child:
        assert child.stdout.readline().split() == ["IDLE"]
        assert child.stdout.readline().split() == ["WAITING"]
        yd.client.work_client.cancel_work_requirement_by_id(requirement.id, True)
        yd.client.worker_pool_client.shutdown_worker_pool_by_id(pool.id)
        assert child.stdout.readline().split() == ["CANCELLED", "TERMINATED"]
        assert child.wait(timeout=30) == 0


def test_a_stream_whose_listener_left_ends_its_sdk_thread_when_the_platform_stops() -> None:
    # yellowdog-sdk's reader sees that its listener left only when an event comes; a stream that
    # just ended would leave it spinning at 100% CPU in the test process for good.
    class Seen(SubscriptionEventListener[WorkRequirement]):
        def __init__(self) -> None:
            self.updates = threading.Event()

        def updated(self, obj: WorkRequirement) -> None:
            self.updates.set()

    with LocalPlatform() as platform:
        work = platform.client.work_client
        requirement = work.add_work_requirement(
            WorkRequirement(namespace="streams", name=unique("stream"))
        )
        before, listener = sdk_event_streams(), Seen()
        work.add_work_requirement_listener_by_id(requirement.id, listener)
        assert listener.updates.wait(10)
        (reader,) = sdk_event_streams() - before
        work.remove_work_requirement_listener(listener)
    reader.join(60)  # ends in well under a second; 10 s was not enough at load 8 (dry run 23)
    assert not reader.is_alive(), "the SDK's stream reader outlived the platform's stop"
