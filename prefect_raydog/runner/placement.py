"""Where tasks run: `placement()`, and the Ray resource each named worker pool advertises."""

from __future__ import annotations

import contextvars
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

POOL_RESOURCE_PREFIX = "raydog-pool-"
PLACEMENT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "raydog_placement", default=None
)


def pool_resource(worker_pool: str) -> str:
    """The Ray custom resource that every node of the worker pool `worker_pool` advertises."""
    return f"{POOL_RESOURCE_PREFIX}{worker_pool}"


@contextmanager
def placement(worker_pool: str | None = None, **ray_options: Any) -> Iterator[None]:
    """Send the tasks submitted inside this block to `worker_pool` and/or with Ray options.

    Example:
        ```python
        with placement(worker_pool="gpu", num_gpus=1):
            train.submit(data)
        ```
    """
    options = dict(PLACEMENT.get() or {})
    options.update(ray_options)
    if worker_pool is not None:
        resources = dict(options.get("resources") or {})
        resources[pool_resource(worker_pool)] = 0.001
        options["resources"] = resources
    token = PLACEMENT.set(options)
    try:
        yield
    finally:
        PLACEMENT.reset(token)


def with_pool_resources(spec: Any) -> Any:
    """Let each named pool's nodes advertise the resource that `placement()` asks for."""
    pools = []
    for pool in spec.worker_pools:
        if pool.name and "RAY_RESOURCES" not in pool.environment:
            resources = json.dumps({pool_resource(pool.name): 1000})
            pool = pool.model_copy(
                update={"environment": {**pool.environment, "RAY_RESOURCES": resources}}
            )
        pools.append(pool)
    return spec.model_copy(update={"worker_pools": pools})
