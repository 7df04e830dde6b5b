"""Warms a new Ray job's worker processes while the flow starts: one short task per worker CPU
starts a process and imports what a task run needs. Ray reuses the job's idle workers, so the
flow's first task runs skip the process start and Prefect's imports.

Runs on both sides: `warm_workers` on the driver, `warm_this_process` in Ray workers (it imports
only the node side), through `runner/remote.py`'s `warm_process`.
"""

from __future__ import annotations

import time
from typing import Any

from prefect.utilities.importtools import lazy_import

from prefect_raydog.runner.remote import warm_process

ray = lazy_import("ray")

# When this worker process was warmed (epoch seconds), or None: what a task run can observe.
warmed_at: float | None = None


def warm_workers() -> list[Any]:
    """Start one warming task per worker CPU of the connected cluster, without waiting for them;
    returns their references. Each holds one CPU, so they spread over the nodes, and a flow's
    first task on a CPU starts once the imports it needs are done."""
    cpus = int(ray.cluster_resources().get("CPU", 0))
    warm = ray.remote(num_cpus=1, max_retries=0)(warm_process)
    return [warm.remote() for _ in range(cpus)]


def warm_this_process() -> None:
    """Import and set up, in this worker process, what `node.run_call` does on first use."""
    global warmed_at
    import prefect.client.orchestration  # noqa: F401
    import prefect.task_engine  # noqa: F401
    from prefect.logging.configuration import ensure_logging_setup

    from prefect_raydog.runner import node

    node.Hydrated.rebuild_models()
    ensure_logging_setup()
    node.quiet_node_console()
    warmed_at = time.time()
