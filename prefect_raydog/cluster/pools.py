"""Worker pools of a built cluster: adding, resizing and removing them (the part of
`RayDogCluster` that changes a cluster after `build()`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Literal

from yellowdog_client import PlatformClient
from yellowdog_client.model import TaskGroupStatus
from yellowdog_client.model.exceptions import InvalidRequestException

from prefect_raydog.cluster.client import parallel
from prefect_raydog.cluster.nodes import (
    NodeGroup,
    abort_task,
    append_task_group,
    live_task_ids,
)
from prefect_raydog.cluster.teardown import ShutdownReport, Teardown
from prefect_raydog.errors import ClusterStateError
from prefect_raydog.spec import ClusterSpec, WorkerPoolSpec

logger = logging.getLogger("prefect_raydog.cluster")

_FINISHED_TASK_GROUP = {
    TaskGroupStatus.COMPLETED,
    TaskGroupStatus.FAILED,
    TaskGroupStatus.CANCELLED,
}


class WorkerPools:
    """Changing the pools of a `RayDogCluster`, which provides the attributes declared here."""

    spec: ClusterSpec
    yd_client: PlatformClient
    work_requirement_id: str | None
    _lock: Any
    _requirement_lock: threading.Lock
    _state: Literal["new", "building", "built", "shut_down"]
    _step: str
    _workers: list[NodeGroup]
    _add_worker_group: Callable[[WorkerPoolSpec], NodeGroup]
    _worker_group: Callable[[str], NodeGroup]
    _worker_group_by_id: Callable[[str], NodeGroup]
    _provision_group: Callable[[NodeGroup], None]
    _add_worker_tasks: Callable[[NodeGroup, int], list[str]]
    _teardown_on_failure: Callable[..., AbstractContextManager[None]]

    def add_worker_pool(self, spec: WorkerPoolSpec | None = None, /, **fields: Any) -> str | None:
        """Add a pool of Ray worker nodes (a `WorkerPoolSpec`, or its fields as keywords).

        Before `build()` the pool is only recorded and None is returned. After, it is provisioned,
        its task group appended to the work requirement and its tasks added; returns its pool ID.
        A failure ends the new pool before the error propagates. Keywords given with a spec
        replace its fields.
        """
        spec = WorkerPoolSpec(**{**dict(spec or {}), **fields})
        with self._lock:
            if self._state in ("building", "shut_down"):
                raise ClusterStateError(f"Cannot add a worker pool: cluster is {self._state}")
            group = self._add_worker_group(spec)
            if self._state == "new":
                return None
        with self._teardown_on_failure(f"Adding worker pool {group.internal_name!r}", [group]):
            self._step = "adding its task group and tasks"
            try:
                self._provision_group(group)
                self._append_task_group(group)
                self._add_worker_tasks(group, spec.start_count)
            except BaseException:
                self._workers.remove(group)
                raise
        logger.info("Added %s to cluster %s", group.describe(), self.spec.name)
        return group.pool_id

    def _append_task_group(self, group: NodeGroup) -> None:
        # Appending reads, changes and writes the whole work requirement: one at a time.
        with self._requirement_lock:
            append_task_group(self.yd_client, self.work_requirement_id, group, self.spec)

    def remove_worker_pool(self, worker_pool_id: str) -> ShutdownReport:
        """Shut the pool down and terminate its compute requirement; its Ray nodes end."""
        return self._remove_group(self._worker_group_by_id(worker_pool_id))

    def remove_worker_pool_by_internal_name(self, internal_name: str) -> ShutdownReport:
        return self._remove_group(self._worker_group(internal_name))

    def _remove_group(self, group: NodeGroup) -> ShutdownReport:
        """End the pool; it stays the cluster's (for a retry or `shut_down()`) until it has."""
        report = Teardown(self.yd_client).run([], [group], self.spec.namespace)
        logger.info(
            "Removed worker pool %s from cluster %s: %s",
            group.internal_name,
            self.spec.name,
            report,
        )
        report.raise_if_failed(group.describe())
        with self._lock:
            if group in self._workers:
                self._workers.remove(group)
        return report

    def resize_worker_pool(self, internal_name: str, count: int) -> None:
        """Grow the pool by adding node tasks, or shrink it by aborting its newest node tasks (their
        nodes then end by idle node shutdown). At least the pool's `min_count` nodes (1 without a
        range), at most its `max_count`. A pool whose task group finished (every node task ended,
        e.g. an adaptive pool shrunk to 0) grows into a new task group on the same workers."""
        group = self._worker_group(internal_name)
        spec = group.spec
        assert isinstance(spec, WorkerPoolSpec)
        if count < spec.floor or count > group.node_limit:
            raise ValueError(
                f"Worker pool {internal_name!r} can have {spec.floor} to {group.node_limit} "
                f"nodes, not {count}; "
                "set max_count when adding the pool to let it grow further"
            )
        if self._state == "new":
            if spec.adaptive:
                raise ClusterStateError(
                    f"Worker pool {internal_name!r} has a range and starts at its min_count; "
                    "resize it after build()"
                )
            group.spec = spec.model_copy(update={"count": count})
            return
        live = live_task_ids(self.yd_client, self.work_requirement_id, group)
        if count > len(live):
            self._grow(group, count - len(live))
        elif count < len(live):
            extra = live[count:]
            parallel([lambda t=t: abort_task(self.yd_client, t) for t in extra])
            group.task_ids = [task_id for task_id in group.task_ids if task_id not in set(extra)]
        logger.info(
            "Resized worker pool %s of cluster %s to %d nodes", internal_name, self.spec.name, count
        )

    def _grow(self, group: NodeGroup, count: int) -> None:
        self._reopen_if_finished(group)
        try:
            self._add_worker_tasks(group, count)
        except InvalidRequestException:
            # Its last aborted task ended between the look and the add: the group has finished.
            if not self._reopen_if_finished(group):
                raise
            self._add_worker_tasks(group, count)

    def _reopen_if_finished(self, group: NodeGroup) -> bool:
        """A task group whose tasks all ended has finished and takes no more tasks: give the pool
        a new task group (same workers) to grow into. Whether it did."""
        requirement = self.yd_client.work_client.get_work_requirement_by_id(
            self.work_requirement_id
        )
        current = next(tg for tg in requirement.taskGroups or [] if tg.id == group.task_group_id)
        if current.status is None or current.status not in _FINISHED_TASK_GROUP:
            return False
        group.generation += 1
        group.task_group_name = f"{group.task_group_base}-{group.generation}"
        group.task_ids = []
        self._append_task_group(group)
        return True
