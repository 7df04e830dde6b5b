"""The node side of the runner: what runs inside Ray worker processes for each task run.

Imports nothing from the driver side, so a node needs only Prefect, Ray, this module,
`runner/remote.py` (the functions the driver sends) and `runner/versions.py` (with which a node
checks that it runs the driver's versions).
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

from prefect.context import (
    AssetContext,
    FlowRunContext,
    SettingsContext,
    SyncClientContext,
    TaskRunContext,
    _deployment_id,
    _deployment_parameters,
)
from prefect.utilities.collections import visit_collection
from prefect.utilities.importtools import lazy_import

from prefect_raydog.runner.outcome import Outcome
from prefect_raydog.runner.versions import check_this_node, check_this_nodes_api

ray = lazy_import("ray")

_HYDRATED: OrderedDict[str, Hydrated] = OrderedDict()
_FETCHED: OrderedDict[str, Any] = OrderedDict()
_NODE_CACHE_SIZE = 4
_node_ip: str | None = None
# When this worker process was warmed (epoch seconds), or None: what a task run can observe.
warmed_at: float | None = None


class Hydrated:
    """A flow run's context rebuilt once per worker process and bound around each task."""

    _models_rebuilt = False

    def __init__(self, context: dict[str, Any]) -> None:
        from prefect.logging.configuration import ensure_logging_setup

        where = f"node {ray.util.get_node_ip_address()}"
        check_this_node(context.get("driver_versions"), where)
        self.rebuild_models()
        ensure_logging_setup()
        quiet_node_console()
        self._stack = ExitStack()
        settings = context.get("settings_context")
        self.settings = SettingsContext(**settings) if settings else None
        if self.settings is not None and "api_reached_by" in context:
            checked = ray.get_runtime_context().get_node_id() in context["api_reached_by"]
            check_this_nodes_api(self.settings.settings.api.url, checked, where)
        with self._bound(self.settings):
            client_ctx = SyncClientContext()
        self._stack.enter_context(client_ctx.client)
        self.client_ctx = client_ctx
        self.flow_run = None
        if flow_run := context.get("flow_run_context"):
            task_runner = self._stack.enter_context(flow_run["flow"].task_runner.duplicate())
            self.flow_run = FlowRunContext(
                **flow_run, client=client_ctx.client, task_runner=task_runner, detached=True
            )
        self.task_run = None
        if task_run := context.get("task_run_context"):
            self.task_run = TaskRunContext(**task_run, client=client_ctx.client)
        self.tags = (context.get("tags_context") or {}).get("current_tags")
        self.deployment_id = context.get("deployment_id")
        self.deployment_parameters = context.get("deployment_parameters")

    @classmethod
    def rebuild_models(cls) -> None:
        if cls._models_rebuilt:
            return
        from prefect._internal.result_records import ResultRecordMetadata
        from prefect.flows import Flow
        from prefect.tasks import Task

        types = {"Flow": Flow, "Task": Task, "ResultRecordMetadata": ResultRecordMetadata}
        FlowRunContext.model_rebuild(_types_namespace=types)
        TaskRunContext.model_rebuild(_types_namespace=types)
        cls._models_rebuilt = True

    @staticmethod
    @contextmanager
    def _bound(model: Any) -> Iterator[None]:
        if model is None:
            yield
            return
        token = model.__var__.set(model)
        try:
            yield
        finally:
            model.__var__.reset(token)

    @contextmanager
    def bound(self) -> Iterator[None]:
        """Bind this context for one task; per-task bookkeeping starts empty each time."""
        from uuid import UUID

        from prefect.context import tags

        flow_run = self.flow_run
        if flow_run is not None:
            flow_run = flow_run.model_copy(update={
                "run_results": {}, "task_run_dynamic_keys": {}, "task_run_assets": {},
                "observed_flow_pauses": {},
            })
        with ExitStack() as stack:
            for model in (self.settings, self.client_ctx, flow_run, self.task_run):
                stack.enter_context(self._bound(model))
            stack.enter_context(tags(*self.tags) if self.tags else nullcontext())
            if self.deployment_id:
                token = _deployment_id.set(UUID(self.deployment_id))
                stack.callback(_deployment_id.reset, token)
            if self.deployment_parameters:
                token = _deployment_parameters.set(self.deployment_parameters)
                stack.callback(_deployment_parameters.reset, token)
            yield

    def close(self) -> None:
        self._stack.close()


def warm_this_process() -> None:
    """Import and set up, in this worker process, what `run_call` does on first use."""
    global warmed_at
    import prefect.client.orchestration  # noqa: F401
    import prefect.task_engine  # noqa: F401
    from prefect.logging.configuration import ensure_logging_setup

    Hydrated.rebuild_models()
    ensure_logging_setup()
    quiet_node_console()
    warmed_at = time.time()


def quiet_node_console() -> None:
    """A node's console only feeds Ray's log files; the API gets every record. Printing each
    "Finished in state" line there cost about a third of a trivial task's time on a node."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if isinstance(handler, PrefectConsoleHandler):
                handler.setLevel(logging.WARNING)


def _cached(cache: OrderedDict[str, Any], ref: Any, build: Callable[[Any], Any]) -> Any:
    key = ref.hex()
    value = cache.get(key)
    if value is None:
        value = cache[key] = build(ray.get(ref))
        if len(cache) > _NODE_CACHE_SIZE:
            _, evicted = cache.popitem(last=False)
            if isinstance(evicted, Hydrated):
                evicted.close()
    else:
        cache.move_to_end(key)
    return value


def _resolve_upstream(expr: Any) -> Any:
    if isinstance(expr, ray.ObjectRef):
        value = ray.get(expr)
        return value.state if isinstance(value, Outcome) else value
    return expr


def run_call(call: dict[str, Any], context_ref: Any, task_ref: Any) -> tuple[str, bytes]:
    """Run one Prefect task run in this Ray worker process; return the node's address and the
    run's final state, pickled. `call`: the task run's id, parameters, wait_for, dependencies
    and asset context."""
    from prefect.task_engine import run_task_async, run_task_sync

    global _node_ip
    if _node_ip is None:
        _node_ip = ray.util.get_node_ip_address()
    hydrated = _cached(_HYDRATED, context_ref, lambda data: Hydrated(pickle.loads(data)))
    task = _cached(_FETCHED, task_ref, pickle.loads)
    parameters = visit_collection(call.pop("parameters"), visit_fn=_resolve_upstream,
                                  return_data=True)
    asset_context = call.pop("asset_context")
    kwargs = dict(task=task, parameters=parameters, return_type="state", **call)
    with hydrated.bound(), AssetContext(**asset_context):
        state = asyncio.run(run_task_async(**kwargs)) if task.isasync else run_task_sync(**kwargs)
        _flush_events()
    return _node_ip, ray.cloudpickle.dumps(state)


def _flush_events() -> None:
    """Send this task's state events before returning, as ProcessPoolTaskRunner does."""
    from prefect.events.worker import EventsWorker

    with EventsWorker._instance_lock:
        has_worker = bool(EventsWorker._instances)
    if has_worker:
        EventsWorker.instance().wait_until_empty()
