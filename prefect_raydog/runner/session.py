"""The driver-side session: provisions or connects to one cluster, tracks its task runs, and
tears it down, shared by a flow and its subflows in this process."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from prefect.context import FlowRunContext
from prefect.states import exception_to_crashed_state
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.utilities.importtools import lazy_import

from prefect_raydog.runner.adaptive import AdaptivePools
from prefect_raydog.runner.connection import (
    ALREADY_CONNECTED,
    CLIENT_CONNECT_TIMEOUT_S,
    check_node_versions,
    connect,
    disconnect,
)
from prefect_raydog.runner.ending import being_cancelled, record_final_state
from prefect_raydog.runner.guardian import Guardian, with_driver_watch
from prefect_raydog.runner.heldlog import HeldRunLog
from prefect_raydog.runner.node import _Outcome, remote_for
from prefect_raydog.runner.placement import _with_pool_resources
from prefect_raydog.runner.recorded import wait_for_final_states
from prefect_raydog.runner.relay import _TcpRelay, shared_relay
from prefect_raydog.runner.shipping import refuse_loopback_api
from prefect_raydog.runner.stats import _ClusterStats
from prefect_raydog.runner.warmup import warm_workers

if TYPE_CHECKING:
    import ray
    from prefect.tasks import Task

    from prefect_raydog.blocks import RayDogClusterConfig
    from prefect_raydog.task_runners import RayDogTaskRunner

ray = lazy_import("ray")

# The final wait for the API's records ends after this long with no new one recorded.
_SETTLE_STALL_S = 30.0
# Unsaved config blocks live here, by token, so a pickled runner never carries their secrets.
_UNSAVED_CONFIGS: dict[str, RayDogClusterConfig] = {}


class _Session:
    """One connection to one cluster in this process, shared by a flow and its subflows."""

    def __init__(self, runner: RayDogTaskRunner) -> None:
        self.key = runner._session_key()
        self.users = 0
        self.stats = _ClusterStats()
        self.cluster_name = runner.address or runner.cluster or "local"
        self.node_api_url: str | None = runner.node_api_url
        self.flow_run_id: uuid.UUID | None = None
        self.in_flight: dict[Any, tuple[Task, uuid.UUID]] = {}
        self._cancelled: set[Any] = set()
        self.finished_on_nodes = bytearray()  # task run ids, packed: see recorded.py
        self.last_done = 0.0
        self._stack = ExitStack()
        self._ready = False
        self._failure: BaseException | None = None
        self._failure_raised = False
        self._lock = threading.Lock()
        self._remote_by_options: dict[str, Any] = {}
        self._reporter: Any = None
        self._workers_to_join = 0
        self._build_timeout_s = 0.0
        self._build_deadline = 0.0
        self.cluster: Any = None
        self.adaptive: AdaptivePools | None = None
        self._starter: threading.Thread | None = None
        self._held_log: HeldRunLog | None = None
        self._guardian: Guardian | None = None
        self._closing = threading.Event()

    def holds_connection(self) -> bool:
        """Whether this session has, or is on its way to, the process's one Ray connection."""
        return self._ready or self._starter is not None

    def start_in_background(self, runner: RayDogTaskRunner, engine: Any = None) -> None:
        """Provision and connect now, in the background: the first submission waits only for
        what is left, and a failure is raised there. With the flow `engine` entering the runner,
        the cluster is named for its flow run and logs to the run's log as it starts."""
        if self._ready or self._failure is not None or self._starter is not None:
            return

        def start() -> None:
            try:
                self.ensure_ready(runner, background=True)
            except BaseException as exc:
                logging.getLogger(__name__).warning("The Ray cluster could not start: %s", exc)

        self._held_log = HeldRunLog(runner.logger)
        if engine is not None:
            from prefect.logging.loggers import flow_run_logger

            self.flow_run_id = engine.flow_run.id
            self._held_log.attach(flow_run_logger(engine.flow_run, engine.flow))
        context = contextvars.copy_context()
        self._starter = threading.Thread(target=context.run, args=(start,), daemon=True,
                                         name="raydog-provision")
        self._starter.start()

    def ensure_ready(self, runner: RayDogTaskRunner, background: bool = False) -> None:
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
            if self.flow_run_id is None and flow_ctx and flow_ctx.flow_run:
                self.flow_run_id = flow_ctx.flow_run.id
            try:
                self._start(runner)
            except BaseException as exc:
                self._failure, self._failure_raised = exc, not background
                self._stack.close()
                raise
            self._ready = True

    def _start(self, runner: RayDogTaskRunner) -> None:
        logger = self._held_log or _run_logger(runner)
        if runner.address and runner.api_relay_address and not self.node_api_url:
            self.node_api_url = self._relay_api(runner.api_relay_address, shared=True)
            logger.info("Nodes reach the Prefect API at %s.", self.node_api_url)
        if runner.address and ray.is_initialized():
            logger.info("Using the Ray cluster this process is already connected to.")
        elif runner.address:
            logger.info("Connecting to the Ray cluster at %s.", runner.address)
            connect(runner.address, runner.init_kwargs, logger)
            self._stack.callback(disconnect)
            warm_workers()
        elif ray.is_initialized():
            raise RuntimeError(ALREADY_CONNECTED)
        else:
            address = self._provision(runner, logger)
            self._check_not_closing()
            connect(address, {**runner.init_kwargs, "runtime_env": self._runtime_env(runner)},
                     logger, self._closing)
            self._stack.callback(disconnect)
            self._wait_for_workers(logger)
            # The workers that joined since connect() checked the nodes then.
            check_node_versions(meanwhile=warm_workers)
            self.adaptive = AdaptivePools.start(self.cluster, self.stats, logger)
            if self.adaptive is not None:
                self._stack.callback(self.adaptive.stop)
        from concurrent.futures import ThreadPoolExecutor

        self._reporter = self._stack.enter_context(ThreadPoolExecutor(1, "raydog-crash-report"))

    def _provision(self, runner: RayDogTaskRunner, logger: Any) -> str:
        """Build the cluster (torn down by the stack) and return the Ray Client address."""
        from prefect_raydog.cluster import RayDogCluster

        config, relay_host = self._load_config(runner)
        if relay_host and not self.node_api_url:
            self.node_api_url = self._relay_api(relay_host)
            logger.info("Nodes reach the Prefect API at %s.", self.node_api_url)
        elif not self.node_api_url:
            from prefect.settings import PREFECT_API_URL

            refuse_loopback_api(PREFECT_API_URL.value())  # before anything is provisioned
        spec = _with_pool_resources(config.to_spec(config.cluster_name(self.flow_run_id)))
        spec = with_driver_watch(spec, runner.driverless_grace_s,
                                 spec.build_timeout.total_seconds() + CLIENT_CONNECT_TIMEOUT_S)
        self.cluster_name = spec.name
        self.stats.pools = [(p.name or f"pool-{i}", p.start_count)
                            for i, p in enumerate(spec.worker_pools, 1)]
        logger.info(
            "Provisioning Ray cluster %s in namespace %s: a head node and %d worker node(s).",
            spec.name, spec.namespace, sum(p.start_count for p in spec.worker_pools),
        )
        cluster = self.cluster = RayDogCluster(spec, client=config.credentials.get_client())
        if runner.cluster is not None:  # the local preset's platform dies with this process
            self._guardian = self._stack.enter_context(Guardian(config.credentials))
            self._guardian.flow_run(self.flow_run_id)
        self._stack.callback(self._shut_down, cluster, logger)
        self._build_timeout_s = spec.build_timeout.total_seconds()
        # One build timeout for the head and the workers, as the Builder counts it.
        self._build_deadline = time.monotonic() + self._build_timeout_s
        # close() sets _closing and then shuts down self.cluster: one of the two sees the other.
        self._check_not_closing()
        head = cluster.build(workers_to_join=0,
                             on_step=self._guardian and self._guardian.follow(cluster))
        self.stats.head_ready_s = cluster.timings.get("head_executing_s")
        logger.info("Head node ready at %s after %.1f s.", head.private_ip,
                    self.stats.head_ready_s or 0.0)
        self._workers_to_join = spec.workers_to_join
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
        else:
            config = RayDogClusterConfig.load(runner.cluster, _sync=True)
        return config, runner.api_relay_address or config.api_relay_address

    def _relay_api(self, host: str, shared: bool = False) -> str:
        """Relay the API on `host`: for this session, or (`shared`, for a cluster this session
        only attaches to) for the rest of the process."""
        from prefect.settings import PREFECT_API_URL

        api_url = PREFECT_API_URL.value() or _ephemeral_api_url()
        parts = urlsplit(api_url)
        target = (parts.hostname, parts.port or 80)
        relay = (shared_relay(host, target) if shared
                 else self._stack.enter_context(_TcpRelay(host, target)))
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
            self._check_not_closing()
            if time.monotonic() > self._build_deadline:
                raise TimeoutError(
                    f"Only {joined} of {wanted} Ray worker nodes joined cluster "
                    f"{self.cluster_name} within its build_timeout ({self._build_timeout_s:g} s); "
                    "the cluster is torn down."
                )
            time.sleep(0.25)

    def _check_not_closing(self) -> None:
        if self._closing.is_set():
            raise RuntimeError("The flow run ended while the Ray cluster was starting.")

    def _runtime_env(self, runner: RayDogTaskRunner) -> dict[str, Any]:
        runtime_env = dict(runner.init_kwargs.get("runtime_env") or {})
        env_vars = {"RAY_AUTH_MODE": "disabled", **(runtime_env.get("env_vars") or {})}
        runtime_env["env_vars"] = env_vars
        return runtime_env

    def remote_function(self, options: dict[str, Any]) -> Any:
        """`_run_on_node` with a task's Ray options, one per options for this connection."""
        return remote_for(options, self._remote_by_options)

    def track(self, ref: Any, task: Task, task_run_id: uuid.UUID,
              settle: Callable[[Any], None]) -> None:
        """Follow a task run to its end; `settle` gets its outcome (or the exception)."""
        self.in_flight[ref] = (task, task_run_id)
        if self.adaptive is not None:
            self.adaptive.submitted(ref)
        if self.flow_run_id is None and (flow_ctx := FlowRunContext.get()) and flow_ctx.flow_run:
            self.flow_run_id = flow_ctx.flow_run.id
            if self._guardian is not None:
                self._guardian.flow_run(self.flow_run_id)
            if self._held_log is not None:
                from prefect.logging.loggers import flow_run_logger

                self._held_log.attach(flow_run_logger(flow_ctx.flow_run, flow_ctx.flow))

        def on_completed(outcome: Any) -> None:
            self.in_flight.pop(ref, None)
            if self.adaptive is not None:
                self.adaptive.finished(ref)
            self.last_done = time.monotonic()
            if isinstance(outcome, _Outcome):
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

    def close(self) -> None:
        self._end_background_start()
        try:
            if self._ready and self.flow_run_id is not None:
                self._publish_artifact()
        finally:
            self._stack.close()

    def _end_background_start(self) -> None:
        """A flow run that ends while its cluster is still starting: interrupt the build."""
        if self._starter is None or not self._starter.is_alive():
            return
        self._closing.set()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.shut_down()
        self._starter.join()

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

    def settle(self) -> None:
        """Before the nodes go: let the API record every final state the nodes sent, for as
        long as it keeps recording more (a shortfall goes to the flow run's log), and give node
        processes time to send their last batch of logs (flushing the log batch after every
        task would wait out the batch interval each time)."""
        from prefect.settings import PREFECT_LOGGING_TO_API_BATCH_INTERVAL

        if self._ready:
            wait_for_final_states(self.finished_on_nodes, _SETTLE_STALL_S, self.flow_run_id,
                                  self.cluster_name)
            interval = min(PREFECT_LOGGING_TO_API_BATCH_INTERVAL.value(), 5.0) + 0.5
            time.sleep(max(0.0, self.last_done + interval - time.monotonic()))


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


def _run_logger(runner: RayDogTaskRunner) -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger when there is one (its records reach the UI), else the runner's."""
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except Exception:
        return runner.logger


def _with_host(url: str, host: str, port: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{host}:{port}"))
