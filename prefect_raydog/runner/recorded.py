"""Waits until the Prefect API has recorded the final states that the nodes sent, for as long as
it keeps recording more of them.

Nodes report task run states as events, which the server records asynchronously: a flow run
that ends (and a temporary server that stops) before then loses them, with errors in its log."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    TaskRunFilter,
    TaskRunFilterId,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType

_FINAL = TaskRunFilterStateType(
    any_=[StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED]
)
_IDS_PER_REQUEST = 1000


def wait_for_final_states(packed_ids: bytes, stall_s: float,
                          flow_run_id: uuid.UUID | None = None, cluster: str = "") -> int:
    """Wait until the API holds a final state for every task run in `packed_ids`, and return
    how many it still lacks: 0 once it has them all, else the count when `stall_s` seconds
    passed without the API recording one more, which goes to the flow run's log as well.

    `packed_ids` holds each run's `UUID.bytes` end to end: 16 bytes a run, where a UUID object
    costs about 100. One count request per 1,000 runs still unconfirmed."""
    ids = [uuid.UUID(bytes=bytes(packed_ids[i:i + 16])) for i in range(0, len(packed_ids), 16)]
    missing = {
        tuple(ids[i:i + _IDS_PER_REQUEST]): min(_IDS_PER_REQUEST, len(ids) - i)
        for i in range(0, len(ids), _IDS_PER_REQUEST)
    }
    left, deadline, pause = len(ids), time.monotonic() + stall_s, 0.05
    with get_client(sync_client=True) as client:
        while left:
            for chunk in list(missing):
                missing[chunk] = len(chunk) - _recorded(client, list(chunk))
                if not missing[chunk]:
                    del missing[chunk]
            now_left = sum(missing.values())
            if now_left < left:
                left, deadline = now_left, time.monotonic() + stall_s
            if not left or time.monotonic() + pause > deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
    if left:
        _log_shortfall(left, len(ids), stall_s, flow_run_id, cluster)
    return left


def _log_shortfall(missing: int, total: int, stall_s: float, flow_run_id: uuid.UUID | None,
                   cluster: str) -> None:
    from prefect.logging.loggers import flow_run_logger

    logger: Any = logging.getLogger(__name__)
    if flow_run_id is not None:
        # The flow run's context is gone by the time its task runner exits.
        logger = flow_run_logger(flow_run_id=flow_run_id)
    logger.warning(
        "The Prefect API has not recorded the final state of %d of the %d task runs that "
        "finished on cluster %s: it recorded none of them in the last %g s, so they may stay "
        "Running in the UI.", missing, total, cluster, stall_s,
    )


def _recorded(client: Any, task_run_ids: list[uuid.UUID]) -> int:
    runs = TaskRunFilter(
        id=TaskRunFilterId(any_=task_run_ids), state=TaskRunFilterState(type=_FINAL)
    )
    response = client.request("POST", "/task_runs/count",
                              json={"task_runs": runs.model_dump(mode="json")})
    return response.raise_for_status().json()
