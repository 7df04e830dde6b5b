"""YellowDog's node actions (`RUN_COMMAND`, `WRITE_FILE`, `CREATE_WORKERS`) and each node's
queue of them, with its wire form (`NodeActionQueueSnapshot`)."""

from __future__ import annotations

from collections import deque
from typing import Any

from prefect_raydog.local.state.errors import InvalidRequest
from prefect_raydog.local.wire import iso_time, now

KINDS = ("RUN_COMMAND", "WRITE_FILE", "CREATE_WORKERS")


class ActionQueue:
    """The actions a node has still to run, in order; the first failure stops the queue."""

    def __init__(self) -> None:
        self.waiting: deque[dict[str, Any]] = deque()
        self.executing: dict[str, Any] | None = None
        self.failed: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        if self.failed is not None:
            return "FAILED"
        if self.executing is not None:
            return "EXECUTING"
        return "WAITING" if self.waiting else "EMPTY"

    def next(self) -> dict[str, Any] | None:
        """Take the next waiting action as executing, unless one is executing or failed."""
        if self.executing is not None or self.failed is not None or not self.waiting:
            return None
        self.executing = self.waiting.popleft()
        return self.executing

    def finish(self, succeeded: bool) -> None:
        if not succeeded:
            self.failed = self.executing
        self.executing = None

    def clear(self) -> None:
        """The node stopped: its agent forgets what it had still to do."""
        self.waiting.clear()
        self.executing = self.failed = None

    def to_wire(self) -> dict[str, Any]:
        return {
            "timestamp": iso_time(now()),
            "status": self.status,
            "waiting": list(self.waiting),
            "executing": [self.executing] if self.executing is not None else [],
            "failed": self.failed,
        }


def parse_request(document: dict[str, Any]) -> tuple[list[list[dict[str, Any]]], list[str] | None]:
    """The action groups of an `AddNodeActionsRequest` and its node id list, checked."""
    groups = document.get("actionGroups")
    if not isinstance(groups, list) or not groups:
        raise InvalidRequest("Node actions: field 'actionGroups' must be a non-empty list")
    node_ids = document.get("nodeIdFilterList")
    if node_ids is not None and not (
        isinstance(node_ids, list) and all(isinstance(i, str) for i in node_ids)
    ):
        raise InvalidRequest("Node actions: field 'nodeIdFilterList' must be a list of node ids")
    parsed = []
    for index, group in enumerate(groups):
        actions = group.get("actions") if isinstance(group, dict) else None
        if not isinstance(actions, list) or not actions:
            raise InvalidRequest(f"Node actions: actionGroups[{index}].actions must be a list")
        parsed.append([_check(action, f"actionGroups[{index}]", node_ids) for action in actions])
    return parsed, node_ids


def _check(action: Any, where: str, node_ids: list[str] | None) -> dict[str, Any]:
    if not isinstance(action, dict) or action.get("action") not in KINDS:
        raise InvalidRequest(f"Node actions: {where}: field 'action' must be one of {KINDS}")
    kind = action["action"]
    if kind in ("RUN_COMMAND", "WRITE_FILE") and not isinstance(action.get("path"), str):
        raise InvalidRequest(f"Node actions: {where}: a {kind} action needs a 'path'")
    if node_ids is not None and action.get("nodeIdFilter") != "LIST":
        raise InvalidRequest(
            f"Node actions: {where}: with 'nodeIdFilterList' every action's "
            "'nodeIdFilter' must be LIST"
        )
    return action


def applies_to(action: dict[str, Any], node_id: str, node_ids: list[str] | None) -> bool:
    """Whether the action is for this node: local nodes have no node type, so an action
    limited to `nodeTypes` is for none of them."""
    if action.get("nodeTypes"):
        return False
    return node_ids is None or node_id in node_ids
