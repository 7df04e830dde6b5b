"""YellowDog's node actions service: actions added to a worker pool's nodes run in order on
each node, as commands inside a process node (simulated nodes complete them at once)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import partial
from typing import Any

from prefect_raydog.local.nodes import TaskLaunch
from prefect_raydog.local.state.actions import applies_to, parse_request
from prefect_raydog.local.state.compute import Node
from prefect_raydog.local.state.errors import InvalidRequest, NotFound
from prefect_raydog.local.state.simulation import Simulation

RUN_COMMAND = 'cd "$HOME" && exec "$0" "$@"'
"""A `RUN_COMMAND` inside the node: its `path` and arguments, run from the agent's home."""
WRITE_FILE = (
    'src="$PWD/taskdata.txt" && cd "$HOME" && mkdir -p -- "$(dirname -- "$0")" && cp -- "$src" "$0"'
)
"""A `WRITE_FILE` inside the node: the content (passed as task data) copied to `path`, which
is relative to the agent's home."""


class NodeActionService(Simulation):
    """Add node actions to a pool's nodes, run them, and show each node's queue."""

    _action_runs = itertools.count(1)

    def add_node_actions(self, pool_id: str, document: dict[str, Any]) -> None:
        groups, node_ids = parse_request(document)
        with self._cond:
            pool = self._pools.get(pool_id)
            if pool is None or not pool.visible:
                raise NotFound(f"Worker pool '{pool_id}' not found")
            if pool.shut_down:
                raise InvalidRequest(f"Worker pool '{pool_id}' is {pool.status}")
            strangers = set(node_ids or ()) - {node.id for node in pool.nodes}
            if strangers:
                raise InvalidRequest(
                    f"Node actions: node(s) {sorted(strangers)} are not in worker pool '{pool_id}'"
                )
            for node in pool.nodes:
                if node.status != "RUNNING" or node.stopping:
                    continue
                for group in groups:
                    node.actions.waiting.extend(
                        action for action in group if applies_to(action, node.id, node_ids)
                    )
                self._next_action(node)
            self._changed()

    def get_node_actions(self, node_id: str) -> dict[str, Any]:
        with self._cond:
            node = self._nodes.get(node_id)
            if node is None or node.status is None or not node.pool.visible:
                raise NotFound(f"Node '{node_id}' not found")
            return node.actions.to_wire()

    def _next_action(self, node: Node) -> None:
        """Start the node's next waiting action, if none is running; simulated nodes complete
        `RUN_COMMAND` and `WRITE_FILE` at once. A node has one worker: `CREATE_WORKERS` fails."""
        while (action := node.actions.next()) is not None:
            if action["action"] == "CREATE_WORKERS":
                node.actions.finish(succeeded=False)
            elif node.simulated:
                node.actions.finish(succeeded=True)
            else:
                launch = _launch(action, f"{node.id}:action:{next(self._action_runs)}")
                runner = self.runner
                assert runner is not None
                ended = self._action_ended(node, action)
                self._later(partial(runner.run_task, node.id, launch, ended))
                return

    def _action_ended(self, node: Node, action: dict[str, Any]) -> Callable[[int], None]:
        def ended(code: int) -> None:
            with self._cond:
                if node.actions.executing is action:
                    node.actions.finish(succeeded=code == 0)
                    self._next_action(node)
                    self._changed()

        return ended


def _launch(action: dict[str, Any], run_id: str) -> TaskLaunch:
    if action["action"] == "WRITE_FILE":
        return TaskLaunch(
            task_id=run_id,
            task_type="bash",
            arguments=["-c", WRITE_FILE, action["path"]],
            task_data=action.get("content") or "",
        )
    return TaskLaunch(
        task_id=run_id,
        task_type="bash",
        arguments=["-c", RUN_COMMAND, action["path"], *map(str, action.get("arguments") or [])],
        task_data=None,
        environment={str(k): str(v) for k, v in (action.get("environment") or {}).items()},
    )
