"""What a cluster did during a flow run, for the artifact published at teardown."""

from __future__ import annotations

import threading
import time


class _ClusterStats:
    """What the cluster did, for the artifact published at teardown."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.head_ready_s: float | None = None
        self.workers_ready_s: float | None = None
        self.tasks_per_node: dict[str, int] = {}
        self.crashed = 0
        self.pools: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def record(self, node_ip: str) -> None:
        with self._lock:
            self.tasks_per_node[node_ip] = self.tasks_per_node.get(node_ip, 0) + 1

    def markdown(self, cluster_name: str) -> str:
        elapsed_h = (time.monotonic() - self.started) / 3600
        nodes = 1 + sum(count for _, count in self.pools)
        node_hours = f"{nodes * elapsed_h:.4f}" if self.pools else "n/a"
        rows = [
            f"## RayDog cluster `{cluster_name}`",
            "",
            "| item | value |",
            "|---|---|",
            *(f"| pool `{name}` | {count} node(s) |" for name, count in self.pools),
            f"| time to head ready | {_seconds(self.head_ready_s)} |",
            f"| time to workers ready | {_seconds(self.workers_ready_s)} |",
            f"| node-hours (head and workers) | {node_hours} |",
            f"| crashed task runs | {self.crashed} |",
            "",
            "| node | tasks |",
            "|---|---|",
            *(f"| {ip} | {n} |" for ip, n in sorted(self.tasks_per_node.items())),
        ]
        return "\n".join(rows)


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"
