"""The local platform's entities and their status machines (work requirements, task groups,
tasks, worker pools, nodes, compute requirements, instances), with no HTTP in sight.

Everything is guarded by one lock. A scheduler thread runs `step()` whenever something changes
and at least every 50 ms for timers: it boots nodes, lets idle workers claim waiting tasks,
grows pools to meet waiting tasks, and ends timed-out tasks and idle nodes and pools. Process
nodes' processes are run by a `NodeRunner`, always called outside the lock.

Choices where YellowDog's behaviour is not documented (contract section 5 and 9.1):
- Tasks are READY as soon as they are added. A worker that has no task is STOPPED (not
  claimed); while it runs a task it is RUNNING with the task's group as its claim.
- Aborted tasks (cancel with abort, pool shutdown) end ABORTED; tasks on a node that is killed
  or whose compute requirement is terminated end FAILED with an ALLOCATION_LOST error; a task
  that passes its timeout ends FAILED with a TIMED_OUT error. A process task keeps its status
  until its process has really ended.
- A task group with a FAILED task ends FAILED, otherwise COMPLETED; a work requirement ends
  FAILED when any of its groups failed, COMPLETED otherwise, CANCELLED when it was cancelled.
- A pool is idle (for `idlePoolShutdown`) when none of its nodes is booting or running a task;
  a node is idle (for `idleNodeShutdown`) from registration or from the end of its last task.
  Idle node shutdown never takes a pool below `minNodes`.
- When several pools can serve one task group, each grows for all of its waiting tasks.
- `DELETE` of a pool that is already SHUTDOWN or TERMINATED, and terminating a compute
  requirement that is already TERMINATING or TERMINATED, succeed and change nothing: RayDog's
  own teardown issues both calls in both orders (contract 1.2), so the real platform must
  accept the second one.
- Searches page 100 items by default (`size` from 1 to 1000); slice ids are opaque offsets.
  Results come in creation order (`sortDirection=DESCENDING` reverses it; `sortField` is
  ignored).
- Only RUNNING or HELD work requirements can be updated (PUT); new task groups are appended.
- Resizing a pool adds nodes or stops idle ones, newest first; shutting down one node lets
  its task end first (the SDK documents it as graceful).
- Process nodes: a task whose process cannot be started ends FAILED (UNABLE_START_PROCESS).
- Duplicate names are refused only among live pools and unfinished work requirements.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

from prefect_raydog.local.nodes import NodeRunner, TaskLaunch
from prefect_raydog.local.templates import NodeMode, Template, TemplateCatalogue, TemplateError
from prefect_raydog.local.wire import (
    TYPE_PREFIX,
    compact,
    iso_duration,
    iso_time,
    now,
    parse_duration,
    parse_time,
)

logger = logging.getLogger(__name__)

ACCOUNT = "000000"
MAX_NODES = 10_000
DEFAULT_PAGE = 100
MAX_PAGE = 1000
STEP_INTERVAL_S = 0.05
PROVIDER = "ON_PREMISE"
REGION = "local"

WR_FINISHED = {"COMPLETED", "FAILED", "CANCELLED"}
GROUP_TERMINATED = {"COMPLETED", "FAILED", "CANCELLED"}
GROUP_CLOSED = GROUP_TERMINATED | {"FAILING", "CANCELLING", "FINISHING"}
TASK_FINISHED = {"COMPLETED", "FAILED", "ABORTED", "CANCELLED", "DISCARDED", "RESUBMITTED"}
WR_TRANSITIONS = {
    "HELD": {"RUNNING"},
    "RUNNING": {"HELD"},
    "FINISHING": {"RUNNING", "HELD"},
    "CANCELLING": {"RUNNING", "HELD", "FINISHING", "CANCELLING"},
}
TASK_READ_ONLY = {
    "id",
    "status",
    "retryCount",
    "taskGroupId",
    "nodeId",
    "workerId",
    "errors",
    "resubmittedToTaskId",
    "resubmittedFromTaskId",
    "startedTime",
    "finishedTime",
    "workingTime",
    "abortRequestedTime",
}
GROUP_READ_ONLY = {"id", "status", "statusChangedTime", "taskSummary"}
WR_READ_ONLY = {"id", "status", "createdTime", "statusChangedTime", "taskGroups"}


class PlatformError(Exception):
    """An error answered in YellowDog's shape: HTTP status, `errorType` and message."""

    status_code = 400
    error_type: str | None = "InvalidRequestException"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidRequest(PlatformError):
    pass


class NotFound(PlatformError):
    status_code = 404
    error_type = None


class InvalidTransition(PlatformError):
    status_code = 403

    def __init__(self, entity: str, current: str, requested: str) -> None:
        super().__init__(f"Invalid transition from {current} to {requested}")
        self.error_type = f"Invalid{entity}StatusException"


def _uuid() -> str:
    return str(uuid.uuid4())


def _require_text(document: dict[str, Any], key: str, what: str) -> str:
    value = document.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidRequest(f"{what}: field '{key}' is required and must be a non-empty string")
    return value


def _duration(value: Any, what: str) -> timedelta | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError:
        raise InvalidRequest(f"{what}: '{value}' is not an ISO-8601 duration") from None


def _auto_shutdown(value: Any, what: str) -> timedelta | None:
    """The timeout of an enabled AutoShutdown, or None when it is off."""
    if not isinstance(value, dict) or not value.get("enabled"):
        return None
    return _duration(value.get("timeout", "PT0S"), what) or timedelta(0)


class WorkRequirement:
    def __init__(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        self.uuid = _uuid()
        self.id = f"ydid:workreq:{ACCOUNT}:{self.uuid}"
        self.namespace = namespace
        self.name = name
        self.spec = spec
        self.status = "RUNNING"
        self.created = self.status_changed = now()
        self.groups: list[TaskGroup] = []

    def set_status(self, status: str) -> None:
        if status != self.status:
            self.status, self.status_changed = status, now()

    def to_wire(self) -> dict[str, Any]:
        return compact(
            {
                **self.spec,
                "id": self.id,
                "namespace": self.namespace,
                "name": self.name,
                "status": self.status,
                "createdTime": iso_time(self.created),
                "statusChangedTime": iso_time(self.status_changed),
                "taskGroups": [group.to_wire() for group in self.groups],
            }
        )

    def summary(self) -> dict[str, Any]:
        tasks = [task for group in self.groups for task in group.tasks]
        return compact(
            {
                "id": self.id,
                "namespace": self.namespace,
                "name": self.name,
                "tag": self.spec.get("tag"),
                "priority": self.spec.get("priority", 0),
                "status": self.status,
                "createdTime": iso_time(self.created),
                "statusChangedTime": iso_time(self.status_changed),
                "completedTaskCount": sum(task.status == "COMPLETED" for task in tasks),
                "totalTaskCount": len(tasks),
                "healthy": True,
            }
        )


class TaskGroup:
    def __init__(self, requirement: WorkRequirement, number: int, spec: dict[str, Any]) -> None:
        what = f"Task group '{spec.get('name')}' of work requirement '{requirement.name}'"
        self.name = _require_text(spec, "name", what)
        run = spec.get("runSpecification")
        if not isinstance(run, dict) or not run.get("taskTypes"):
            raise InvalidRequest(f"{what}: field 'runSpecification.taskTypes' is required")
        self.requirement = requirement
        self.number = number
        self.id = f"ydid:taskgrp:{ACCOUNT}:{requirement.uuid}:{number}"
        self.spec = spec
        self.task_types: list[str] = list(run["taskTypes"])
        self.worker_tags: list[str] | None = run.get("workerTags") or None
        self.namespaces: list[str] | None = run.get("namespaces") or None
        self.timeout = _duration(run.get("taskTimeout"), f"{what}: runSpecification.taskTimeout")
        self.finish_if_all = spec.get("finishIfAllTasksFinished", True)
        self.finish_if_any_failed = spec.get("finishIfAnyTaskFailed", False)
        self.status = "HELD" if requirement.status == "HELD" else "PENDING"
        self.status_changed = self.updated = now()
        self.tasks: list[Task] = []
        self.ready: deque[Task] = deque()
        self.executing = 0

    def set_status(self, status: str) -> None:
        if status != self.status:
            self.status, self.status_changed = status, now()

    def claimable(self) -> bool:
        return self.requirement.status in ("RUNNING", "FINISHING") and self.status in (
            "PENDING",
            "RUNNING",
            "FINISHING",
        )

    def to_wire(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for task in self.tasks:
            counts[task.status] = counts.get(task.status, 0) + 1
        return compact(
            {
                **self.spec,
                "id": self.id,
                "status": self.status,
                "statusChangedTime": iso_time(self.status_changed),
                "taskSummary": {
                    "statusCounts": counts,
                    "taskCount": len(self.tasks),
                    "lastUpdatedTime": iso_time(self.updated),
                },
            }
        )


class Task:
    def __init__(self, group: TaskGroup, number: int, spec: dict[str, Any]) -> None:
        self.group = group
        self.id = f"ydid:task:{ACCOUNT}:{group.requirement.uuid}:{group.number}:{number}"
        self.spec = spec
        self.status = "READY"
        self.node: Node | None = None
        self.started: datetime | None = None
        self.finished: datetime | None = None
        self.abort_requested: datetime | None = None
        self.errors: list[dict[str, Any]] = []
        self.outcome: tuple[str, dict[str, Any] | None] | None = None
        self.timeout = _duration(spec.get("timeout"), f"Task '{spec.get('name')}': timeout")

    @property
    def task_type(self) -> str:
        return self.spec["taskType"]

    def to_wire(self) -> dict[str, Any]:
        node = self.node
        return compact(
            {
                **self.spec,
                "id": self.id,
                "taskGroupId": self.group.id,
                "status": self.status,
                "retryCount": 0,
                "nodeId": node.id if node else None,
                "workerId": node.worker_id if node else None,
                "startedTime": iso_time(self.started),
                "finishedTime": iso_time(self.finished),
                "abortRequestedTime": iso_time(self.abort_requested),
                "errors": self.errors or None,
            }
        )


class ComputeRequirement:
    def __init__(self, usage: dict[str, Any], namespace: str, name: str, template: Template):
        self.uuid = _uuid()
        self.id = f"ydid:compreq:{ACCOUNT}:{self.uuid}"
        self.source_id = f"ydid:compsrc:{ACCOUNT}:{self.uuid}:1"
        self.namespace, self.name, self.template = namespace, name, template
        self.tag = usage.get("requirementTag")
        self.target = 0
        self.status = "PROVISIONING"
        self.next_status: str | None = None
        self.created = self.status_changed = now()
        self.pool: WorkerPool | None = None

    def set_status(self, status: str, next_status: str | None = None) -> None:
        self.next_status = next_status
        if status != self.status:
            self.status, self.status_changed = status, now()

    def to_wire(self) -> dict[str, Any]:
        nodes = self.pool.nodes if self.pool else []
        return compact(
            {
                "id": self.id,
                "namespace": self.namespace,
                "name": self.name,
                "tag": self.tag,
                "createdTime": iso_time(self.created),
                "createdFromId": f"local:{self.template.id}",
                "status": self.status,
                "nextStatus": self.next_status,
                "statusChangedTime": iso_time(self.status_changed),
                "targetInstanceCount": self.target,
                "expectedInstanceCount": sum(n.instance_status != "TERMINATED" for n in nodes),
                "maintainInstanceCount": False,
                "supportedOperations": {
                    "canStopStart": False,
                    "canScaleOut": True,
                    "canReprovision": False,
                },
                "provisionStrategy": {
                    "type": TYPE_PREFIX + "SingleSourceProvisionStrategy",
                    "sources": [
                        {
                            "type": TYPE_PREFIX + "SimulatorComputeSource",
                            "id": self.source_id,
                            "name": self.template.id.replace("/", "-"),
                            "region": REGION,
                            "instanceType": self.template.instance_type,
                            "imageId": "local",
                            "status": "ACTIVE",
                            "limit": 0,
                        }
                    ],
                },
            }
        )


class WorkerPool:
    def __init__(
        self, namespace: str, name: str, properties: dict[str, Any], requirement: ComputeRequirement
    ) -> None:
        what = f"Worker pool '{namespace}/{name}'"
        self.id = f"ydid:wrkrpool:{ACCOUNT}:{_uuid()}"
        self.namespace, self.name, self.properties = namespace, name, properties
        self.requirement = requirement
        self.template = requirement.template
        self.worker_tag: str | None = properties.get("workerTag")
        self.min_nodes = int(properties.get("minNodes") or 0)
        self.max_nodes = int(properties.get("maxNodes") or MAX_NODES)
        if not 0 <= self.min_nodes <= self.max_nodes <= MAX_NODES:
            raise InvalidRequest(
                f"{what}: minNodes ({self.min_nodes}) and maxNodes ({self.max_nodes}) must "
                f"satisfy 0 <= minNodes <= maxNodes <= {MAX_NODES}"
            )
        self.idle_node_timeout = _auto_shutdown(
            properties.get("idleNodeShutdown"), f"{what}: idleNodeShutdown.timeout"
        )
        self.idle_pool_timeout = _auto_shutdown(
            properties.get("idlePoolShutdown"), f"{what}: idlePoolShutdown.timeout"
        )
        self.status = "PENDING"
        self.created = self.status_changed = now()
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
                    "actionQueueStatuses": {"EMPTY": self.registered},
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
        self.uuid = _uuid()
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
                "actionQueueStatus": "EMPTY",
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
                "imageId": "local",
                "hostname": self.hostname,
                "privateIpAddress": self.private_ip,
                "publicIpAddress": self.public_ip,
                "spot": False,
                "status": self.instance_status,
                "statusChangedTime": iso_time(self.instance_changed),
            }
        )


class Query:
    """A search's query parameters: repeated keys, `x.min`/`x.max` ranges, `True`/`False`."""

    def __init__(self, params: dict[str, list[str]]) -> None:
        self.params = params

    def one(self, key: str) -> str | None:
        values = self.params.get(key)
        return values[-1] if values else None

    def many(self, key: str) -> set[str] | None:
        values = self.params.get(key)
        return set(values) if values else None

    def flag(self, key: str) -> bool | None:
        value = self.one(key)
        return None if value is None else value.lower() == "true"

    def in_range(self, key: str, moment: datetime | None) -> bool:
        low, high = self.one(f"{key}.min"), self.one(f"{key}.max")
        if low is None and high is None:
            return True
        if moment is None:
            return False
        try:
            return (low is None or moment >= parse_time(low)) and (
                high is None or moment <= parse_time(high)
            )
        except ValueError:
            raise InvalidRequest(f"Search field '{key}': not an ISO-8601 date-time") from None

    def page(self, items: Iterable[Any], render: Callable[[Any], dict]) -> dict[str, Any]:
        matched = list(items)
        if self.one("sortDirection") == "DESCENDING":
            matched.reverse()
        try:
            start = int(self.one("sliceId") or 0)
            size = int(self.one("size") or DEFAULT_PAGE)
        except ValueError:
            raise InvalidRequest("Search: 'sliceId' and 'size' must be integers") from None
        if not 1 <= size <= MAX_PAGE:
            raise InvalidRequest(f"Search: field 'size' must be between 1 and {MAX_PAGE}")
        end = start + size
        return {
            "items": [render(item) for item in matched[start:end]],
            "nextSliceId": str(end) if end < len(matched) else None,
        }


def _matches(query: Query, key: str, value: Any) -> bool:
    wanted = query.many(key)
    return wanted is None or value in wanted


class PlatformState:
    """Every entity of the local platform, and the scheduler that moves them along."""

    def __init__(
        self,
        templates: TemplateCatalogue,
        runner: NodeRunner | None = None,
        runner_unavailable: str = "no node runner was configured",
    ) -> None:
        self.templates = templates
        self.runner = runner
        self.runner_unavailable = runner_unavailable
        self._cond = threading.Condition(threading.Lock())
        self._requirements: dict[str, WorkRequirement] = {}
        self._groups: dict[str, TaskGroup] = {}
        self._tasks: dict[str, Task] = {}
        self._pools: dict[str, WorkerPool] = {}
        self._compute: dict[str, ComputeRequirement] = {}
        self._nodes: dict[str, Node] = {}
        self._nodes_by_worker: dict[str, Node] = {}
        self._open_pools: dict[WorkerPool, None] = {}
        self._idle: dict[WorkerPool, dict[Node, None]] = {}
        self._waiting: dict[TaskGroup, None] = {}
        self._timers: list[tuple[float, int, str, Any, int]] = []
        self._sequence = itertools.count()
        self._actions: list[Callable[[], None]] = []
        self._dirty = False
        self._boot_failures: list[str | None] = []
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="yd-local-node")
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="yd-local-scheduler", daemon=True)
        self._thread.start()

    @property
    def stopped(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                if not (self._dirty or self._actions):
                    self._cond.wait(self._wait_time())
                try:
                    self.step()
                except Exception:  # a bug in one step must not stop the whole platform
                    logger.exception("The local platform's scheduler step failed")
                actions, self._actions = self._actions, []
            for action in actions:
                action()

    def _wait_time(self) -> float:
        if not self._timers:
            return STEP_INTERVAL_S
        return max(0.0, min(STEP_INTERVAL_S, self._timers[0][0] - time.monotonic()))

    def _changed(self) -> None:
        self._dirty = True
        self._cond.notify_all()

    def _timer(self, delay_s: float, kind: str, subject: Any, epoch: int = 0) -> None:
        heapq.heappush(
            self._timers, (time.monotonic() + delay_s, next(self._sequence), kind, subject, epoch)
        )

    def _later(self, action: Callable[[], None]) -> None:
        """Run `action` off the lock, in the node thread pool (it may block)."""
        self._actions.append(lambda: self._executor.submit(self._logged, action))

    @staticmethod
    def _logged(action: Callable[[], None]) -> None:
        try:
            action()
        except Exception:  # the executor would swallow it silently
            logger.exception("A node action of the local platform failed")

    # ---- the scheduler ---------------------------------------------------------------------

    def step(self) -> None:
        """Fire due timers, let idle workers claim waiting tasks, grow pools. Caller holds the
        lock; cheap when nothing changed."""
        clock = time.monotonic()
        while self._timers and self._timers[0][0] <= clock:
            _, _, kind, subject, epoch = heapq.heappop(self._timers)
            getattr(self, f"_on_{kind}")(subject, epoch)
        if self._dirty:
            self._dirty = False
            self._claim_tasks()
            self._grow_pools()

    def _claim_tasks(self) -> None:
        for group in list(self._waiting):
            if not group.ready:
                del self._waiting[group]
                continue
            if not group.claimable():
                continue
            while group.ready:
                node = self._find_idle_node(group, group.ready[0])
                if node is None:
                    break
                self._start_task(group.ready.popleft(), node)
            if not group.ready:
                del self._waiting[group]

    def _find_idle_node(self, group: TaskGroup, task: Task) -> Node | None:
        for pool, idle in self._idle.items():
            if (
                idle
                and _pool_serves(pool, group)
                and (task.task_type in pool.template.supported_task_types)
            ):
                return next(iter(idle))
        return None

    def _grow_pools(self) -> None:
        groups = [group for group in self._waiting if group.claimable()]
        if not groups:
            return
        for pool in self._open_pools:
            if pool.live >= pool.max_nodes:
                continue
            demand = sum(len(group.ready) for group in groups if _pool_serves(pool, group))
            idle = pool.registered - pool.busy
            extra = min(demand - idle - pool.booting, pool.max_nodes - pool.live)
            for _ in range(max(0, extra)):
                self._add_node(pool)

    # ---- timers ----------------------------------------------------------------------------

    def _on_boot(self, node: Node, _epoch: int) -> None:
        if node.stopping:
            return
        if self._boot_fails(node):
            self._boot_failed(node)
        elif node.simulated:
            node.private_ip = node.public_ip = "127.0.0.1"
            self._register(node)
        else:
            node.boot_started = True
            self._later(lambda: self._boot_process_node(node))

    def _on_task_timeout(self, task: Task, _epoch: int) -> None:
        if task.status == "EXECUTING" and task.outcome is None:
            limit = iso_duration(task.timeout or task.group.timeout or timedelta(0))
            self._abort(
                task, "FAILED", self._error(task, "TIMED_OUT", f"Task timed out after {limit}")
            )

    def _on_node_idle(self, node: Node, epoch: int) -> None:
        pool = node.pool
        if epoch != node.idle_epoch or node.task is not None or node.stopping:
            return
        if node.status == "RUNNING" and pool.registered > pool.min_nodes:
            self._stop_node(node, "ABORTED", None)

    def _on_pool_idle(self, pool: WorkerPool, epoch: int) -> None:
        if epoch == pool.idle_epoch and pool.idle_since is not None and not pool.shut_down:
            self._shut_down_pool(pool)

    # ---- nodes -----------------------------------------------------------------------------

    def _add_node(self, pool: WorkerPool) -> Node:
        node = Node(pool)
        pool.nodes.append(node)
        pool.live += 1
        pool.booting += 1
        self._nodes[node.id] = node
        self._nodes_by_worker[node.worker_id] = node
        self._timer(pool.template.boot_delay_s, "boot", node)
        self._refresh_pool(pool)
        return node

    def _boot_fails(self, node: Node) -> bool:
        for index, pool_id in enumerate(self._boot_failures):
            if pool_id is None or pool_id == node.pool.id:
                del self._boot_failures[index]
                return True
        rate = node.pool.template.boot_failure_rate
        return rate > 0 and random.random() < rate

    def _boot_process_node(self, node: Node) -> None:
        assert self.runner is not None
        try:
            address = self.runner.boot_node(node.id, node.hostname)
        except Exception as error:  # whatever stops a node booting is its boot failure
            logger.warning(
                "Node %s of worker pool %s failed to boot: %s", node.id, node.pool.id, error
            )
            with self._cond:
                self._boot_failed(node)
                self._changed()
            return
        with self._cond:
            node.private_ip, node.public_ip = address.private_ip, address.public_ip
            node.hostname = address.hostname
            if node.stopping:
                self._later(lambda: self._stop_process_node(node, kill=False, lost=False))
            else:
                self._register(node)
            self._changed()

    def _boot_failed(self, node: Node) -> None:
        node.stopping = True
        node.set_instance_status("TERMINATED")
        node.pool.booting -= 1
        node.pool.live -= 1
        self._refresh_pool(node.pool)

    def _register(self, node: Node) -> None:
        pool = node.pool
        pool.booting -= 1
        pool.registered += 1
        node.set_instance_status("RUNNING")
        node.set_status("RUNNING")
        node.registered = now()
        self._worker_idle(node)
        self._refresh_pool(pool)

    def _worker_idle(self, node: Node) -> None:
        node.worker_status = "STOPPED"
        idle = self._idle.get(node.pool)
        if idle is not None:
            idle[node] = None
        node.idle_epoch += 1
        timeout = node.pool.idle_node_timeout
        if timeout is not None:
            self._timer(timeout.total_seconds(), "node_idle", node, node.idle_epoch)
        self._changed()

    def _worker_busy(self, node: Node) -> None:
        self._idle.get(node.pool, {}).pop(node, None)
        node.idle_epoch += 1

    def _stop_node(
        self, node: Node, task_status: str, error: dict[str, Any] | None, kill: bool = False
    ) -> None:
        """End the node: its task ends with `task_status`, its instance terminates."""
        if node.stopping:
            return
        node.stopping = True
        self._worker_busy(node)
        if node.status is None:
            if not node.boot_started:
                self._node_terminated(node, worker_status="SHUTDOWN")
            return
        task = node.task
        if task is not None and task.outcome is None:
            task.outcome = (task_status, error)
            task.abort_requested = now()
        if node.simulated:
            if task is not None:
                self._task_ended(task, None)
            self._node_terminated(node, worker_status="LOST" if kill else "SHUTDOWN")
        else:
            node.set_instance_status("TERMINATING")
            self._later(lambda: self._stop_process_node(node, kill=kill, lost=kill))

    def _stop_process_node(self, node: Node, kill: bool, lost: bool) -> None:
        assert self.runner is not None
        try:
            self.runner.stop_node(node.id, kill=kill)
        finally:
            self._node_stopped(node, lost)

    def _node_stopped(self, node: Node, lost: bool) -> None:
        with self._cond:
            if node.task is not None:
                self._task_ended(node.task, None)
            self._node_terminated(node, worker_status="LOST" if lost else "SHUTDOWN")
            self._changed()

    def _node_terminated(self, node: Node, worker_status: str) -> None:
        if node.instance_status == "TERMINATED":
            return
        pool = node.pool
        if node.status is None:
            pool.booting -= 1
        else:
            pool.registered -= 1
            node.set_status("TERMINATED")
            node.deregistered = now()
            node.worker_status = worker_status
        node.set_instance_status("TERMINATED")
        pool.live -= 1
        self._refresh_pool(pool)

    def _refresh_pool(self, pool: WorkerPool) -> None:
        requirement = pool.requirement
        if pool.shut_down:
            if pool.live == 0:
                pool.set_status("TERMINATED")
                requirement.set_status("TERMINATED")
            return
        if pool.registered == 0:
            pool.set_status("PENDING" if pool.booting and pool.status == "PENDING" else "EMPTY")
        else:
            pool.set_status("RUNNING" if pool.busy else "IDLE")
        requirement.set_status("PROVISIONING" if pool.booting else "RUNNING")
        self._refresh_pool_idleness(pool)

    def _refresh_pool_idleness(self, pool: WorkerPool) -> None:
        idle = pool.busy == 0 and pool.booting == 0
        if idle and pool.idle_since is None:
            pool.idle_since = time.monotonic()
            pool.idle_epoch += 1
            if pool.idle_pool_timeout is not None:
                self._timer(
                    pool.idle_pool_timeout.total_seconds(), "pool_idle", pool, pool.idle_epoch
                )
        elif not idle and pool.idle_since is not None:
            pool.idle_since = None
            pool.idle_epoch += 1

    # ---- tasks -----------------------------------------------------------------------------

    def _start_task(self, task: Task, node: Node) -> None:
        self._worker_busy(node)
        node.task = task
        node.worker_status = "RUNNING"
        node.pool.busy += 1
        task.node = node
        task.status = "EXECUTING"
        task.started = now()
        group = task.group
        group.executing += 1
        group.updated = now()
        self._evaluate_group(group)
        self._refresh_pool(node.pool)
        timeout = task.timeout or group.timeout
        if timeout is not None:
            self._timer(timeout.total_seconds(), "task_timeout", task)
        if not node.simulated:
            launch = self._launch(task, node)
            runner = self.runner
            assert runner is not None
            self._actions.append(lambda: self._run_task(runner, node, launch, task))

    def _run_task(self, runner: NodeRunner, node: Node, launch: TaskLaunch, task: Task) -> None:
        try:
            runner.run_task(node.id, launch, lambda code: self._on_exit(task, code))
        except Exception as error:  # the task could not start: YellowDog's UNABLE_START_PROCESS
            logger.warning("Task %s could not start on node %s: %s", task.id, node.id, error)
            with self._cond:
                if task.status == "EXECUTING":
                    if task.outcome is None:
                        message = f"Unable to start process: {error}"
                        failure = self._error(task, "UNABLE_START_PROCESS", message)
                        task.outcome = ("FAILED", failure)
                    self._task_ended(task, None)
                    self._changed()

    def _launch(self, task: Task, node: Node) -> TaskLaunch:
        group = task.group
        environment = {
            **(task.spec.get("environment") or {}),
            "YD_TASK_ID": task.id,
            "YD_TASK_GROUP_ID": group.id,
            "YD_WORK_REQUIREMENT_ID": group.requirement.id,
            "YD_NAMESPACE": group.requirement.namespace,
            "YD_WORKER_SLOT": "1",
            "YD_PROVIDER": PROVIDER,
            "YD_REGION": REGION,
            "YD_INSTANCE_TYPE": node.pool.template.instance_type,
            "YD_INSTANCE_ID": node.instance_id,
        }
        return TaskLaunch(
            task_id=task.id,
            task_type=task.task_type,
            arguments=list(task.spec.get("arguments") or []),
            task_data=task.spec.get("taskData"),
            environment=environment,
        )

    def _on_exit(self, task: Task, code: int) -> None:
        with self._cond:
            if task.status == "EXECUTING":
                self._task_ended(task, code)
                self._changed()

    def _task_ended(self, task: Task, code: int | None) -> None:
        """The task's process ended with `code` (None: the node ended it); decide its status."""
        if task.outcome is not None:
            status, error = task.outcome
        elif code == 0:
            status, error = "COMPLETED", None
        else:
            status, error = (
                "FAILED",
                self._error(
                    task, "PROCESS_NON_ZERO_EXIT", f"Process exited with code {code}", code
                ),
            )
        node = task.node
        assert node is not None
        node.task = None
        node.pool.busy -= 1
        task.group.executing -= 1
        self._finish(task, status, error)
        if node.draining:
            self._stop_node(node, "ABORTED", None)
        elif not node.stopping:
            self._worker_idle(node)
        self._refresh_pool(node.pool)

    def _abort(self, task: Task, status: str, error: dict[str, Any] | None) -> None:
        task.outcome = (status, error)
        task.abort_requested = now()
        if task.node is not None and task.node.simulated:
            self._task_ended(task, None)
        elif self.runner is not None:
            runner = self.runner
            self._later(lambda: runner.abort_task(task.id))

    def _error(
        self, task: Task, kind: str, message: str, code: int | None = None
    ) -> dict[str, Any]:
        node = task.node
        return compact(
            {
                "timestamp": iso_time(now()),
                "error": message,
                "errorType": kind,
                "statusAtFailure": task.status,
                "processExitCode": code,
                "causedFailure": True,
                "nodeId": node.id if node else None,
                "workerId": node.worker_id if node else None,
            }
        )

    def _finish(self, task: Task, status: str, error: dict[str, Any] | None = None) -> None:
        task.status = status
        task.finished = now()
        if error is not None:
            task.errors.append(error)
        group = task.group
        group.updated = now()
        if status == "FAILED" and group.finish_if_any_failed and group.status not in GROUP_CLOSED:
            group.set_status("FAILING")
            self._end_waiting(group, "DISCARDED")
        self._evaluate_group(group)

    def _end_waiting(self, group: TaskGroup, status: str) -> None:
        while group.ready:
            self._finish(group.ready.popleft(), status)

    def _evaluate_group(self, group: TaskGroup) -> None:
        if group.status in GROUP_TERMINATED:
            return
        if group.status in ("CANCELLING", "FAILING"):
            if group.executing == 0:
                group.set_status("CANCELLED" if group.status == "CANCELLING" else "FAILED")
        elif (
            group.executing == 0
            and not group.ready
            and (group.status == "FINISHING" or (group.finish_if_all and group.tasks))
        ):
            failed = any(task.status == "FAILED" for task in group.tasks)
            group.set_status("FAILED" if failed else "COMPLETED")
        elif group.status not in ("HELD", "FINISHING"):
            group.set_status("RUNNING" if group.executing else "PENDING")
        self._evaluate_requirement(group.requirement)

    def _evaluate_requirement(self, requirement: WorkRequirement) -> None:
        if requirement.status in WR_FINISHED:
            return
        groups = requirement.groups
        if not all(group.status in GROUP_TERMINATED for group in groups):
            return
        if requirement.status == "CANCELLING":
            requirement.set_status("CANCELLED")
        elif groups or requirement.status == "FINISHING":
            failed = any(group.status == "FAILED" for group in groups)
            requirement.set_status("FAILED" if failed else "COMPLETED")

    # ---- pools -----------------------------------------------------------------------------

    def _shut_down_pool(self, pool: WorkerPool, lost: str | None = None) -> None:
        """Stop every node of the pool: their tasks end ABORTED, or FAILED with an
        ALLOCATION_LOST error saying `lost` when the machines are taken away."""
        pool.set_status("SHUTDOWN")
        pool.requirement.set_status("TERMINATING", "TERMINATED")
        self._open_pools.pop(pool, None)
        self._idle.pop(pool, None)
        for node in pool.nodes:
            if node.stopping:
                continue
            if lost is not None and node.task is not None:
                self._stop_node(node, "FAILED", self._error(node.task, "ALLOCATION_LOST", lost))
            else:
                self._stop_node(node, "ABORTED", None)
        self._refresh_pool(pool)

    # ---- the work service ------------------------------------------------------------------

    def add_work_requirement(self, document: dict[str, Any]) -> dict[str, Any]:
        with self._cond:
            namespace = _require_text(document, "namespace", "Work requirement")
            name = _require_text(document, "name", "Work requirement")
            for other in self._requirements.values():
                if (other.namespace, other.name) == (namespace, name) and (
                    other.status not in WR_FINISHED
                ):
                    raise InvalidRequest(
                        f"Work requirement with name '{namespace}/{name}' already exists"
                    )
            spec = {k: v for k, v in document.items() if k not in WR_READ_ONLY}
            requirement = WorkRequirement(namespace, name, spec)
            groups = self._new_groups(requirement, document.get("taskGroups") or [])
            requirement.groups = groups
            self._requirements[requirement.id] = requirement
            self._groups.update((group.id, group) for group in groups)
            return requirement.to_wire()

    def _new_groups(
        self, requirement: WorkRequirement, documents: list[dict[str, Any]]
    ) -> list[TaskGroup]:
        names = {group.name for group in requirement.groups}
        if not isinstance(documents, list) or not all(isinstance(d, dict) for d in documents):
            raise InvalidRequest(
                f"Work requirement '{requirement.name}': field 'taskGroups' "
                "must be a list of task groups"
            )
        groups = []
        for document in documents:
            spec = {k: v for k, v in document.items() if k not in GROUP_READ_ONLY}
            group = TaskGroup(requirement, len(requirement.groups) + len(groups) + 1, spec)
            if group.name in names:
                raise InvalidRequest(
                    f"Task group name '{group.name}' is used twice in work "
                    f"requirement '{requirement.name}'"
                )
            names.add(group.name)
            groups.append(group)
        return groups

    def update_work_requirement(self, document: dict[str, Any]) -> dict[str, Any]:
        with self._cond:
            requirement = self._requirement(_require_text(document, "id", "Work requirement"))
            if requirement.status not in ("RUNNING", "HELD"):
                raise InvalidRequest(
                    f"Work requirement '{requirement.id}' is "
                    f"{requirement.status} and can no longer be updated"
                )
            known_ids = {group.id for group in requirement.groups}
            known_names = {group.name for group in requirement.groups}
            fresh = [
                g
                for g in document.get("taskGroups") or []
                if not isinstance(g, dict)
                or (g.get("id") not in known_ids and g.get("name") not in known_names)
            ]
            groups = self._new_groups(requirement, fresh)
            requirement.groups.extend(groups)
            self._groups.update((group.id, group) for group in groups)
            for key in ("tag", "priority"):
                if key in document:
                    requirement.spec[key] = document[key]
            return requirement.to_wire()

    def get_work_requirement(self, requirement_id: str) -> dict[str, Any]:
        with self._cond:
            return self._requirement(requirement_id).to_wire()

    def get_work_requirement_by_name(self, namespace: str, name: str) -> dict[str, Any]:
        with self._cond:
            return self._requirement_by_name(namespace, name).to_wire()

    def _requirement(self, requirement_id: str) -> WorkRequirement:
        try:
            return self._requirements[requirement_id]
        except KeyError:
            raise NotFound(f"Work requirement '{requirement_id}' not found") from None

    def _requirement_by_name(self, namespace: str, name: str) -> WorkRequirement:
        found = [
            r for r in self._requirements.values() if (r.namespace, r.name) == (namespace, name)
        ]
        if not found:
            raise NotFound(f"Work requirement '{namespace}/{name}' not found")
        return max(found, key=lambda requirement: requirement.created)

    def transition_work_requirement(
        self, requirement_id: str, status: str, abort: bool
    ) -> dict[str, Any]:
        with self._cond:
            requirement = self._requirement(requirement_id)
            if requirement.status not in WR_TRANSITIONS.get(status, set()):
                raise InvalidTransition("WorkRequirement", requirement.status, status)
            if status == "CANCELLING":
                self._cancel_requirement(requirement, abort)
            elif status == "HELD":
                requirement.set_status("HELD")
                for group in requirement.groups:
                    if group.status in ("PENDING", "RUNNING"):
                        group.set_status("HELD")
            elif status == "RUNNING":
                requirement.set_status("RUNNING")
                for group in requirement.groups:
                    if group.status == "HELD":
                        group.set_status("RUNNING" if group.executing else "PENDING")
            else:
                requirement.set_status("FINISHING")
                for group in requirement.groups:
                    if group.status not in GROUP_CLOSED:
                        group.set_status("FINISHING")
                    self._evaluate_group(group)
                self._evaluate_requirement(requirement)
            self._changed()
            return requirement.to_wire()

    def _cancel_requirement(self, requirement: WorkRequirement, abort: bool) -> None:
        requirement.set_status("CANCELLING")
        for group in requirement.groups:
            if group.status in GROUP_TERMINATED:
                continue
            if group.status != "FAILING":
                group.set_status("CANCELLING")
            self._end_waiting(group, "CANCELLED")
            if abort:
                for task in group.tasks:
                    if task.status == "EXECUTING" and task.outcome is None:
                        self._abort(task, "ABORTED", None)
            self._evaluate_group(group)
        self._evaluate_requirement(requirement)

    def search_work_requirements(self, params: dict[str, list[str]]) -> dict[str, Any]:
        query = Query(params)
        namespaces = query.many("namespaces")
        with self._cond:
            found = (
                r
                for r in self._requirements.values()
                if _matches(query, "namespace", r.namespace)
                and (namespaces is None or r.namespace in namespaces)
                and _matches(query, "name", r.name)
                and _matches(query, "tag", r.spec.get("tag"))
                and _matches(query, "statuses", r.status)
                and query.in_range("createdTime", r.created)
                and query.in_range("statusChangedTime", r.status_changed)
            )
            return query.page(found, WorkRequirement.summary)

    def add_tasks(self, group_id: str, documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with self._cond:
            return self._add_tasks(self._group(group_id), documents)

    def add_tasks_by_name(
        self,
        namespace: str,
        requirement_name: str,
        group_name: str,
        documents: list[dict[str, Any]],
    ) -> list[dict[str, Any]]:
        with self._cond:
            requirement = self._requirement_by_name(namespace, requirement_name)
            for group in requirement.groups:
                if group.name == group_name:
                    return self._add_tasks(group, documents)
            raise NotFound(
                f"Task group '{group_name}' not found in work requirement "
                f"'{namespace}/{requirement_name}'"
            )

    def _group(self, group_id: str) -> TaskGroup:
        try:
            return self._groups[group_id]
        except KeyError:
            raise NotFound(f"Task group '{group_id}' not found") from None

    def _add_tasks(self, group: TaskGroup, documents: list[dict[str, Any]]) -> list[dict]:
        requirement = group.requirement
        if requirement.status in WR_FINISHED or requirement.status == "CANCELLING":
            raise InvalidRequest(
                f"Cannot add tasks to task group '{group.name}': its work "
                f"requirement '{requirement.name}' is {requirement.status}"
            )
        if group.status in GROUP_CLOSED:
            raise InvalidRequest(
                f"Cannot add tasks to task group '{group.name}': it is {group.status}"
            )
        tasks = [
            self._new_task(group, len(group.tasks) + index + 1, document)
            for index, document in enumerate(documents)
        ]
        group.tasks.extend(tasks)
        group.ready.extend(tasks)
        group.updated = now()
        self._tasks.update((task.id, task) for task in tasks)
        if tasks:
            self._waiting[group] = None
            self._changed()
        return [task.to_wire() for task in tasks]

    def _new_task(self, group: TaskGroup, number: int, document: Any) -> Task:
        if not isinstance(document, dict):
            raise InvalidRequest(f"Task {number} for task group '{group.name}' is not an object")
        spec = {k: v for k, v in document.items() if k not in TASK_READ_ONLY}
        task_type = spec.get("taskType")
        if task_type is None and len(group.task_types) == 1:
            spec["taskType"] = task_type = group.task_types[0]
        if task_type not in group.task_types:
            raise InvalidRequest(
                f"Task '{spec.get('name', number)}': field 'taskType' ({task_type!r}) must be "
                f"one of the task group's runSpecification.taskTypes {group.task_types}"
            )
        return Task(group, number, spec)

    def get_task(self, task_id: str) -> dict[str, Any]:
        with self._cond:
            return self._task(task_id).to_wire()

    def _task(self, task_id: str) -> Task:
        try:
            return self._tasks[task_id]
        except KeyError:
            raise NotFound(f"Task '{task_id}' not found") from None

    def cancel_task(self, task_id: str, abort: bool) -> dict[str, Any]:
        with self._cond:
            task = self._task(task_id)
            if task.status in TASK_FINISHED:
                raise InvalidTransition("Task", task.status, "CANCELLED")
            if task.status == "READY":
                task.group.ready.remove(task)
                self._finish(task, "CANCELLED")
            elif abort and task.outcome is None:
                self._abort(task, "ABORTED", None)
            self._changed()
            return task.to_wire()

    def search_tasks(self, params: dict[str, list[str]]) -> dict[str, Any]:
        query = Query(params)
        with self._cond:
            tasks: Iterable[Task] = self._tasks.values()
            group_id, requirement_id = query.one("taskGroupId"), query.one("workRequirementId")
            if group_id is not None:
                tasks = self._groups[group_id].tasks if group_id in self._groups else []
            elif requirement_id is not None:
                requirement = self._requirements.get(requirement_id)
                tasks = [t for g in requirement.groups for t in g.tasks] if requirement else []
            prefix = query.one("tagStartsWith")
            has_errors = query.flag("hasErrors")
            found = (
                t
                for t in tasks
                if (requirement_id is None or t.group.requirement.id == requirement_id)
                and _matches(query, "name", t.spec.get("name"))
                and _matches(query, "tag", t.spec.get("tag"))
                and (prefix is None or (t.spec.get("tag") or "").startswith(prefix))
                and _matches(query, "statuses", t.status)
                and (has_errors is None or bool(t.errors) == has_errors)
                and query.in_range("startedTime", t.started)
                and query.in_range("finishedTime", t.finished)
            )
            return query.page(found, Task.to_wire)

    def task_output(self, task_id: str) -> str:
        with self._cond:
            task = self._task(task_id)
            simulated = task.node is None or task.node.simulated
        if simulated or self.runner is None:
            return ""
        return self.runner.task_output(task_id)

    # ---- the worker pool service -----------------------------------------------------------

    def provision_worker_pool(self, document: dict[str, Any]) -> dict[str, Any]:
        usage = document.get("requirementTemplateUsage")
        if not isinstance(usage, dict):
            raise InvalidRequest("Provision request: field 'requirementTemplateUsage' is required")
        template_id = _require_text(usage, "templateId", "requirementTemplateUsage")
        name = _require_text(usage, "requirementName", "requirementTemplateUsage")
        namespace = usage.get("requirementNamespace") or "default"
        try:
            template = self.templates.get(template_id)
        except TemplateError as error:
            raise InvalidRequest(str(error)) from None
        if template.mode is NodeMode.PROCESS and self.runner is None:
            raise InvalidRequest(
                f"Template '{template_id}' needs process nodes, which are "
                f"unavailable here: {self.runner_unavailable}"
            )
        properties = document.get("provisionedProperties") or {}
        with self._cond:
            for other in self._pools.values():
                if (other.namespace, other.name) == (namespace, name) and not other.shut_down:
                    raise InvalidRequest(
                        f"Worker pool with name '{namespace}/{name}' already exists"
                    )
            requirement = ComputeRequirement(usage, namespace, name, template)
            pool = WorkerPool(namespace, name, properties, requirement)
            requirement.pool = pool
            count = int(usage.get("targetInstanceCount") or 0)
            requirement.target = min(max(count, pool.min_nodes), pool.max_nodes)
            self._pools[pool.id] = pool
            self._open_pools[pool] = None
            self._idle[pool] = {}
            self._compute[requirement.id] = requirement
            for _ in range(requirement.target):
                self._add_node(pool)
            self._refresh_pool(pool)
            self._changed()
            return pool.to_wire()

    def get_worker_pool(self, pool_id: str) -> dict[str, Any]:
        with self._cond:
            return self._pool(pool_id).to_wire()

    def _pool(self, pool_id: str) -> WorkerPool:
        try:
            return self._pools[pool_id]
        except KeyError:
            raise NotFound(f"Worker pool '{pool_id}' not found") from None

    def get_worker_pool_by_name(self, namespace: str, name: str) -> dict[str, Any]:
        with self._cond:
            found = [p for p in self._pools.values() if (p.namespace, p.name) == (namespace, name)]
            if not found:
                raise NotFound(f"Worker pool '{namespace}/{name}' not found")
            return max(found, key=lambda pool: pool.created).to_wire()

    def shut_down_worker_pool(self, pool_id: str) -> None:
        with self._cond:
            pool = self._pool(pool_id)
            if not pool.shut_down:
                self._shut_down_pool(pool)
                self._changed()

    def resize_worker_pool(self, pool_id: str, size: int) -> dict[str, Any]:
        """Add nodes, or stop idle nodes (newest first), until the pool has `size` nodes."""
        with self._cond:
            pool = self._pool(pool_id)
            if pool.shut_down:
                raise InvalidRequest(f"Worker pool '{pool_id}' is {pool.status}")
            if not pool.min_nodes <= size <= pool.max_nodes:
                raise InvalidRequest(
                    f"Worker pool '{pool.name}': size {size} must be between "
                    f"minNodes {pool.min_nodes} and maxNodes {pool.max_nodes}"
                )
            pool.requirement.target = size
            for _ in range(size - pool.live):
                self._add_node(pool)
            idle = [node for node in reversed(pool.nodes) if node.task is None]
            for node in idle[: max(0, pool.live - size)]:
                self._stop_node(node, "ABORTED", None)
            self._changed()
            return pool.to_wire()

    def shut_down_node(self, node_id: str) -> dict[str, Any]:
        """Stop one node gracefully: it takes no new task and stops once its task has ended."""
        with self._cond:
            node = self._nodes.get(node_id)
            if node is None or node.status is None:
                raise NotFound(f"Node '{node_id}' not found")
            node.draining = True
            if node.task is None:
                self._stop_node(node, "ABORTED", None)
            self._changed()
            return node.to_wire()

    def search_worker_pools(self, params: dict[str, list[str]]) -> dict[str, Any]:
        query = Query(params)
        namespaces = query.many("namespaces")
        kind = query.one("type")
        with self._cond:
            found = (
                p
                for p in self._pools.values()
                if _matches(query, "namespace", p.namespace)
                and (namespaces is None or p.namespace in namespaces)
                and _matches(query, "name", p.name)
                and (kind is None or "ProvisionedWorkerPool".endswith(kind.split(".")[-1]))
                and _matches(query, "statuses", p.status)
                and query.in_range("createdTime", p.created)
            )
            return query.page(found, WorkerPool.summary)

    def get_node(self, node_id: str) -> dict[str, Any]:
        with self._cond:
            node = self._nodes.get(node_id)
            if node is None or node.status is None:
                raise NotFound(f"Node '{node_id}' not found")
            return node.to_wire()

    def get_node_by_worker(self, worker_id: str) -> dict[str, Any]:
        with self._cond:
            node = self._nodes_by_worker.get(worker_id)
            if node is None or node.status is None:
                raise NotFound(f"Worker '{worker_id}' not found")
            return node.to_wire()

    def search_nodes(self, params: dict[str, list[str]]) -> dict[str, Any]:
        query = Query(params)
        with self._cond:
            pool_id = query.one("workerPoolId")
            nodes: Iterable[Node] = self._nodes.values()
            if pool_id is not None:
                nodes = self._pools[pool_id].nodes if pool_id in self._pools else []
            group_id = query.one("workerTaskGroupId")
            found = (
                n
                for n in nodes
                if n.status is not None
                and _matches(query, "statuses", n.status)
                and _matches(query, "instanceId", n.instance_id)
                and _matches(query, "workerTag", n.pool.worker_tag)
                and _matches(query, "workerStatuses", n.worker_status)
                and _matches(query, "instanceType", n.pool.template.instance_type)
                and _matches(query, "region", REGION)
                and (group_id is None or (n.task is not None and n.task.group.id == group_id))
                and query.in_range("registeredTime", n.registered)
            )
            return query.page(found, Node.to_wire)

    # ---- the compute service ---------------------------------------------------------------

    def get_compute_requirement(self, requirement_id: str) -> dict[str, Any]:
        with self._cond:
            return self._compute_requirement(requirement_id).to_wire()

    def _compute_requirement(self, requirement_id: str) -> ComputeRequirement:
        try:
            return self._compute[requirement_id]
        except KeyError:
            raise NotFound(f"Compute requirement '{requirement_id}' not found") from None

    def get_compute_requirement_by_name(self, namespace: str, name: str) -> dict[str, Any]:
        with self._cond:
            found = [
                c for c in self._compute.values() if (c.namespace, c.name) == (namespace, name)
            ]
            if not found:
                raise NotFound(f"Compute requirement '{namespace}/{name}' not found")
            return max(found, key=lambda requirement: requirement.created).to_wire()

    def transition_compute_requirement(self, requirement_id: str, status: str) -> dict[str, Any]:
        with self._cond:
            requirement = self._compute_requirement(requirement_id)
            if status != "TERMINATED":
                raise InvalidRequest(
                    f"Compute requirement transition to '{status}' is not "
                    "supported by the local platform; only TERMINATED is"
                )
            pool = requirement.pool
            if requirement.status not in ("TERMINATING", "TERMINATED") and pool is not None:
                self._shut_down_pool(pool, lost="Compute requirement terminated")
                self._changed()
            return requirement.to_wire()

    def search_compute_requirements(self, params: dict[str, list[str]]) -> dict[str, Any]:
        query = Query(params)
        with self._cond:
            found = (
                c
                for c in self._compute.values()
                if _matches(query, "namespace", c.namespace)
                and _matches(query, "name", c.name)
                and _matches(query, "tag", c.tag)
                and _matches(query, "statuses", c.status)
                and query.in_range("createdTime", c.created)
            )
            return query.page(found, ComputeRequirement.to_wire)

    def search_instances(self, params: dict[str, list[str]]) -> dict[str, Any]:
        query = Query(params)
        with self._cond:
            requirement_id = query.one("computeRequirementId")
            nodes: Iterable[Node] = self._nodes.values()
            if requirement_id is not None:
                requirement = self._compute.get(requirement_id)
                nodes = requirement.pool.nodes if requirement and requirement.pool else []
            found = (
                n
                for n in nodes
                if _matches(query, "computeSourceId", n.pool.requirement.source_id)
                and _matches(query, "statuses", n.instance_status)
                and _matches(query, "providers", PROVIDER)
                and _matches(query, "regions", REGION)
                and _matches(query, "publicIpAddress", n.public_ip)
                and _matches(query, "privateIpAddress", n.private_ip)
                and _matches(query, "hostname", n.hostname)
            )
            return query.page(found, Node.instance_to_wire)

    # ---- control (faults and inspection) ---------------------------------------------------

    def fail_node_boot(self, count: int = 1, pool_id: str | None = None) -> None:
        """Make the next `count` nodes to boot (of one pool, or of any) fail to boot."""
        with self._cond:
            self._boot_failures.extend([pool_id] * count)

    def clear_boot_failures(self) -> None:
        with self._cond:
            self._boot_failures.clear()

    def kill_node(self, node_id: str) -> None:
        """The node's machine dies: processes SIGKILLed, worker LOST, node and instance
        TERMINATED, its task FAILED with ALLOCATION_LOST."""
        with self._cond:
            node = self._nodes.get(node_id)
            if node is None:
                raise NotFound(f"Node '{node_id}' not found")
            if node.stopping:
                raise InvalidRequest(f"Node '{node_id}' is already {node.instance_status}")
            task = node.task
            error = self._error(task, "ALLOCATION_LOST", "Node lost") if task else None
            self._stop_node(node, "FAILED", error, kill=True)
            self._changed()

    def end_everything(self) -> None:
        """Cancel every unfinished work requirement (aborting its tasks) and shut down every
        pool, as a test does to clean up after a failure."""
        with self._cond:
            for requirement in self._requirements.values():
                if requirement.status not in WR_FINISHED:
                    self._cancel_requirement(requirement, abort=True)
            for pool in list(self._open_pools):
                self._shut_down_pool(pool)
            self._changed()

    def live_entities(self) -> dict[str, list[dict[str, Any]]]:
        with self._cond:
            live = {
                "workRequirements": [
                    _brief(r.id, r.status, r.name)
                    for r in self._requirements.values()
                    if r.status not in WR_FINISHED
                ],
                "workerPools": [
                    _brief(p.id, p.status, p.name)
                    for p in self._pools.values()
                    if p.status != "TERMINATED"
                ],
                "computeRequirements": [
                    _brief(c.id, c.status, c.name)
                    for c in self._compute.values()
                    if c.status != "TERMINATED"
                ],
                "nodes": [
                    _brief(n.id, n.status, n.hostname)
                    for n in self._nodes.values()
                    if n.status in ("RUNNING", "LATE")
                ],
                "instances": [
                    _brief(n.instance_id, n.instance_status, n.hostname)
                    for n in self._nodes.values()
                    if n.instance_status != "TERMINATED"
                ],
            }
        processes = self.runner.processes() if self.runner is not None else []
        live["processes"] = [{"pid": pid} for pid in processes]
        return live


def _brief(entity_id: str, status: str | None, name: str) -> dict[str, Any]:
    return {"id": entity_id, "name": name, "status": status}


def _pool_serves(pool: WorkerPool, group: TaskGroup) -> bool:
    """Whether the pool's workers may claim the group's tasks (run specification match)."""
    if group.worker_tags is not None and pool.worker_tag not in group.worker_tags:
        return False
    if group.namespaces is not None and pool.namespace not in group.namespaces:
        return False
    return any(kind in pool.template.supported_task_types for kind in group.task_types)
