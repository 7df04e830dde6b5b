"""The autoscaler's YellowDog side on the local platform, without Ray: the monitor's view of the
cluster's nodes repeats its task search only after the work requirement's update stream says
something changed."""

from __future__ import annotations

import time
import uuid

from conftest import wait_for
from yellowdog_client.model import RunSpecification, Task, TaskGroup, WorkRequirement

from prefect_raydog.autoscaler.yellowdog import CACHE_S, ClusterRecord, YellowDogCluster
from prefect_raydog.local import LocalPlatform

SEARCH = "GET /work/tasks"


def test_the_monitors_view_searches_tasks_only_after_an_update(platform: LocalPlatform) -> None:
    client = platform.client
    namespace = f"watch-{uuid.uuid4().hex[:8]}"
    requirement = client.work_client.add_work_requirement(WorkRequirement(
        namespace=namespace, name="watch-abcdefgh", taskGroups=[TaskGroup(
            name="worker-nodes-cpu", tag="cpu",
            runSpecification=RunSpecification(taskTypes=["bash"]))]))
    cluster = YellowDogCluster(client, "watch", namespace)
    cluster.record = ClusterRecord("watch", namespace, "abcdefgh", requirement.id)
    try:
        cluster.watch_updates()
        wait_for(lambda: cluster._watch.streaming, 10, what="the update stream's first event")
        assert cluster.live_nodes() == []
        platform.reset_api_calls()
        for _ in range(2):
            time.sleep(CACHE_S + 0.2)
            assert cluster.live_nodes() == []
        assert platform.api_calls().get(SEARCH, 0) == 0

        (task,) = client.work_client.add_tasks_to_task_group_by_name(
            namespace, "watch-abcdefgh", "worker-nodes-cpu",
            [Task(name="cpu-1", taskType="bash", arguments=["x"])])
        nodes = wait_for(cluster.live_nodes, 10, what="the new task in the view")
        assert [node.task_id for node in nodes] == [task.id]
        assert platform.api_calls().get(SEARCH, 0) >= 1
    finally:
        cluster.shut_down()
