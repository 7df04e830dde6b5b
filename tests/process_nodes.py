"""Helpers for tests of the local platform's process nodes: pools of `local/process` nodes and
work requirements made through the SDK, torn down afterwards, checks on host namespaces, and the
footprint of a process that runs a platform, to check that nothing of it outlives it."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import wait_for
from yellowdog_client import PlatformClient
from yellowdog_client.model import (
    ComputeRequirementTemplateUsage,
    NodeWorkerTarget,
    NodeWorkerTargetType,
    ProvisionedWorkerPoolProperties,
    RunSpecification,
    Task,
    TaskGroup,
    TaskStatus,
    WorkerPoolStatus,
    WorkRequirement,
)

from prefect_raydog.local import LocalPlatform
from prefect_raydog.local.network import LOCK_DIR

ABORT_GRACE_S = 1.0


def node_networking(bridge: str) -> list[str]:
    """The network namespaces and veth links on the host that belong to `bridge`'s nodes."""
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in namespaces.splitlines()]
    names += [line.split(": ")[1].split("@")[0] for line in links.splitlines()]
    return [name for name in names if name.startswith((f"{bridge}-", f"{bridge}v"))]


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def _process_table() -> dict[int, tuple[int, str, str]]:
    """Every live (non-zombie) process: pid -> (parent pid, start time, command name)."""
    table = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        if stat:
            name, rest = stat.split(" (", 1)[1].rsplit(")", 1)
            fields = rest.split()
            if fields[0] != "Z":
                table[int(entry.name)] = (int(fields[1]), fields[19], name)
    return table


@dataclass(frozen=True)
class Footprint:
    """What a process that runs a local platform has on this machine: its descendants (node
    processes, raylets, a bridge's reaper), by pid and start time, and the bridges that it or a
    descendant holds."""

    processes: dict[int, tuple[str, str]]
    """pid -> (start time, command name)."""
    bridges: dict[str, str]
    """bridge -> pid of the process that claimed it."""

    @classmethod
    def of(cls, pid: int) -> Footprint:
        table = _process_table()
        found, pending = {}, [pid]
        while pending:
            parent = pending.pop()
            for child, (ppid, started, name) in table.items():
                if ppid == parent and child not in found:
                    found[child] = (started, name)
                    pending.append(child)
        holders = {str(holder) for holder in (pid, *found)}
        return cls(found, {bridge: holder for bridge, holder in _bridge_holders().items()
                           if holder in holders})

    def __or__(self, other: Footprint) -> Footprint:
        return Footprint({**self.processes, **other.processes}, {**self.bridges, **other.bridges})

    @property
    def bridge(self) -> str | None:
        return next(iter(self.bridges), None)

    def names(self) -> list[str]:
        return sorted(name for _, name in self.processes.values())

    def left(self) -> list[str]:
        """What of it is still on this machine: a process (same pid and start time), or a
        bridge, its link, node namespaces and veths (unless another platform claimed it since)."""
        table = _process_table()
        left = [f"{name} (pid {pid})" for pid, (started, name) in self.processes.items()
                if pid in table and table[pid][1] == started]
        for bridge, holder in self.bridges.items():
            left += bridge_leftovers(bridge, holder)
        return left

    def wait_gone(self, since: float, timeout: float = 60.0) -> float:
        """Wait until nothing of it is left; return the seconds from `since` (a monotonic time,
        when its process was told to end) until then."""
        while left := self.left():
            if time.monotonic() - since > timeout:
                pytest.fail(f"Left {timeout:g} s after the platform's process was ended: {left}")
            time.sleep(0.05)
        return time.monotonic() - since


def bridge_leftovers(bridge: str, holder: str) -> list[str]:
    """What is left on this machine of `bridge`, which the process `holder` (a pid) claimed: its
    link, node namespaces, veths and hosts files; nothing once another platform has claimed the
    name since (it writes its lock file before it makes anything, so it is read last)."""
    left = node_networking(bridge) + ([bridge] if link_exists(bridge) else [])
    left += [str(path) for path in Path("/etc/netns").glob(f"{bridge}-*")]
    return left if _bridge_holders().get(bridge, holder) == holder else []


def _bridge_holders() -> dict[str, str]:
    """bridge -> pid written in its lock file by the platform that claimed it."""
    holders = {}
    for lock in LOCK_DIR.glob("ydl*.lock"):
        with suppress(OSError):
            holders[lock.stem] = (lock.read_text().split() or [""])[-1]
    return holders


def run_leaving_nothing(command: list[str], timeout: float, **options
                        ) -> subprocess.CompletedProcess[str]:
    """`subprocess.run(command, capture_output=True, text=True)` that watches what the child
    starts while it runs and, once it has ended, waits until none of that is left."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, **options)
    deadline, footprint, outputs = time.monotonic() + timeout, Footprint({}, {}), None
    with process:
        while outputs is None:
            footprint |= Footprint.of(process.pid)
            try:
                outputs = process.communicate(timeout=0.2)
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    process.kill()
                    raise
    footprint.wait_gone(time.monotonic())
    return subprocess.CompletedProcess(command, process.returncode, *outputs)


class Pools:
    """Provisions pools (of `local/process` nodes unless told otherwise) and work requirements
    through the SDK; tears down."""

    def __init__(self, platform: LocalPlatform | None, client: PlatformClient | None = None
                 ) -> None:
        self.platform = platform
        self.client: PlatformClient = client or platform.make_client(
            max_attempts=3, initial_interval=0.05)
        self.namespace = f"ns-{uuid.uuid4().hex[:8]}"
        self.pool_ids: list[str] = []
        self.requirement_ids: list[str] = []

    def provision(self, count: int, tag: str, template: str = "local/process",
                  user_data: str | None = None) -> str:
        pool = self.client.worker_pool_client.provision_worker_pool(
            ComputeRequirementTemplateUsage(
                templateId=template, requirementName=f"pool-{uuid.uuid4().hex[:8]}",
                requirementNamespace=self.namespace, targetInstanceCount=count,
                userData=user_data),
            ProvisionedWorkerPoolProperties(
                createNodeWorkers=NodeWorkerTarget(NodeWorkerTargetType.PER_NODE, 1),
                workerTag=tag, maxNodes=count))
        self.pool_ids.append(pool.id)
        return pool.id

    def wait_idle(self, pool_id: str, timeout: float = 20) -> None:
        pools = self.client.worker_pool_client
        wait_for(lambda: pools.get_worker_pool_by_id(pool_id).status == WorkerPoolStatus.IDLE,
                 timeout, what=f"pool {pool_id} to be idle")

    def run(self, tag: str, scripts: list[str], environment: dict[str, str] | None = None
            ) -> list[Task]:
        """One task group for `tag`, one bash task per script; returns the added tasks."""
        group = TaskGroup(name="g", runSpecification=RunSpecification(
            taskTypes=["bash"], workerTags=[tag], namespaces=[self.namespace],
            taskTimeout=timedelta(minutes=10)))
        requirement = self.client.work_client.add_work_requirement(WorkRequirement(
            namespace=self.namespace, name=f"wr-{uuid.uuid4().hex[:8]}", taskGroups=[group]))
        self.requirement_ids.append(requirement.id)
        tasks = [Task(name=f"t{n}", taskType="bash", arguments=["taskdata.txt"],
                      taskData=script, environment=environment or {})
                 for n, script in enumerate(scripts)]
        return self.client.work_client.add_tasks_to_task_group_by_id(
            requirement.taskGroups[0].id, tasks)

    def wait_task(self, task_id: str, *statuses: TaskStatus, timeout: float = 20) -> Task:
        work = self.client.work_client
        return wait_for(lambda: (task := work.get_task_by_id(task_id)).status in statuses
                        and task, timeout, what=f"task {task_id} to be {statuses}")

    def close(self) -> None:
        for requirement_id in self.requirement_ids:
            work = self.client.work_client
            if not work.get_work_requirement_by_id(requirement_id).status.finished:
                work.cancel_work_requirement_by_id(requirement_id, True)
        for pool_id in self.pool_ids:
            self.client.worker_pool_client.shutdown_worker_pool_by_id(pool_id)


@contextmanager
def process_pools(platform: LocalPlatform,
                  abort_grace_s: float = ABORT_GRACE_S) -> Iterator[Pools]:
    """`Pools` on `platform` with the given abort grace; afterwards every node namespace is gone."""
    runner = platform.runner
    if runner is None:
        pytest.skip(f"process nodes are unavailable: {platform.state.runner_unavailable}")
    grace, runner.abort_grace_s = runner.abort_grace_s, abort_grace_s
    bridge = getattr(runner.network, "bridge", None)
    workspace = Pools(platform)
    try:
        yield workspace
    finally:
        workspace.close()
        runner.abort_grace_s = grace
    if bridge is not None:
        wait_for(lambda: node_networking(bridge) == [], 30, what="the nodes' namespaces to go")
