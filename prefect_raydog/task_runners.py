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
import atexit
import contextlib
import contextvars
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from prefect.context import (
    AssetContext,
    EngineContext,
    FlowRunContext,
    SettingsContext,
    SyncClientContext,
    TagsContext,
    TaskRunContext,
    _deployment_id,
    _deployment_parameters,
    serialize_context,
)
from prefect.futures import PrefectFuture
from prefect.states import State, exception_to_crashed_state
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.utilities.collections import visit_collection
from prefect.utilities.engine import collect_task_run_inputs_sync
from prefect.utilities.importtools import lazy_import
from prefect_ray.context import RemoteOptionsContext
from prefect_ray.task_runners import PrefectRayFuture, RayTaskRunner
from typing_extensions import Self

if TYPE_CHECKING:
    import ray
    from prefect.tasks import Task

    from prefect_raydog.blocks import RayDogClusterConfig

ray = lazy_import("ray")

POOL_RESOURCE_PREFIX = "raydog-pool-"
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
_CLIENT_CONNECT_ATTEMPTS = 30
_WAIT_SLICE_S = 1.0
_PLACEMENT: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "raydog_placement", default=None
)
# Unsaved config blocks live here, by token, so a pickled runner never carries their secrets.
_UNSAVED_CONFIGS: dict[str, RayDogClusterConfig] = {}


def pool_resource(worker_pool: str) -> str:
    """The Ray custom resource that every node of the worker pool `worker_pool` advertises."""
    return f"{POOL_RESOURCE_PREFIX}{worker_pool}"


@contextmanager
def placement(worker_pool: str | None = None, **ray_options: Any) -> Iterator[None]:
    """Send the tasks submitted inside this block to `worker_pool` and/or with Ray options.

    Example:
        ```python
        with placement(worker_pool="gpu", num_gpus=1):
            train.submit(data)
        ```
    """
    options = dict(_PLACEMENT.get() or {})
    options.update(ray_options)
    if worker_pool is not None:
        resources = dict(options.get("resources") or {})
        resources[pool_resource(worker_pool)] = 0.001
        options["resources"] = resources
    token = _PLACEMENT.set(options)
    try:
        yield
    finally:
        _PLACEMENT.reset(token)


class _Outcome(NamedTuple):
    """What a remote task run sends back: the node it ran on and its final Prefect state."""

    node_ip: str
    state: State


class RayDogFuture(PrefectRayFuture):
    """A task run on the cluster; a lost worker or node resolves to a Crashed state."""

    def wait(self, timeout: float | None = None) -> None:
        self._resolve(timeout)

    def result(self, timeout: float | None = None, raise_on_failure: bool = True) -> Any:
        if not self._resolve(timeout):
            raise TimeoutError(
                f"Task run {self.task_run_id} did not complete within {timeout} seconds"
            )
        result = self._final_state.result(raise_on_failure=raise_on_failure)
        return run_coro_as_sync(result) if asyncio.iscoroutine(result) else result

    def _resolve(self, timeout: float | None) -> bool:
        if self._final_state is not None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
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
                self._final_state = run_coro_as_sync(exception_to_crashed_state(exc))
                return True
            self._final_state = outcome.state
            return True


class _ClusterStats:
    """What the cluster did, for the artifact published at teardown."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.head_ready_s: float | None = None
        self.workers_ready_s: float | None = None
        self.tasks_per_node: dict[str, int] = {}
        self.crashed = 0
        self.pools: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def record(self, node_ip: str) -> None:
        with self._lock:
            self.tasks_per_node[node_ip] = self.tasks_per_node.get(node_ip, 0) + 1

    def markdown(self, cluster_name: str) -> str:
        elapsed_h = (time.monotonic() - self.started) / 3600
        nodes = 1 + sum(count for _, count in self.pools)
        node_hours = f"{nodes * elapsed_h:.4f}" if self.pools else "n/a"
        rows = [
            f"## RayDog cluster `{cluster_name}`",
            "",
            "| item | value |",
            "|---|---|",
            *(f"| pool `{name}` | {count} node(s) |" for name, count in self.pools),
            f"| time to head ready | {_seconds(self.head_ready_s)} |",
            f"| time to workers ready | {_seconds(self.workers_ready_s)} |",
            f"| node-hours (head and workers) | {node_hours} |",
            f"| crashed task runs | {self.crashed} |",
            "",
            "| node | tasks |",
            "|---|---|",
            *(f"| {ip} | {n} |" for ip, n in sorted(self.tasks_per_node.items())),
        ]
        return "\n".join(rows)


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


class _Session:
    """One connection to one cluster in this process, shared by a flow and its subflows."""

    def __init__(self, runner: RayDogTaskRunner) -> None:
        self.key = runner._session_key()
        self.users = 0
        self.stats = _ClusterStats()
        self.cluster_name = runner.address or runner.cluster or "local"
        self.node_api_url: str | None = runner.node_api_url
        self.flow_run_id: uuid.UUID | None = None
        self.in_flight: dict[Any, None] = {}
        self.last_done = 0.0
        self._stack = ExitStack()
        self._ready = False
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        self._remote: Any = None
        self._remote_by_options: dict[str, Any] = {}
        self._reporter: Any = None
        self._workers_to_join = 0
        self._build_deadline = 0.0

    def ensure_ready(self, runner: RayDogTaskRunner) -> None:
        with self._lock:
            if self._ready:
                return
            if self._failure is not None:
                raise RuntimeError(f"The Ray cluster could not start: {self._failure}")
            flow_ctx = FlowRunContext.get()
            if flow_ctx and flow_ctx.flow_run:
                self.flow_run_id = flow_ctx.flow_run.id
            try:
                self._start(runner)
            except BaseException as exc:
                self._failure = exc
                self._stack.close()
                raise
            self._ready = True

    def _start(self, runner: RayDogTaskRunner) -> None:
        logger = _run_logger(runner)
        if runner.address and ray.is_initialized():
            logger.info("Using the Ray cluster this process is already connected to.")
        elif runner.address:
            logger.info("Connecting to the Ray cluster at %s.", runner.address)
            _connect(runner.address, runner.init_kwargs, logger)
            self._stack.callback(ray.shutdown)
        elif ray.is_initialized():
            raise RuntimeError(
                "This process is already connected to a Ray cluster, so RayDogTaskRunner cannot "
                "connect to the cluster it would provision: call ray.shutdown() first, or pass "
                "RayDogTaskRunner(address=...) to use the connected cluster."
            )
        else:
            address = self._provision(runner, logger)
            _connect(address, {**runner.init_kwargs, "runtime_env": self._runtime_env(runner)},
                     logger)
            self._stack.callback(ray.shutdown)
            self._wait_for_workers(logger)
        from concurrent.futures import ThreadPoolExecutor

        self._reporter = self._stack.enter_context(ThreadPoolExecutor(1, "raydog-crash-report"))
        self._remote = ray.remote(max_retries=0)(_run_on_node)

    def _provision(self, runner: RayDogTaskRunner, logger: Any) -> str:
        """Build the cluster (torn down by the stack) and return the Ray Client address."""
        from prefect_raydog.cluster import RayDogCluster

        config, relay_host = self._load_config(runner)
        if relay_host and not self.node_api_url:
            self.node_api_url = self._relay_api(relay_host)
            logger.info("Nodes reach the Prefect API at %s.", self.node_api_url)
        spec = _with_pool_resources(config.to_spec(config.cluster_name(self.flow_run_id)))
        self.cluster_name = spec.name
        self.stats.pools = [(p.name or f"pool-{i}", p.count)
                            for i, p in enumerate(spec.worker_pools, 1)]
        logger.info(
            "Provisioning Ray cluster %s in namespace %s: a head node and %d worker node(s).",
            spec.name, spec.namespace, sum(p.count for p in spec.worker_pools),
        )
        cluster = RayDogCluster(spec, client=config.credentials.get_client())
        self._stack.callback(self._shut_down, cluster, logger)
        head = cluster.build(workers_to_join=0)
        self.stats.head_ready_s = cluster.timings.get("head_executing_s")
        logger.info("Head node ready at %s after %.1f s.", head.private_ip,
                    self.stats.head_ready_s or 0.0)
        self._workers_to_join = spec.workers_to_join
        self._build_deadline = time.monotonic() + spec.build_timeout.total_seconds()
        if config.ssh_tunnel:
            return self._tunnel(config, head.public_ip or head.private_ip)
        return f"ray://{head.private_ip}:10001"

    def _load_config(self, runner: RayDogTaskRunner) -> tuple[RayDogClusterConfig, str | None]:
        """The cluster config to build, and where to relay the Prefect API for its nodes."""
        from prefect_raydog.blocks import RayDogClusterConfig

        if runner.cluster is None:
            from prefect_raydog.local import LocalPlatform

            platform = self._stack.enter_context(LocalPlatform())
            config = RayDogClusterConfig.local(platform.url, platform.key_id, platform.key_secret)
            return config, runner.api_relay_address or platform.host_address
        if runner.cluster.startswith("unsaved:"):
            config = _UNSAVED_CONFIGS.get(runner.cluster)
            if config is None:
                raise RuntimeError(
                    "RayDogTaskRunner was given an unsaved RayDogClusterConfig in another "
                    "process; save the block and pass its name: RayDogTaskRunner(cluster=NAME)."
                )
            return config, runner.api_relay_address
        return RayDogClusterConfig.load(runner.cluster, _sync=True), runner.api_relay_address

    def _relay_api(self, host: str) -> str:
        from prefect.settings import PREFECT_API_URL

        api_url = PREFECT_API_URL.value() or _ephemeral_api_url()
        parts = urlsplit(api_url)
        relay = self._stack.enter_context(
            _TcpRelay(host, (parts.hostname, parts.port or 80))
        )
        return _with_host(api_url, host, relay.port)

    def _tunnel(self, config: RayDogClusterConfig, head_ip: str) -> str:
        import tempfile

        from prefect_raydog.tunnels import RayTunnels

        key_dir = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="raydog-ssh-"))
        key_file = os.path.join(key_dir, "id")
        with os.fdopen(os.open(key_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as handle:
            handle.write(config.ssh_private_key.get_secret_value())
        tunnels = self._stack.enter_context(
            RayTunnels(head_ip, config.ssh_username, private_key_file=key_file)
        )
        return tunnels.ray_client_address

    def _shut_down(self, cluster: Any, logger: Any) -> None:
        report = cluster.shut_down()
        logger.info("Cluster %s shut down: %s.", cluster.spec.name, report)

    def _wait_for_workers(self, logger: Any) -> None:
        """Dispatch only once the configured number of Ray worker nodes has joined."""
        wanted = self._workers_to_join
        while wanted:
            joined = sum(1 for node in ray.nodes()
                         if node.get("Alive") and node.get("Resources", {}).get("CPU"))
            if joined >= wanted:
                self.stats.workers_ready_s = time.monotonic() - self.stats.started
                logger.info("%d Ray worker node(s) joined after %.1f s.", joined,
                            self.stats.workers_ready_s)
                return
            if time.monotonic() > self._build_deadline:
                raise TimeoutError(
                    f"Only {joined} of {wanted} Ray worker nodes joined cluster "
                    f"{self.cluster_name} within its build timeout."
                )
            time.sleep(0.25)

    def _runtime_env(self, runner: RayDogTaskRunner) -> dict[str, Any]:
        runtime_env = dict(runner.init_kwargs.get("runtime_env") or {})
        env_vars = {"RAY_AUTH_MODE": "disabled", **(runtime_env.get("env_vars") or {})}
        runtime_env["env_vars"] = env_vars
        return runtime_env

    def remote_function(self, options: dict[str, Any]) -> Any:
        key = repr(sorted(options.items()))
        remote = self._remote_by_options.get(key)
        if remote is None:
            remote = self._remote.options(**options) if options else self._remote
            self._remote_by_options[key] = remote
        return remote

    def track(self, ref: Any, task: Task, task_run_id: uuid.UUID) -> None:
        self.in_flight[ref] = None

        def on_completed(outcome: Any) -> None:
            self.in_flight.pop(ref, None)
            self.last_done = time.monotonic()
            if isinstance(outcome, _Outcome):
                self.stats.record(outcome.node_ip)
            elif isinstance(outcome, Exception) and self._reporter is not None:
                self.stats.crashed += 1
                # After teardown the reporter is shut: these are the runs teardown cancelled.
                with contextlib.suppress(RuntimeError):
                    self._reporter.submit(self._report_crash, task, task_run_id, outcome)

        ref._on_completed(on_completed)

    def _report_crash(self, task: Task, task_run_id: uuid.UUID, exc: Exception) -> None:
        """Tell the API that the task run crashed: its own engine died with its worker."""
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

        state = run_coro_as_sync(exception_to_crashed_state(exc))
        try:
            with get_client(sync_client=True) as client:
                try:
                    client.set_task_run_state(task_run_id, state, force=True)
                except (ObjectNotFound, PrefectHTTPStatusError) as error:
                    # The server may not have ingested the dead node's events yet: the sync
                    # client reports that as a bare 404.
                    if getattr(getattr(error, "response", None), "status_code", 404) != 404:
                        raise
                    client.create_task_run(
                        task, flow_run_id=self.flow_run_id, dynamic_key=str(task_run_id),
                        id=task_run_id, state=state,
                    )
        except Exception:
            logging.getLogger(__name__).warning(
                "Could not report the crash of task run %s", task_run_id, exc_info=True
            )

    def cancel_all(self) -> None:
        for ref in list(self.in_flight):
            try:
                ray.cancel(ref, force=True)
            except Exception:
                logging.getLogger(__name__).debug("Could not cancel %s", ref, exc_info=True)

    def close(self) -> None:
        try:
            if self._ready and self.flow_run_id is not None:
                self._publish_artifact()
        finally:
            self._stack.close()

    def _publish_artifact(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactCreate

        try:
            with get_client(sync_client=True) as client:
                client.create_artifact(ArtifactCreate(
                    type="markdown", key="raydog-cluster", flow_run_id=self.flow_run_id,
                    description="The Ray cluster this flow run used.",
                    data=self.stats.markdown(self.cluster_name),
                ))
        except Exception:
            logging.getLogger(__name__).warning("Could not publish the cluster artifact",
                                                exc_info=True)

    def log_grace(self) -> None:
        """Give node processes time to send their last batch of logs before nodes go away.

        Flushing the log batch after every task would wait out the batch interval each time."""
        from prefect.settings import PREFECT_LOGGING_TO_API_BATCH_INTERVAL

        if self._ready:
            interval = min(PREFECT_LOGGING_TO_API_BATCH_INTERVAL.value(), 5.0) + 0.5
            time.sleep(max(0.0, self.last_done + interval - time.monotonic()))


# Sessions entered in this process, by configuration: subflows share their parent's cluster.
_SESSIONS: dict[tuple, _Session] = {}
_SESSIONS_LOCK = threading.Lock()


# Sessions kept across a failed flow-run attempt that Prefect will retry, by configuration.
_PARKED: dict[tuple, tuple[_Session, threading.Timer]] = {}
_PARK_MARGIN_S = 60.0


def _retry_coming(flow_run: Any) -> bool:
    """Whether the engine is about to retry this flow run (its state was set back to running)."""
    state = getattr(flow_run, "state", None)
    return state is not None and not state.is_final()


def _park(session: _Session, flow_run: Any) -> None:
    """Keep the cluster for the retry; end it if no retry enters in time."""
    policy = getattr(flow_run, "empirical_policy", None)
    delay = getattr(policy, "retry_delay", None) or 0
    timer = threading.Timer(float(delay) + _PARK_MARGIN_S, _end_parked, (session.key,))
    timer.daemon = True
    with _SESSIONS_LOCK:
        _PARKED[session.key] = (session, timer)
    timer.start()


def _unpark(key: tuple) -> _Session | None:
    parked = _PARKED.pop(key, None)
    if parked is None:
        return None
    parked[1].cancel()
    return parked[0]


def _end_parked(key: tuple) -> None:
    with _SESSIONS_LOCK:
        session = _unpark(key)
    if session is not None:
        session.close()


@atexit.register
def _end_all_parked() -> None:
    for key in list(_PARKED):
        _end_parked(key)


class RayDogTaskRunner(RayTaskRunner):
    """Runs each task of a flow run on a Ray cluster provisioned on YellowDog for the flow run.

    Args:
        cluster: the name of a saved `RayDogClusterConfig` block, or the block itself; `None`
            uses the `local` preset (a local platform started on demand).
        address: a running Ray cluster to attach to instead (`ray://host:10001` or `local`);
            nothing is provisioned.
        init_kwargs: extra keyword arguments for `ray.init`.
        node_api_url: the Prefect API URL that nodes use, when it differs from this process's.
        api_relay_address: an address of this machine that nodes reach; the runner relays the
            Prefect API there for the flow run (the local preset uses the platform's own).

    Example:
        ```python
        @flow(task_runner=RayDogTaskRunner(cluster="gpu-cluster"))
        def sweep(n: int = 1000):
            return sum(simulate.map(range(n)).result())
        ```
    """

    _CONFIG_FIELDS = ("cluster", "address", "init_kwargs", "node_api_url", "api_relay_address")

    def __init__(
        self,
        cluster: str | RayDogClusterConfig | None = None,
        *,
        address: str | None = None,
        init_kwargs: dict[str, Any] | None = None,
        node_api_url: str | None = None,
        api_relay_address: str | None = None,
    ) -> None:
        if cluster is not None and address is not None:
            raise ValueError(
                "RayDogTaskRunner: pass either `cluster` (provision a cluster) or `address` "
                "(attach to a running one), not both."
            )
        super().__init__(address=address, init_kwargs=init_kwargs)
        self.cluster = _cluster_reference(cluster)
        self.node_api_url = node_api_url
        self.api_relay_address = api_relay_address
        self._session: _Session | None = None
        self._flow_run: Any = None
        self._contexts: OrderedDict[tuple, tuple[tuple, Any]] = OrderedDict()
        self._task_refs: OrderedDict[int, tuple[Task, Any]] = OrderedDict()

    def _config(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._CONFIG_FIELDS}

    def _session_key(self) -> tuple:
        return (self.cluster, self.address, repr(sorted(self.init_kwargs.items())))

    def duplicate(self) -> RayDogTaskRunner:
        return type(self)(**self._config())

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._config() == self._config()

    __hash__ = None  # type: ignore[assignment]

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_session=None, _flow_run=None, _contexts=OrderedDict(),
                     _task_refs=OrderedDict(), _ray_context=None)
        return state

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._config().items() if v)
        return f"RayDogTaskRunner({fields})"

    def __enter__(self) -> Self:
        super(RayTaskRunner, self).__enter__()
        if _inside_ray_worker():
            return self
        key = self._session_key()
        with _SESSIONS_LOCK:
            session = _SESSIONS.get(key) or _unpark(key) or _Session(self)
            _SESSIONS[key] = session
            session.users += 1
        self._session = session
        return self

    def __exit__(self, *exc_info: Any) -> None:
        session, self._session = self._session, None
        flow_run, self._flow_run = self._flow_run, None
        try:
            if session is not None:
                with _SESSIONS_LOCK:
                    session.users -= 1
                    last_user = session.users == 0
                    if last_user:
                        _SESSIONS.pop(session.key, None)
                if last_user and exc_info[0] is None and _retry_coming(flow_run):
                    _park(session, flow_run)
                elif last_user:
                    if exc_info[0] is None or issubclass(exc_info[0], Exception):
                        session.log_grace()
                    session.close()
        finally:
            self._contexts.clear()
            self._task_refs.clear()
            super(RayTaskRunner, self).__exit__(*exc_info)

    def cancel_all(self) -> None:
        """Cancel every task run in flight on the cluster this configuration is running."""
        with _SESSIONS_LOCK:
            session = _SESSIONS.get(self._session_key())
        if session is not None:
            session.cancel_all()

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
            self._session.ensure_ready(self)
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
        parameters, upstream_refs = self._exchange_prefect_for_ray_futures(parameters)
        wait_for = list(wait_for or [])
        upstream_refs += [f.wrapped_future for f in wait_for if isinstance(f, PrefectRayFuture)]
        ref = self._remote(task).remote(
            [self._context_ref(task)], [self._task_ref(task)], *upstream_refs,
            task_run_id=task_run_id, parameters=parameters, wait_for=wait_for or None,
            dependencies=dependencies, asset_context=asset_context,
        )
        if self._session is not None:
            self._session.track(ref, task, task_run_id)
        return RayDogFuture(task_run_id=task_run_id, wrapped_future=ref)

    def _remote(self, task: Task) -> Any:
        options = {
            "name": task.name,
            **RemoteOptionsContext.get().current_remote_options,
            **(_PLACEMENT.get() or {}),
        }
        if self._session is None:
            return _worker_remote().options(**options)
        return self._session.remote_function(options)

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
        _register_code_by_value(task, live[0])
        _rewrite_api_url(context, self._session.node_api_url if self._session else None)
        ref = ray.put(context)
        self._contexts[key] = (live, ref)
        if len(self._contexts) > 16:
            self._contexts.popitem(last=False)
        return ref

    def _task_ref(self, task: Task) -> Any:
        cached = self._task_refs.get(id(task))
        if cached is not None and cached[0] is task:
            return cached[1]
        _register_code_by_value(task, None)
        ref = ray.put(task)
        self._task_refs[id(task)] = (task, ref)
        if len(self._task_refs) > 256:
            self._task_refs.popitem(last=False)
        return ref


def _cluster_reference(cluster: Any) -> str | None:
    """A block name for `cluster`; an unsaved block is kept in this process, by token."""
    if cluster is None or isinstance(cluster, str):
        return cluster
    name = getattr(cluster, "_block_document_name", None)
    if name and not getattr(cluster, "_is_anonymous", False):
        return name
    token = f"unsaved:{uuid.uuid4().hex}"
    _UNSAVED_CONFIGS[token] = cluster
    return token


def _ephemeral_api_url() -> str:
    """The URL of the temporary server Prefect starts when no API URL is set."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


def _with_pool_resources(spec: Any) -> Any:
    """Let each named pool's nodes advertise the resource that `placement()` asks for."""
    pools = []
    for pool in spec.worker_pools:
        if pool.name and "RAY_RESOURCES" not in pool.environment:
            resources = json.dumps({pool_resource(pool.name): 1000})
            pool = pool.model_copy(
                update={"environment": {**pool.environment, "RAY_RESOURCES": resources}}
            )
        pools.append(pool)
    return spec.model_copy(update={"worker_pools": pools})


class _TcpRelay:
    """Forwards TCP connections from an address that nodes reach to the loopback Prefect API."""

    def __init__(self, host: str, target: tuple[str, int]) -> None:
        self._target = target
        self._server = socket.create_server((host, 0))
        self.port = self._server.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="raydog-api-relay", daemon=True).start()

    def __enter__(self) -> _TcpRelay:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._server.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
                upstream = socket.create_connection(self._target)
            except OSError:
                if self._server.fileno() == -1:
                    return
                continue
            with self._lock:
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(src)


def _run_logger(runner: RayDogTaskRunner) -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger when there is one (its records reach the UI), else the runner's."""
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except Exception:
        return runner.logger


def _connect(address: str, init_kwargs: dict[str, Any], logger: Any) -> None:
    """Connect to Ray, retrying while a new head's client server is still starting."""
    kwargs = {"namespace": "prefect", "log_to_driver": False, **init_kwargs}
    if address == "local":
        kwargs.setdefault("include_dashboard", False)
    for attempt in range(1, _CLIENT_CONNECT_ATTEMPTS + 1):
        try:
            with _signal_handlers_kept():
                ray.init(address, **kwargs)
            break
        except ConnectionError as exc:
            if attempt == _CLIENT_CONNECT_ATTEMPTS:
                raise ConnectionError(
                    f"Could not connect to the Ray cluster at {address} after {attempt} "
                    f"attempts: {exc}"
                ) from exc
            time.sleep(min(0.2 * attempt, 2.0))
    alive = [node for node in ray.nodes() if node.get("Alive")]
    logger.info("Connected to the Ray cluster at %s: %d node(s).", address, len(alive))



@contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Keep the flow engine's SIGTERM/SIGINT handlers across `ray.init`.

    On the main thread Ray installs its own, which call `sys.exit`: a worker's cancel signal
    would then reach the engine as SystemExit instead of its TerminationSignal, and a
    cancelled run would end Crashed rather than Cancelled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)

def _inside_ray_worker() -> bool:
    if not ray.is_initialized() or ray.util.client.ray.is_connected():
        return False
    return ray._private.worker.global_worker.mode == ray._private.worker.WORKER_MODE


def _register_code_by_value(task: Task, engine_ctx: Any) -> None:
    """Ship the flow's own modules by value, so nodes run code they do not have installed."""
    import ray.cloudpickle as cloudpickle

    functions = [getattr(task, "fn", None)]
    flow = getattr(engine_ctx, "flow", None)
    if flow is not None:
        functions.append(flow.fn)
    for fn in functions:
        module = sys.modules.get(getattr(fn, "__module__", "") or "")
        path = getattr(module, "__file__", None) or ""
        if module is None or module.__name__ == "__main__" or "site-packages" in path:
            continue
        if not path or module.__name__.startswith(("prefect", "ray")):
            continue
        cloudpickle.register_pickle_by_value(module)


def _rewrite_api_url(context: dict[str, Any], node_api_url: str | None) -> None:
    """Give nodes an API URL they reach; refuse a loopback URL that they cannot."""
    settings = context.get("settings_context", {}).get("settings", {})
    api = settings.setdefault("api", {})
    url = api.get("url")
    if node_api_url:
        api["url"] = node_api_url
    elif url and urlsplit(url).hostname in _LOOPBACK_HOSTS and _nodes_are_remote():
        raise RuntimeError(
            f"The Prefect API URL {url} is on loopback, which the cluster's nodes cannot "
            "reach. Serve the API on an address the nodes reach, or pass "
            "RayDogTaskRunner(node_api_url=...)."
        )


def _nodes_are_remote() -> bool:
    return ray.util.client.ray.is_connected()


def _with_host(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{host}:{port}"))


# ---- node side: runs in Ray worker processes ----

_HYDRATED: OrderedDict[str, _Hydrated] = OrderedDict()
_FETCHED: OrderedDict[str, Any] = OrderedDict()
_NODE_CACHE_SIZE = 4
_node_ip: str | None = None


class _Hydrated:
    """A flow run's context rebuilt once per worker process and bound around each task."""

    _models_rebuilt = False

    def __init__(self, context: dict[str, Any]) -> None:
        from prefect.logging.configuration import ensure_logging_setup

        self._rebuild_models()
        ensure_logging_setup()
        _quiet_node_console()
        self._stack = ExitStack()
        settings = context.get("settings_context")
        self.settings = SettingsContext(**settings) if settings else None
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
    def _rebuild_models(cls) -> None:
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


def _quiet_node_console() -> None:
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
            if isinstance(evicted, _Hydrated):
                evicted.close()
    else:
        cache.move_to_end(key)
    return value


def _resolve_upstream(expr: Any) -> Any:
    if isinstance(expr, ray.ObjectRef):
        value = ray.get(expr)
        return value.state if isinstance(value, _Outcome) else value
    return expr


def _run_on_node(
    context_box: list[Any],
    task_box: list[Any],
    *upstream_refs: Any,
    task_run_id: uuid.UUID,
    parameters: dict[str, Any],
    wait_for: list[PrefectFuture[Any]] | None,
    dependencies: dict[str, Any] | None,
    asset_context: dict[str, Any],
) -> _Outcome:
    """Run one Prefect task run in this Ray worker process and return its final state."""
    from prefect.task_engine import run_task_async, run_task_sync

    global _node_ip
    if _node_ip is None:
        _node_ip = ray.util.get_node_ip_address()
    hydrated = _cached(_HYDRATED, context_box[0], _Hydrated)
    task = _cached(_FETCHED, task_box[0], lambda task: task)
    parameters = visit_collection(parameters, visit_fn=_resolve_upstream, return_data=True)
    kwargs = dict(task=task, task_run_id=task_run_id, parameters=parameters, wait_for=wait_for,
                  dependencies=dependencies, return_type="state")
    with hydrated.bound(), AssetContext(**asset_context):
        state = asyncio.run(run_task_async(**kwargs)) if task.isasync else run_task_sync(**kwargs)
        _flush_events()
    return _Outcome(_node_ip, state)


def _flush_events() -> None:
    """Send this task's state events before returning, as ProcessPoolTaskRunner does."""
    from prefect.events.worker import EventsWorker

    with EventsWorker._instance_lock:
        has_worker = bool(EventsWorker._instances)
    if has_worker:
        EventsWorker.instance().wait_until_empty()


_WORKER_REMOTE: Any = None


def _worker_remote() -> Any:
    """The remote entry point, built once per process, for submits made on a node."""
    global _WORKER_REMOTE
    if _WORKER_REMOTE is None:
        _WORKER_REMOTE = ray.remote(max_retries=0)(_run_on_node)
    return _WORKER_REMOTE
