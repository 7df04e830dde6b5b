"""Quickstart: map a task over a few hundred inputs on a Ray cluster provisioned for the flow run.

With no cluster block named, RayDogTaskRunner uses the `local` preset: a local YellowDog
platform started on demand, a head node and two worker nodes, all on this machine.

    python flows/quickstart.py
"""

from __future__ import annotations

import collections
import os
import socket

# The try-out runs offline: keep Prefect's temporary server from reporting usage. On a new
# machine that server first creates its database, which can outlast Prefect's 20 s start-up wait.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

from prefect import flow, task  # noqa: E402

from prefect_raydog import RayDogTaskRunner  # noqa: E402


@task
def square(x: int) -> tuple[int, str]:
    import ray

    return x * x, ray.util.get_node_ip_address() or socket.gethostname()


@flow(task_runner=RayDogTaskRunner())
def quickstart(n: int = 300) -> dict[str, int]:
    results = square.map(range(n)).result()
    assert [value for value, _ in results] == [x * x for x in range(n)]
    tasks_per_node = collections.Counter(node for _, node in results)
    for node, count in sorted(tasks_per_node.items()):
        print(f"{count:4d} tasks ran on node {node}")
    return dict(tasks_per_node)


if __name__ == "__main__":
    quickstart()
