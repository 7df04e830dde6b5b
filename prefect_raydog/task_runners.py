"""`RayDogTaskRunner`: runs a Prefect flow's tasks on a Ray cluster that exists for the flow run.

Switching a flow from the thread pool to a cluster provisioned on YellowDog is one argument:

```python
from prefect import flow, task
from prefect_raydog import RayDogTaskRunner

@task
def simulate(seed: int) -> float: ...

@flow(task_runner=RayDogTaskRunner(cluster="gpu-cluster"))  # a saved RayDogClusterConfig block
def sweep(n: int = 1000):
    return sum(simulate.map(range(n)).result())
```

With no `cluster`, the runner uses the `local` preset: a local platform started on demand.
With `address`, it attaches to a running Ray cluster and provisions nothing.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from prefect.context import (
    AssetContext,
    EngineContext,
    FlowRunContext,
    SettingsContext,
    TagsContext,
    TaskRunContext,
    _deployment_id,
    _deployment_parameters,
    serialize_context,
)
from prefect.futures import PrefectFuture
from prefect.states import exception_to_crashed_state
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.utilities.engine import collect_task_run_inputs_sync
from prefect.utilities.importtools import lazy_import
from prefect_ray.context import RemoteOptionsContext
from prefect_ray.task_runners import PrefectRayFuture, RayTaskRunner
from typing_extensions import Self

from prefect_raydog.runner import versions
from prefect_raydog.runner.connection import nodes_reaching
from prefect_raydog.runner.outcome import Outcome
from prefect_raydog.runner.packing import Kept, keep, unpack
from prefect_raydog.runner.parking import live_session, release_session, take_session
from prefect_raydog.runner.placement import PLACEMENT, placement, pool_resource
from prefect_raydog.runner.remote import dumps_with_refs, inside_ray_worker, remote_for
from prefect_raydog.runner.session import run_logger
from prefect_raydog.runner.settings import SessionSettings, cluster_reference, unsaved_config
from prefect_raydog.runner.shipping import register_code_by_value, rewrite_api_url

if TYPE_CHECKING:
    import ray
    from prefect.states import State
    from prefect.tasks import Task

    from prefect_raydog.blocks import RayDogClusterConfig
    from prefect_raydog.runner.session import Session

ray = lazy_import("ray")

__all__ = ["RayDogFuture", "RayDogTaskRunner", "placement", "pool_resource"]

_WAIT_SLICE_S = 1.0
# Ray Client drops a completion callback whose outcome it cannot unpickle (it logs "Callback
# error"): a future whose outcome Ray has held this long undelivered fetches it itself.
_UNDELIVERED_CHECK_S = 5.0
_SETTLE_LOCK = threading.Lock()


class RayDogFuture(PrefectRayFuture):
    """A task run on the cluster; a lost worker or node resolves to a Crashed state.

    The final state is kept packed (`runner.packing`) and unpacked each time it is read.
    """

    def __init__(self, task_run_id: uuid.UUID, wrapped_future: Any) -> None:
        self._kept: Kept | None = None
        super().__init__(task_run_id, wrapped_future)
        # None: Ray is asked for the outcome (no session); a list: the session will deliver it
        # to `_settle` (these callbacks wait for it); (): it was delivered.
        self._waiters: list[Callable[[Any], Any]] | tuple[()] | None = None

    @property  # type: ignore[override]
    def _final_state(self) -> State | None:
        return None if self._kept is None else unpack(self._kept)

    @_final_state.setter
    def _final_state(self, state: State | None) -> None:
        self._kept = state

    @property
    def state(self) -> State:
        state = self._final_state
        return super().state if state is None else state

    def __getstate__(self) -> dict[str, Any]:
        # A copy elsewhere (a node's `wait_for`) has no session to deliver the outcome, and no
        # dictionary to unpack this process's packed state: it asks Ray.
        return {**self.__dict__, "_waiters": None, "_kept": None}

    def _take(self, outcome: Any) -> None:
        if isinstance(outcome, Outcome):
            self._kept = keep(outcome.state_pickle)

    def _settle(self, outcome: Any) -> None:
        """Take the outcome the session fetched; an exception is left for `_resolve` to raise."""
        with _SETTLE_LOCK:
            self._take(outcome)
            waiters, self._waiters = self._waiters, ()
        for fn in waiters or ():
            try:
                fn(self)
            except Exception:
                logging.getLogger(__name__).exception("A done callback of %r failed", self)

    def add_done_callback(self, fn: Callable[[Any], Any]) -> None:
        with _SETTLE_LOCK:
            waiters = self._waiters
            if isinstance(waiters, list):
                waiters.append(fn)
                return
        if waiters is None and self._kept is None:
            self.wrapped_future._on_completed(lambda _: fn(self))
        else:
            fn(self)

    def wait(self, timeout: float | None = None) -> None:
        self._resolve(timeout)

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> Any:
        if not self._resolve(timeout):
            raise TimeoutError(
                f"Task run {self.task_run_id} did not complete within {timeout} seconds"
            )
        result = unpack(self._kept).result(raise_on_failure=raise_on_failure)
        return run_coro_as_sync(result) if asyncio.iscoroutine(result) else result

    def _resolve(self, timeout: float | None) -> bool:
        if self._kept is not None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._waiters is not None:
            if not self._settled_by(deadline):
                return False
            if self._kept is not None:
                return True
        while True:
            if not ray.is_initialized():  # ray.get would start a Ray cluster of its own
                lost = ConnectionError(f"The Ray connection closed before task run "
                                       f"{self.task_run_id} ended")
                self._kept = run_coro_as_sync(exception_to_crashed_state(lost))
                return True
            # Short slices: a blocking ray.get holds off SIGINT/SIGTERM until it returns.
            remaining = _WAIT_SLICE_S if deadline is None else deadline - time.monotonic()
            try:
                outcome = ray.get(self.wrapped_future, timeout=max(0.0, min(remaining,
                                                                            _WAIT_SLICE_S)))
            except ray.exceptions.GetTimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    return False
                continue
            except Exception as exc:
                self._kept = run_coro_as_sync(exception_to_crashed_state(exc))
                return True
            self._take(outcome)
            return True

    def _settled_by(self, deadline: float | None) -> bool:
        """Wait for the session to deliver the outcome, in short slices (see `_resolve`), while
        the Ray connection that would deliver it lasts, and while Ray does not hold an outcome
        the session failed to deliver."""
        settled = threading.Event()
        self.add_done_callback(lambda _: settled.set())
        ready_since: float | None = None
        next_check = time.monotonic() + _UNDELIVERED_CHECK_S
        while not settled.wait(_WAIT_SLICE_S if deadline is None
                               else max(0.0, min(deadline - time.monotonic(), _WAIT_SLICE_S))):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return False
            if not ray.is_initialized():
                return True
            if now >= next_check:
                next_check = now + _UNDELIVERED_CHECK_S
                if ready_since is not None:
                    return True  # ready a whole check ago, still undelivered: ask Ray
                if ray.wait([self.wrapped_future], timeout=0)[0]:
                    ready_since = now
        return True


# Past Ray Client's own 30 s for a driver to reconnect.
_DRIVERLESS_GRACE_S = 60.0
_DEFAULTS_UNSHOWN = (("provision", "eager"), ("driverless_grace_s", _DRIVERLESS_GRACE_S))


class RayDogTaskRunner(RayTaskRunner):
    """Runs each task of a flow run on a Ray cluster provisioned on YellowDog for the flow run.

    Args:
        cluster: the name of a saved `RayDogClusterConfig` block, or the block itself; `None`
            uses the `local` preset (a local platform started on demand).
        address: a running Ray cluster to attach to instead (`ray://host:10001` or `local`);
            nothing is provisioned.
        init_kwargs: extra keyword arguments for `ray.init`.
        node_api_url: the Prefect API URL that nodes use, when it differs from this process's.
        api_relay_address: an address of this machine that nodes reach; the runner relays a
            plain-http Prefect API on this machine's loopback there for the flow run (the local
            preset uses the platform's own); any other API URL reaches the nodes unchanged.
        provision: "eager" (the default) starts provisioning when the flow run starts, in the
            background, so the first submission waits only for what is left; "lazy" provisions
            at the first submission, so a flow run that submits nothing provisions nothing.
        driverless_grace_s: a provisioned cluster's head ends the cluster once no Ray driver
            has been connected for this many seconds, should this process die without ending
            it; `None` leaves such a cluster to its `cluster_lifetime`.

    Example:
        ```python
        @flow(task_runner=RayDogTaskRunner(cluster="gpu-cluster"))
        def sweep(n: int = 1000):
            return sum(simulate.map(range(n)).result())
        ```
    """

    _CONFIG_FIELDS = ("cluster", "address", "init_kwargs", "node_api_url", "api_relay_address",
                      "provision", "driverless_grace_s")

    def __init__(
        self,
        cluster: str | RayDogClusterConfig | None = None,
        *,
        address: str | None = None,
        init_kwargs: dict[str, Any] | None = None,
        node_api_url: str | None = None,
        api_relay_address: str | None = None,
        provision: Literal["eager", "lazy"] = "eager",
        driverless_grace_s: float | None = _DRIVERLESS_GRACE_S,
    ) -> None:
        if cluster is not None and address is not None:
            raise ValueError(
                "RayDogTaskRunner: pass either `cluster` (provision a cluster) or `address` "
                "(attach to a running one), not both."
            )
        if provision not in ("eager", "lazy"):
            raise ValueError(
                f"RayDogTaskRunner: provision must be 'eager' or 'lazy', not {provision!r}."
            )
        if driverless_grace_s is not None and not driverless_grace_s > 0:
            raise ValueError(
                "RayDogTaskRunner: driverless_grace_s must be a positive number of seconds or "
                f"None, not {driverless_grace_s!r}."
            )
        super().__init__(address=address, init_kwargs=init_kwargs)
        self.provision = provision
        self.driverless_grace_s = driverless_grace_s
        self.cluster = cluster_reference(cluster)
        self._unsaved_config = unsaved_config(self.cluster)  # the block stays while we do
        self.node_api_url = node_api_url
        self.api_relay_address = api_relay_address
        self._session: Session | None = None
        self._flow_run: Any = None
        self._contexts: OrderedDict[tuple, tuple[tuple, Any]] = OrderedDict()
        self._task_refs: OrderedDict[int, tuple[Task, Any]] = OrderedDict()

    def _config(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._CONFIG_FIELDS}

    def _session_key(self) -> tuple:
        return self._settings().key

    def _settings(self) -> SessionSettings:
        return SessionSettings(
            cluster=self.cluster, address=self.address, init_kwargs=dict(self.init_kwargs),
            node_api_url=self.node_api_url, api_relay_address=self.api_relay_address,
            driverless_grace_s=self.driverless_grace_s, logger=self.logger,
            unsaved_config=self._unsaved_config or unsaved_config(self.cluster),
        )

    def duplicate(self) -> RayDogTaskRunner:
        return type(self)(**self._config())

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._config() == self._config()

    __hash__ = None  # type: ignore[assignment]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_session=None, _flow_run=None, _unsaved_config=None, _contexts=OrderedDict(),
                     _task_refs=OrderedDict(), _ray_context=None)
        return state

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._config().items()
                           if v and (k, v) not in _DEFAULTS_UNSHOWN)
        return f"RayDogTaskRunner({fields})"

    def __enter__(self) -> Self:
        super(RayTaskRunner, self).__enter__()
        if inside_ray_worker():
            return self
        settings = self._settings()
        self._session = take_session(settings)
        if self._session.key != settings.key:
            run_logger(self.logger).warning(
                "%r runs its tasks on Ray cluster %s, which this process is already connected "
                "to for an enclosing flow run (a process has one Ray connection); its own "
                "configuration is not used.", self, self._session.cluster_name,
            )
        if self.provision == "eager":
            self._session.start_in_background(settings, _entering_engine())
        return self

    def __exit__(self, *exc_info: Any) -> None:
        session, self._session = self._session, None
        flow_run, self._flow_run = self._flow_run, None
        try:
            if session is not None:
                release_session(session, flow_run, exc_info[0])
        finally:
            self._contexts.clear()
            self._task_refs.clear()
            super(RayTaskRunner, self).__exit__(*exc_info)

    def cancel_all(self) -> None:
        """Cancel every task run in flight on the cluster this configuration is running."""
        session = live_session(self._session_key())
        if session is not None:
            session.runs.cancel_all()

    def submit(
        self,
        task: Task,
        parameters: dict[str, Any],
        wait_for: Iterable[PrefectFuture[Any]] | None = None,
        dependencies: dict[str, Any] | None = None,
    ) -> RayDogFuture:
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        if self._session is not None:
            self._session.ensure_ready(self._settings())
            if self._flow_run is None and (flow_ctx := FlowRunContext.get()):
                self._flow_run = flow_ctx.flow_run
        task_run_id = uuid.uuid4()
        task_inputs = {
            k: collect_task_run_inputs_sync(v, future_cls=PrefectFuture)
            for k, v in parameters.items()
        }
        asset_context = AssetContext.from_task_and_inputs(
            task=task, task_run_id=task_run_id, task_inputs=task_inputs, copy_to_child_ctx=True
        ).serialize()
        _forget_no_assets(task_run_id)
        parameters, upstream_refs = self._exchange_prefect_for_ray_futures(parameters)
        wait_for = list(wait_for or [])
        upstream_refs += [f.wrapped_future for f in wait_for if isinstance(f, PrefectRayFuture)]
        call, refs = dumps_with_refs({
            "task_run_id": task_run_id, "parameters": parameters, "wait_for": wait_for or None,
            "dependencies": dependencies, "asset_context": asset_context,
        })
        ref = self._remote(task).remote(
            call, refs, [self._context_ref(task)], [self._task_ref(task)], *upstream_refs
        )
        future = RayDogFuture(task_run_id=task_run_id, wrapped_future=ref)
        if self._session is not None:
            future._waiters = []
            self._session.track(ref, task, task_run_id, future._settle)
        return future

    def _remote(self, task: Task) -> Any:
        options = {
            "name": task.name,
            **RemoteOptionsContext.get().current_remote_options,
            **(PLACEMENT.get() or {}),
        }
        if self._session is None:
            return remote_for(options)
        return self._session.runs.remote_function(options)

    def _context_ref(self, task: Task) -> Any:
        """The flow's serialized context, put in the object store once per flow-run scope."""
        live = (EngineContext.get(), TaskRunContext.get(), SettingsContext.get(),
                _deployment_parameters.get())
        tags_ctx = TagsContext.get()
        key = (*map(id, live), tuple(sorted(tags_ctx.current_tags)) if tags_ctx else (),
               _deployment_id.get())
        cached = self._contexts.get(key)
        if cached is not None and all(a is b for a, b in zip(cached[0], live, strict=True)):
            return cached[1]
        context = serialize_context()
        context.pop("asset_context", None)
        register_code_by_value(task, live[0])
        api_url = rewrite_api_url(context, self._session.node_api_url if self._session else None)
        # For nodes that join later, which check themselves.
        context["driver_versions"] = versions.own()
        context["api_reached_by"] = nodes_reaching(api_url)
        ref = ray.put(ray.cloudpickle.dumps(context))  # opened on the nodes alone
        self._contexts[key] = (live, ref)
        if len(self._contexts) > 16:
            self._contexts.popitem(last=False)
        return ref

    def _task_ref(self, task: Task) -> Any:
        cached = self._task_refs.get(id(task))
        if cached is not None and cached[0] is task:
            return cached[1]
        register_code_by_value(task, None)
        ref = ray.put(ray.cloudpickle.dumps(task))
        self._task_refs[id(task)] = (task, ref)
        if len(self._task_refs) > 256:
            self._task_refs.popitem(last=False)
        return ref


def _entering_engine() -> Any:
    """The flow engine entering this runner, if any: Prefect enters a flow run's task runner
    before it sets the run's context, so the run is known only to the engine, up the stack."""
    from prefect.flow_engine import AsyncFlowRunEngine, FlowRunEngine

    frame = sys._getframe(2)
    while frame is not None:
        engine = frame.f_locals.get("self")
        if isinstance(engine, (FlowRunEngine, AsyncFlowRunEngine)):
            return engine if engine.flow_run is not None else None
        frame = frame.f_back
    return None


def _forget_no_assets(task_run_id: uuid.UUID) -> None:
    """Drop the empty set Prefect records for a task run with no assets: its lookups treat a
    missing entry as empty, and 10,000 of them hold 2 MB on the driver."""
    flow_ctx = FlowRunContext.get()
    if flow_ctx is not None and not flow_ctx.task_run_assets.get(task_run_id, True):
        del flow_ctx.task_run_assets[task_run_id]
