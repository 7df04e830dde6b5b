"""YellowDog's work entities (work requirements, task groups, tasks), their wire forms and
their status machines."""

from __future__ import annotations

from collections import deque
from datetime import datetime
from typing import Any, Protocol

from prefect_raydog.local.state.errors import InvalidRequest, duration, require_text
from prefect_raydog.local.wire import ACCOUNT, compact, iso_time, new_uuid, now

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


class WorkRequirement:
    def __init__(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        self.uuid = new_uuid()
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

    def evaluate(self) -> None:
        """End the requirement once all of its groups have ended."""
        if self.status in WR_FINISHED:
            return
        groups = self.groups
        if not all(group.status in GROUP_TERMINATED for group in groups):
            return
        if self.status == "CANCELLING":
            self.set_status("CANCELLED")
        elif groups or self.status == "FINISHING":
            failed = any(group.status == "FAILED" for group in groups)
            self.set_status("FAILED" if failed else "COMPLETED")


class TaskGroup:
    def __init__(self, requirement: WorkRequirement, number: int, spec: dict[str, Any]) -> None:
        what = f"Task group '{spec.get('name')}' of work requirement '{requirement.name}'"
        self.name = require_text(spec, "name", what)
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
        self.timeout = duration(run.get("taskTimeout"), f"{what}: runSpecification.taskTimeout")
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

    def end_waiting(self, status: str) -> None:
        """End every task still waiting for a worker with `status`."""
        while self.ready:
            self.ready.popleft().finish(status)

    def evaluate(self) -> None:
        """Move the group to the status its tasks call for, then its work requirement."""
        if self.status in GROUP_TERMINATED:
            return
        if self.status in ("CANCELLING", "FAILING"):
            if self.executing == 0:
                self.set_status("CANCELLED" if self.status == "CANCELLING" else "FAILED")
        elif (
            self.executing == 0
            and not self.ready
            and (self.status == "FINISHING" or (self.finish_if_all and self.tasks))
        ):
            failed = any(task.status == "FAILED" for task in self.tasks)
            self.set_status("FAILED" if failed else "COMPLETED")
        elif self.status not in ("HELD", "FINISHING"):
            self.set_status("RUNNING" if self.executing else "PENDING")
        self.requirement.evaluate()


class Assignee(Protocol):
    """The node a task runs on, as the task sees it (a `compute.Node`, which knows its task)."""

    id: str
    worker_id: str

    @property
    def simulated(self) -> bool: ...


class Task:
    def __init__(self, group: TaskGroup, number: int, spec: dict[str, Any]) -> None:
        self.group = group
        self.id = f"ydid:task:{ACCOUNT}:{group.requirement.uuid}:{group.number}:{number}"
        self.spec = spec
        self.status = "READY"
        self.node: Assignee | None = None
        self.started: datetime | None = None
        self.finished: datetime | None = None
        self.abort_requested: datetime | None = None
        self.errors: list[dict[str, Any]] = []
        self.outcome: tuple[str, dict[str, Any] | None] | None = None
        self.timeout = duration(spec.get("timeout"), f"Task '{spec.get('name')}': timeout")

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

    def error(self, kind: str, message: str, code: int | None = None) -> dict[str, Any]:
        """A task error in YellowDog's shape, stamped now."""
        node = self.node
        return compact(
            {
                "timestamp": iso_time(now()),
                "error": message,
                "errorType": kind,
                "statusAtFailure": self.status,
                "processExitCode": code,
                "causedFailure": True,
                "nodeId": node.id if node else None,
                "workerId": node.worker_id if node else None,
            }
        )

    def finish(self, status: str, error: dict[str, Any] | None = None) -> None:
        """End the task with `status` (and `error`), then re-evaluate its group."""
        self.status = status
        self.finished = now()
        if error is not None:
            self.errors.append(error)
        group = self.group
        group.updated = now()
        if status == "FAILED" and group.finish_if_any_failed and group.status not in GROUP_CLOSED:
            group.set_status("FAILING")
            group.end_waiting("DISCARDED")
        group.evaluate()
