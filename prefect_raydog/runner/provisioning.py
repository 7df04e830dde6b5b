"""`Provisioning`: the cluster a session builds for its flow run: its config block, the way its
nodes reach the Prefect API (a relay, or the head's door over SSH), its guardian, the build, the
wait for its workers, and its shut-down."""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from prefect.utilities.importtools import lazy_import

from prefect_raydog.errors import NodeTaskFailed
from prefect_raydog.runner.adaptive import AdaptivePools
from prefect_raydog.runner.api_door import ApiDoor
from prefect_raydog.runner.connection import CLIENT_CONNECT_TIMEOUT_S, check_not_stopped
from prefect_raydog.runner.guardian import Guardian, with_driver_watch
from prefect_raydog.runner.placement import with_pool_resources
from prefect_raydog.runner.relay import forwardable_api_url, relay_api
from prefect_raydog.runner.settings import SessionSettings, unsaved_config
from prefect_raydog.runner.shipping import refuse_loopback_api
from prefect_raydog.runner.stats import ClusterStats

if TYPE_CHECKING:
    import ray

    from prefect_raydog.blocks import RayDogClusterConfig
    from prefect_raydog.cluster import RayDogCluster
    from prefect_raydog.tunnels import RayTunnels

ray = lazy_import("ray")
# How often the wait for Ray worker nodes asks YellowDog whether a worker's task has ended.
WORKER_TASK_CHECK_S = 2.0


class Provisioning:
    """One cluster built from a runner's settings; what it makes is ended by the session's
    `stack`, and `stop` (the flow run ended) interrupts the build. The nodes use
    `node_api_url` when given, else the Prefect API relayed where they reach it, or (a head
    reached over SSH) through the head's door to it."""

    def __init__(self, settings: SessionSettings, stack: ExitStack, stats: ClusterStats,
                 stop: threading.Event, node_api_url: str | None) -> None:
        self.settings = settings
        self.name = settings.cluster or "local"
        self.node_api_url = node_api_url
        self.cluster: RayDogCluster | None = None
        self.guardian: Guardian | None = None
        self._stack = stack
        self._stats = stats
        self._stop = stop
        self._workers_to_join = 0
        self._build_timeout_s = 0.0
        self._build_deadline = 0.0
        self._api_over_ssh: str | None = None
        self._door: ApiDoor | None = None

    def build(self, flow_run_id: uuid.UUID | None, logger: Any) -> RayDogClusterConfig:
        """Build the cluster (`self.cluster`), named for `flow_run_id`; return its config."""
        from prefect_raydog.cluster import RayDogCluster

        config = self._load_config(logger)
        spec = with_pool_resources(config.to_spec(config.cluster_name(flow_run_id)))
        spec = with_driver_watch(spec, self.settings.driverless_grace_s,
                                 spec.build_timeout.total_seconds() + CLIENT_CONNECT_TIMEOUT_S)
        self.name = spec.name
        self._stats.pools = [(p.name or f"pool-{i}", p.start_count)
                             for i, p in enumerate(spec.worker_pools, 1)]
        logger.info(
            "Provisioning Ray cluster %s in namespace %s: a head node and %d worker node(s).",
            spec.name, spec.namespace, sum(p.start_count for p in spec.worker_pools),
        )
        cluster = self.cluster = RayDogCluster(spec, client=config.credentials.get_client(),
                                               ssh=config.ssh_login())
        if self.settings.cluster is not None:  # the local preset's platform dies with this process
            self.guardian = self._stack.enter_context(Guardian(config.credentials))
            self.guardian.flow_run(flow_run_id)
        self._stack.callback(_shut_down, cluster, logger)
        self._build_timeout_s = spec.build_timeout.total_seconds()
        # One build timeout for the head and the workers, as the Builder counts it.
        self._build_deadline = time.monotonic() + self._build_timeout_s
        # The session's close() sets `stop` and then shuts down self.cluster: one of the two
        # sees the other.
        check_not_stopped(self._stop)
        head = cluster.build(workers_to_join=0,
                             on_step=self.guardian and self.guardian.follow(cluster))
        self._stats.head_ready_s = cluster.timings.get("head_executing_s")
        logger.info("Head node ready at %s after %.1f s.", head.private_ip,
                    self._stats.head_ready_s or 0.0)
        self._workers_to_join = spec.workers_to_join
        return config

    def _load_config(self, logger: Any) -> RayDogClusterConfig:
        """The cluster config to build; the Prefect API relayed where its nodes reach it."""
        config, relay_host = self._config_and_relay_host()
        if relay_host and not self.node_api_url:
            self.node_api_url = relay_api(relay_host, logger, self._stack)
        elif config.ssh_tunnel and not self.node_api_url:
            self._api_over_ssh = forwardable_api_url(logger, "the head's door over SSH")
        if not self.node_api_url and not self._api_over_ssh:
            from prefect.settings import PREFECT_API_URL

            refuse_loopback_api(PREFECT_API_URL.value())  # before anything is provisioned
        return config

    def _config_and_relay_host(self) -> tuple[RayDogClusterConfig, str | None]:
        from prefect_raydog.blocks import RayDogClusterConfig

        settings = self.settings
        if settings.cluster is None:
            from prefect_raydog.local import LocalPlatform

            # Sealed as a cloud's nodes wherever this machine can (bridge networking, as root).
            platform = self._stack.enter_context(LocalPlatform(firewall=None))
            config = RayDogClusterConfig.local(
                platform.url, platform.key_id, platform.key_secret,
                ssh_known_hosts=platform.ssh_known_hosts, sealed=bool(platform.firewall))
            relay_host = None if platform.firewall else platform.host_address
            return config, settings.api_relay_address or relay_host
        if settings.cluster.startswith("unsaved:"):
            config = settings.unsaved_config or unsaved_config(settings.cluster)
            if config is None:
                raise RuntimeError(
                    "RayDogTaskRunner was given an unsaved RayDogClusterConfig in another "
                    "process; save the block and pass its name: RayDogTaskRunner(cluster=NAME)."
                )
        else:
            config = RayDogClusterConfig.load(settings.cluster, _sync=True)
        return config, settings.api_relay_address or config.api_relay_address

    def open_api_door(self, tunnels: RayTunnels | None) -> None:
        """Once connected through `tunnels`: start opening the head's door to a loopback API
        (`node_api_url` names it once `wait_for_api_door` returns)."""
        if tunnels is not None and self._api_over_ssh and self.cluster is not None:
            self._door = ApiDoor(tunnels, self.cluster.head_address.private_ip,
                                 self._api_over_ssh)

    def wait_for_api_door(self, logger: Any) -> None:
        if self._door is not None:
            self.node_api_url = self._door.url(logger)

    def wait_for_workers(self, logger: Any) -> None:
        """Dispatch only once the configured number of Ray worker nodes has joined; a worker
        whose task ended meanwhile fails the wait at once."""
        wanted = self._workers_to_join
        next_check = time.monotonic() + WORKER_TASK_CHECK_S
        while wanted:
            joined = sum(1 for node in ray.nodes()
                         if node.get("Alive") and node.get("Resources", {}).get("CPU"))
            if joined >= wanted:
                self._stats.workers_ready_s = time.monotonic() - self._stats.started
                logger.info("%d Ray worker node(s) joined after %.1f s.", joined,
                            self._stats.workers_ready_s)
                return
            check_not_stopped(self._stop)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + WORKER_TASK_CHECK_S
                self._check_no_worker_ended()
            if time.monotonic() > self._build_deadline:
                raise TimeoutError(
                    f"Only {joined} of {wanted} Ray worker nodes joined cluster "
                    f"{self.name} within its build_timeout ({self._build_timeout_s:g} s); "
                    "the cluster is torn down."
                )
            time.sleep(0.25)

    def _check_no_worker_ended(self) -> None:
        """A worker node whose task has ended will never join (Ray refused it, say)."""
        from prefect_raydog.cluster.waits import describe_task_end, ended_node_task

        cluster = self.cluster
        task = ended_node_task(cluster.yd_client, cluster.work_requirement_id,
                               cluster.head_node_task_id)
        if task is not None:
            raise NodeTaskFailed(
                f"The task of worker node {task.name} of cluster {self.name} ended "
                f"{describe_task_end(task)} before its Ray node joined: its task output "
                "(YellowDog's taskoutput.txt) says why; the cluster is torn down.")

    def adapt(self, logger: Any) -> AdaptivePools | None:
        """Start resizing the cluster's adaptive pools, until the session's stack closes."""
        adaptive = AdaptivePools.start(self.cluster, self._stats, logger)
        if adaptive is not None:
            self._stack.callback(adaptive.stop)
        return adaptive

    def interrupt(self) -> None:
        """The flow run ended while the cluster was starting: end what the build made."""
        if self.cluster is not None:
            self.cluster.shut_down()


def _shut_down(cluster: RayDogCluster, logger: Any) -> None:
    report = cluster.shut_down()
    logger.info("Cluster %s shut down: %s.", cluster.spec.name, report)
