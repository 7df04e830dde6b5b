"""`Session`: one cluster in this process, shared by a flow and its subflows: started once (in
the background or at the first submission), and ended once. Its parts each do one thing:
`provisioning.py` builds, `attach.py` reaches the head, `tracking.py` follows task runs,
`finishing.py` settles and publishes."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from prefect.context import FlowRunContext
from prefect.utilities.importtools import lazy_import

from prefect_raydog.runner import finishing
from prefect_raydog.runner.attach import attach_to_address, attach_to_head, refuse_second_connection
from prefect_raydog.runner.connection import check_node_versions
from prefect_raydog.runner.heldlog import HeldRunLog
from prefect_raydog.runner.provisioning import Provisioning
from prefect_raydog.runner.relay import relay_api
from prefect_raydog.runner.settings import SessionSettings
from prefect_raydog.runner.shipping import api_url_for_nodes
from prefect_raydog.runner.tracking import TaskRuns
from prefect_raydog.runner.warmup import warm_workers

if TYPE_CHECKING:
    import ray
    from prefect.tasks import Task

ray = lazy_import("ray")


class Session:
    """One connection to one cluster in this process, shared by a flow and its subflows."""

    def __init__(self, settings: SessionSettings) -> None:
        self.key = settings.key
        self.users = 0
        self.runs = TaskRuns()
        self.node_api_url = settings.node_api_url
        self.provisioning: Provisioning | None = None
        self._named = settings.address or settings.cluster or "local"
        self._stack = ExitStack()
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._ready = False
        self._failure: BaseException | None = None
        self._failure_raised = False
        self._starter: threading.Thread | None = None
        self._held_log: HeldRunLog | None = None

    @property
    def cluster_name(self) -> str:
        return self.provisioning.name if self.provisioning is not None else self._named

    def holds_connection(self) -> bool:
        """Whether this session has, or is on its way to, the process's one Ray connection."""
        return self._ready or self._starter is not None

    def start_in_background(self, settings: SessionSettings, engine: Any = None) -> None:
        """Provision and connect now, in the background: the first submission waits only for
        what is left, and a failure is raised there. With the flow `engine` entering the runner,
        the cluster is named for its flow run and logs to the run's log as it starts."""
        if self._ready or self._failure is not None or self._starter is not None:
            return

        def start() -> None:
            try:
                self.ensure_ready(settings, background=True)
            except BaseException as exc:
                logging.getLogger(__name__).warning("The Ray cluster could not start: %s", exc)

        self._held_log = HeldRunLog(settings.logger)
        if engine is not None:
            from prefect.logging.loggers import flow_run_logger

            self.runs.flow_run_id = engine.flow_run.id
            self._held_log.attach(flow_run_logger(engine.flow_run, engine.flow))
        context = contextvars.copy_context()
        self._starter = threading.Thread(target=context.run, args=(start,), daemon=True,
                                         name="raydog-provision")
        self._starter.start()

    def ensure_ready(self, settings: SessionSettings, background: bool = False) -> None:
        """Start once; the first submission after a failed start gets its error, later ones say
        that the cluster could not start."""
        with self._lock:
            if self._ready:
                if not ray.is_initialized():  # Ray would start a cluster of its own here
                    raise RuntimeError(
                        f"The Ray connection to cluster {self.cluster_name} was closed while "
                        "the flow run used it (ray.shutdown() in this process?)."
                    )
                return
            if self._failure is not None:
                if not self._failure_raised:
                    self._failure_raised = True
                    raise self._failure
                raise RuntimeError(f"The Ray cluster could not start: {self._failure}")
            flow_ctx = FlowRunContext.get()
            if self.runs.flow_run_id is None and flow_ctx and flow_ctx.flow_run:
                self.runs.flow_run_id = flow_ctx.flow_run.id
            try:
                self._start(settings)
            except BaseException as exc:
                self._failure, self._failure_raised = exc, not background
                self._stack.close()
                raise
            self._ready = True

    def _start(self, settings: SessionSettings) -> None:
        logger = self._held_log or run_logger(settings.logger)
        if settings.address:
            if settings.api_relay_address and not self.node_api_url:
                self.node_api_url = relay_api(settings.api_relay_address, logger)
            attach_to_address(settings.address, settings.init_kwargs, self._stack, logger,
                              self._closing, api_url_for_nodes(self.node_api_url))
        else:
            refuse_second_connection()
            self._provision_and_attach(settings, logger)
        self.runs.open_reports(self._stack)

    def _provision_and_attach(self, settings: SessionSettings, logger: Any) -> None:
        provisioning = self.provisioning = Provisioning(
            settings, self._stack, self.runs.stats, self._closing, self.node_api_url
        )
        config = provisioning.build(self.runs.flow_run_id, logger)
        self.node_api_url = provisioning.node_api_url
        tunnels = attach_to_head(provisioning.cluster, config, settings.init_kwargs,
                                 self._stack, logger, self._closing)
        provisioning.open_api_door(tunnels)
        provisioning.wait_for_workers(logger)
        provisioning.wait_for_api_door(logger)
        self.node_api_url = provisioning.node_api_url
        # Every node at once, the head's too: the probe's worker process on the head then
        # starts while the warm-up imports Prefect on the workers.
        check_node_versions(meanwhile=warm_workers, api_url=api_url_for_nodes(self.node_api_url))
        self.runs.adaptive = provisioning.adapt(logger)

    def track(self, ref: Any, task: Task, task_run_id: uuid.UUID,
              settle: Callable[[Any], None]) -> None:
        """Follow a task run to its end; `settle` gets its outcome (or the exception)."""
        if self.runs.flow_run_id is None:
            self._learn_flow_run()
        self.runs.track(ref, task, task_run_id, settle)

    def _learn_flow_run(self) -> None:
        """A lazy start outside a flow run's context learns its flow run at a submission."""
        flow_ctx = FlowRunContext.get()
        if not (flow_ctx and flow_ctx.flow_run):
            return
        self.runs.flow_run_id = flow_ctx.flow_run.id
        guardian = self.provisioning and self.provisioning.guardian
        if guardian is not None:
            guardian.flow_run(self.runs.flow_run_id)
        if self._held_log is not None:
            from prefect.logging.loggers import flow_run_logger

            self._held_log.attach(flow_run_logger(flow_ctx.flow_run, flow_ctx.flow))

    def settle(self) -> None:
        """Before the nodes go: let the API record what they sent (see `finishing.settle`)."""
        if self._ready:
            finishing.settle(self.runs, self.cluster_name)

    def close(self) -> None:
        """Interrupt a start still under way, publish the summary artifact, end the rest."""
        self._end_background_start()
        try:
            if self._ready and self.runs.flow_run_id is not None:
                finishing.publish_artifact(self.runs.flow_run_id, self.runs.stats,
                                           self.cluster_name)
        finally:
            self._stack.close()

    def _end_background_start(self) -> None:
        """A flow run that ends while its cluster is still starting: interrupt the build."""
        if self._starter is None or not self._starter.is_alive():
            return
        self._closing.set()
        if self.provisioning is not None:
            with contextlib.suppress(Exception):
                self.provisioning.interrupt()
        self._starter.join()


def run_logger(fallback: Any) -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger when there is one (its records reach the UI), else `fallback`."""
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except Exception:
        return fallback
