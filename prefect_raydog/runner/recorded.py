"""Waits, bounded, until the Prefect API has recorded the final states that the nodes sent.

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


def wait_for_final_states(packed_ids: bytes, timeout: float) -> bool:
    """Return True once the API holds a final state for every task run in `packed_ids`, or
    False after `timeout` seconds. `packed_ids` holds each run's `UUID.bytes` end to end: 16
    bytes a run, where a UUID object costs about 100. One count request per 1,000 runs still
    unconfirmed."""
    ids = [uuid.UUID(bytes=bytes(packed_ids[i:i + 16])) for i in range(0, len(packed_ids), 16)]
    pending = [ids[i:i + _IDS_PER_REQUEST] for i in range(0, len(ids), _IDS_PER_REQUEST)]
    deadline = time.monotonic() + timeout
    pause = 0.05
    with get_client(sync_client=True) as client:
        while pending:
            pending = [chunk for chunk in pending if _recorded(client, chunk) < len(chunk)]
            if not pending or time.monotonic() + pause > deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
    if pending:
        logging.getLogger(__name__).warning(
            "After %g s the Prefect API has not yet recorded the final state of %d task runs.",
            timeout, sum(map(len, pending)),
        )
    return not pending


def _recorded(client: Any, task_run_ids: list[uuid.UUID]) -> int:
    runs = TaskRunFilter(
        id=TaskRunFilterId(any_=task_run_ids), state=TaskRunFilterState(type=_FINAL)
    )
    response = client.request("POST", "/task_runs/count",
                              json={"task_runs": runs.model_dump(mode="json")})
    return response.raise_for_status().json()
