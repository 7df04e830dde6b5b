"""YellowDog's compute entities (compute requirements, worker pools, and nodes with their
instances and workers) and their wire forms."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

from prefect_raydog.local.state.actions import ActionQueue
from prefect_raydog.local.state.errors import InvalidRequest, auto_shutdown
from prefect_raydog.local.templates import IMAGE, PROVIDER, REGION, NodeMode, Template
from prefect_raydog.local.wire import ACCOUNT, TYPE_PREFIX, compact, iso_time, new_uuid, now

if TYPE_CHECKING:
    from prefect_raydog.local.state.work import Task

MAX_NODES = 10_000
"""The most nodes one worker pool has (the platform's MAX_WORKER_POOL_NODE_COUNT)."""
ALIVE = ("PENDING", "RUNNING")


class ComputeRequirement:
    def __init__(self, usage: dict[str, Any], namespace: str, name: str, template: Template):
        self.uuid = new_uuid()
        self.id = f"ydid:compreq:{ACCOUNT}:{self.uuid}"
        self.source_id = f"ydid:compsrc:{ACCOUNT}:{self.uuid}:1"
        self.namespace, self.name, self.template = namespace, name, template
        self.usage = usage
        self.tag = usage.get("requirementTag")
        self.user_data: str | None = usage.get("userData")
        self.target = 0
        self.stopped = False
        self.starting = False
        self.status = "PROVISIONING"
        self.next_status: str | None = None
        self.created = self.status_changed = now()
        self.pool: WorkerPool | None = None

    def set_status(self, status: str, next_status: str | None = None) -> None:
        self.next_status = next_status
        if status != self.status:
            self.status, self.status_changed = status, now()

    @property
    def instances(self) -> list[Node]:
        return self.pool.nodes if self.pool else []

    @property
    def target_count(self) -> int:
        """The instances wanted: set by provisioning and resizing, followed by the pool as it
        grows for waiting tasks and stops idle nodes; lost or terminated instances still
        count, until the requirement is reprovisioned."""
        return self.target

    def _status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.instances:
            counts[node.instance_status] = counts.get(node.instance_status, 0) + 1
        return counts

    def to_wire(self) -> dict[str, Any]:
        counts = self._status_counts()
        expected = sum(n for status, n in counts.items() if status != "TERMINATED")
        source = {
            **self.template.source(),
            **({"userData": self.user_data} if self.user_data else {}),
            "id": self.source_id,
            "createdFromId": self.template.source_template_id,
            "provider": PROVIDER,
            "status": "INACTIVE" if self.status == "TERMINATED" else "ACTIVE",
            "instanceSummary": {
                "statusCounts": counts,
                "aliveCount": sum(counts.get(status, 0) for status in ALIVE),
                "requestedCount": self.target_count,
                "expectedCount": expected,
                "totalCount": sum(counts.values()),
                "lastUpdatedTime": iso_time(now()),
            },
        }
        return compact(
            {
                "id": self.id,
                "namespace": self.namespace,
                "name": self.name,
                "tag": self.tag,
                "createdTime": iso_time(self.created),
                "createdFromId": self.template.requirement_template_id,
                "status": self.status,
                "nextStatus": self.next_status,
                "statusChangedTime": iso_time(self.status_changed),
                "targetInstanceCount": self.target_count,
                "expectedInstanceCount": expected,
                "maintainInstanceCount": False,
                "supportedOperations": {
                    "canStopStart": True,
                    "canScaleOut": True,
                    "canReprovision": True,
                },
                "provisionStrategy": {
                    "type": TYPE_PREFIX + "SingleSourceProvisionStrategy",
                    "sources": [source],
                },
            }
        )

    def summary(self) -> dict[str, Any]:
        """The `ComputeRequirementSummary` a search with `summaries=true` returns."""
        counts = self._status_counts()
        return compact(
            {
                "id": self.id,
                "namespace": self.namespace,
                "name": self.name,
                "tag": self.tag,
                "targetInstanceCount": self.target_count,
                "expectedInstanceCount": sum(
                    n for status, n in counts.items() if status != "TERMINATED"
                ),
                "aliveInstanceCount": sum(counts.get(status, 0) for status in ALIVE),
                "createdTime": iso_time(self.created),
                "statusChangedTime": iso_time(self.status_changed),
                "status": self.status,
                "healthy": True,
            }
        )


class WorkerPool:
    def __init__(
        self, namespace: str, name: str, properties: dict[str, Any], requirement: ComputeRequirement
    ) -> None:
        what = f"Worker pool '{namespace}/{name}'"
        self.id = f"ydid:wrkrpool:{ACCOUNT}:{new_uuid()}"
        self.namespace, self.name, self.properties = namespace, name, properties
        self.requirement = requirement
        self.template = requirement.template
        self.worker_tag: str | None = properties.get("workerTag")
        self.min_nodes = int(properties.get("minNodes") or 0)
        max_nodes = int(properties.get("maxNodes") or MAX_NODES)
        if not 0 <= self.min_nodes <= min(max_nodes, MAX_NODES):
            raise InvalidRequest(
                f"{what}: minNodes ({self.min_nodes}) and maxNodes ({max_nodes}) must "
                f"satisfy 0 <= minNodes <= maxNodes and minNodes <= {MAX_NODES}"
            )
        # A larger maxNodes is accepted (RayDog's autoscaler asks for 100000 on every worker
        # pool) and the pool grows to the platform's limit at most.
        self.max_nodes = min(max_nodes, MAX_NODES)
        self.idle_node_timeout = auto_shutdown(
            properties.get("idleNodeShutdown"), f"{what}: idleNodeShutdown.timeout"
        )
        self.idle_pool_timeout = auto_shutdown(
            properties.get("idlePoolShutdown"), f"{what}: idlePoolShutdown.timeout"
        )
        self.status = "PENDING"
        self.created = self.status_changed = now()
        self.visible = True
        self.nodes: list[Node] = []
        self.live = self.booting = self.registered = self.busy = 0
        self.idle_epoch = 0
        self.idle_since: float | None = None

    def set_status(self, status: str) -> None:
        if status != self.status:
            self.status, self.status_changed = status, now()

    @property
    def shut_down(self) -> bool:
        return self.status in ("SHUTDOWN", "TERMINATED")

    def _counts(self, attribute: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            value = getattr(node, attribute)
            if value is not None:
                counts[value] = counts.get(value, 0) + 1
        return counts

    def _action_queue_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            if node.status == "RUNNING":
                counts[node.actions.status] = counts.get(node.actions.status, 0) + 1
        return counts

    def to_wire(self) -> dict[str, Any]:
        stamp = iso_time(now())
        return compact(
            {
                "type": TYPE_PREFIX + "ProvisionedWorkerPool",
                "id": self.id,
                "name": self.name,
                "namespace": self.namespace,
                "createdTime": iso_time(self.created),
                "status": self.status,
                "statusChangedTime": iso_time(self.status_changed),
                "expectedNodeCount": self.live,
                "awaitingNodes": self.booting > 0,
                "workerSummary": {
                    "statusCounts": self._counts("worker_status"),
                    "claimedWorkerCount": self.busy,
                    "lastUpdatedTime": stamp,
                },
                "nodeSummary": {
                    "statusCounts": self._counts("status"),
                    "actionQueueStatuses": self._action_queue_counts(),
                    "lastUpdatedTime": stamp,
                },
                "properties": self.properties,
                "computeRequirementId": self.requirement.id,
            }
        )

    def summary(self) -> dict[str, Any]:
        return compact(
            {
                "id": self.id,
                "name": self.name,
                "namespace": self.namespace,
                "type": TYPE_PREFIX + "ProvisionedWorkerPool",
                "status": self.status,
                "registeredNodeCount": self.registered,
                "registeredWorkerCount": self.registered,
                "claimedWorkerCount": self.busy,
                "workingWorkerCount": self.busy,
                "createdTime": iso_time(self.created),
                "statusChangedTime": iso_time(self.status_changed),
                "healthy": True,
            }
        )


class Node:
    """A node together with its instance and its one worker (PER_NODE, one worker a node)."""

    def __init__(self, pool: WorkerPool) -> None:
        self.uuid = new_uuid()
        self.id = f"ydid:node:{ACCOUNT}:{self.uuid}"
        self.worker_id = f"ydid:wrkr:{ACCOUNT}:{self.uuid}:1"
        self.instance_id = "i-" + uuid.uuid4().hex[:17]
        self.hostname = f"yd-{self.uuid[:8]}"
        self.pool = pool
        self.private_ip: str | None = None
        self.public_ip: str | None = None
        self.instance_status = "PENDING"
        self.created = self.instance_changed = now()
        self.status: str | None = None
        self.status_changed: datetime | None = None
        self.registered: datetime | None = None
        self.deregistered: datetime | None = None
        self.worker_status: str | None = None
        self.task: Task | None = None
        self.idle_epoch = 0
        self.stopping = False
        self.boot_started = False
        self.draining = False
        self.halted = False
        self.restart = False
        self.actions = ActionQueue()

    @property
    def simulated(self) -> bool:
        return self.pool.template.mode is NodeMode.SIMULATED

    def set_status(self, status: str) -> None:
        if status != self.status:
            self.status, self.status_changed = status, now()

    def set_instance_status(self, status: str) -> None:
        if status != self.instance_status:
            self.instance_status, self.instance_changed = status, now()

    def to_wire(self) -> dict[str, Any]:
        template = self.pool.template
        worker = compact(
            {
                "id": self.worker_id,
                "status": self.worker_status,
                "taskGroupId": self.task.group.id if self.task else None,
                "registeredTime": iso_time(self.registered),
            }
        )
        return compact(
            {
                "id": self.id,
                "workerPoolId": self.pool.id,
                "status": self.status,
                "statusChangedTime": iso_time(self.status_changed),
                "registeredTime": iso_time(self.registered),
                "deregisteredTime": iso_time(self.deregistered),
                "agentVersion": "local",
                "actionQueueStatus": self.actions.status,
                "details": compact(
                    {
                        "instanceId": self.instance_id,
                        "provider": PROVIDER,
                        "region": REGION,
                        "sourceName": template.id.replace("/", "-"),
                        "sourceNumber": 1,
                        "instanceType": template.instance_type,
                        "hostname": self.hostname,
                        "privateIpAddress": self.private_ip,
                        "publicIpAddress": self.public_ip,
                        "vcpus": template.vcpus,
                        "ram": template.memory_gb,
                        "supportedTaskTypes": list(template.supported_task_types),
                        "workerTag": self.pool.worker_tag,
                        "spot": False,
                    }
                ),
                "workers": [worker],
            }
        )

    def instance_to_wire(self) -> dict[str, Any]:
        return compact(
            {
                "type": TYPE_PREFIX + "SimulatorInstance",
                "id": {"sourceId": self.pool.requirement.source_id, "instanceId": self.instance_id},
                "createdTime": iso_time(self.created),
                "provider": PROVIDER,
                "region": REGION,
                "instanceType": self.pool.template.instance_type,
                "imageId": IMAGE,
                "hostname": self.hostname,
                "privateIpAddress": self.private_ip,
                "publicIpAddress": self.public_ip,
                "spot": False,
                "status": self.instance_status,
                "statusChangedTime": iso_time(self.instance_changed),
            }
        )
