"""Teardown: ends a cluster's work requirements, compute requirements and worker pools in
parallel, and reports what it ended (`ShutdownReport`)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from yellowdog_client import PlatformClient
from yellowdog_client.model import ComputeRequirementStatus

from prefect_raydog.cluster.client import is_not_found, is_transient, parallel
from prefect_raydog.cluster.nodes import NodeGroup
from prefect_raydog.errors import ClusterShutdownError

logger = logging.getLogger("prefect_raydog.cluster")

TEARDOWN_ATTEMPTS = 3

_ENDED_COMPUTE_REQUIREMENT = {
    ComputeRequirementStatus.TERMINATING,
    ComputeRequirementStatus.TERMINATED,
}


@dataclass
class ShutdownReport:
    """What a shutdown ended, what had already gone, and what it could not end."""

    ended: list[str] = field(default_factory=list)
    already_gone: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        def listed(items: list[str]) -> str:
            return ", ".join(items) if items else "nothing"

        text = f"ended {listed(self.ended)}; already gone: {listed(self.already_gone)}"
        return text + (f"; FAILED to end: {listed(self.failed)}" if self.failed else "")

    def merge(self, other: ShutdownReport) -> None:
        self.ended += other.ended
        self.already_gone += other.already_gone
        self.failed += other.failed

    def raise_if_failed(self, subject: str) -> None:
        if self.failed:
            raise ClusterShutdownError(
                f"Could not end everything of {subject} ({self}); end the rest by hand or with "
                "sweep()",
                self.failed,
            )


@dataclass
class _Ending:
    """One entity to end: how to end it, and how to tell (by reading it) that it has ended."""

    what: str
    end: Callable[[], Any]
    is_gone: Callable[[], bool]


class Teardown:
    """Ends work requirements, compute requirements and worker pools in parallel, tolerating
    entities that are already gone (checked by reading them back, not by parsing messages)."""

    def __init__(self, client: PlatformClient, check_first: bool = False) -> None:
        self._client = client
        self._lock = threading.Lock()
        # Saved state may be stale: read every entity before ending any, so that what had
        # already ended is reported as such (the platform accepts repeated shutdowns silently).
        self._check_first = check_first

    def run(
        self, work_requirement_ids: Iterable[str], groups: Iterable[NodeGroup], namespace: str
    ) -> ShutdownReport:
        report = ShutdownReport()
        groups = [g for g in groups if g.pool_id or g.provision_attempted]
        unresolved = [g for g in groups if not (g.pool_id and g.compute_requirement_id)]
        found = parallel([lambda g=g: self._resolve(g, namespace, report) for g in unresolved])
        missing = {id(g) for g, ok in zip(unresolved, found, strict=True) if not ok}
        endings = [self._work_requirement(wr_id) for wr_id in work_requirement_ids]
        for group in groups:
            if id(group) not in missing:
                endings.append(self._pool(group))
                if group.compute_requirement_id:
                    endings.append(self._compute_requirement(group))
        if self._check_first:
            gone = parallel([lambda e=e: self._gone_already(e.is_gone) for e in endings])
            for ending in (e for e, is_gone in zip(endings, gone, strict=True) if is_gone):
                self._record(report, "already_gone", ending.what)
            endings = [e for e, is_gone in zip(endings, gone, strict=True) if not is_gone]
        parallel([lambda e=e: self._end(e, report) for e in endings])
        return report

    def _record(self, report: ShutdownReport, outcome: str, what: str) -> None:
        with self._lock:
            getattr(report, outcome).append(what)

    @staticmethod
    def _gone_already(is_gone: Callable[[], bool]) -> bool:
        try:
            return is_gone()
        except Exception as exc:  # noqa: BLE001
            return is_not_found(exc)

    def _end(self, ending: _Ending, report: ShutdownReport) -> None:
        """End it, retrying transient failures; on any failure, decide by reading it back."""
        error: BaseException | None = None
        for attempt in range(TEARDOWN_ATTEMPTS):
            try:
                ending.end()
                self._record(report, "ended", ending.what)
                return
            except Exception as exc:  # noqa: BLE001 - every failure is checked by reading back
                error = exc
                if not is_transient(exc):
                    break
                time.sleep(0.1 * 2**attempt)
        # Gone although the call failed: ended by one of the parallel calls (a pool's shutdown
        # also ends its tasks and compute requirement), or before; only check_first can tell.
        if self._gone_already(ending.is_gone):
            self._record(report, "ended", ending.what)
        else:
            logger.error("Could not end %s: %s", ending.what, error)
            self._record(report, "failed", f"{ending.what}: {error}")

    def _work_requirement(self, wr_id: str) -> _Ending:
        work = self._client.work_client
        return _Ending(
            f"work requirement {wr_id}",
            lambda: work.cancel_work_requirement_by_id(wr_id, abort=True),
            lambda: work.get_work_requirement_by_id(wr_id).status.finished,
        )

    def _compute_requirement(self, group: NodeGroup) -> _Ending:
        compute = self._client.compute_client
        cr_id = group.compute_requirement_id
        return _Ending(
            f"compute requirement {group.requirement_name} ({cr_id})",
            lambda: compute.terminate_compute_requirement_by_id(cr_id),
            lambda: (
                compute.get_compute_requirement_by_id(cr_id).status in _ENDED_COMPUTE_REQUIREMENT
            ),
        )

    def _pool(self, group: NodeGroup) -> _Ending:
        pools = self._client.worker_pool_client
        pool_id = group.pool_id
        return _Ending(
            group.describe(),
            lambda: pools.shutdown_worker_pool_by_id(pool_id),
            lambda: pools.get_worker_pool_by_id(pool_id).status.finished,
        )

    def _resolve(self, group: NodeGroup, namespace: str, report: ShutdownReport) -> bool:
        """Find a pool whose ID or compute requirement is unknown (its provisioning answer was
        lost, or it comes from saved state); False if there is nothing to end."""
        pools = self._client.worker_pool_client
        try:
            pool = (
                pools.get_worker_pool_by_id(group.pool_id)
                if group.pool_id
                else pools.get_worker_pool_by_name(namespace, group.requirement_name)
            )
        except Exception as exc:  # noqa: BLE001
            if not is_not_found(exc):
                self._record(report, "failed", f"{group.describe()}: {exc}")
            elif group.pool_id:
                self._record(report, "already_gone", group.describe())
            return False
        if not group.pool_id and pool.status.finished:
            return False
        group.pool_id = pool.id
        group.requirement_name = pool.name or group.requirement_name
        group.compute_requirement_id = pool.computeRequirementId
        return True


def end_work_requirement_named(
    client: PlatformClient, namespace: str, name: str
) -> tuple[ShutdownReport, str | None]:
    """End the live work requirement with this name (one a build submitted but whose answer was
    lost, or one saved state knows only by name); also return its ID, if found."""
    try:
        requirement = client.work_client.get_work_requirement_by_name(namespace, name)
    except Exception as error:  # noqa: BLE001
        if is_not_found(error):
            return ShutdownReport(), None
        return ShutdownReport(failed=[f"work requirement {name}: {error}"]), None
    if requirement.status is None or requirement.status.finished:
        return ShutdownReport(already_gone=[f"work requirement {requirement.id}"]), requirement.id
    return Teardown(client).run([requirement.id], [], namespace), requirement.id
