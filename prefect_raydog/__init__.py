"""prefect-raydog: a Ray cluster on the YellowDog Platform for each Prefect flow run."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names and the module that defines each. Imported lazily so that the Builder and the
# local platform work without importing Prefect, while `prefect block register -m prefect_raydog`
# still finds the blocks through attribute access.
_EXPORTS: dict[str, str] = {
    "RayDogTaskRunner": "prefect_raydog.task_runners",
    "RayDogFuture": "prefect_raydog.task_runners",
    "placement": "prefect_raydog.task_runners",
    "pool_resource": "prefect_raydog.task_runners",
    "YellowDogCredentials": "prefect_raydog.blocks",
    "RayDogClusterConfig": "prefect_raydog.blocks",
    "RayDogCluster": "prefect_raydog.cluster.builder",
    "RayDogClusterProxy": "prefect_raydog.cluster.saved",
    "HeadNodeAddress": "prefect_raydog.cluster.builder",
    "ShutdownReport": "prefect_raydog.cluster.teardown",
    "SSHLogin": "prefect_raydog.cluster.token_auth",
    "sweep": "prefect_raydog.cluster.saved",
    "create_client": "prefect_raydog.cluster.client",
    "wait_for_ray_nodes": "prefect_raydog.cluster.client",
    "ClusterSpec": "prefect_raydog.spec",
    "NodeGroupSpec": "prefect_raydog.spec",
    "WorkerPoolSpec": "prefect_raydog.spec",
    "RayDogError": "prefect_raydog.errors",
    "ClusterBuildError": "prefect_raydog.errors",
    "ClusterBuildTimeout": "prefect_raydog.errors",
    "NodeTaskFailed": "prefect_raydog.errors",
    "ClusterShutdownError": "prefect_raydog.errors",
    "ClusterStateError": "prefect_raydog.errors",
    "UnknownWorkerPoolError": "prefect_raydog.errors",
    "HostKeyRefused": "prefect_raydog.errors",
    "HostKeys": "prefect_raydog.host_keys",
    "RayTunnels": "prefect_raydog.tunnels",
    "node_requirements": "prefect_raydog.local.images",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'prefect_raydog' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = ["__version__", *_EXPORTS]
