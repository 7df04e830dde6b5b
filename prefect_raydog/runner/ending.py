"""Final states that the driver records for task runs whose engines died with their Ray workers
(a lost node, a cancelled or stopped flow run)."""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

if TYPE_CHECKING:
    from prefect.states import State
    from prefect.tasks import Task

logger = logging.getLogger(__name__)


def record_final_state(
    task: Task, task_run_id: uuid.UUID, flow_run_id: uuid.UUID | None, state: State
) -> None:
    """Set a task run's final state for its engine, which is gone; a failure is logged."""
    try:
        with get_client(sync_client=True) as client:
            try:
                client.set_task_run_state(task_run_id, state, force=True)
            except (ObjectNotFound, PrefectHTTPStatusError) as error:
                # The server may not have ingested the dead node's events yet: the sync client
                # reports that as a bare 404.
                if getattr(getattr(error, "response", None), "status_code", 404) != 404:
                    raise
                client.create_task_run(
                    task,
                    flow_run_id=flow_run_id,
                    dynamic_key=str(task_run_id),
                    id=task_run_id,
                    state=state,
                )
    except Exception:
        logger.warning(
            "Could not report the %s state of task run %s", state.name, task_run_id, exc_info=True
        )


def being_cancelled(flow_run_id: uuid.UUID) -> bool:
    """Whether the flow run is being (or was) cancelled; False when the API cannot say."""
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
    except Exception:
        logger.warning("Could not read the state of flow run %s", flow_run_id, exc_info=True)
        return False
    return state is not None and (state.is_cancelling() or state.is_cancelled())
