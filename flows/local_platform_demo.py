"""The local YellowDog platform driven by the unmodified yellowdog-sdk: provision a worker pool of
two `local/process` nodes, run one bash task on each, print what each task printed, tear down.

Run it with `python flows/local_platform_demo.py`; it needs no YellowDog account.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

from rich.console import Console
from rich.panel import Panel
from yellowdog_client import PlatformClient
from yellowdog_client.model import (
    ComputeRequirementTemplateUsage,
    Node,
    NodeSearch,
    NodeStatus,
    NodeWorkerTarget,
    NodeWorkerTargetType,
    ProvisionedWorkerPoolProperties,
    RunSpecification,
    Task,
    TaskGroup,
    TaskStatus,
    WorkRequirement,
)

from prefect_raydog.local import LocalPlatform

NODES = 2
NAMESPACE = "demo"
WORKER_TAG = f"demo-{uuid.uuid4().hex[:8]}"
POLL_INTERVAL_S = 0.1
TIMEOUT_S = 60.0
TASK_SCRIPT = """\
echo "hostname:       $(hostname)"
echo "node address:   $(hostname -i)"
echo "YD_TASK_ID:     $YD_TASK_ID"
echo "YD_INSTANCE_ID: $YD_INSTANCE_ID"
"""

console = Console()
T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str) -> T:
    """Poll `condition()` until it returns something truthy, and return that."""
    deadline = time.monotonic() + TIMEOUT_S
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Timed out after {TIMEOUT_S:g} s waiting for {what}")
        time.sleep(POLL_INTERVAL_S)
    return result


def provision_pool(client: PlatformClient) -> str:
    """A worker pool of `NODES` process nodes, one worker each, tagged `WORKER_TAG`."""
    pool = client.worker_pool_client.provision_worker_pool(
        ComputeRequirementTemplateUsage(
            templateId="local/process",
            requirementName=f"{WORKER_TAG}-pool",
            requirementNamespace=NAMESPACE,
            targetInstanceCount=NODES,
        ),
        ProvisionedWorkerPoolProperties(
            createNodeWorkers=NodeWorkerTarget(NodeWorkerTargetType.PER_NODE, 1),
            workerTag=WORKER_TAG,
            maxNodes=NODES,
        ),
    )
    return pool.id


def registered_nodes(client: PlatformClient, pool_id: str) -> list[Node] | None:
    """The pool's nodes once all `NODES` of them are RUNNING."""
    nodes = client.worker_pool_client.find_nodes(NodeSearch(workerPoolId=pool_id))
    running = [node for node in nodes if node.status == NodeStatus.RUNNING]
    return running if len(running) == NODES else None


def submit_tasks(client: PlatformClient) -> tuple[str, list[Task]]:
    """A work requirement whose one task group runs on the pool's workers, with one bash task
    per node; returns the work requirement's id and the added tasks."""
    group = TaskGroup(
        name="hello",
        runSpecification=RunSpecification(
            taskTypes=["bash"], workerTags=[WORKER_TAG], taskTimeout=timedelta(minutes=5)
        ),
    )
    requirement = client.work_client.add_work_requirement(
        WorkRequirement(namespace=NAMESPACE, name=f"{WORKER_TAG}-work", taskGroups=[group])
    )
    tasks = [
        Task(name=f"hello-{n}", taskType="bash", arguments=["taskdata.txt"], taskData=TASK_SCRIPT)
        for n in range(NODES)
    ]
    added = client.work_client.add_tasks_to_task_group_by_id(requirement.taskGroups[0].id, tasks)
    return requirement.id, added


def all_completed(client: PlatformClient, tasks: list[Task]) -> list[Task] | None:
    """The tasks, fresh, once all are COMPLETED; raises if one ends otherwise."""
    fresh = [client.work_client.get_task_by_id(task.id) for task in tasks]
    for task in fresh:
        if task.status.finished and task.status != TaskStatus.COMPLETED:
            raise RuntimeError(f"Task {task.name} ended {task.status.value}: {task.errors}")
    return fresh if all(task.status == TaskStatus.COMPLETED for task in fresh) else None


def tear_down(client: PlatformClient, requirement_id: str | None, pool_id: str) -> None:
    """Cancel the work requirement if it is still running and shut the pool down."""
    if requirement_id is not None:
        requirement = client.work_client.get_work_requirement_by_id(requirement_id)
        if not requirement.status.finished:
            client.work_client.cancel_work_requirement_by_id(requirement_id, True)
    client.worker_pool_client.shutdown_worker_pool_by_id(pool_id)


def main() -> None:
    with LocalPlatform() as platform:
        console.print(f"Local YellowDog platform at [cyan]{platform.url}[/cyan]")
        client = platform.client
        pool_id = provision_pool(client)
        requirement_id = None
        try:
            nodes = wait_until(lambda: registered_nodes(client, pool_id), "the nodes to register")
            for node in nodes:
                console.print(f"Node {node.details.hostname} at {node.details.privateIpAddress}")
            requirement_id, tasks = submit_tasks(client)
            completed = wait_until(lambda: all_completed(client, tasks), "the tasks to complete")
            for task in completed:
                console.print(Panel(platform.task_output(task.id).rstrip(), title=task.name))
        finally:
            tear_down(client, requirement_id, pool_id)
        wait_until(lambda: not any(platform.live_entities().values()), "everything to end")
        console.print("[green]Done:[/green] nothing is left live on the platform.")


if __name__ == "__main__":
    main()
