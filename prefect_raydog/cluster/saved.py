"""Ending a cluster from outside the process that built it: its saved state (the JSON a built
cluster writes and `RayDogClusterProxy` reads back), and `sweep`, which finds clusters by tag."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from yellowdog_client import PlatformClient
from yellowdog_client.model import (
    WorkerPoolSearch,
    WorkerPoolStatus,
    WorkRequirementSearch,
    WorkRequirementStatus,
)

from prefect_raydog.cluster.client import DEFAULT_API_URL, _client_or_credentials
from prefect_raydog.cluster.nodes import NodeGroup
from prefect_raydog.cluster.teardown import ShutdownReport, _Teardown
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
_RAYDOG_POOL_NAME = re.compile(r"^(?P<cluster>.+)-(\d{2,}-head|\d{2,}-wrkrs|observability)$")


def saved_state_json(
    spec: ClusterSpec, work_requirement_id: str | None, pool_ids: list[str | None]
) -> str:
    """The state needed to shut the cluster down later, with RayDog's keys."""
    return json.dumps(
        {
            "cluster_name": spec.name,
            "cluster_namespace": spec.namespace,
            "cluster_tag": spec.tag,
            "work_requirement_id": work_requirement_id,
            "worker_pool_ids": pool_ids,
        },
        indent=2,
    )


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
        self.yd_client = _client_or_credentials(
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
        if not isinstance(state.get("work_requirement_id"), str | None):
            raise ClusterStateError("Saved cluster state's 'work_requirement_id' must be a string")
        if state.get("work_requirement_id") is None and not isinstance(
            state.get("cluster_name"), str
        ):
            raise ClusterStateError(
                "Saved cluster state lacks 'work_requirement_id' and 'cluster_name'"
            )
        pool_ids = state.get("worker_pool_ids")
        if not isinstance(pool_ids, list) or not all(isinstance(i, str) for i in pool_ids):
            raise ClusterStateError("Saved cluster state's 'worker_pool_ids' must be a list of IDs")
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
        groups = [_saved_pool(pool_id) for pool_id in self._state["worker_pool_ids"]]
        work_requirement_id = self._state["work_requirement_id"]
        if work_requirement_id is None:
            # Saved before the build finished: pools may exist whose IDs never reached the file.
            groups += self._pools_named_for(self._state["cluster_name"], groups)
        report = _Teardown(self.yd_client, check_first=True).run(
            [work_requirement_id] if work_requirement_id else [], groups,
            self._state["cluster_namespace"],
        )
        self._shut_down = True
        logger.info("Shut down saved Ray cluster %s: %s", self._state.get("cluster_name"), report)
        report.raise_if_failed(f"saved cluster {self._state.get('cluster_name')!r}")
        return report


    def _pools_named_for(self, cluster: str, known: list[NodeGroup]) -> list[NodeGroup]:
        search = WorkerPoolSearch(namespace=self._state["cluster_namespace"], statuses=_LIVE_POOL)
        known_ids = {group.pool_id for group in known}
        return [
            _saved_pool(pool.id, pool.name or "")
            for pool in self.yd_client.worker_pool_client.get_worker_pools(search).iterate()
            if pool.id not in known_ids
            and (match := _RAYDOG_POOL_NAME.match(pool.name or "")) and match["cluster"] == cluster
        ]


def _saved_pool(pool_id: str, name: str = "") -> NodeGroup:
    return NodeGroup(role="worker", internal_name=name, requirement_name=name, pool_id=pool_id)


def sweep(client: PlatformClient, namespace: str, tag: str) -> ShutdownReport:
    """End every RayDog cluster in the namespace whose tag matches: live work requirements with
    the tag, and live pools named like a RayDog cluster's whose compute requirement has the tag
    (so pools provisioned by a process killed before it submitted its work requirement too)."""
    work = client.work_client
    requirements = [
        summary
        for summary in work.get_work_requirements(
            WorkRequirementSearch(namespace=namespace, tag=tag, statuses=_LIVE_WORK_REQUIREMENT)
        ).iterate()
        if summary.tag == tag
    ]
    clusters = {summary.name for summary in requirements}
    groups: list[NodeGroup] = []
    compute = client.compute_client
    for pool in client.worker_pool_client.get_worker_pools(
        WorkerPoolSearch(namespace=namespace, statuses=_LIVE_POOL)
    ).iterate():
        match = _RAYDOG_POOL_NAME.match(pool.name or "")
        if match is None:
            continue
        if match["cluster"] not in clusters and not _pool_has_tag(client, compute, pool.id, tag):
            continue
        groups.append(_saved_pool(pool.id, pool.name or ""))
    report = _Teardown(client).run([summary.id for summary in requirements], groups, namespace)
    logger.info("Swept namespace %s for clusters tagged %s: %s", namespace, tag, report)
    return report


def _pool_has_tag(client: PlatformClient, compute: Any, pool_id: str, tag: str) -> bool:
    pool = client.worker_pool_client.get_worker_pool_by_id(pool_id)
    if not pool.computeRequirementId:
        return False
    return compute.get_compute_requirement_by_id(pool.computeRequirementId).tag == tag
