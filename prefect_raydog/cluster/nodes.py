"""A cluster's node groups and the platform calls for their nodes: provisioning a group's worker
pool, its task group, and starting, locating and waiting for the node tasks."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from requests import HTTPError
from yellowdog_client import PlatformClient
from yellowdog_client.model import (
    InstanceSearch,
    NodeSearch,
    NodeStatus,
    Task,
    TaskGroup,
    TaskSearch,
    TaskStatus,
)
from yellowdog_client.model.exceptions import InvalidRequestException

from prefect_raydog.cluster import node_requests
from prefect_raydog.errors import ClusterBuildError
from prefect_raydog.spec import ClusterSpec, NodeGroupSpec, WorkerPoolSpec

if TYPE_CHECKING:
    from prefect_raydog.cluster.token_auth import SSHLogin

logger = logging.getLogger("prefect_raydog.cluster")

HEAD_TASK_GROUP = "head-node"
OBSERVABILITY_TASK_GROUP = "observability-node"

Role = Literal["head", "observability", "worker"]

_LIVE_TASK = [status for status in TaskStatus if not status.finished]


@dataclass
class NodeGroup:
    """One node group of a cluster: its YellowDog worker pool, task group and tasks."""

    role: Role
    internal_name: str
    requirement_name: str
    spec: NodeGroupSpec | None = None
    worker_tag: str = ""
    task_group_name: str = ""
    task_group_base: str = ""
    generation: int = 1
    script: str = ""
    node_limit: int = 1
    pool_id: str | None = None
    compute_requirement_id: str | None = None
    task_group_id: str | None = None
    task_ids: list[str] = field(default_factory=list)
    provision_attempted: bool = False

    def describe(self) -> str:
        return f"worker pool {self.requirement_name or '?'} ({self.pool_id or 'id unknown'})"


def head_group(cluster: ClusterSpec, prefix: str) -> NodeGroup:
    """The head node's group; `prefix` is the build's name, which every derived name starts with."""
    return _new_group(prefix, "head", cluster.head, HEAD_TASK_GROUP, "00-head", "head")


def observability_group(cluster: ClusterSpec, prefix: str) -> NodeGroup | None:
    if not cluster.observability:
        return None
    return _new_group(
        prefix,
        "observability",
        cluster.observability,
        OBSERVABILITY_TASK_GROUP,
        "observability",
        "observability",
    )


def worker_group(prefix: str, number: int, spec: WorkerPoolSpec) -> NodeGroup:
    """The cluster's `number`th worker pool, named by the spec or else by its task group."""
    text = f"{number:02d}"
    group = _new_group(prefix, "worker", spec, f"worker-nodes-{text}", f"{text}-wrkrs", "worker")
    group.internal_name = spec.name or group.task_group_name
    return group


def _new_group(
    prefix: str,
    role: Role,
    spec: NodeGroupSpec,
    task_group: str,
    suffix: str,
    script_name: str,
) -> NodeGroup:
    name = f"{prefix}-{suffix}"
    worker_tag = f"{name}-00" if role == "observability" else name
    limit = spec.node_limit if isinstance(spec, WorkerPoolSpec) else 1
    return NodeGroup(
        role=role,
        internal_name=task_group,
        spec=spec,
        requirement_name=name,
        worker_tag=worker_tag,
        task_group_name=task_group,
        task_group_base=task_group,
        script=spec.script_text(script_name),
        node_limit=limit,
    )


def provision_pool(client: PlatformClient, group: NodeGroup, cluster: ClusterSpec,
                   login: SSHLogin | None = None) -> None:
    """Provision the group's worker pool and record its pool and compute requirement IDs; its
    userdata authorizes `login`'s key when the key is the cluster's own."""
    spec = group.spec
    request = node_requests.PoolRequest(
        template_id=spec.template_id,
        name=group.requirement_name,
        namespace=cluster.namespace,
        tag=cluster.tag,
        worker_tag=group.worker_tag,
        count=spec.start_count if isinstance(spec, WorkerPoolSpec) else 1,
        max_nodes=group.node_limit,
        idle_node_shutdown=cluster.idle_node_shutdown,
        idle_pool_shutdown=cluster.idle_pool_shutdown,
        images_id=spec.images_id,
        userdata=login.authorizing(spec.userdata) if login is not None else spec.userdata,
        instance_tags=spec.instance_tags,
        metrics_enabled=spec.metrics_enabled,
    )
    group.provision_attempted = True
    try:
        pool = client.worker_pool_client.provision_worker_pool(
            request.usage(), request.properties()
        )
    except Exception as error:
        hint = (
            "; check the template ID (or 'namespace/name') in the YellowDog portal"
            if isinstance(error, InvalidRequestException)
            else ""
        )
        raise ClusterBuildError(
            f"Provisioning the {group.role} pool {group.internal_name!r} from template "
            f"{spec.template_id!r} failed: {error}{hint}"
        ) from error
    group.pool_id = pool.id
    group.compute_requirement_id = pool.computeRequirementId
    logger.debug("Provisioned %s", group.describe())


def task_group(group: NodeGroup, cluster: ClusterSpec) -> TaskGroup:
    """The task group that runs the group's node tasks on its pool's workers."""
    return node_requests.node_task_group(
        group.task_group_name,
        group.internal_name,
        group.worker_tag,
        cluster.namespace,
        cluster.cluster_lifetime,
        is_head=group.role == "head",
    )


def append_task_group(
    client: PlatformClient, work_requirement_id: str | None, group: NodeGroup, cluster: ClusterSpec
) -> None:
    """Append the group's task group to the cluster's live work requirement."""
    work = client.work_client
    requirement = work.get_work_requirement_by_id(work_requirement_id)
    requirement.taskGroups = [*(requirement.taskGroups or []), task_group(group, cluster)]
    requirement = work.update_work_requirement(requirement)
    group.task_group_id = next(
        tg.id for tg in requirement.taskGroups or [] if tg.name == group.task_group_name
    )


def node_tasks(group: NodeGroup, names: list[str], environment: dict[str, str]) -> list[Task]:
    """One task per name that starts a Ray node of the group, with the given environment."""
    return node_requests.node_tasks(names, group.script, {**group.spec.environment, **environment})


def abort_task(client: PlatformClient, task_id: str) -> None:
    """Abort a node's task; one that ended meanwhile (its Ray stopped, its node lost) is left
    as it is, where YellowDog refuses the cancel as an invalid transition."""
    try:
        client.work_client.cancel_task_by_id(task_id, True)
    except HTTPError:
        status = client.work_client.get_task_by_id(task_id).status
        if status is None or not status.finished:
            raise


def live_task_ids(
    client: PlatformClient, work_requirement_id: str | None, group: NodeGroup
) -> list[str]:
    """The group's node tasks that have not finished, in the order they were added."""
    search = TaskSearch(
        workRequirementId=work_requirement_id,
        taskGroupId=group.task_group_id,
        statuses=_LIVE_TASK,
    )
    live = {task.id for task in client.work_client.get_tasks(search).iterate()}
    return [task_id for task_id in group.task_ids if task_id in live]


def node_addresses(client: PlatformClient, group: NodeGroup, task: Task) -> tuple[str, str | None]:
    """The private and public IP of the node running the task (task -> node -> instance)."""
    pools = client.worker_pool_client
    node = (
        pools.get_node_by_id(task.nodeId)
        if task.nodeId
        else pools.get_node_by_worker_id(task.workerId)
    )
    details = node.details
    if details is None or not details.privateIpAddress:
        raise ClusterBuildError(f"Node {node.id} of {group.describe()} reports no private IP")
    public_ip = details.publicIpAddress or _public_ip(client, group, details.instanceId)
    return details.privateIpAddress, public_ip


def _public_ip(client: PlatformClient, group: NodeGroup, instance_id: str) -> str | None:
    search = InstanceSearch(computeRequirementId=group.compute_requirement_id)
    for instance in client.compute_client.get_instances(search).iterate():
        if instance.id is not None and instance.id.instanceId == instance_id:
            return instance.publicIpAddress
    return None


def running_nodes(client: PlatformClient, groups: list[NodeGroup]) -> dict[str, str]:
    """The running nodes of the groups' pools: {node id: private IP}."""
    nodes = {}
    for group in groups:
        if group.pool_id:
            search = NodeSearch(workerPoolId=group.pool_id, statuses=[NodeStatus.RUNNING])
            for node in client.worker_pool_client.get_nodes(search).iterate():
                if node.details is not None and node.details.privateIpAddress:
                    nodes[node.id] = node.details.privateIpAddress
    return nodes
