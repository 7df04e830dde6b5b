"""The end of a session's flow run, before its cluster goes: the wait for the API to record what
the nodes sent, and the summary artifact."""

from __future__ import annotations

import logging
import time
import uuid

from prefect_raydog.runner.recorded import wait_for_final_states
from prefect_raydog.runner.stats import ClusterStats
from prefect_raydog.runner.tracking import TaskRuns

# The final wait for the API's records ends after this long with no new one recorded.
SETTLE_STALL_S = 30.0


def settle(runs: TaskRuns, cluster_name: str) -> None:
    """Let the API record every final state the nodes sent, for as long as it keeps recording
    more (a shortfall goes to the flow run's log), and give node processes time to send their
    last batch of logs (flushing the log batch after every task would wait out the batch
    interval each time)."""
    from prefect.settings import PREFECT_LOGGING_TO_API_BATCH_INTERVAL

    wait_for_final_states(runs.finished_on_nodes, SETTLE_STALL_S, runs.flow_run_id, cluster_name)
    interval = min(PREFECT_LOGGING_TO_API_BATCH_INTERVAL.value(), 5.0) + 0.5
    time.sleep(max(0.0, runs.last_done + interval - time.monotonic()))


def publish_artifact(flow_run_id: uuid.UUID, stats: ClusterStats, cluster_name: str) -> None:
    """The flow run's `raydog-cluster` artifact: what the cluster did (a failure is logged)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import ArtifactCreate

    try:
        with get_client(sync_client=True) as client:
            client.create_artifact(ArtifactCreate(
                type="markdown", key="raydog-cluster", flow_run_id=flow_run_id,
                description="The Ray cluster this flow run used.",
                data=stats.markdown(cluster_name),
            ))
    except Exception:
        logging.getLogger(__name__).warning("Could not publish the cluster artifact",
                                            exc_info=True)
