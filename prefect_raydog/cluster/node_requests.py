"""The YellowDog requests that start a RayDog cluster's nodes, made in one place for the Builder
and the autoscaler: a provisioned worker pool per node group, a task group per pool, and one
`bash` task per Ray node."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from yellowdog_client.model import (
    AutoShutdown,
    ComputeRequirementTemplateUsage,
    NodeWorkerTarget,
    ProvisionedWorkerPoolProperties,
    RunSpecification,
    Task,
    TaskGroup,
)

TASK_TYPE = "bash"


@dataclass(frozen=True)
class PoolRequest:
    """What a node group's worker pool is provisioned from, and how it ends by itself."""

    template_id: str
    name: str
    namespace: str
    tag: str | None
    worker_tag: str
    count: int
    max_nodes: int
    idle_node_shutdown: timedelta | None
    idle_pool_shutdown: timedelta | None
    images_id: str | None = None
    userdata: str | None = None
    instance_tags: dict[str, str] | None = None
    metrics_enabled: bool = False

    def usage(self) -> ComputeRequirementTemplateUsage:
        return ComputeRequirementTemplateUsage(
            templateId=self.template_id,
            requirementName=self.name,
            requirementNamespace=self.namespace,
            requirementTag=self.tag,
            targetInstanceCount=self.count,
            imagesId=self.images_id,
            userData=self.userdata,
            instanceTags=self.instance_tags,
        )

    def properties(self) -> ProvisionedWorkerPoolProperties:
        return ProvisionedWorkerPoolProperties(
            createNodeWorkers=NodeWorkerTarget.per_node(1),
            minNodes=0,
            maxNodes=self.max_nodes,
            idleNodeShutdown=auto_shutdown(self.idle_node_shutdown),
            idlePoolShutdown=auto_shutdown(self.idle_pool_shutdown),
            workerTag=self.worker_tag,
            metricsEnabled=self.metrics_enabled,
        )


def auto_shutdown(timeout: timedelta | None) -> AutoShutdown:
    """YellowDog's auto shutdown after `timeout`, or none."""
    if timeout is None:
        return AutoShutdown(enabled=False)
    return AutoShutdown(enabled=True, timeout=timeout)


def node_task_group(
    name: str,
    tag: str,
    worker_tag: str,
    namespace: str,
    lifetime: timedelta,
    *,
    is_head: bool,
    stays_open: bool = False,
) -> TaskGroup:
    """The task group whose tasks run Ray nodes on one pool's workers. The head's group fails
    the cluster when its task fails; a group that `stays_open` waits for more tasks when all its
    nodes have gone (an autoscaled pool's next scale-up)."""
    return TaskGroup(
        name=name,
        tag=tag,
        runSpecification=RunSpecification(
            taskTypes=[TASK_TYPE],
            taskTimeout=lifetime,
            workerTags=[worker_tag],
            namespaces=[namespace],
        ),
        finishIfAnyTaskFailed=is_head,
        finishIfAllTasksFinished=not stays_open,
    )


def node_tasks(names: list[str], script: str, environment: dict[str, str]) -> list[Task]:
    """One `bash` task per name that runs the node script with the given environment."""
    return [
        Task(
            name=name,
            taskType=TASK_TYPE,
            arguments=["taskdata.txt"],
            taskData=script,
            environment=dict(environment),
        )
        for name in names
    ]
