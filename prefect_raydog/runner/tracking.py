"""`TaskRuns`: a session's task runs on its cluster, followed until their outcomes arrive,
counted for the summary, and reported Crashed or Cancelled when their engines cannot say so."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from prefect.states import exception_to_crashed_state
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.utilities.importtools import lazy_import

from prefect_raydog.runner.ending import being_cancelled, record_final_state
from prefect_raydog.runner.outcome import Outcome
from prefect_raydog.runner.remote import remote_for
from prefect_raydog.runner.stats import ClusterStats

if TYPE_CHECKING:
    import ray
    from prefect.tasks import Task

    from prefect_raydog.runner.adaptive import AdaptivePools

ray = lazy_import("ray")


class TaskRuns:
    """The task runs of one session, from submission to outcome."""

    def __init__(self) -> None:
        self.stats = ClusterStats()
        self.flow_run_id: uuid.UUID | None = None
        self.adaptive: AdaptivePools | None = None
        self.in_flight: dict[Any, tuple[Task, uuid.UUID]] = {}
        self.finished_on_nodes = bytearray()  # task run ids, packed: see recorded.py
        self.last_done = 0.0
        self._cancelled: set[Any] = set()
        self._remote_by_options: dict[str, Any] = {}
        self._reporter: ThreadPoolExecutor | None = None

    def open_reports(self, stack: ExitStack) -> None:
        """Report crashes from now until `stack` closes (after that, a run that ends was
        cancelled by the teardown)."""
        self._reporter = stack.enter_context(ThreadPoolExecutor(1, "raydog-crash-report"))

    def remote_function(self, options: dict[str, Any]) -> Any:
        """`run_task_run` with a task's Ray options, one per options for this connection."""
        return remote_for(options, self._remote_by_options)

    def track(self, ref: Any, task: Task, task_run_id: uuid.UUID,
              settle: Callable[[Any], None]) -> None:
        """Follow a task run to its end; `settle` gets its outcome (or the exception)."""
        self.in_flight[ref] = (task, task_run_id)
        if self.adaptive is not None:
            self.adaptive.submitted(ref)

        def on_completed(outcome: Any) -> None:
            self.in_flight.pop(ref, None)
            if self.adaptive is not None:
                self.adaptive.finished(ref)
            self.last_done = time.monotonic()
            if isinstance(outcome, Outcome):
                self.stats.record(outcome.node_ip)
                self.finished_on_nodes.extend(task_run_id.bytes)
            elif (isinstance(outcome, Exception) and self._reporter is not None
                  and ref not in self._cancelled):
                self.stats.crashed += 1
                # After teardown the reporter is shut: these are the runs teardown cancelled.
                with contextlib.suppress(RuntimeError):
                    self._reporter.submit(self._report_crash, task, task_run_id, outcome)
            settle(outcome)

        ref._on_completed(on_completed)

    def _report_crash(self, task: Task, task_run_id: uuid.UUID, exc: Exception) -> None:
        """Tell the API that the task run crashed: its own engine died with its worker."""
        state = run_coro_as_sync(exception_to_crashed_state(exc))
        record_final_state(task, task_run_id, self.flow_run_id, state)

    def cancel_all(self, crashed: bool = False) -> None:
        """End every task run in flight: its worker is killed, so its state is set here,
        Cancelled (or Crashed, when its flow run's process is stopped without a cancellation)."""
        from prefect.states import Cancelled, Crashed

        cancelled = list(self.in_flight.items())
        self._cancelled.update(ref for ref, _ in cancelled)
        for ref, _ in cancelled:
            try:
                ray.cancel(ref, force=True)
            except Exception:
                logging.getLogger(__name__).debug("Could not cancel %s", ref, exc_info=True)
        for _, (task, task_run_id) in cancelled:
            state = (Crashed(message="Its flow run's process was stopped.") if crashed
                     else Cancelled(message="Its flow run was cancelled."))
            record_final_state(task, task_run_id, self.flow_run_id, state)

    def terminated(self) -> None:
        """The flow run's process is told to stop (SIGTERM) with task runs in flight: they end
        Cancelled if the flow run is being cancelled, else Crashed. Prefect's engine asks the
        runner to cancel them only after the runner has exited, when it has no session."""
        if self.in_flight and self.flow_run_id is not None:
            self.cancel_all(crashed=not being_cancelled(self.flow_run_id))
