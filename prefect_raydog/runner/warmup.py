"""Warms a new Ray job's worker processes while the flow starts: one short task per worker CPU
starts a process and imports what a task run needs. Ray reuses the job's idle workers, so the
flow's first task runs skip the process start and Prefect's imports.

`warm_workers` runs on the driver; the workers run `runner/remote.py`'s `warm_process`.
"""

from __future__ import annotations

from typing import Any

from prefect.utilities.importtools import lazy_import

from prefect_raydog.runner.remote import warm_process

ray = lazy_import("ray")

def warm_workers() -> list[Any]:
    """Start one warming task per worker CPU of the connected cluster, without waiting for them;
    returns their references. Each holds one CPU, so they spread over the nodes, and a flow's
    first task on a CPU starts once the imports it needs are done."""
    cpus = int(ray.cluster_resources().get("CPU", 0))
    warm = ray.remote(num_cpus=1, max_retries=0)(warm_process)
    return [warm.remote() for _ in range(cpus)]
