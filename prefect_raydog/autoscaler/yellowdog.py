"""The autoscaler's YellowDog calls: one work requirement per Ray cluster, one task group and one
provisioned worker pool per node type, one `bash` task per Ray node (Ray node id = task id).
Every entity's name carries the cluster's 8-character id, and lookups match it exactly."""

from __future__ import annotations

import json
import logging
import re
import secrets
import string
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from yellowdog_client import PlatformClient
from yellowdog_client.model import (
    Task,
    TaskGroup,
    TaskSearch,
    TaskStatus,
    WorkerPoolSearch,
    WorkerPoolStatus,
    WorkRequirement,
    WorkRequirementSearch,
    WorkRequirementStatus,
)

from prefect_raydog.cluster import RayDogClusterProxy, ShutdownReport
from prefect_raydog.cluster.node_requests import PoolRequest, node_task_group, node_tasks
from prefect_raydog.cluster.nodes import abort_task
from prefect_raydog.cluster.waits import RequirementWatch, describe_task_end

logger = logging.getLogger("prefect_raydog.autoscaler")

HEAD_TASK_GROUP = "head-node"
WORKER_TASK_GROUP = "worker-nodes-{node_type}"
ID_ALPHABET = string.ascii_lowercase + string.digits
ID_LENGTH = 8
_LIVE_TASK = [status for status in TaskStatus if not status.finished]
_LIVE_POOL = [status for status in WorkerPoolStatus if not status.finished]
FIRST_POLL_S = 0.05
MAX_POLL_S = 0.5
CACHE_S = 1.0
# With the work requirement's update stream, the task search is repeated only when an update came,
# and at least this often in case the stream missed one.
MAX_STALE_S = 10.0


class HeadNodeFailed(RuntimeError):
    """The head node's task ended or did not start in time; the message says how."""


@dataclass(frozen=True)
class NodeType:
    """What the provider needs to start Ray nodes of one `available_node_types` entry."""

    name: str
    template_id: str
    script: str
    max_nodes: int = 1
    images_id: str | None = None
    userdata: str | None = None
    metrics_enabled: bool | None = None


@dataclass
class LiveNode:
    """A live Ray node as YellowDog sees it: its task, and its node's addresses once it runs."""

    task_id: str
    node_type: str
    is_head: bool
    status: TaskStatus
    node_id: str | None = None
    private_ip: str | None = None
    public_ip: str | None = None


@dataclass
class ClusterRecord:
    """Who the cluster is: enough for any process (ray up, the monitor) to find all of it."""

    cluster_name: str
    namespace: str
    cluster_id: str
    work_requirement_id: str
    head_private_ip: str = ""
    tag: str | None = None

    @property
    def full_name(self) -> str:
        return f"{self.cluster_name}-{self.cluster_id}"

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> ClusterRecord:
        return cls(**json.loads(text))


def new_cluster_id() -> str:
    return "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH))


@dataclass
class YellowDogCluster:
    """The YellowDog side of one autoscaled Ray cluster."""

    client: PlatformClient
    cluster_name: str
    namespace: str
    tag: str | None = None
    lifetime: timedelta = timedelta(hours=1)
    idle_node_shutdown: timedelta = timedelta(minutes=1)
    record: ClusterRecord | None = None
    _pools: dict[str, str] = field(default_factory=dict)
    _groups: dict[str, tuple[bool, str]] = field(default_factory=dict)
    _addresses: dict[str, tuple[str | None, str | None, str | None]] = field(default_factory=dict)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _cache: tuple[float, int | None, list[LiveNode]] | None = None
    _watch: RequirementWatch | None = None

    # ---- finding -----------------------------------------------------------------------------

    def find(self) -> ClusterRecord | None:
        """The live cluster of this name in the namespace: a RUNNING work requirement named
        exactly `<cluster>-<8-character id>` (never one whose name merely starts alike)."""
        pattern = re.compile(rf"^{re.escape(self.cluster_name)}-[0-9a-z]{{{ID_LENGTH}}}$")
        search = WorkRequirementSearch(namespace=self.namespace,
                                       statuses=[WorkRequirementStatus.RUNNING])
        for summary in self.client.work_client.get_work_requirements(search).iterate():
            if summary.namespace == self.namespace and pattern.match(summary.name or ""):
                self.record = ClusterRecord(
                    self.cluster_name, self.namespace, summary.name[-ID_LENGTH:], summary.id,
                    tag=summary.tag)
                return self.record
        return None

    def watch_updates(self) -> None:
        """Follow the work requirement's update stream, so that `live_nodes` searches the tasks
        only after something changed (for the monitor, which asks at every autoscaler update)."""
        with self._lock:
            if self._watch is None and self.record and self.record.work_requirement_id:
                self._watch = RequirementWatch(self.client, self.record.work_requirement_id).open()

    def live_nodes(self) -> list[LiveNode]:
        """Every live task of the cluster (one search), with its node's addresses once known.
        Ray asks several times per autoscaler update: answers within `CACHE_S` are shared, and
        while the update stream says nothing changed, for up to `MAX_STALE_S`."""
        if self.record is None:
            return []
        watch = self._watch
        version = watch.version if watch is not None and watch.streaming else None
        with self._lock:
            if self._cache is not None:
                age = time.monotonic() - self._cache[0]
                unchanged = version is not None and version == self._cache[1]
                if age < CACHE_S or (unchanged and age < MAX_STALE_S):
                    return list(self._cache[2])
        nodes = self._search_live_nodes()
        with self._lock:
            self._cache = (time.monotonic(), version, nodes)
        return list(nodes)

    def _search_live_nodes(self) -> list[LiveNode]:
        groups = self._task_groups()
        search = TaskSearch(workRequirementId=self.record.work_requirement_id, statuses=_LIVE_TASK)
        nodes = []
        for task in self.client.work_client.get_tasks(search).iterate():
            group = groups.get(task.taskGroupId)
            if group is None:
                continue
            node = LiveNode(task.id, group[1], group[0], task.status)
            if task.status == TaskStatus.EXECUTING:
                node.node_id, node.private_ip, node.public_ip = self._node_addresses(task)
            nodes.append(node)
        return nodes

    def _task_groups(self) -> dict[str, tuple[bool, str]]:
        """Task group id -> (is it the head's, node type name), read once per cluster."""
        with self._lock:
            if not self._groups:
                requirement = self.client.work_client.get_work_requirement_by_id(
                    self.record.work_requirement_id)
                for group in requirement.taskGroups or []:
                    self._groups[group.id] = (group.name == HEAD_TASK_GROUP, group.tag or "")
            return dict(self._groups)

    def _node_addresses(self, task: Task) -> tuple[str | None, str | None, str | None]:
        cached = self._addresses.get(task.id)
        if cached is not None:
            return cached
        pools = self.client.worker_pool_client
        node = (pools.get_node_by_id(task.nodeId) if task.nodeId
                else pools.get_node_by_worker_id(task.workerId))
        details = node.details
        addresses = (node.id, details.privateIpAddress if details else None,
                     details.publicIpAddress if details else None)
        if addresses[1]:
            self._addresses[task.id] = addresses
        return addresses

    # ---- creating ----------------------------------------------------------------------------

    def create(self, head: NodeType, worker_types: list[str], environment: dict[str, str]
               ) -> str:
        """Provision the head pool, submit the work requirement (a task group for the head and
        one per worker node type) and add the head task; return its id. On failure, end what
        was made."""
        self.record = ClusterRecord(self.cluster_name, self.namespace, new_cluster_id(), "",
                                    tag=self.tag)
        try:
            self._provision(head, count=1, max_nodes=1, idle_pool=None)
            requirement = self.client.work_client.add_work_requirement(WorkRequirement(
                namespace=self.namespace, name=self.record.full_name, tag=self.tag,
                taskGroups=[self._task_group(HEAD_TASK_GROUP, head.name, True),
                            *[self._task_group(WORKER_TASK_GROUP.format(node_type=name), name,
                                               False) for name in worker_types]]))
            self.record.work_requirement_id = requirement.id
            (task,) = self.add_tasks(HEAD_TASK_GROUP, head, 1, environment)
            return task
        except BaseException:
            self.shut_down()
            raise

    def wait_for_head(self, task_id: str, timeout: timedelta) -> LiveNode:
        """Wait until the head task runs; its addresses. Raises HeadNodeFailed saying why."""
        deadline = time.monotonic() + timeout.total_seconds()
        interval = FIRST_POLL_S
        while True:
            task = self.client.work_client.get_task_by_id(task_id)
            if task.status == TaskStatus.EXECUTING:
                node_id, private_ip, public_ip = self._node_addresses(task)
                if private_ip:
                    self.record.head_private_ip = private_ip
                    return LiveNode(task_id, HEAD_TASK_GROUP, True, task.status, node_id,
                                    private_ip, public_ip or private_ip)
            elif task.status is not None and task.status.finished:
                raise self.head_failure(task_id)
            if time.monotonic() > deadline:
                raise HeadNodeFailed(
                    f"The head node of cluster {self.cluster_name!r} did not start within "
                    f"{timeout}: its task {task_id} is still {task.status}")
            time.sleep(interval)
            interval = min(interval * 1.5, MAX_POLL_S)

    def head_failure(self, task_id: str) -> HeadNodeFailed | None:
        """Why the head task has ended, or None while it is live."""
        task = self.client.work_client.get_task_by_id(task_id)
        if task.status is None or not task.status.finished:
            return None
        return HeadNodeFailed(
            f"The head node of cluster {self.cluster_name!r} did not start: its task "
            f"{task_id} ended {describe_task_end(task)}")

    def add_workers(self, node_type: NodeType, count: int, environment: dict[str, str]
                    ) -> list[str]:
        """Add `count` worker tasks of the type (provisioning its pool on first use); the pool
        grows to meet them, up to the type's maximum."""
        with self._lock:
            if node_type.name not in self._pools:
                self._find_or_provision(node_type, count)
        group = WORKER_TASK_GROUP.format(node_type=node_type.name)
        return self.add_tasks(group, node_type, count, environment)

    def _find_or_provision(self, node_type: NodeType, count: int) -> None:
        name = self._pool_name(node_type.name)
        search = WorkerPoolSearch(namespace=self.namespace, statuses=_LIVE_POOL)
        for pool in self.client.worker_pool_client.get_worker_pools(search).iterate():
            if pool.name == name:
                self._pools[node_type.name] = pool.id
                return
        self._provision(node_type, count, node_type.max_nodes, self.lifetime)

    def _provision(self, node_type: NodeType, count: int, max_nodes: int,
                   idle_pool: timedelta | None) -> None:
        request = PoolRequest(
            template_id=node_type.template_id, name=self._pool_name(node_type.name),
            namespace=self.namespace, tag=self.tag, worker_tag=self._worker_tag(node_type.name),
            count=count, max_nodes=max_nodes, idle_node_shutdown=self.idle_node_shutdown,
            idle_pool_shutdown=idle_pool, images_id=node_type.images_id,
            userdata=node_type.userdata, metrics_enabled=node_type.metrics_enabled)
        pool = self.client.worker_pool_client.provision_worker_pool(
            request.usage(), request.properties())
        self._pools[node_type.name] = pool.id
        logger.info("Provisioned worker pool %s (%s)", pool.name, pool.id)

    def _pool_name(self, node_type: str) -> str:
        return f"{self.record.full_name}-{node_type}"

    def _worker_tag(self, node_type: str) -> str:
        return f"{node_type}-{self.record.cluster_id}"

    def _task_group(self, name: str, node_type: str, is_head: bool) -> TaskGroup:
        # A worker group stays open when all its nodes have gone, for the next scale-up.
        return node_task_group(name, node_type, self._worker_tag(node_type), self.namespace,
                               self.lifetime, is_head=is_head, stays_open=not is_head)

    def add_tasks(self, group_name: str, node_type: NodeType, count: int,
                   environment: dict[str, str]) -> list[str]:
        names = [f"{node_type.name}-{secrets.token_hex(4)}" for _ in range(count)]
        added = self.client.work_client.add_tasks_to_task_group_by_name(
            self.namespace, self.record.full_name, group_name,
            node_tasks(names, node_type.script, environment))
        self._cache = None
        return [task.id for task in added]

    # ---- ending ------------------------------------------------------------------------------

    def end_node(self, task_id: str) -> None:
        """Abort the node's task; its machine then goes by idle node shutdown."""
        abort_task(self.client, task_id)
        self._addresses.pop(task_id, None)
        self._cache = None

    def shut_down(self) -> ShutdownReport:
        """Cancel the work requirement (aborting every task) and shut down every pool whose
        name carries this cluster's id, through the Builder's teardown."""
        if self.record is None:
            return ShutdownReport()
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        prefix = f"{self.record.full_name}-"
        search = WorkerPoolSearch(namespace=self.namespace, statuses=_LIVE_POOL)
        pool_ids = {pool.id for pool in self.client.worker_pool_client.get_worker_pools(
            search).iterate() if (pool.name or "").startswith(prefix)}
        pool_ids |= set(self._pools.values())
        proxy = RayDogClusterProxy(self.client)
        proxy.load_saved_state_from_json(json.dumps({
            "cluster_name": self.record.full_name, "cluster_namespace": self.namespace,
            "work_requirement_id": self.record.work_requirement_id or _NO_REQUIREMENT,
            "worker_pool_ids": sorted(pool_ids)}))
        report = proxy.shut_down()
        self._pools.clear()
        self._cache = None
        return report


_NO_REQUIREMENT = "ydid:workreq:000000:none"

