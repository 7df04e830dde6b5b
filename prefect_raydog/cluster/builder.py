"""`RayDogCluster`, the Builder's cluster object: it builds one Ray cluster as one YellowDog work
requirement plus one provisioned worker pool per node group, resizes it and shuts it down."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple

from pydantic import SecretStr
from yellowdog_client import PlatformClient
from yellowdog_client.model import Task, WorkRequirement

from prefect_raydog.cluster.client import (
    DEFAULT_API_URL,
    Deadline,
    client_or_credentials,
    is_key_refused,
    parallel,
)
from prefect_raydog.cluster.nodes import (
    NodeGroup,
    head_group,
    node_addresses,
    node_tasks,
    observability_group,
    provision_pool,
    running_nodes,
    task_group,
    worker_group,
)
from prefect_raydog.cluster.pools import WorkerPools
from prefect_raydog.cluster.saved import SavedState
from prefect_raydog.cluster.teardown import ShutdownReport, Teardown, end_work_requirement_named
from prefect_raydog.cluster.token_auth import SSHLogin, TokenAuth, check_groups_take_a_key
from prefect_raydog.cluster.waits import (
    RequirementWatch,
    check_head_still_running,
    wait_for_workers,
    wait_until_executing,
)
from prefect_raydog.errors import (
    ClusterBuildError,
    ClusterShutdownError,
    ClusterStateError,
    KeyRefusedError,
    UnknownWorkerPoolError,
)
from prefect_raydog.spec import BUILD_ID_LENGTH, ClusterSpec, WorkerPoolSpec

logger = logging.getLogger("prefect_raydog.cluster")


_LOST = object()


class HeadNodeAddress(NamedTuple):
    """The head node's addresses, as RayDog's build() returns them: (private, public)."""

    private_ip: str
    public_ip: str | None


class RayDogCluster(WorkerPools, SavedState):
    """A Ray cluster on YellowDog: a head node, worker pools and an optional observability node.

    Everything RayDog's Builder does, from a validated `ClusterSpec`: `build()` provisions every
    pool at once and returns the head node's addresses; pools can be added, resized and removed;
    `shut_down()` ends everything in parallel; a failure anywhere tears down what was created.
    Every name it gives starts with `build_name` (the cluster name and this object's own build
    ID), so that it only ever ends what it made, even beside another build of the same name.
    Given an `ssh` login to its nodes, it locks Ray with a token of its own (`TokenAuth`): connect
    with `ray.init(f"ray://...", **cluster.ray_client_kwargs())`.
    """

    def __init__(
        self,
        spec: ClusterSpec,
        client: PlatformClient | None = None,
        *,
        key_id: str | None = None,
        key_secret: str | SecretStr | None = None,
        url: str = DEFAULT_API_URL,
        ssh: SSHLogin | None = None,
    ) -> None:
        if ssh is not None and ssh.authorize_in_userdata:
            check_groups_take_a_key(spec)
        self.token_auth = TokenAuth(ssh) if ssh is not None else None
        self._owns_client = client is None
        self.spec = spec
        self.build_id = secrets.token_hex(BUILD_ID_LENGTH // 2)
        self.build_name = f"{spec.name}-{self.build_id}"
        self.yd_client = client_or_credentials("RayDogCluster", client, key_id, key_secret, url)
        self._lock = threading.RLock()
        self._requirement_lock = threading.Lock()
        self._state: Literal["new", "building", "built", "shut_down"] = "new"
        self._watch: RequirementWatch | None = None
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
        self._head = head_group(spec, self.build_name)
        self._observability = observability_group(spec, self.build_name)
        self._workers: list[NodeGroup] = []
        for pool in spec.worker_pools:
            self._add_worker_group(pool)

    def __repr__(self) -> str:
        return (
            f"RayDogCluster(name={self.spec.name!r}, build_name={self.build_name!r}, "
            f"namespace={self.spec.namespace!r}, "
            f"state={self._state!r}, work_requirement_id={self.work_requirement_id!r})"
        )

    # ----- groups and names -------------------------------------------------------------------

    def _add_worker_group(self, spec: WorkerPoolSpec) -> NodeGroup:
        group = worker_group(self.build_name, self._next_pool_number, spec)
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

    def ray_client_kwargs(self) -> dict[str, Any]:
        """What `ray.init("ray://...")` needs to be let in: the token, when the cluster has one."""
        return self.token_auth.ray_client_kwargs() if self.token_auth is not None else {}

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
        self,
        timeout: timedelta | float | None = None,
        workers_to_join: int | None = None,
        on_step: Callable[[str], None] | None = None,
    ) -> HeadNodeAddress:
        """Provision every pool at once, submit the work requirement, start the head node (after
        the observability node, if any), start the worker nodes, and return the head's addresses.

        Waits until `workers_to_join` worker tasks run (the spec's value when None), at most
        `timeout` (the spec's `build_timeout` when None). A node task that fails ends the build at
        once. Any failure, timeout, interrupt or `shut_down()` from another thread tears down what
        was created before the error propagates; nothing of another build is touched.
        `on_step(step)` is called as each step starts, the first before any provisioning call,
        and with "built" at the end: e.g. to show progress, or to save the state as it grows.
        """
        with self._lock:
            if self._state != "new":
                raise ClusterStateError(
                    f"Cluster {self.spec.name!r} is {self._state}; build it once"
                )
            self._state = "building"
        if isinstance(timeout, (int, float)):
            timeout = timedelta(seconds=timeout)
        deadline = Deadline(self.spec.build_timeout if timeout is None else timeout)
        joined = self.spec.workers_to_join if workers_to_join is None else workers_to_join
        started = time.monotonic()
        logger.info("Building Ray cluster %s in namespace %s", self.spec.name, self.spec.namespace)
        with self._teardown_on_failure(f"Building cluster {self.spec.name!r}"):
            self._enter_step("provisioning the worker pools", on_step)
            self._provision(self._all_groups())
            self.timings["pools_provisioned_s"] = time.monotonic() - started
            self._enter_step("submitting the work requirement", on_step)
            self._submit_work_requirement()
            with RequirementWatch(self.yd_client, self.work_requirement_id) as watch:
                self._watch = watch
                self._start_nodes(watch, joined, deadline, started, on_step)
            with self._lock:
                self._check_not_closing()
                self._state = "built"
        if on_step is not None:
            on_step("built")
        self.timings["build_s"] = time.monotonic() - started
        logger.info(
            "Ray cluster %s is up: head node %s (public %s), %d worker pools",
            self.spec.name,
            self.head_node_private_ip,
            self.head_node_public_ip,
            len(self._workers),
        )
        return self.head_address  # type: ignore[return-value]

    def _enter_step(self, step: str, on_step: Callable[[str], None] | None) -> None:
        self._step = step
        if on_step is not None:
            on_step(step)

    def _start_nodes(
        self,
        watch: RequirementWatch,
        joined: int,
        deadline: Deadline,
        started: float,
        on_step: Callable[[str], None] | None,
    ) -> None:
        self._enter_step("starting the observability node", on_step)
        environment = self._start_observability_node(watch, deadline)
        self._enter_step("starting the head node", on_step)
        self._start_head_node(watch, environment, deadline)
        self.timings["head_executing_s"] = time.monotonic() - started
        self._enter_step("adding the worker node tasks", on_step)
        parallel(
            [lambda g=g: self._add_worker_tasks(g, g.spec.start_count) for g in self._workers]
        )
        self._enter_step("waiting for the worker nodes", on_step)
        if joined:
            self._wait_for_workers(watch, joined, deadline)
            self.timings["workers_joined_s"] = time.monotonic() - started
        else:
            check_head_still_running(
                self.yd_client, self.head_node_task_id, self.spec.name, self._check_not_closing
            )

    @contextmanager
    def _teardown_on_failure(
        self, action: str, groups: list[NodeGroup] | None = None
    ) -> Iterator[None]:
        """On any failure inside, end what was created (the whole cluster, or only `groups`)."""
        try:
            yield
        except BaseException as error:
            if is_key_refused(error):
                self._refuse_key(action)
            if groups is None:
                report = self._end_everything()
                with self._lock:
                    self._state = "shut_down"
                    if not report.failed:
                        self._shutdown_report = report
                if self._owns_client and not report.failed:
                    self.yd_client.close()
            else:
                report = Teardown(self.yd_client).run([], groups, self.spec.namespace)
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

    def _refuse_key(self, action: str) -> None:
        """Every call, teardown's included, would be refused the same way: end nothing."""
        made = [group.describe() for group in self._all_groups() if group.pool_id]
        with self._lock:
            self._state = "shut_down"
            if not made:
                self._shutdown_report = ShutdownReport()
        raise KeyRefusedError(f"{action} failed", (), made) from None

    def _check_not_closing(self) -> None:
        if self._closing.is_set():
            raise ClusterBuildError(f"Cluster {self.spec.name!r} was shut down while being built")

    def _provision(self, groups: list[NodeGroup]) -> None:
        parallel([lambda g=g: self._provision_group(g) for g in groups])

    def _provision_group(self, group: NodeGroup) -> None:
        self._check_not_closing()
        provision_pool(self.yd_client, group, self.spec,
                       self.token_auth.login if self.token_auth is not None else None)

    def _submit_work_requirement(self) -> None:
        self._check_not_closing()
        groups = self._all_groups()
        requirement = WorkRequirement(
            namespace=self.spec.namespace,
            name=self.build_name,
            taskGroups=[task_group(group, self.spec) for group in groups],
            tag=self.spec.tag,
        )
        self._work_requirement_attempted = True
        requirement = self.yd_client.work_client.add_work_requirement(requirement)
        self.work_requirement_id = requirement.id
        ids = {tg.name: tg.id for tg in requirement.taskGroups or []}
        for group in groups:
            group.task_group_id = ids[group.task_group_name]

    def _next_task_names(self, count: int) -> list[str]:
        with self._lock:
            first = self._task_counter + 1
            self._task_counter += count
        return [f"task-{number:05d}" for number in range(first, first + count)]

    def add_tasks(self, group: NodeGroup, count: int, environment: dict[str, str]) -> list[str]:
        self._check_not_closing()
        tasks = node_tasks(group, self._next_task_names(count), environment)
        added = self.yd_client.work_client.add_tasks_to_task_group_by_id(group.task_group_id, tasks)
        ids = [task.id for task in added]
        group.task_ids.extend(ids)
        return ids

    def _start_observability_node(
        self, watch: RequirementWatch, deadline: Deadline
    ) -> dict[str, str]:
        if self._observability is None:
            return {}
        (task_id,) = self.add_tasks(self._observability, 1, {})
        task = self._wait_until_executing(
            watch, self._observability, task_id, "observability node", deadline
        )
        self.observability_node_private_ip, _ = node_addresses(
            self.yd_client, self._observability, task
        )
        return {"OBSERVABILITY_HOST": self.observability_node_private_ip}

    def _start_head_node(
        self, watch: RequirementWatch, environment: dict[str, str], deadline: Deadline
    ) -> None:
        if self.token_auth is not None:
            environment = {**environment, **self.token_auth.environment}
        self._environment = environment
        (self.head_node_task_id,) = self.add_tasks(self._head, 1, environment)
        task = self._wait_until_executing(
            watch, self._head, self.head_node_task_id, "head node", deadline
        )
        self.head_node_started_time = task.startedTime
        self.head_node_node_id = task.nodeId
        self.head_node_private_ip, self.head_node_public_ip = node_addresses(
            self.yd_client, self._head, task
        )
        if self.token_auth is not None:
            self.token_auth.deliver_to_head(self.head_node_public_ip or self.head_node_private_ip)
            self.token_auth.follow(lambda: running_nodes(self.yd_client, list(self._workers)))

    def _worker_environment(self) -> dict[str, str]:
        return {
            **self._environment,
            "RAY_HEAD_IP": self.head_node_private_ip or "",
            "RAY_HEAD_NODE_PRIVATE_IP": self.head_node_private_ip or "",
        }

    def _add_worker_tasks(self, group: NodeGroup, count: int) -> list[str]:
        return self.add_tasks(group, count, self._worker_environment()) if count else []

    def _wait_until_executing(
        self, watch: RequirementWatch, group: NodeGroup, task_id: str, what: str,
        deadline: Deadline,
    ) -> Task:
        return wait_until_executing(
            self.yd_client, watch, group.task_group_id, task_id, what, self.spec.name, deadline,
            self._check_not_closing,
        )

    def _wait_for_workers(self, watch: RequirementWatch, count: int, deadline: Deadline) -> None:
        """Wait until `count` worker node tasks are EXECUTING, failing as soon as one ends."""
        group_ids = {group.task_group_id for group in self._workers}
        wait_for_workers(
            self.yd_client,
            watch,
            (self._head.task_group_id, self.head_node_task_id),
            group_ids,
            count,
            self.spec.name,
            deadline,
            self._check_not_closing,
        )

    # ----- shutdown ---------------------------------------------------------------------------

    def _end_everything(self) -> ShutdownReport:
        if self.token_auth is not None:
            self.token_auth.close()
        if self._watch is not None:  # before the requirement's final event: see RequirementWatch
            self._watch.close()
        with self._lock:
            groups = list(self._all_groups())
            requirement = self._work_requirement_to_end()
        report = ShutdownReport()
        if requirement is _LOST:
            lost, self.work_requirement_id = end_work_requirement_named(
                self.yd_client, self.spec.namespace, self.build_name
            )
            report.merge(lost)
            requirement = None
        report.merge(
            Teardown(self.yd_client).run(
                [requirement] if requirement else [], groups, self.spec.namespace
            )
        )
        return report

    def _work_requirement_to_end(self) -> str | object | None:
        if self.work_requirement_id:
            return self.work_requirement_id
        return _LOST if self._work_requirement_attempted else None

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
