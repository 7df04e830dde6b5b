"""The autoscaler's YellowDog side on the local platform, without Ray: a worker task group stays
open for new nodes after all of its nodes have gone, and the monitor's view of the cluster's
nodes repeats its task search only after the work requirement's update stream says something
changed."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from conftest import wait_for
from yellowdog_client.model import Task, WorkRequirement

from prefect_raydog.autoscaler.yellowdog import (
    CACHE_S,
    WORKER_TASK_GROUP,
    ClusterRecord,
    NodeType,
    YellowDogCluster,
)
from prefect_raydog.local import LocalPlatform

SEARCH = "GET /work/tasks"
CPU = NodeType("cpu", "local/process", "#!/bin/bash\nsleep 600\n")
GROUP = WORKER_TASK_GROUP.format(node_type="cpu")


@pytest.fixture
def cluster(platform: LocalPlatform) -> Iterator[YellowDogCluster]:
    """A cluster's work requirement with one worker task group, as the provider makes it, and
    no worker pool: its tasks wait."""
    namespace = f"watch-{uuid.uuid4().hex[:8]}"
    cluster = YellowDogCluster(platform.client, "watch", namespace)
    cluster.record = ClusterRecord("watch", namespace, "abcdefgh", "")
    requirement = platform.client.work_client.add_work_requirement(WorkRequirement(
        namespace=namespace, name=cluster.record.full_name,
        taskGroups=[cluster._task_group(GROUP, "cpu", is_head=False)]))
    cluster.record.work_requirement_id = requirement.id
    try:
        yield cluster
    finally:
        cluster.shut_down()


def test_a_worker_group_whose_nodes_have_all_ended_takes_new_ones(
        cluster: YellowDogCluster, platform: LocalPlatform) -> None:
    (first,) = cluster.add_tasks(GROUP, CPU, 1, {})
    cluster.end_node(first)
    wait_for(lambda: platform.client.work_client.get_task_by_id(first).status.finished, 10,
             what="the ended node's task to finish")
    (second,) = cluster.add_tasks(GROUP, CPU, 1, {})
    assert [node.task_id for node in cluster.live_nodes()] == [second]


def test_the_monitors_view_searches_tasks_only_after_an_update(
        cluster: YellowDogCluster, platform: LocalPlatform) -> None:
    cluster.watch_updates()
    wait_for(lambda: cluster._watch.streaming, 10, what="the update stream's first event")
    assert cluster.live_nodes() == []
    platform.reset_api_calls()
    for _ in range(2):
        time.sleep(CACHE_S + 0.2)
        assert cluster.live_nodes() == []
    assert platform.api_calls().get(SEARCH, 0) == 0

    # Added by another process (Ray's other thread, `ray up`): only the stream tells.
    (task,) = platform.client.work_client.add_tasks_to_task_group_by_name(
        cluster.namespace, cluster.record.full_name, GROUP,
        [Task(name="cpu-1", taskType="bash", arguments=["x"])])
    nodes = wait_for(cluster.live_nodes, 10, what="the new task in the view")
    assert [node.task_id for node in nodes] == [task.id]
    assert platform.api_calls().get(SEARCH, 0) >= 1
