"""Adaptive worker pools: the driver grows a pool with a range while task runs wait for capacity
and shrinks it when its nodes sit idle, through the Builder, logging each decision.

Demand is what the runner knows: the task runs submitted and not yet finished, and the CPUs they
ask for; a run placed on a pool with `placement(worker_pool=...)` is demand for that pool only,
any other run is demand for every adaptive pool (as YellowDog grows every pool that can serve a
waiting task). A pool grows as soon as its demand needs more nodes. It shrinks, to its minimum,
only when none of its task runs has been in flight for `COOLDOWN_S` and its size last changed at
least `COOLDOWN_S` ago: no running task loses its node, and between a grow and the next shrink
there is always a cooldown, so a pool does not thrash.
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any

from prefect.utilities.importtools import lazy_import

from prefect_raydog.runner.placement import PLACEMENT, POOL_RESOURCE_PREFIX, pool_resource

if TYPE_CHECKING:
    import ray

    from prefect_raydog.cluster import RayDogCluster
    from prefect_raydog.runner.stats import ClusterStats
    from prefect_raydog.spec import WorkerPoolSpec

ray = lazy_import("ray")

# A pool shrinks after its nodes have had no task run for this long, and not sooner than this
# after it last grew: long enough to bridge the gaps between a flow's waves of tasks, short enough
# that idle nodes stop costing within a minute (with the cluster's idle node shutdown after).
COOLDOWN_S = 10.0
_TICK_S = 0.5


class _Pool:
    """One adaptive pool: its range, the size asked of the Builder, and when it last changed."""

    def __init__(self, internal_name: str, spec: WorkerPoolSpec) -> None:
        self.internal_name = internal_name
        self.resource = pool_resource(spec.name) if spec.name else None
        self.low = spec.floor
        self.high = spec.node_limit
        self.size = spec.start_count
        self.changed = 0.0
        self.idle_since: float | None = time.monotonic()


class AdaptivePools:
    """Scales a cluster's adaptive pools from the demand of the task runs in flight."""

    def __init__(self, cluster: RayDogCluster, stats: ClusterStats, logger: Any) -> None:
        self.cluster = cluster
        self.stats = stats
        self.logger = logger
        # The spec's pools are the cluster's first ones, in order (pools added later follow).
        names = cluster.worker_pool_internal_names
        self.pools = [
            _Pool(name, spec)
            for name, spec in zip(names, cluster.spec.worker_pools, strict=False)
            if spec.adaptive
        ]
        self._demand: dict[Any, tuple[str | None, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raydog-adaptive", daemon=True)
        for pool in self.pools:
            self.stats.record_size(pool.internal_name, pool.size)

    @classmethod
    def start(cls, cluster: RayDogCluster, stats: ClusterStats, logger: Any
              ) -> AdaptivePools | None:
        """Scale the cluster's adaptive pools in the background; None when it has none."""
        if not any(spec.adaptive for spec in cluster.spec.worker_pools):
            return None
        pools = cls(cluster, stats, logger)
        pools._thread.start()
        return pools

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def submitted(self, ref: Any) -> None:
        """Count a task run just submitted (in the submitting thread: its placement applies)."""
        options = PLACEMENT.get() or {}
        resources = options.get("resources") or {}
        pool = next((name for name in resources if name.startswith(POOL_RESOURCE_PREFIX)), None)
        cpus = float(options.get("num_cpus", 1) or 0)
        with self._lock:
            self._demand[ref] = (pool, cpus)

    def finished(self, ref: Any) -> None:
        with self._lock:
            self._demand.pop(ref, None)

    def _run(self) -> None:
        while not self._stop.wait(_TICK_S):
            try:
                self._tick()
            except Exception as exc:  # keep scaling: the next tick may succeed
                self.logger.warning("Adaptive scaling failed this round: %s", exc)

    def _tick(self) -> None:
        slots = _cpus_per_node()
        for pool in self.pools:
            with self._lock:
                cpus = sum(c for name, c in self._demand.values()
                           if name is None or name == pool.resource)
            now = time.monotonic()
            per_node = slots.get(pool.resource, slots.get(None, 1.0))
            want = min(pool.high, max(pool.low, math.ceil(cpus / per_node)))
            if cpus:
                pool.idle_since = None
            elif pool.idle_since is None:
                pool.idle_since = now
            if want > pool.size:
                self._resize(pool, want, f"{cpus:g} CPU(s) of task runs in flight")
            elif (pool.size > pool.low and pool.idle_since is not None
                  and now - pool.idle_since >= COOLDOWN_S and now - pool.changed >= COOLDOWN_S):
                self._resize(pool, pool.low, f"no task runs for {COOLDOWN_S:g} s")

    def _resize(self, pool: _Pool, size: int, reason: str) -> None:
        verb = "Growing" if size > pool.size else "Shrinking"
        self.logger.info("%s worker pool %s from %d to %d node(s): %s.", verb,
                         pool.internal_name, pool.size, size, reason)
        self.cluster.resize_worker_pool(pool.internal_name, size)
        pool.size, pool.changed = size, time.monotonic()
        self.stats.record_size(pool.internal_name, size)


def _cpus_per_node() -> dict[str | None, float]:
    """CPUs of one node of each named pool (key: its resource), and of any worker (key None)."""
    slots: dict[str | None, float] = {}
    for node in ray.nodes():
        resources = node.get("Resources", {}) if node.get("Alive") else {}
        cpus = resources.get("CPU", 0.0)
        if not cpus:
            continue
        slots[None] = max(slots.get(None, 0.0), cpus)
        for name in resources:
            if name.startswith(POOL_RESOURCE_PREFIX):
                slots[name] = cpus
    return slots
