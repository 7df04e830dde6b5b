"""What ends a provisioned cluster whose flow process died without tearing it down (SIGKILL, out
of memory): a guardian process beside the flow process, and the head's driver watch.

The guardian holds what no node may hold, the YellowDog key and the Prefect API's address and
key. It learns the cluster's saved state and the flow run over a pipe; when the pipe closes with
no "done" (the flow process is gone, however it went), it ends the cluster and marks the flow
run's unfinished task runs Crashed. A machine that dies takes the guardian with it: then the
head's driver watch (`scripts/driver_watch.py`) ends the node tasks, and idle node and pool
shutdown reclaim the machines."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import IO, Any

_CRASHED_MESSAGE = "The flow run's process ended without ending its Ray cluster."
# Task run states the nodes sent just before the end may be recorded a moment later.
_SECOND_PASS_AFTER_S = 3.0


def with_driver_watch(spec: Any, grace_s: float | None, first_within_s: float) -> Any:
    """`spec` with its head ending once no driver has been connected for `grace_s` seconds
    (none within `first_within_s`); unchanged when `grace_s` is None."""
    if grace_s is None:
        return spec
    environment = {
        **spec.head.environment,
        "RAYDOG_DRIVERLESS_GRACE_S": f"{grace_s:g}",
        "RAYDOG_FIRST_DRIVER_WITHIN_S": f"{first_within_s:g}",
    }
    return spec.model_copy(
        update={"head": spec.head.model_copy(update={"environment": environment})}
    )


class Guardian:
    """The flow process's end of a guardian process."""

    def __init__(self, credentials: Any) -> None:
        from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL

        # Its own session: a signal to the flow's process group must not end it too.
        self._process = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            start_new_session=True,
            text=True,
        )
        self._send(
            {
                "yellowdog": {
                    "url": credentials.api_url,
                    "key_id": credentials.api_key_id,
                    "key_secret": credentials.api_key_secret.get_secret_value(),
                },
                "prefect": {"url": PREFECT_API_URL.value(), "key": PREFECT_API_KEY.value()},
            }
        )

    def __enter__(self) -> Guardian:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def follow(self, cluster: Any) -> Callable[[str], None]:
        """A `build(on_step=...)` callback that sends the guardian `cluster`'s saved state: the
        names of what the build will make, then, once built, their IDs."""

        def on_step(step: str) -> None:
            if step in ("provisioning the worker pools", "built"):
                self._send({"state": cluster.save_state_to_json()})

        return on_step

    def flow_run(self, flow_run_id: uuid.UUID | None) -> None:
        """Whose unfinished task runs to mark Crashed (a subflow's are found through it)."""
        if flow_run_id is not None:
            self._send({"flow_run_id": str(flow_run_id)})

    def close(self) -> None:
        """The cluster was torn down: the guardian ends without doing anything."""
        self._send({"done": True})
        stdin: IO[str] = self._process.stdin  # type: ignore[assignment]
        stdin.close()
        self._process.wait()

    def _send(self, message: dict[str, Any]) -> None:
        stdin: IO[str] = self._process.stdin  # type: ignore[assignment]
        stdin.write(json.dumps(message) + "\n")
        stdin.flush()


def _guard(lines: IO[str]) -> None:
    secrets = json.loads(lines.readline())
    state, flow_runs = None, []
    for line in lines:
        message = json.loads(line)
        if message.get("done"):
            return
        state = message.get("state", state)
        if "flow_run_id" in message:
            flow_runs.append(uuid.UUID(message["flow_run_id"]))
    print(
        "The flow process ended without tearing down its Ray cluster: the guardian ends it.",
        file=sys.stderr,
        flush=True,
    )
    if state is not None:
        _attempt("end the cluster", _end_cluster, secrets["yellowdog"], state)
    if flow_runs and secrets["prefect"]["url"]:
        _attempt("mark its task runs Crashed", _crash_task_runs, secrets["prefect"], flow_runs)


def _attempt(what: str, action: Callable[..., None], *args: Any) -> None:
    try:
        action(*args)
    except Exception as error:  # noqa: BLE001 - one failure must not stop the other action
        print(f"The guardian could not {what}: {error}", file=sys.stderr, flush=True)


def _end_cluster(yellowdog: dict[str, str], state: str) -> None:
    from prefect_raydog.cluster.saved import RayDogClusterProxy

    proxy = RayDogClusterProxy(
        key_id=yellowdog["key_id"], key_secret=yellowdog["key_secret"], url=yellowdog["url"]
    )
    proxy.load_saved_state_from_json(state)
    print(f"Ended: {proxy.shut_down()}", file=sys.stderr, flush=True)


def _crash_task_runs(prefect: dict[str, str | None], flow_runs: list[uuid.UUID]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL, temporary_settings

    api = {PREFECT_API_URL: prefect["url"], PREFECT_API_KEY: prefect["key"]}
    with temporary_settings(api), get_client(sync_client=True) as client:
        crashed = _crash_unfinished(client, _with_subflow_runs(client, flow_runs))
        time.sleep(_SECOND_PASS_AFTER_S)
        crashed += _crash_unfinished(client, _with_subflow_runs(client, flow_runs))
    print(f"Marked {crashed} unfinished task runs Crashed.", file=sys.stderr, flush=True)


def _with_subflow_runs(client: Any, flow_runs: list[uuid.UUID]) -> list[uuid.UUID]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    found, frontier = list(flow_runs), list(flow_runs)
    while frontier:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)
            )
        )
        frontier = [run.id for run in children if run.id not in found]
        found += frontier
    return found


def _crash_unfinished(client: Any, flow_runs: list[uuid.UUID]) -> int:
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    unfinished = TaskRunFilter(
        state=TaskRunFilterState(
            type=TaskRunFilterStateType(
                any_=[StateType.PENDING, StateType.RUNNING, StateType.SCHEDULED, StateType.PAUSED]
            )
        )
    )
    crashed: set[uuid.UUID] = set()
    while runs := [
        run
        for run in client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_runs)),
            task_run_filter=unfinished,
        )
        if run.id not in crashed
    ]:
        for run in runs:
            client.set_task_run_state(run.id, Crashed(message=_CRASHED_MESSAGE), force=True)
            crashed.add(run.id)
    return len(crashed)


if __name__ == "__main__":
    _guard(sys.stdin)
