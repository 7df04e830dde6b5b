"""Small helpers of more than one test module: the connected Ray cluster's nodes, what is live on
a local platform, a free port, whether a flow's runs ran a task, the sealed `local` preset."""

from __future__ import annotations

import socket
import subprocess
import sys

import ray
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from ray import cloudpickle
from yellowdog_client.model import NodeSearch

from prefect_raydog.blocks import RayDogClusterConfig
from prefect_raydog.local import LocalPlatform


def head_ips() -> set[str]:
    """The addresses of the connected Ray cluster's head: the alive nodes with no CPU for tasks."""
    return {
        n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"] and not n["Resources"].get("CPU")
    }


def tcp_listeners(pid: int) -> set[str]:
    """The addresses (`HOST:PORT`) on which the process `pid` listens for TCP (`ss`)."""
    lines = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3] for line in lines.splitlines() if f"pid={pid}," in line}


def public_ips(platform: LocalPlatform, private_ips: set[str]) -> set[str]:
    """The public addresses that the platform's API reports for its nodes (ended ones too) at
    `private_ips`."""
    pools = platform.client.worker_pool_client
    return {node.details.publicIpAddress for pool in pools.find_all_worker_pools()
            for node in pools.find_nodes(NodeSearch(workerPoolId=pool.id))
            if node.details is not None and node.details.privateIpAddress in private_ips}


def worker_node_ids() -> set[str]:
    """The IDs of the connected Ray cluster's alive worker nodes (those with CPU for tasks)."""
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")}


def what_is_live(platform: LocalPlatform) -> dict[str, list]:
    """What is live on `platform`, by kind, without the empty kinds."""
    return {kind: items for kind, items in platform.live_entities().items() if items}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that no one listens on now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def no_task_ran(flow_name: str) -> bool:
    """Whether the API has a run of the flow `flow_name`, and no task run of it."""
    named = FlowFilter(name=FlowFilterName(any_=[flow_name]))
    with get_client(sync_client=True) as client:
        return bool(client.read_flow_runs(flow_filter=named)) and not client.read_task_runs(
            flow_filter=named)


# A flow that calls these carries them to the nodes with its context, where this module is not
# installed: it travels by value, as the test modules do.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def authorizing_userdata(public_key: str) -> str:
    """Userdata that authorizes `public_key` for the node's agent user, as a cloud image's does."""
    return f"#!/bin/bash\ncat >> ~yd-agent/.ssh/authorized_keys <<'EOF'\n{public_key}\nEOF\n"


def sealed_preset(platform: LocalPlatform, worker_nodes: int = 2) -> RayDogClusterConfig:
    """The `local` preset's sealed nodes on `platform` (run with `firewall=True`), reached over
    SSH with its host key pinned."""
    return RayDogClusterConfig.local(platform.url, platform.key_id, platform.key_secret,
                                     worker_nodes, ssh_known_hosts=platform.ssh_known_hosts,
                                     sealed=True)
