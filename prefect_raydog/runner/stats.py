"""What a cluster did during a flow run, for the artifact published at teardown."""

from __future__ import annotations

import threading
import time


class ClusterStats:
    """What the cluster did, for the artifact published at teardown."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.head_ready_s: float | None = None
        self.workers_ready_s: float | None = None
        self.tasks_per_node: dict[str, int] = {}
        self.crashed = 0
        self.pools: list[tuple[str, int]] = []
        self.sizes: list[tuple[float, str, int]] = []
        self._lock = threading.Lock()

    def record(self, node_ip: str) -> None:
        with self._lock:
            self.tasks_per_node[node_ip] = self.tasks_per_node.get(node_ip, 0) + 1

    def record_size(self, pool: str, size: int) -> None:
        """An adaptive pool's size (asked of the Builder) from now on."""
        with self._lock:
            self.sizes.append((time.monotonic() - self.started, pool, size))

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
            *self._sizes_markdown(),
        ]
        return "\n".join(rows)

    def _sizes_markdown(self) -> list[str]:
        if not self.sizes:
            return []
        pools = sorted({pool for _, pool, _ in self.sizes})
        charts = [f"- `{pool}`: `{_sparkline([s for _, p, s in self.sizes if p == pool])}`"
                  for pool in pools]
        return [
            "", "### Adaptive pool sizes", "", *charts, "",
            "| time (s) | pool | nodes |", "|---|---|---|",
            *(f"| {t:.1f} | {pool} | {size} |" for t, pool, size in self.sizes),
        ]


def _sparkline(sizes: list[int]) -> str:
    """The sizes as a row of block characters, one per change, tallest at the pool's maximum."""
    bars = " ▁▂▃▄▅▆▇█"
    top = max(sizes) or 1
    return "".join(bars[round(size / top * (len(bars) - 1))] for size in sizes)


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"
