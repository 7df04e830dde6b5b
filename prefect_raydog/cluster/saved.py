"""Ending a cluster from outside the process that built it: its saved state (the JSON that
`RayDogCluster` writes through `SavedState` and `RayDogClusterProxy` reads back), and `sweep`,
which finds clusters by tag."""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr
from yellowdog_client import PlatformClient
from yellowdog_client.model import (
    TaskSearch,
    WorkerPoolSearch,
    WorkerPoolStatus,
    WorkRequirementSearch,
    WorkRequirementStatus,
)

from prefect_raydog.cluster.client import DEFAULT_API_URL, client_or_credentials, is_not_found
from prefect_raydog.cluster.nodes import HEAD_TASK_GROUP, NodeGroup
from prefect_raydog.cluster.teardown import ShutdownReport, Teardown, end_work_requirement_named
from prefect_raydog.errors import ClusterStateError
from prefect_raydog.spec import ClusterSpec

logger = logging.getLogger("prefect_raydog.cluster")

_LIVE_WORK_REQUIREMENT = [
    WorkRequirementStatus.RUNNING,
    WorkRequirementStatus.HELD,
    WorkRequirementStatus.FINISHING,
    WorkRequirementStatus.CANCELLING,
]
_LIVE_POOL = [status for status in WorkerPoolStatus if not status.finished]
# A build provisions its pools, then submits its work requirement and head task within seconds.
SWEEP_GRACE = timedelta(minutes=10)
_RAYDOG_POOL_NAME = re.compile(r"^(?P<cluster>.+)-(\d{2,}-head|\d{2,}-wrkrs|observability)$")


class SavedState:
    """The saved state of a `RayDogCluster`, which provides the attributes declared here."""

    spec: ClusterSpec
    build_name: str
    work_requirement_id: str | None
    _state: Literal["new", "building", "built", "shut_down"]
    _workers: list[NodeGroup]
    _head: NodeGroup
    _observability: NodeGroup | None

    def save_state_to_json(self) -> str:
        """The state needed to shut the cluster down later, with RayDog's keys. Saved before
        `build()`, it names what the build will make, so that a build that dies half-way can
        still be ended from it (`RayDogClusterProxy` finds the entities by name)."""
        if self._state == "shut_down":
            raise ClusterStateError(f"Cluster {self.spec.name!r} is shut down; nothing to save")
        groups = [g for g in [*self._workers, self._head, self._observability] if g is not None]
        built = self._state == "built"
        return json.dumps(
            {
                "cluster_name": self.spec.name,
                "cluster_namespace": self.spec.namespace,
                "cluster_tag": self.spec.tag,
                "work_requirement_id": self.work_requirement_id if built else None,
                "worker_pool_ids": [group.pool_id for group in groups] if built else [],
                "build_name": self.build_name,
                "worker_pool_names": [group.requirement_name for group in groups],
            },
            indent=2,
        )

    def save_state_to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(self.save_state_to_json())


class RayDogClusterProxy:
    """Shuts down a cluster from the state `RayDogCluster.save_state_to_json()` saved, e.g. from
    another process. Stale state ends what still exists and reports what had already gone."""

    def __init__(
        self,
        client: PlatformClient | None = None,
        *,
        key_id: str | None = None,
        key_secret: str | SecretStr | None = None,
        url: str = DEFAULT_API_URL,
    ) -> None:
        self.yd_client = client_or_credentials(
            "RayDogClusterProxy", client, key_id, key_secret, url
        )
        self._state: dict[str, Any] | None = None
        self._shut_down = False

    def load_saved_state_from_json(self, text: str) -> None:
        try:
            state = json.loads(text)
        except json.JSONDecodeError as error:
            raise ClusterStateError(f"Saved cluster state is not JSON: {error}") from error
        if not isinstance(state, dict):
            raise ClusterStateError("Saved cluster state must be a JSON object")
        by_name = state.get("work_requirement_id") is None and isinstance(
            state.get("build_name"), str
        )
        if not by_name and not isinstance(state.get("work_requirement_id"), str):
            raise ClusterStateError("Saved cluster state lacks 'work_requirement_id' (a string)")
        key = "worker_pool_names" if by_name else "worker_pool_ids"
        pools = state.get(key)
        if not isinstance(pools, list) or not all(isinstance(i, str) for i in pools):
            raise ClusterStateError(f"Saved cluster state's {key!r} must be a list of strings")
        if not isinstance(state.get("cluster_namespace"), str):
            raise ClusterStateError("Saved cluster state lacks 'cluster_namespace' (a string)")
        self._state = state
        self._shut_down = False

    def load_saved_state_from_json_file(self, path: str | Path) -> None:
        self.load_saved_state_from_json(Path(path).read_text())

    def shut_down(self) -> ShutdownReport:
        """End the saved cluster's work requirement and worker pools, in parallel."""
        if self._state is None:
            raise ClusterStateError(
                "No saved cluster state loaded; call load_saved_state_from_json"
            )
        if self._shut_down:
            raise ClusterStateError(
                f"Cluster {self._state.get('cluster_name')!r} is already shut down"
            )
        state, namespace = self._state, self._state["cluster_namespace"]
        report = ShutdownReport()
        requirement_id = state["work_requirement_id"]
        if requirement_id is None:
            # Saved before the build made anything: find what it made by the build's names.
            report, _ = end_work_requirement_named(self.yd_client, namespace, state["build_name"])
            groups = [_named_pool(name) for name in state["worker_pool_names"]]
        else:
            groups = [_saved_pool(pool_id) for pool_id in state["worker_pool_ids"]]
        report.merge(
            Teardown(self.yd_client, check_first=True).run(
                [requirement_id] if requirement_id else [], groups, namespace
            )
        )
        # Only a complete shutdown is final: after a partial failure, shut_down() can retry.
        self._shut_down = not report.failed
        logger.info("Shut down saved Ray cluster %s: %s", self._state.get("cluster_name"), report)
        report.raise_if_failed(f"saved cluster {self._state.get('cluster_name')!r}")
        return report


def _saved_pool(pool_id: str, name: str = "") -> NodeGroup:
    return NodeGroup(role="worker", internal_name=name, requirement_name=name, pool_id=pool_id)


def _named_pool(name: str) -> NodeGroup:
    return NodeGroup(
        role="worker", internal_name=name, requirement_name=name, provision_attempted=True
    )


def sweep(
    client: PlatformClient, namespace: str, tag: str, everything: bool = False,
    grace: timedelta = SWEEP_GRACE,
) -> ShutdownReport:
    """End the orphaned RayDog clusters in the namespace whose tag matches, and leave the healthy
    ones: a cluster is orphaned when its head's node task is no longer live (its Ray cluster is
    gone), when it has outlived its lifetime, or when its pools have had no work requirement for
    `grace` (a process killed between provisioning and submitting). `everything` ends every
    cluster with the tag, healthy or not."""
    report = ShutdownReport()
    work = client.work_client
    search = WorkRequirementSearch(namespace=namespace, tag=tag, statuses=_LIVE_WORK_REQUIREMENT)
    requirements = [
        summary
        for summary in _listed(report, "work requirements", work.get_work_requirements(search))
        if summary.tag == tag
    ]
    now = datetime.now(timezone.utc)
    orphans = [r for r in requirements if everything or _orphaned(client, r, now, grace, report)]
    healthy = {summary.name for summary in requirements} - {summary.name for summary in orphans}
    orphan_names = {summary.name for summary in orphans}
    groups: list[NodeGroup] = []
    pools = client.worker_pool_client.get_worker_pools(
        WorkerPoolSearch(namespace=namespace, statuses=_LIVE_POOL)
    )
    for pool in _listed(report, "worker pools", pools):
        match = _RAYDOG_POOL_NAME.match(pool.name or "")
        if match is None or match["cluster"] in healthy:
            continue
        if match["cluster"] not in orphan_names:
            try:
                if not _pool_has_tag(client, pool.id, tag) or (
                    not everything and _younger(pool.createdTime, now, grace)
                    and not _submitted(client, namespace, match["cluster"])
                ):
                    continue
            except Exception as error:  # noqa: BLE001 - one pool must not stop the sweep
                report.failed.append(f"worker pool {pool.name} ({pool.id}): {error}")
                continue
        groups.append(_saved_pool(pool.id, pool.name or ""))
    report.merge(
        Teardown(client).run([summary.id for summary in orphans], groups, namespace)
    )
    logger.info("Swept namespace %s for clusters tagged %s: %s", namespace, tag, report)
    return report


def _orphaned(
    client: PlatformClient, summary: Any, now: datetime, grace: timedelta, report: ShutdownReport
) -> bool:
    """Whether a live work requirement's cluster is gone: its head task ended, or its lifetime
    (the head task group's task timeout) has passed. A requirement that cannot be read is kept."""
    try:
        requirement = client.work_client.get_work_requirement_by_id(summary.id)
        (head,) = [g for g in requirement.taskGroups or [] if g.name == HEAD_TASK_GROUP]
        lifetime = head.runSpecification.taskTimeout
        if lifetime is not None and not _younger(summary.createdTime, now, lifetime):
            return True
        tasks = client.work_client.get_tasks(
            TaskSearch(workRequirementId=summary.id, taskGroupId=head.id)
        ).list_all()
        if not tasks and _younger(summary.createdTime, now, grace):
            return False  # still being built: its head task is on its way
        return not any(task.status is not None and not task.status.finished for task in tasks)
    except Exception as error:  # noqa: BLE001 - one cluster must not stop the sweep
        report.failed.append(f"work requirement {summary.name} ({summary.id}): {error}")
        return False


def _submitted(client: PlatformClient, namespace: str, name: str) -> bool:
    """Whether the cluster's work requirement was ever submitted (it has ended since)."""
    try:
        client.work_client.get_work_requirement_by_name(namespace, name)
    except Exception as error:  # noqa: BLE001
        if is_not_found(error):
            return False
        raise
    return True


def _younger(created: datetime | None, now: datetime, age: timedelta) -> bool:
    return created is not None and now - created < age


def _listed(report: ShutdownReport, what: str, search: Any) -> list[Any]:
    """What a search finds; on an error, what it found so far, and the error in the report."""
    found: list[Any] = []
    try:
        for item in search.iterate():
            found.append(item)
    except Exception as error:  # noqa: BLE001 - sweep ends what it found, then reports
        report.failed.append(f"listing the {what}: {error}")
    return found


def _pool_has_tag(client: PlatformClient, pool_id: str, tag: str) -> bool:
    pool = client.worker_pool_client.get_worker_pool_by_id(pool_id)
    if not pool.computeRequirementId:
        return False
    return client.compute_client.get_compute_requirement_by_id(pool.computeRequirementId).tag == tag
