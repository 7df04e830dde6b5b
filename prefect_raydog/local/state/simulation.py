"""The simulation: claims of waiting tasks by idle workers, pool growth, node boot and stop,
task runs, timeouts and idle shutdown, moving every entity through its statuses."""

from __future__ import annotations

import logging
import random
import time
from datetime import timedelta
from typing import Any

from prefect_raydog.local.nodes import NodeRunner, TaskLaunch
from prefect_raydog.local.state.clock import Clock
from prefect_raydog.local.state.compute import (
    PROVIDER,
    REGION,
    ComputeRequirement,
    Node,
    WorkerPool,
)
from prefect_raydog.local.state.work import GROUP_TERMINATED, Task, TaskGroup, WorkRequirement
from prefect_raydog.local.templates import TemplateCatalogue
from prefect_raydog.local.wire import iso_duration, now

logger = logging.getLogger(__name__)


class Simulation(Clock):
    """The registries of every entity, and what the scheduler does to them."""

    def __init__(
        self,
        templates: TemplateCatalogue,
        runner: NodeRunner | None = None,
        runner_unavailable: str = "no node runner was configured",
    ) -> None:
        super().__init__()
        self.templates = templates
        self.runner = runner
        self.runner_unavailable = runner_unavailable
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
        self._boot_failures: list[str | None] = []

    # ---- the scheduler ---------------------------------------------------------------------

    def step(self) -> None:
        """Let idle workers claim waiting tasks, grow pools, then fire due timers. Caller holds
        the lock; cheap when nothing changed.

        Claims come first: a node that registered or finished its task while a matching task
        waits takes it, as on YellowDog, before its idle timer or its pool's (0 s ones
        included) can end it. A change a timer makes is claimed in the next step, at once."""
        if self._dirty:
            self._dirty = False
            self._claim_tasks()
            self._grow_pools()
        self._fire_due_timers()

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
            if pool.live >= pool.max_nodes or pool.requirement.stopped:
                continue
            demand = sum(len(group.ready) for group in groups if _pool_serves(pool, group))
            idle = pool.registered - pool.busy
            extra = max(0, min(demand - idle - pool.booting, pool.max_nodes - pool.live))
            pool.requirement.target += extra
            for _ in range(extra):
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
            self._abort(task, "FAILED", task.error("TIMED_OUT", f"Task timed out after {limit}"))

    def _on_node_idle(self, node: Node, epoch: int) -> None:
        pool = node.pool
        if epoch != node.idle_epoch or node.task is not None or node.stopping:
            return
        if node.status == "RUNNING" and pool.registered > pool.min_nodes:
            pool.requirement.target -= 1
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
            address = self.runner.boot_node(
                node.id, node.hostname, node.pool.requirement.user_data, node.pool.template.image)
        except Exception as error:  # whatever stops a node booting is its boot failure
            logger.warning(
                "Node %s of worker pool %s failed to boot: %s", node.id, node.pool.id, error
            )
            with self._cond:
                self._boot_failed(node)
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
        """The machine never came up; tasks still waiting for it make the pool grow again."""
        node.stopping = True
        node.set_instance_status("TERMINATED")
        node.pool.booting -= 1
        node.pool.live -= 1
        self._refresh_pool(node.pool)
        self._changed()

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
            else:  # a process node's boot (its userdata) ends now; the boot then fails
                self._later(lambda: self.runner.stop_node(node.id, kill=True))
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
            if not node.halted:
                pool.registered -= 1
            node.halted = False
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
        requirement.set_status(*_requirement_status(requirement, pool))
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
        group.evaluate()
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
                        failure = task.error("UNABLE_START_PROCESS", message)
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
                task.error("PROCESS_NON_ZERO_EXIT", f"Process exited with code {code}", code),
            )
        node = task.node
        assert isinstance(node, Node)
        node.task = None
        node.pool.busy -= 1
        task.group.executing -= 1
        task.finish(status, error)
        if node.draining:
            self._stop_node(node, "ABORTED", None)
        elif not (node.stopping or node.halted):
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
                self._stop_node(node, "FAILED", node.task.error("ALLOCATION_LOST", lost))
            else:
                self._stop_node(node, "ABORTED", None)
        self._refresh_pool(pool)

    # ---- cancellation ----------------------------------------------------------------------

    def _cancel_requirement(self, requirement: WorkRequirement, abort: bool) -> None:
        requirement.set_status("CANCELLING")
        for group in requirement.groups:
            if group.status in GROUP_TERMINATED:
                continue
            if group.status != "FAILING":
                group.set_status("CANCELLING")
            group.end_waiting("CANCELLED")
            if abort:
                for task in group.tasks:
                    if task.status == "EXECUTING" and task.outcome is None:
                        self._abort(task, "ABORTED", None)
            group.evaluate()
        requirement.evaluate()


def _pool_serves(pool: WorkerPool, group: TaskGroup) -> bool:
    """Whether the pool's workers may claim the group's tasks (run specification match)."""
    if group.worker_tags is not None and pool.worker_tag not in group.worker_tags:
        return False
    if group.namespaces is not None and pool.namespace not in group.namespaces:
        return False
    return any(kind in pool.template.supported_task_types for kind in group.task_types)


def _requirement_status(
    requirement: ComputeRequirement, pool: WorkerPool
) -> tuple[str, str | None]:
    """The status of a live compute requirement (and its next one) from its instances."""
    if requirement.stopped:
        stopping = any(node.instance_status == "STOPPING" for node in pool.nodes)
        return ("STOPPING", "STOPPED") if stopping else ("STOPPED", None)
    if requirement.starting:
        if any(node.halted and not node.stopping for node in pool.nodes):
            return "STARTING", "RUNNING"
        requirement.starting = False
    return ("PROVISIONING" if pool.booting else "RUNNING"), None
