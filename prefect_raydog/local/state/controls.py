"""The controls tests use beyond YellowDog's API: injected faults (boot failures, killed
nodes), ending everything, and the list of what is still live."""

from __future__ import annotations

from typing import Any

from prefect_raydog.local.state.errors import InvalidRequest, NotFound
from prefect_raydog.local.state.simulation import Simulation
from prefect_raydog.local.state.work import WR_FINISHED


class Controls(Simulation):
    """Fault injection and inspection."""

    def fail_node_boot(self, count: int = 1, pool_id: str | None = None) -> None:
        """Make the next `count` nodes to boot (of one pool, or of any) fail to boot."""
        with self._cond:
            self._boot_failures.extend([pool_id] * count)

    def clear_boot_failures(self) -> None:
        with self._cond:
            self._boot_failures.clear()

    def kill_node(self, node_id: str) -> None:
        """The node's machine dies: processes SIGKILLed, worker LOST, node and instance
        TERMINATED, its task FAILED with ALLOCATION_LOST."""
        with self._cond:
            node = self._nodes.get(node_id)
            if node is None:
                raise NotFound(f"Node '{node_id}' not found")
            if node.stopping:
                raise InvalidRequest(f"Node '{node_id}' is already {node.instance_status}")
            task = node.task
            error = task.error("ALLOCATION_LOST", "Node lost") if task else None
            self._stop_node(node, "FAILED", error, kill=True)
            self._changed()

    def end_everything(self) -> None:
        """Cancel every unfinished work requirement (aborting its tasks) and shut down every
        pool, as a test does to clean up after a failure."""
        with self._cond:
            for requirement in self._requirements.values():
                if requirement.status not in WR_FINISHED:
                    self._cancel_requirement(requirement, abort=True)
            for pool in list(self._pools.values()):
                if not pool.shut_down:
                    self._shut_down_pool(pool)
            self._changed()

    def live_entities(self) -> dict[str, list[dict[str, Any]]]:
        with self._cond:
            live = {
                "workRequirements": [
                    _brief(r.id, r.status, r.name)
                    for r in self._requirements.values()
                    if r.status not in WR_FINISHED
                ],
                "workerPools": [
                    _brief(p.id, p.status, p.name)
                    for p in self._pools.values()
                    if p.status != "TERMINATED" and p.visible
                ],
                "computeRequirements": [
                    _brief(c.id, c.status, c.name)
                    for c in self._compute.values()
                    if c.status != "TERMINATED"
                ],
                "nodes": [
                    _brief(n.id, n.status, n.hostname)
                    for n in self._nodes.values()
                    if n.status in ("RUNNING", "LATE") and n.pool.visible
                ],
                "instances": [
                    _brief(n.instance_id, n.instance_status, n.hostname)
                    for n in self._nodes.values()
                    if n.instance_status != "TERMINATED"
                ],
            }
        processes = self.runner.processes() if self.runner is not None else []
        live["processes"] = [{"pid": pid} for pid in processes]
        return live


def _brief(entity_id: str, status: str | None, name: str) -> dict[str, Any]:
    return {"id": entity_id, "name": name, "status": status}
