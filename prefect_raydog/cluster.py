"""The RayDog Builder: one Ray cluster as one YellowDog work requirement plus one provisioned worker
pool per node group, built, resized and torn down through the unmodified yellowdog-sdk.

Example:
    ```python
    with RayDogCluster(spec, key_id="...", key_secret="...") as cluster:
        ray.init(f"ray://{cluster.head_node_private_ip}:10001")
    ```
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import requests
from pydantic import SecretStr
from yellowdog_client import PlatformClient
from yellowdog_client.model import (
    ApiKey,
    AutoShutdown,
    ComputeRequirementStatus,
    ComputeRequirementTemplateUsage,
    InstanceSearch,
    NodeWorkerTarget,
    ProvisionedWorkerPoolProperties,
    RetryProperties,
    RunSpecification,
    ServicesSchema,
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
from yellowdog_client.model.exceptions import InternalServerException, InvalidRequestException

from prefect_raydog.errors import (
    ClusterBuildError,
    ClusterBuildTimeout,
    ClusterShutdownError,
    ClusterStateError,
    NodeTaskFailed,
    UnknownWorkerPoolError,
)
from prefect_raydog.spec import ClusterSpec, NodeGroupSpec, WorkerPoolSpec

logger = logging.getLogger("prefect_raydog.cluster")

DEFAULT_API_URL = "https://api.yellowdog.ai"
HEAD_TASK_GROUP = "head-node"
OBSERVABILITY_TASK_GROUP = "observability-node"
TASK_TYPE = "bash"
MAX_PARALLEL_CALLS = 32
FIRST_POLL_S = 0.02
MAX_POLL_S = 0.25
TEARDOWN_ATTEMPTS = 3

_LIVE_WORK_REQUIREMENT = [
    WorkRequirementStatus.RUNNING,
    WorkRequirementStatus.HELD,
    WorkRequirementStatus.FINISHING,
    WorkRequirementStatus.CANCELLING,
]
_LIVE_POOL = [status for status in WorkerPoolStatus if not status.finished]
_LIVE_TASK = [status for status in TaskStatus if not status.finished]
_ENDED_COMPUTE_REQUIREMENT = {
    ComputeRequirementStatus.TERMINATING,
    ComputeRequirementStatus.TERMINATED,
}
_RAYDOG_POOL_NAME = re.compile(r"^(?P<cluster>.+)-(\d{2,}-head|\d{2,}-wrkrs|observability)$")

Role = Literal["head", "observability", "worker"]
T = TypeVar("T")


def create_client(
    key_id: str,
    key_secret: str | SecretStr,
    url: str = DEFAULT_API_URL,
    *,
    max_attempts: int = RetryProperties.DEFAULT_MAX_ATTEMPTS,
    initial_retry_interval: timedelta = RetryProperties.DEFAULT_INITIAL_RETRY_INTERVAL,
) -> PlatformClient:
    """A PlatformClient for an application key; the secret may be a plain str or a SecretStr."""
    secret = key_secret.get_secret_value() if isinstance(key_secret, SecretStr) else key_secret
    retry = RetryProperties(maxAttempts=max_attempts, initialInterval=initial_retry_interval)
    return PlatformClient.create(
        ServicesSchema(defaultUrl=url, retry=retry), ApiKey(key_id, secret)
    )


def _client_or_credentials(
    owner: str, client: PlatformClient | None, key_id: str | None,
    key_secret: str | SecretStr | None, url: str,
) -> PlatformClient:
    """The client given, or one made from an application key."""
    if client is not None:
        return client
    if not key_id or not key_secret:
        raise ValueError(f"{owner} needs a PlatformClient or both key_id and key_secret")
    return create_client(key_id, key_secret, url)


class HeadNodeAddress(NamedTuple):
    """The head node's addresses, as RayDog's build() returns them: (private, public)."""

    private_ip: str
    public_ip: str | None


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
class NodeGroup:
    """One node group of a cluster: its YellowDog worker pool, task group and tasks."""

    role: Role
    internal_name: str
    requirement_name: str
    spec: NodeGroupSpec | None = None
    worker_tag: str = ""
    task_group_name: str = ""
    script: str = ""
    node_limit: int = 1
    pool_id: str | None = None
    compute_requirement_id: str | None = None
    task_group_id: str | None = None
    task_ids: list[str] = field(default_factory=list)
    provision_attempted: bool = False

    def describe(self) -> str:
        return f"worker pool {self.requirement_name or '?'} ({self.pool_id or 'id unknown'})"


class _Deadline:
    def __init__(self, timeout: timedelta) -> None:
        self.timeout = timeout
        self._end = time.monotonic() + timeout.total_seconds()

    def remaining(self) -> float:
        return self._end - time.monotonic()


def _parallel(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Run calls concurrently; raise the first error after every started call has finished, so
    that whatever a call created is recorded before anyone tears it down."""
    if len(calls) == 1:
        return [calls[0]()]
    executor = ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_CALLS, max(len(calls), 1)))
    futures = [executor.submit(call) for call in calls]
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in done:
            if future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        return [future.result() for future in futures]
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _is_not_found(error: BaseException) -> bool:
    response = getattr(error, "response", None)
    return isinstance(error, requests.HTTPError) and getattr(response, "status_code", 0) == 404


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, (requests.ConnectionError, requests.Timeout, InternalServerException)):
        return True
    status = getattr(getattr(error, "response", None), "status_code", 0) or 0
    return isinstance(error, requests.HTTPError) and (status >= 500 or status == 429)


def _describe_task_end(task: Task) -> str:
    text = str(task.status)
    for error in task.errors or []:
        text += f" ({error.errorType}"
        if error.processExitCode is not None:
            text += f", exit code {error.processExitCode}"
        text += f": {error.error})" if error.error else ")"
    return text


@dataclass
class _Ending:
    """One entity to end: how to end it, and how to tell (by reading it) that it has ended."""

    what: str
    end: Callable[[], Any]
    is_gone: Callable[[], bool]


class _Teardown:
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
        found = _parallel([lambda g=g: self._resolve(g, namespace, report) for g in unresolved])
        missing = {id(g) for g, ok in zip(unresolved, found, strict=True) if not ok}
        endings = [self._work_requirement(wr_id) for wr_id in work_requirement_ids]
        for group in groups:
            if id(group) not in missing:
                endings.append(self._pool(group))
                if group.compute_requirement_id:
                    endings.append(self._compute_requirement(group))
        if self._check_first:
            gone = _parallel([lambda e=e: self._gone_already(e.is_gone) for e in endings])
            for ending in (e for e, is_gone in zip(endings, gone, strict=True) if is_gone):
                self._record(report, "already_gone", ending.what)
            endings = [e for e, is_gone in zip(endings, gone, strict=True) if not is_gone]
        _parallel([lambda e=e: self._end(e, report) for e in endings])
        return report

    def _record(self, report: ShutdownReport, outcome: str, what: str) -> None:
        with self._lock:
            getattr(report, outcome).append(what)

    @staticmethod
    def _gone_already(is_gone: Callable[[], bool]) -> bool:
        try:
            return is_gone()
        except Exception as exc:  # noqa: BLE001
            return _is_not_found(exc)

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
                if not _is_transient(exc):
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
            if not _is_not_found(exc):
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


class RayDogCluster:
    """A Ray cluster on YellowDog: a head node, worker pools and an optional observability node.

    Everything RayDog's Builder does, from a validated `ClusterSpec`: `build()` provisions every
    pool at once and returns the head node's addresses; pools can be added, resized and removed;
    `shut_down()` ends everything in parallel; a failure anywhere tears down what was created.
    """

    def __init__(
        self,
        spec: ClusterSpec,
        client: PlatformClient | None = None,
        *,
        key_id: str | None = None,
        key_secret: str | SecretStr | None = None,
        url: str = DEFAULT_API_URL,
    ) -> None:
        self._owns_client = client is None
        self.spec = spec
        self.yd_client = _client_or_credentials("RayDogCluster", client, key_id, key_secret, url)
        self._lock = threading.RLock()
        self._state: Literal["new", "building", "built", "shut_down"] = "new"
        self._closing = threading.Event()
        self._task_counter = 0
        self._next_pool_number = 1
        self._work_requirement_attempted = False
        self._shutdown_report: ShutdownReport | None = None
        self.work_requirement_id: str | None = None
        self.head_node_task_id: str | None = None
        self.head_node_node_id: str | None = None
        self.head_node_private_ip: str | None = None
        self.head_node_public_ip: str | None = None
        self.head_node_started_time: datetime | None = None
        self.observability_node_private_ip: str | None = None
        self._environment: dict[str, str] = {}
        self._step = "starting"
        self.timings: dict[str, float] = {}
        self._head = self._new_group("head", spec.head, HEAD_TASK_GROUP, "00-head", "head")
        self._observability = (
            self._new_group(
                "observability",
                spec.observability,
                OBSERVABILITY_TASK_GROUP,
                "observability",
                "observability",
            )
            if spec.observability
            else None
        )
        self._workers: list[NodeGroup] = []
        for pool in spec.worker_pools:
            self._add_worker_group(pool)

    def __repr__(self) -> str:
        return (
            f"RayDogCluster(name={self.spec.name!r}, namespace={self.spec.namespace!r}, "
            f"state={self._state!r}, work_requirement_id={self.work_requirement_id!r})"
        )

    # ----- groups and names -------------------------------------------------------------------

    def _new_group(
        self, role: Role, spec: NodeGroupSpec, task_group: str, suffix: str, script_name: str
    ) -> NodeGroup:
        name = f"{self.spec.name}-{suffix}"
        worker_tag = f"{name}-00" if role == "observability" else name
        limit = spec.node_limit if isinstance(spec, WorkerPoolSpec) else 1
        return NodeGroup(
            role=role,
            internal_name=task_group,
            spec=spec,
            requirement_name=name,
            worker_tag=worker_tag,
            task_group_name=task_group,
            script=spec.script_text(script_name),
            node_limit=limit,
        )

    def _add_worker_group(self, spec: WorkerPoolSpec) -> NodeGroup:
        number = f"{self._next_pool_number:02d}"
        group = self._new_group(
            "worker", spec, f"worker-nodes-{number}", f"{number}-wrkrs", "worker"
        )
        group.internal_name = spec.name or group.task_group_name
        if group.internal_name in self.worker_pool_internal_names:
            raise ValueError(f"worker pool name {group.internal_name!r} is already in use")
        self._next_pool_number += 1
        self._workers.append(group)
        return group

    def _all_groups(self) -> list[NodeGroup]:
        return [self._head, *([self._observability] if self._observability else []), *self._workers]

    def _worker_group(self, internal_name: str) -> NodeGroup:
        for group in self._workers:
            if group.internal_name == internal_name:
                return group
        raise UnknownWorkerPoolError(
            f"Cluster {self.spec.name!r} has no worker pool named {internal_name!r}; "
            f"its pools are {self.worker_pool_internal_names}"
        )

    @property
    def worker_pool_ids(self) -> list[str]:
        """IDs of the provisioned worker pools of Ray worker nodes (not head or observability)."""
        return [group.pool_id for group in self._workers if group.pool_id]

    @property
    def worker_pool_internal_names(self) -> list[str]:
        """Names of the worker pools within the cluster, in the order they were added."""
        return [group.internal_name for group in self._workers]

    @property
    def head_node_worker_pool_id(self) -> str | None:
        return self._head.pool_id

    @property
    def observability_node_worker_pool_id(self) -> str | None:
        return self._observability.pool_id if self._observability else None

    @property
    def is_built(self) -> bool:
        return self._state == "built"

    @property
    def head_address(self) -> HeadNodeAddress | None:
        if self.head_node_private_ip is None:
            return None
        return HeadNodeAddress(self.head_node_private_ip, self.head_node_public_ip)

    def get_worker_pool_internal_name_by_id(self, worker_pool_id: str) -> str:
        return self._worker_group_by_id(worker_pool_id).internal_name

    def _worker_group_by_id(self, worker_pool_id: str) -> NodeGroup:
        for group in self._workers:
            if group.pool_id == worker_pool_id:
                return group
        raise UnknownWorkerPoolError(
            f"Cluster {self.spec.name!r} has no worker pool with ID {worker_pool_id!r}"
        )

    # ----- build ------------------------------------------------------------------------------

    def build(
        self, timeout: timedelta | float | None = None, workers_to_join: int | None = None
    ) -> HeadNodeAddress:
        """Provision every pool at once, submit the work requirement, start the head node (after
        the observability node, if any), start the worker nodes, and return the head's addresses.

        Waits until `workers_to_join` worker tasks run (the spec's value when None). Any failure,
        timeout or interrupt tears down what was created before the error propagates.
        """
        with self._lock:
            if self._state != "new":
                raise ClusterStateError(
                    f"Cluster {self.spec.name!r} is {self._state}; build it once"
                )
            self._state = "building"
        if isinstance(timeout, (int, float)):
            timeout = timedelta(seconds=timeout)
        deadline = _Deadline(timeout or self.spec.build_timeout)
        joined = self.spec.workers_to_join if workers_to_join is None else workers_to_join
        started = time.monotonic()
        logger.info("Building Ray cluster %s in namespace %s", self.spec.name, self.spec.namespace)
        with self._teardown_on_failure(f"Building cluster {self.spec.name!r}"):
            self._step = "provisioning the worker pools"
            self._provision(self._all_groups())
            self.timings["pools_provisioned_s"] = time.monotonic() - started
            self._step = "submitting the work requirement"
            self._submit_work_requirement()
            self._step = "starting the observability node"
            environment = self._start_observability_node(deadline)
            self._step = "starting the head node"
            self._start_head_node(environment, deadline)
            self.timings["head_executing_s"] = time.monotonic() - started
            self._step = "adding the worker node tasks"
            _parallel([lambda g=g: self._add_worker_tasks(g, g.spec.count) for g in self._workers])
            self._step = "waiting for the worker nodes"
            if joined:
                self._wait_for_workers(joined, deadline)
                self.timings["workers_joined_s"] = time.monotonic() - started
            else:
                self._check_head_still_running()
        with self._lock:
            if self._state == "building":
                self._state = "built"
        self.timings["build_s"] = time.monotonic() - started
        logger.info(
            "Ray cluster %s is up: head node %s (public %s), %d worker pools",
            self.spec.name,
            self.head_node_private_ip,
            self.head_node_public_ip,
            len(self._workers),
        )
        return self.head_address  # type: ignore[return-value]

    @contextmanager
    def _teardown_on_failure(
        self, action: str, groups: list[NodeGroup] | None = None
    ) -> Iterator[None]:
        """On any failure inside, end what was created (the whole cluster, or only `groups`)."""
        try:
            yield
        except BaseException as error:
            if groups is None:
                report = self._end_everything()
                with self._lock:
                    self._state = "shut_down"
                    if not report.failed:
                        self._shutdown_report = report
            else:
                report = _Teardown(self.yd_client).run([], groups, self.spec.namespace)
            cause = error.what_failed if isinstance(error, ClusterBuildError) else error
            logger.error("%s failed (%s); teardown: %s", action, cause, report)
            if not isinstance(error, Exception):
                raise
            failure = (
                error.what_failed
                if isinstance(error, ClusterBuildError)
                else f"{action} failed while {self._step}: {type(error).__name__}: {error}"
            )
            cls = type(error) if isinstance(error, ClusterBuildError) else ClusterBuildError
            raise cls(failure, report.ended + report.already_gone, report.failed) from error

    def _check_not_closing(self) -> None:
        if self._closing.is_set():
            raise ClusterBuildError(f"Cluster {self.spec.name!r} was shut down while being built")

    def _provision(self, groups: list[NodeGroup]) -> None:
        _parallel([lambda g=g: self._provision_group(g) for g in groups])

    def _provision_group(self, group: NodeGroup) -> None:
        self._check_not_closing()
        spec = group.spec
        count = spec.count if isinstance(spec, WorkerPoolSpec) else 1
        usage = ComputeRequirementTemplateUsage(
            templateId=spec.template_id,
            requirementName=group.requirement_name,
            requirementNamespace=self.spec.namespace,
            requirementTag=self.spec.tag,
            targetInstanceCount=count,
            imagesId=spec.images_id,
            userData=spec.userdata,
            instanceTags=spec.instance_tags,
        )
        properties = ProvisionedWorkerPoolProperties(
            createNodeWorkers=NodeWorkerTarget.per_node(1),
            minNodes=0,
            maxNodes=group.node_limit,
            idleNodeShutdown=_auto_shutdown(self.spec.idle_node_shutdown),
            idlePoolShutdown=_auto_shutdown(self.spec.idle_pool_shutdown),
            workerTag=group.worker_tag,
            metricsEnabled=spec.metrics_enabled,
        )
        group.provision_attempted = True
        try:
            pool = self.yd_client.worker_pool_client.provision_worker_pool(usage, properties)
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

    def _task_group(self, group: NodeGroup) -> TaskGroup:
        return TaskGroup(
            name=group.task_group_name,
            tag=group.internal_name,
            runSpecification=RunSpecification(
                taskTypes=[TASK_TYPE],
                taskTimeout=self.spec.cluster_lifetime,
                workerTags=[group.worker_tag],
                namespaces=[self.spec.namespace],
            ),
            finishIfAnyTaskFailed=group.role == "head",
        )

    def _submit_work_requirement(self) -> None:
        self._check_not_closing()
        groups = self._all_groups()
        requirement = WorkRequirement(
            namespace=self.spec.namespace,
            name=self.spec.name,
            taskGroups=[self._task_group(group) for group in groups],
            tag=self.spec.tag,
        )
        self._work_requirement_attempted = True
        requirement = self.yd_client.work_client.add_work_requirement(requirement)
        self.work_requirement_id = requirement.id
        ids = {task_group.name: task_group.id for task_group in requirement.taskGroups or []}
        for group in groups:
            group.task_group_id = ids[group.task_group_name]

    def _next_task_names(self, count: int) -> list[str]:
        with self._lock:
            first = self._task_counter + 1
            self._task_counter += count
        return [f"task-{number:05d}" for number in range(first, first + count)]

    def _add_tasks(self, group: NodeGroup, count: int, environment: dict[str, str]) -> list[str]:
        self._check_not_closing()
        tasks = [
            Task(
                name=name,
                taskType=TASK_TYPE,
                arguments=["taskdata.txt"],
                taskData=group.script,
                environment={**group.spec.environment, **environment},
            )
            for name in self._next_task_names(count)
        ]
        added = self.yd_client.work_client.add_tasks_to_task_group_by_id(group.task_group_id, tasks)
        ids = [task.id for task in added]
        group.task_ids.extend(ids)
        return ids

    def _start_observability_node(self, deadline: _Deadline) -> dict[str, str]:
        if self._observability is None:
            return {}
        (task_id,) = self._add_tasks(self._observability, 1, {})
        task = self._wait_until_executing(task_id, "observability node", deadline)
        self.observability_node_private_ip, _ = self._node_addresses(self._observability, task)
        return {"OBSERVABILITY_HOST": self.observability_node_private_ip}

    def _start_head_node(self, environment: dict[str, str], deadline: _Deadline) -> None:
        self._environment = environment
        (self.head_node_task_id,) = self._add_tasks(self._head, 1, environment)
        task = self._wait_until_executing(self.head_node_task_id, "head node", deadline)
        self.head_node_started_time = task.startedTime
        self.head_node_node_id = task.nodeId
        self.head_node_private_ip, self.head_node_public_ip = self._node_addresses(self._head, task)

    def _worker_environment(self) -> dict[str, str]:
        return {
            **self._environment,
            "RAY_HEAD_IP": self.head_node_private_ip or "",
            "RAY_HEAD_NODE_PRIVATE_IP": self.head_node_private_ip or "",
        }

    def _add_worker_tasks(self, group: NodeGroup, count: int) -> list[str]:
        return self._add_tasks(group, count, self._worker_environment()) if count else []

    def _wait_until_executing(self, task_id: str, what: str, deadline: _Deadline) -> Task:
        """Poll the task, 20 ms at first and growing to 250 ms, until it runs, ends or times out."""
        interval = FIRST_POLL_S
        while True:
            self._check_not_closing()
            task = self.yd_client.work_client.get_task_by_id(task_id)
            if task.status == TaskStatus.EXECUTING:
                return task
            if task.status is not None and task.status.finished:
                raise NodeTaskFailed(
                    f"The {what} of cluster {self.spec.name!r} did not start: its task {task_id} "
                    f"ended {_describe_task_end(task)}"
                )
            if deadline.remaining() <= 0:
                raise ClusterBuildTimeout(
                    f"The {what} of cluster {self.spec.name!r} did not start within "
                    f"{deadline.timeout}: its task {task_id} is still {task.status}"
                )
            time.sleep(max(0.0, min(interval, deadline.remaining())))
            interval = min(interval * 1.5, MAX_POLL_S)

    def _node_addresses(self, group: NodeGroup, task: Task) -> tuple[str, str | None]:
        """The private and public IP of the node running the task (task -> node -> instance)."""
        pools = self.yd_client.worker_pool_client
        node = (
            pools.get_node_by_id(task.nodeId)
            if task.nodeId
            else pools.get_node_by_worker_id(task.workerId)
        )
        details = node.details
        if details is None or not details.privateIpAddress:
            raise ClusterBuildError(f"Node {node.id} of {group.describe()} reports no private IP")
        public_ip = details.publicIpAddress or self._public_ip(group, details.instanceId)
        return details.privateIpAddress, public_ip

    def _public_ip(self, group: NodeGroup, instance_id: str) -> str | None:
        search = InstanceSearch(computeRequirementId=group.compute_requirement_id)
        for instance in self.yd_client.compute_client.get_instances(search).iterate():
            if instance.id is not None and instance.id.instanceId == instance_id:
                return instance.publicIpAddress
        return None

    def _check_head_still_running(self) -> None:
        task = self.yd_client.work_client.get_task_by_id(self.head_node_task_id)
        if task.status is not None and task.status.finished:
            raise NodeTaskFailed(
                f"The head node of cluster {self.spec.name!r} stopped while the cluster was being "
                f"built: its task {task.id} ended {_describe_task_end(task)}"
            )

    def _wait_for_workers(self, count: int, deadline: _Deadline) -> None:
        """Wait until `count` worker node tasks are EXECUTING (one search per poll)."""
        group_ids = {group.task_group_id for group in self._workers}
        search = TaskSearch(
            workRequirementId=self.work_requirement_id, statuses=[TaskStatus.EXECUTING]
        )
        interval = FIRST_POLL_S
        while True:
            self._check_not_closing()
            tasks = list(self.yd_client.work_client.get_tasks(search).iterate())
            if not any(task.id == self.head_node_task_id for task in tasks):
                self._check_head_still_running()
            executing = sum(1 for task in tasks if task.taskGroupId in group_ids)
            if executing >= count:
                return
            if deadline.remaining() <= 0:
                raise ClusterBuildTimeout(
                    f"Only {executing} of the {count} required worker nodes of cluster "
                    f"{self.spec.name!r} started within {deadline.timeout}"
                )
            time.sleep(max(0.0, min(interval, deadline.remaining())))
            interval = min(interval * 1.5, MAX_POLL_S)

    # ----- worker pools -----------------------------------------------------------------------

    def add_worker_pool(self, spec: WorkerPoolSpec | None = None, /, **fields: Any) -> str | None:
        """Add a pool of Ray worker nodes (a `WorkerPoolSpec`, or its fields as keywords).

        Before `build()` the pool is only recorded and None is returned. After, it is provisioned,
        its task group appended to the work requirement and its tasks added; returns its pool ID.
        A failure ends the new pool before the error propagates.
        """
        spec = spec or WorkerPoolSpec(**fields)
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
                work = self.yd_client.work_client
                requirement = work.get_work_requirement_by_id(self.work_requirement_id)
                requirement.taskGroups = [*(requirement.taskGroups or []), self._task_group(group)]
                requirement = work.update_work_requirement(requirement)
                group.task_group_id = next(
                    tg.id for tg in requirement.taskGroups or [] if tg.name == group.task_group_name
                )
                self._add_worker_tasks(group, spec.count)
            except BaseException:
                self._workers.remove(group)
                raise
        logger.info("Added %s to cluster %s", group.describe(), self.spec.name)
        return group.pool_id

    def remove_worker_pool(self, worker_pool_id: str) -> ShutdownReport:
        """Shut the pool down and terminate its compute requirement; its Ray nodes end."""
        return self._remove_group(self._worker_group_by_id(worker_pool_id))

    def remove_worker_pool_by_internal_name(self, internal_name: str) -> ShutdownReport:
        return self._remove_group(self._worker_group(internal_name))

    def _remove_group(self, group: NodeGroup) -> ShutdownReport:
        with self._lock:
            self._workers.remove(group)
        report = _Teardown(self.yd_client).run([], [group], self.spec.namespace)
        logger.info(
            "Removed worker pool %s from cluster %s: %s",
            group.internal_name,
            self.spec.name,
            report,
        )
        report.raise_if_failed(group.describe())
        return report

    def resize_worker_pool(self, internal_name: str, count: int) -> None:
        """Grow the pool by adding node tasks, or shrink it by aborting its newest node tasks (their
        nodes then end by idle node shutdown). At most the pool's `max_count` nodes."""
        group = self._worker_group(internal_name)
        spec = group.spec
        assert isinstance(spec, WorkerPoolSpec)
        if count < 1 or count > group.node_limit:
            raise ValueError(
                f"Worker pool {internal_name!r} can have 1 to {group.node_limit} nodes, "
                f"not {count}; "
                "set max_count when adding the pool to let it grow further"
            )
        if self._state == "new":
            group.spec = spec.model_copy(update={"count": count})
            return
        live = self._live_task_ids(group)
        if count > len(live):
            self._add_worker_tasks(group, count - len(live))
        elif count < len(live):
            work = self.yd_client.work_client
            extra = live[count:]
            _parallel([lambda t=t: work.cancel_task_by_id(t, True) for t in extra])
            group.task_ids = [task_id for task_id in group.task_ids if task_id not in set(extra)]
        logger.info(
            "Resized worker pool %s of cluster %s to %d nodes", internal_name, self.spec.name, count
        )

    def _live_task_ids(self, group: NodeGroup) -> list[str]:
        search = TaskSearch(
            workRequirementId=self.work_requirement_id,
            taskGroupId=group.task_group_id,
            statuses=_LIVE_TASK,
        )
        live = {task.id for task in self.yd_client.work_client.get_tasks(search).iterate()}
        return [task_id for task_id in group.task_ids if task_id in live]

    # ----- shutdown ---------------------------------------------------------------------------

    def _end_everything(self) -> ShutdownReport:
        with self._lock:
            groups = list(self._all_groups())
            requirement = self._work_requirement_to_end()
        report = ShutdownReport()
        if requirement is _LOST:
            report.merge(self._end_lost_work_requirement())
            requirement = None
        report.merge(
            _Teardown(self.yd_client).run(
                [requirement] if requirement else [], groups, self.spec.namespace
            )
        )
        return report

    def _work_requirement_to_end(self) -> str | object | None:
        if self.work_requirement_id:
            return self.work_requirement_id
        return _LOST if self._work_requirement_attempted else None

    def _end_lost_work_requirement(self) -> ShutdownReport:
        """The work requirement was submitted but its answer was lost: find it by name."""
        try:
            requirement = self.yd_client.work_client.get_work_requirement_by_name(
                self.spec.namespace, self.spec.name
            )
        except Exception as error:  # noqa: BLE001
            if _is_not_found(error):
                return ShutdownReport()
            return ShutdownReport(failed=[f"work requirement {self.spec.name}: {error}"])
        if requirement.status is None or requirement.status.finished:
            return ShutdownReport()
        self.work_requirement_id = requirement.id
        return _Teardown(self.yd_client).run([requirement.id], [], self.spec.namespace)

    def shut_down(self) -> ShutdownReport:
        """Cancel the work requirement (aborting its tasks), terminate the compute requirements and
        shut the pools down, all in parallel. Idempotent; tolerates entities already gone.
        Raises ClusterShutdownError (after trying everything) if something could not be ended."""
        with self._lock:
            if self._shutdown_report is not None:
                return self._shutdown_report
            self._closing.set()
            self._state = "shut_down"
        started = time.monotonic()
        report = self._end_everything()
        if not report.failed:
            self._shutdown_report = report
        self.timings["shutdown_s"] = time.monotonic() - started
        logger.info("Shut down Ray cluster %s: %s", self.spec.name, report)
        if self._owns_client and not report.failed:
            self.yd_client.close()
        report.raise_if_failed(f"cluster {self.spec.name!r}")
        return report

    def __enter__(self) -> RayDogCluster:
        if self._state == "new":
            self.build()
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        try:
            self.shut_down()
        except ClusterShutdownError:
            if exc is None:
                raise
            logger.exception("Shutting down cluster %s after an error also failed", self.spec.name)

    # ----- saved state ------------------------------------------------------------------------

    def save_state_to_json(self) -> str:
        """The state needed to shut the cluster down later, with RayDog's keys."""
        if self._state != "built":
            raise ClusterStateError(
                f"Cluster {self.spec.name!r} is {self._state}; "
                "only a built cluster has state to save"
            )
        pool_ids = [*self.worker_pool_ids, self._head.pool_id]
        if self._observability is not None:
            pool_ids.append(self._observability.pool_id)
        return json.dumps(
            {
                "cluster_name": self.spec.name,
                "cluster_namespace": self.spec.namespace,
                "cluster_tag": self.spec.tag,
                "work_requirement_id": self.work_requirement_id,
                "worker_pool_ids": pool_ids,
            },
            indent=2,
        )

    def save_state_to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(self.save_state_to_json())


_LOST = object()


def _auto_shutdown(timeout: timedelta | None) -> AutoShutdown:
    if timeout is None:
        return AutoShutdown(enabled=False)
    return AutoShutdown(enabled=True, timeout=timeout)


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
        if not isinstance(state.get("work_requirement_id"), str):
            raise ClusterStateError("Saved cluster state lacks 'work_requirement_id' (a string)")
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
        report = _Teardown(self.yd_client, check_first=True).run(
            [self._state["work_requirement_id"]], groups, self._state["cluster_namespace"]
        )
        self._shut_down = True
        logger.info("Shut down saved Ray cluster %s: %s", self._state.get("cluster_name"), report)
        report.raise_if_failed(f"saved cluster {self._state.get('cluster_name')!r}")
        return report


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


def wait_for_ray_nodes(count: int, timeout: float = 120.0) -> int:
    """Wait until the Ray cluster this process is connected to (`ray.init` first) has `count`
    alive nodes, the head included; return how many it has."""
    import ray

    deadline = time.monotonic() + timeout
    interval = FIRST_POLL_S
    while True:
        alive = sum(1 for node in ray.nodes() if node["Alive"])
        if alive >= count:
            return alive
        if time.monotonic() > deadline:
            raise TimeoutError(f"Only {alive} of {count} Ray nodes joined within {timeout} s")
        time.sleep(interval)
        interval = min(interval * 1.5, 1.0)


def _pool_has_tag(client: PlatformClient, compute: Any, pool_id: str, tag: str) -> bool:
    pool = client.worker_pool_client.get_worker_pool_by_id(pool_id)
    if not pool.computeRequirementId:
        return False
    return compute.get_compute_requirement_by_id(pool.computeRequirementId).tag == tag
