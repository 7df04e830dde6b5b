"""YellowDog's compute requirement and instance operations beyond provisioning: stop, start,
restart, reprovision, terminate and deprovision, compute requirements instantiated without a
worker pool, and template tests (`yd-compute-*`, `yd-terminate`, `yd-instantiate`,
`yd-provision --report`)."""

from __future__ import annotations

import logging
from typing import Any

from prefect_raydog.local.state.compute import ComputeRequirement, Node, WorkerPool
from prefect_raydog.local.state.errors import (
    InvalidRequest,
    InvalidTransition,
    NotFound,
    require_text,
)
from prefect_raydog.local.state.pool_service import PoolService
from prefect_raydog.local.templates import TemplateError
from prefect_raydog.local.wire import now

logger = logging.getLogger(__name__)

TEST_RESULT = "co.yellowdog.platform.interaction.compute.ComputeRequirementStaticTemplateTestResult"
INSTANCE_TRANSITIONS = {
    "STOPPED": ("RUNNING",),
    "RUNNING": ("STOPPED",),
    "PENDING": ("RUNNING",),
    "TERMINATED": ("PENDING", "RUNNING", "STOPPING", "STOPPED"),
}


class InstanceService(PoolService):
    """Move compute requirements and their instances between YellowDog's statuses."""

    def transition_compute_requirement(self, requirement_id: str, status: str) -> dict[str, Any]:
        """Terminate (`TERMINATED`), stop (`STOPPED`), start (`RUNNING`) or reprovision
        (`PROVISIONING`) a compute requirement."""
        with self._cond:
            requirement = self._compute_requirement(requirement_id)
            pool = requirement.pool
            assert pool is not None
            if status == "TERMINATED":
                if requirement.status not in ("TERMINATING", "TERMINATED"):
                    self._shut_down_pool(pool, lost="Compute requirement terminated")
            else:
                allowed = {"STOPPED": "RUNNING", "RUNNING": "STOPPED", "PROVISIONING": "RUNNING"}
                if status not in allowed:
                    raise InvalidRequest(
                        f"Compute requirement transition to '{status}' is not supported: "
                        "use TERMINATED, STOPPED, RUNNING or PROVISIONING"
                    )
                if requirement.status != allowed[status]:
                    raise InvalidTransition("ComputeRequirement", requirement.status, status)
                self._transition(requirement, pool, status)
            self._refresh_pool(pool)
            self._changed()
            return requirement.to_wire()

    def _transition(self, requirement: ComputeRequirement, pool: WorkerPool, status: str) -> None:
        live = [node for node in pool.nodes if not node.stopping]
        if status == "STOPPED":
            requirement.stopped = True
            for node in live:
                if not node.halted:
                    self._halt(node)
        elif status == "RUNNING":
            requirement.stopped, requirement.starting = False, True
            for node in live:
                if node.instance_status == "STOPPED":
                    self._resume(node)
        else:
            missing = min(requirement.target - len(live), pool.max_nodes - pool.live)
            for _ in range(max(0, missing)):
                self._add_node(pool)

    def update_compute_requirement(
        self, document: dict[str, Any], reprovision: bool
    ) -> dict[str, Any]:
        """Change a compute requirement's `targetInstanceCount`: its pool is resized to it;
        with `reprovision`, lost instances are replaced as well."""
        with self._cond:
            requirement = self._compute_requirement(
                require_text(document, "id", "Compute requirement")
            )
            target = document.get("targetInstanceCount")
            if not isinstance(target, int) or isinstance(target, bool):
                raise InvalidRequest("Compute requirement: field 'targetInstanceCount' is required")
            pool = requirement.pool
            assert pool is not None
            self._resize(pool, target)
            if reprovision:
                self._transition(requirement, pool, "PROVISIONING")
            self._refresh_pool(pool)
            return requirement.to_wire()

    def transition_instances(
        self, requirement_id: str, status: str, instance_ids: list[Any], deprovision: bool = False
    ) -> None:
        """Stop (`STOPPED`), start (`RUNNING`), restart (`PENDING`) or terminate (`TERMINATED`)
        some of a compute requirement's instances; `deprovision` terminates them and lowers
        the requirement's target to match."""
        if status not in INSTANCE_TRANSITIONS:
            raise InvalidRequest(
                f"Instance transition to '{status}' is not supported: "
                f"use one of {sorted(INSTANCE_TRANSITIONS)}"
            )
        with self._cond:
            requirement = self._compute_requirement(requirement_id)
            if requirement.status in ("TERMINATING", "TERMINATED"):
                raise InvalidTransition("ComputeRequirement", requirement.status, status)
            nodes = [self._instance(requirement, entry) for entry in instance_ids]
            for node in nodes:
                if node.instance_status not in INSTANCE_TRANSITIONS[status] or node.stopping:
                    raise InvalidTransition("Instance", node.instance_status, status)
            for node in nodes:
                self._transition_instance(node, status)
            if deprovision:
                requirement.target = max(0, requirement.target - len(nodes))
            assert requirement.pool is not None
            self._refresh_pool(requirement.pool)
            self._changed()

    def _instance(self, requirement: ComputeRequirement, entry: Any) -> Node:
        instance_id = entry.get("instanceId") if isinstance(entry, dict) else None
        if not isinstance(instance_id, str):
            raise InvalidRequest("Instance ids: each must be an InstanceId with 'instanceId'")
        for node in requirement.instances:
            if node.instance_id == instance_id:
                return node
        raise NotFound(f"Instance '{instance_id}' not found in '{requirement.id}'")

    def _transition_instance(self, node: Node, status: str) -> None:
        if status == "STOPPED":
            self._halt(node)
        elif status == "RUNNING":
            self._resume(node)
        elif status == "PENDING":
            self._halt(node, restart=True)
        else:
            error = node.task.error("ALLOCATION_LOST", "Instance terminated") if node.task else None
            self._stop_node(node, "FAILED", error)

    # ---- stopping and starting instances ---------------------------------------------------

    def _halt(self, node: Node, restart: bool = False) -> None:
        """Stop the node's instance: its task fails (ALLOCATION_LOST), its processes end and
        its node is LOST until the instance starts again (at once, for a `restart`)."""
        node.halted, node.restart = True, restart
        self._worker_busy(node)
        node.pool.registered -= 1
        node.set_status("LOST")
        node.worker_status = "LOST"
        node.set_instance_status("STOPPING")
        task = node.task
        if task is not None and task.outcome is None:
            task.outcome = ("FAILED", task.error("ALLOCATION_LOST", "Instance stopped"))
            task.abort_requested = now()
        if node.simulated:
            if task is not None:
                self._task_ended(task, None)
            self._halted(node)
        else:
            self._later(lambda: self._stop_instance(node))

    def _stop_instance(self, node: Node) -> None:
        assert self.runner is not None
        try:
            self.runner.stop_node(node.id)
        finally:
            with self._cond:
                if node.task is not None:
                    self._task_ended(node.task, None)
                self._halted(node)
                self._changed()

    def _halted(self, node: Node) -> None:
        if node.stopping:
            return
        node.set_instance_status("STOPPED")
        node.actions.clear()
        if node.restart:
            self._resume(node)
        self._refresh_pool(node.pool)

    def _resume(self, node: Node) -> None:
        node.restart = False
        node.set_instance_status("PENDING")
        if node.simulated:
            self._resumed(node)
        else:
            self._later(lambda: self._start_instance(node))

    def _start_instance(self, node: Node) -> None:
        assert self.runner is not None
        user_data = node.pool.requirement.user_data
        try:
            self.runner.boot_node(node.id, node.hostname, user_data, node.pool.template.image)
        except Exception as error:  # an instance that cannot start again is lost
            logger.warning("Instance of node %s failed to start: %s", node.id, error)
            with self._cond:
                node.stopping = True
                self._node_terminated(node, worker_status="LOST")
                self._changed()
            return
        with self._cond:
            if node.stopping:
                self._later(lambda: self._stop_process_node(node, kill=False, lost=False))
            else:
                self._resumed(node)
            self._changed()

    def _resumed(self, node: Node) -> None:
        node.halted = False
        node.pool.registered += 1
        node.set_instance_status("RUNNING")
        node.set_status("RUNNING")
        self._worker_idle(node)
        self._refresh_pool(node.pool)

    # ---- compute requirements without a worker pool, and template tests -------------------

    def provision_compute_requirement(self, usage: Any) -> dict[str, Any]:
        """A compute requirement of the template's instances, with no worker pool: its
        instances boot (running their user data's SSH keys) but register no worker."""
        requirement = self._usage(usage, "Compute requirement template usage")
        with self._cond:
            for other in self._compute.values():
                if (other.namespace, other.name) == (requirement.namespace, requirement.name) and (
                    other.status != "TERMINATED"
                ):
                    raise InvalidRequest(
                        f"Compute requirement with name '{other.namespace}/{other.name}' "
                        "already exists"
                    )
            pool = WorkerPool(requirement.namespace, requirement.name, {}, requirement)
            pool.visible = False
            requirement.pool = pool
            requirement.target = min(int(usage.get("targetInstanceCount") or 0), pool.max_nodes)
            self._pools[pool.id] = pool
            self._boot(requirement, pool)
            return requirement.to_wire()

    def test_requirement_template(self, usage: Any) -> dict[str, Any]:
        """What provisioning from the template would make (`yd-provision --report`): the
        compute requirement, never stored, as a static template's test result."""
        template_id = usage.get("templateId") if isinstance(usage, dict) else None
        try:
            self.templates.get(str(template_id))
        except TemplateError as error:
            raise NotFound(str(error)) from None
        requirement = self._usage(usage, "Compute requirement template usage")
        requirement.target = int(usage.get("targetInstanceCount") or 0)
        requirement.set_status("NEW")
        document = requirement.to_wire()
        del document["id"]
        return {"type": TEST_RESULT, "computeRequirement": document}

