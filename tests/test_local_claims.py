"""The local platform through the unmodified yellowdog-sdk: a node that is free while a task it
matches waits takes that task before an idle timer can end the node or its pool, whatever the
timeouts. RayDog provisions its head's pool with 0 s idle node and idle pool shutdown."""

from __future__ import annotations

from datetime import timedelta

import pytest
import test_local_api
from conftest import wait_for
from test_local_api import Workspace
from yellowdog_client.model import AutoShutdown, NodeStatus, TaskStatus, WorkerPoolStatus

AT_ONCE = AutoShutdown(enabled=True, timeout=timedelta(0))
yd = test_local_api.yd  # the fixture: a workspace on the platform, torn down after
ENDED = (WorkerPoolStatus.SHUTDOWN, WorkerPoolStatus.TERMINATED)


def _executing_or_pool_ended(yd: Workspace, task_id: str, pool_id: str, timeout: float = 30):
    """The task once it executes, or None once its pool has ended without running it."""
    pools = yd.client.worker_pool_client

    def settled():
        task = yd.task(task_id)
        if task.status == TaskStatus.EXECUTING:
            return task
        return pools.get_worker_pool_by_id(pool_id).status in ENDED and "ended"

    found = wait_for(settled, timeout, what=f"task {task_id} to execute or its pool to end")
    return None if found == "ended" else found


def _waiting_behind_a_busy_node(yd: Workspace, **idle_settings) -> tuple[str, str, str]:
    """A one-node pool running one task while a second waits: (pool, first, second) ids."""
    requirement = yd.requirement(yd.group())
    first, second = yd.add_tasks(requirement.taskGroups[0].id, 2)
    pool = yd.provision(count=1, **idle_settings)
    yd.wait_task(first.id, TaskStatus.EXECUTING)
    assert yd.task(second.id).status == TaskStatus.READY
    return pool.id, first.id, second.id


def test_a_process_node_that_registers_while_a_task_waits_takes_it_with_0_s_idle_shutdown(
    yd: Workspace,
) -> None:
    if yd.platform.runner is None:
        pytest.skip(f"process nodes are unavailable: {yd.platform.state.runner_unavailable}")
    requirement = yd.requirement(yd.group())
    task = yd.add_tasks(requirement.taskGroups[0].id, 1)[0]
    pool = yd.provision(
        template="local/process", idleNodeShutdown=AT_ONCE, idlePoolShutdown=AT_ONCE
    )
    executing = _executing_or_pool_ended(yd, task.id, pool.id)
    assert executing is not None, "the pool ended and its node never took the waiting task"
    node = yd.client.worker_pool_client.get_node_by_id(executing.nodeId)
    assert node.workerPoolId == pool.id and node.status == NodeStatus.RUNNING


def test_a_node_freed_by_a_finished_task_takes_the_waiting_one_with_0_s_idle_node_shutdown(
    yd: Workspace,
) -> None:
    pool_id, first, second = _waiting_behind_a_busy_node(yd, idleNodeShutdown=AT_ONCE)
    node_id = yd.task(first).nodeId
    yd.client.work_client.cancel_task_by_id(first, True)
    executing = _executing_or_pool_ended(yd, second, pool_id)
    assert executing is not None and executing.nodeId == node_id, "another node took it"
    assert yd.client.worker_pool_client.get_node_by_id(node_id).status == NodeStatus.RUNNING


def test_a_pool_whose_last_task_ends_while_another_waits_runs_it_with_0_s_idle_pool_shutdown(
    yd: Workspace,
) -> None:
    pool_id, first, second = _waiting_behind_a_busy_node(yd, idlePoolShutdown=AT_ONCE)
    yd.client.work_client.cancel_task_by_id(first, True)
    assert _executing_or_pool_ended(yd, second, pool_id) is not None, "the pool shut down"
    pool = yd.client.worker_pool_client.get_worker_pool_by_id(pool_id)
    assert pool.status == WorkerPoolStatus.RUNNING
