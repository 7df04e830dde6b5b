"""YellowDog's worker pool and compute services: the operations the API's worker pool, node,
compute requirement and instance routes call."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prefect_raydog.local.state.compute import ComputeRequirement, Node, WorkerPool
from prefect_raydog.local.state.errors import InvalidRequest, NotFound, require_text
from prefect_raydog.local.state.search import (
    Query,
    by_id,
    contains,
    healthy,
    in_namespaces,
    matches,
    newest_by_name,
)
from prefect_raydog.local.state.simulation import Simulation
from prefect_raydog.local.templates import IMAGE, PROVIDER, REGION, NodeMode, TemplateError


class PoolService(Simulation):
    """Provision, resize, shut down and search worker pools, nodes, compute requirements and
    instances."""

    def _usage(self, usage: Any, what: str) -> ComputeRequirement:
        """A new compute requirement, not yet stored, from a `ComputeRequirementTemplateUsage`."""
        if not isinstance(usage, dict):
            raise InvalidRequest(f"{what}: field 'requirementTemplateUsage' is required")
        template_id = require_text(usage, "templateId", "requirementTemplateUsage")
        name = require_text(usage, "requirementName", "requirementTemplateUsage")
        namespace = usage.get("requirementNamespace") or "default"
        try:
            template = self.templates.get(template_id)
        except TemplateError as error:
            raise InvalidRequest(str(error)) from None
        if template.mode is NodeMode.PROCESS and self.runner is None:
            raise InvalidRequest(
                f"Template '{template_id}' needs process nodes, which are "
                f"unavailable here: {self.runner_unavailable}"
            )
        return ComputeRequirement(usage, namespace, name, template)

    def provision_worker_pool(self, document: dict[str, Any]) -> dict[str, Any]:
        requirement = self._usage(document.get("requirementTemplateUsage"), "Provision request")
        namespace, name, usage = requirement.namespace, requirement.name, requirement.usage
        properties = document.get("provisionedProperties") or {}
        with self._cond:
            for other in self._pools.values():
                if (
                    (other.namespace, other.name) == (namespace, name)
                    and not other.shut_down
                    and other.visible
                ):
                    raise InvalidRequest(
                        f"Worker pool with name '{namespace}/{name}' already exists"
                    )
            pool = WorkerPool(namespace, name, properties, requirement)
            requirement.pool = pool
            count = int(usage.get("targetInstanceCount") or 0)
            requirement.target = min(max(count, pool.min_nodes), pool.max_nodes)
            self._pools[pool.id] = pool
            self._open_pools[pool] = None
            self._idle[pool] = {}
            self._boot(requirement, pool)
            return pool.to_wire()

    def _boot(self, requirement: ComputeRequirement, pool: WorkerPool) -> None:
        """Record a new compute requirement and start its target count of machines."""
        self._compute[requirement.id] = requirement
        for _ in range(requirement.target):
            self._add_node(pool)
        self._refresh_pool(pool)
        self._changed()

    def get_worker_pool(self, pool_id: str) -> dict[str, Any]:
        with self._cond:
            return self._pool(pool_id).to_wire()

    def _pool(self, pool_id: str) -> WorkerPool:
        return by_id(self._pools, pool_id, "Worker pool")

    def get_worker_pool_by_name(self, namespace: str, name: str) -> dict[str, Any]:
        with self._cond:
            pools = (pool for pool in self._pools.values() if pool.visible)
            return newest_by_name(pools, namespace, name, "Worker pool").to_wire()

    def shut_down_worker_pool(self, pool_id: str) -> None:
        with self._cond:
            pool = self._pool(pool_id)
            if not pool.shut_down:
                self._shut_down_pool(pool)
                self._changed()

    def resize_worker_pool(self, pool_id: str, size: int) -> dict[str, Any]:
        """Add nodes, or stop idle nodes (newest first), until the pool has `size` nodes."""
        with self._cond:
            pool = self._pool(pool_id)
            self._resize(pool, size)
            return pool.to_wire()

    def _resize(self, pool: WorkerPool, size: int) -> None:
        if pool.shut_down:
            raise InvalidRequest(f"Worker pool '{pool.id}' is {pool.status}")
        if not pool.min_nodes <= size <= pool.max_nodes:
            raise InvalidRequest(
                f"Worker pool '{pool.name}': size {size} must be between "
                f"minNodes {pool.min_nodes} and maxNodes {pool.max_nodes}"
            )
        pool.requirement.target = size
        for _ in range(size - pool.live):
            self._add_node(pool)
        idle = [node for node in reversed(pool.nodes) if node.task is None]
        for node in idle[: max(0, pool.live - size)]:
            self._stop_node(node, "ABORTED", None)
        self._changed()

    def shut_down_node(self, node_id: str) -> dict[str, Any]:
        """Stop one node gracefully: it takes no new task and stops once its task has ended."""
        with self._cond:
            node = self._nodes.get(node_id)
            if node is None or node.status is None:
                raise NotFound(f"Node '{node_id}' not found")
            node.draining = True
            if not node.stopping:
                node.pool.requirement.target -= 1
            if node.task is None:
                self._stop_node(node, "ABORTED", None)
            self._changed()
            return node.to_wire()

    def search_worker_pools(self, params: dict[str, list[str]]) -> dict[str, Any]:
        query = Query(params)
        kind = query.one("type")
        with self._cond:
            found = (
                p
                for p in self._pools.values()
                if p.visible
                and in_namespaces(query, p.namespace)
                and contains(query, "name", p.name)
                and (kind is None or "ProvisionedWorkerPool".endswith(kind.split(".")[-1]))
                and matches(query, "statuses", p.status)
                and healthy(query, True)
                and query.in_range("createdTime", p.created)
            )
            return query.page(found, WorkerPool.summary)

    def get_node(self, node_id: str) -> dict[str, Any]:
        with self._cond:
            node = self._nodes.get(node_id)
            if node is None or node.status is None:
                raise NotFound(f"Node '{node_id}' not found")
            return node.to_wire()

    def get_node_by_worker(self, worker_id: str) -> dict[str, Any]:
        with self._cond:
            node = self._nodes_by_worker.get(worker_id)
            if node is None or node.status is None:
                raise NotFound(f"Worker '{worker_id}' not found")
            return node.to_wire()

    def search_nodes(self, params: dict[str, list[str]]) -> dict[str, Any]:
        query = Query(params)
        with self._cond:
            pool_id = query.one("workerPoolId")
            nodes: Iterable[Node] = self._nodes.values()
            if pool_id is not None:
                nodes = self._pools[pool_id].nodes if pool_id in self._pools else []
            group_id = query.one("workerTaskGroupId")
            found = (
                n
                for n in nodes
                if n.status is not None
                and n.pool.visible
                and matches(query, "statuses", n.status)
                and matches(query, "instanceId", n.instance_id)
                and matches(query, "workerTag", n.pool.worker_tag)
                and matches(query, "workerStatuses", n.worker_status)
                and matches(query, "instanceType", n.pool.template.instance_type)
                and matches(query, "region", REGION)
                and matches(query, "providers", PROVIDER)
                and (group_id is None or (n.task is not None and n.task.group.id == group_id))
                and query.in_range("registeredTime", n.registered)
            )
            return query.page(found, Node.to_wire)

    def get_compute_requirement(self, requirement_id: str) -> dict[str, Any]:
        with self._cond:
            return self._compute_requirement(requirement_id).to_wire()

    def _compute_requirement(self, requirement_id: str) -> ComputeRequirement:
        return by_id(self._compute, requirement_id, "Compute requirement")

    def get_compute_requirement_by_name(self, namespace: str, name: str) -> dict[str, Any]:
        with self._cond:
            requirements = self._compute.values()
            return newest_by_name(requirements, namespace, name, "Compute requirement").to_wire()

    def search_compute_requirements(self, params: dict[str, list[str]]) -> dict[str, Any]:
        query = Query(params)
        summaries = query.flag("summaries")
        with self._cond:
            found = (
                c
                for c in self._compute.values()
                if in_namespaces(query, c.namespace)
                and contains(query, "name", c.name)
                and contains(query, "tag", c.tag)
                and matches(query, "statuses", c.status)
                and healthy(query, True)
                and query.in_range("createdTime", c.created)
            )
            render = ComputeRequirement.summary if summaries else ComputeRequirement.to_wire
            return query.page(found, render)

    def search_instances(self, params: dict[str, list[str]]) -> dict[str, Any]:
        query = Query(params)
        with self._cond:
            requirement_id = query.one("computeRequirementId")
            nodes: Iterable[Node] = self._nodes.values()
            if requirement_id is not None:
                requirement = self._compute.get(requirement_id)
                nodes = requirement.pool.nodes if requirement and requirement.pool else []
            found = (
                n
                for n in nodes
                if matches(query, "computeSourceId", n.pool.requirement.source_id)
                and matches(query, "statuses", n.instance_status)
                and matches(query, "providers", PROVIDER)
                and matches(query, "regions", REGION)
                and matches(query, "imageIds", IMAGE)
                and matches(query, "publicIpAddress", n.public_ip)
                and matches(query, "privateIpAddress", n.private_ip)
                and matches(query, "hostname", n.hostname)
            )
            return query.page(found, Node.instance_to_wire)
