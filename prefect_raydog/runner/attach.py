"""How a session reaches its cluster's head and takes this process's Ray connection: a running
cluster at a given address, a head it built directly, or that head through an SSH tunnel."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from prefect.utilities.importtools import lazy_import

from prefect_raydog.runner.connection import (
    ALREADY_CONNECTED,
    check_node_versions,
    check_not_stopped,
    connect,
    disconnect,
)
from prefect_raydog.runner.warmup import warm_workers

if TYPE_CHECKING:
    import ray

    from prefect_raydog.blocks import RayDogClusterConfig
    from prefect_raydog.cluster import RayDogCluster
    from prefect_raydog.tunnels import RayTunnels

ray = lazy_import("ray")
RAY_CLIENT_PORT = 10001


def attach_to_address(address: str, init_kwargs: Mapping[str, Any], stack: ExitStack,
                      logger: Any, stop: threading.Event, api_url: str | None) -> None:
    """Connect to the running cluster at `address` until `stack` closes (unless this process
    is connected already: then that connection is used, and left open); `stop` gives up.
    Then checks the nodes' versions and that they reach `api_url` (the Prefect API URL they
    get), while the job's workers warm."""
    if ray.is_initialized():
        logger.info("Using the Ray cluster this process is already connected to.")
        return
    logger.info("Connecting to the Ray cluster at %s.", address)
    connect(address, dict(init_kwargs), logger, stop)
    stack.callback(disconnect)
    if address != "local":  # a cluster of its own runs this very Python
        check_node_versions(meanwhile=warm_workers, api_url=api_url)
    else:
        warm_workers()


def refuse_second_connection() -> None:
    """A session that provisions needs the process's one Ray connection for its own cluster."""
    if ray.is_initialized():
        raise RuntimeError(ALREADY_CONNECTED)


def attach_to_head(cluster: RayDogCluster, config: RayDogClusterConfig,
                   init_kwargs: Mapping[str, Any], stack: ExitStack, logger: Any,
                   stop: threading.Event) -> RayTunnels | None:
    """Connect to the head of a cluster this session built, until `stack` closes: through SSH
    tunnels when `config` asks for them (returned), else at its private address; with the
    cluster's Ray token when it has one. The session checks the nodes once its workers
    joined."""
    head = cluster.head_address
    tunnels = None
    if config.ssh_tunnel:
        tunnels = _tunnels(cluster, head.public_ip or head.private_ip, stack)
        address = tunnels.ray_client_address
    else:
        address = f"ray://{head.private_ip}:{RAY_CLIENT_PORT}"
    check_not_stopped(stop)
    token = cluster.ray_client_kwargs()
    runtime_env = _runtime_env(init_kwargs, "token" if token else "disabled")
    connect(address, {**init_kwargs, **token, "runtime_env": runtime_env}, logger, stop,
            head_ended=lambda: head_task_end(cluster),
            listening=tunnels.head_listening if tunnels else None)
    stack.callback(disconnect)
    return tunnels


def head_task_end(cluster: RayDogCluster) -> str | None:
    """How the head node's task ended ("FAILED (...)"), or None while it runs."""
    from prefect_raydog.cluster.waits import describe_task_end

    try:
        task = cluster.yd_client.work_client.get_task_by_id(cluster.head_node_task_id)
    except Exception as error:  # noqa: BLE001 - unknown for now; the connect goes on
        logging.getLogger(__name__).debug("Reading the head's task failed: %s", error)
        return None
    return describe_task_end(task) if task.status is not None and task.status.finished else None


def _tunnels(cluster: RayDogCluster, head_ip: str, stack: ExitStack) -> RayTunnels:
    """Open SSH tunnels to the head (closed with `stack`) over the SSH connection that
    delivered the cluster's token: one connection carries the token, Ray Client, the
    dashboard and the nodes' way to this machine's Prefect API."""
    from prefect_raydog.tunnels import RayTunnels

    transport = cluster.token_auth.head_transport
    if transport is None or not transport.is_active():
        raise ConnectionError(f"The SSH connection to the head node {head_ip} has ended")
    return stack.enter_context(RayTunnels.over(transport, head_ip))


def _runtime_env(init_kwargs: Mapping[str, Any], auth_mode: str) -> dict[str, Any]:
    """The job's runtime env, its workers in the cluster's auth mode (explicit: with it unset,
    a stray ~/.ray/auth_token would turn token mode on)."""
    runtime_env = dict(init_kwargs.get("runtime_env") or {})
    env_vars = {"RAY_AUTH_MODE": auth_mode, **(runtime_env.get("env_vars") or {})}
    runtime_env["env_vars"] = env_vars
    return runtime_env
