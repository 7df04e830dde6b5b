"""The RayDog Builder on a YellowDog account's path: the local platform's sealed nodes behind its
firewall, which see only their image, run Ray as `yd-agent`, and answer this machine at SSH
alone. Given an `SSHLogin`, the Builder locks the cluster with a Ray token of its own, written
over SSH (into the workers' files through the head, a pool added later included); the driver
reaches Ray Client and the dashboard through an SSH tunnel to the head's public address. Tasks
run on the pool they ask for; pools are added, resized and removed; without the token, Ray
Client and the dashboard's Jobs API refuse. docs/builder.md shows the part of
tests/test_cluster_sealed.py between its markers."""

from __future__ import annotations

import os
import pwd
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import requests
from cluster_helpers import NAMESPACE, fast_client, unique_name
from helpers import authorizing_userdata
from pydantic import SecretStr
from test_local_ssh import make_key
from test_locked_head import refused_job
from test_token_auth import _ssh_transports

from prefect_raydog import ClusterSpec, HostKeys, RayDogCluster, RayTunnels, SSHLogin
from prefect_raydog.cluster import wait_for_ray_nodes
from prefect_raydog.cluster.client import wait_until_listening
from prefect_raydog.local import LocalPlatform
from prefect_raydog.spec import LOCAL_IMAGE_VENV

pytestmark = [pytest.mark.ray, pytest.mark.system_packages("openssh-server")]

# The nodes run what Ray Client sends them; they cannot import this module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def local_platform() -> Iterator[LocalPlatform]:
    with LocalPlatform(firewall=True) as platform:
        yield platform


def _spec(key: Path) -> ClusterSpec:
    """Two one-node pools of sealed nodes, each offering its own resource (so where a task runs
    is decided, not hoped for); every node authorizes `key`; the head's dashboard is on, as
    head.sh has it on YellowDog."""
    spec = ClusterSpec.for_local_platform(unique_name("sealed"), NAMESPACE, pool_sizes=[1, 1],
                                          workers_to_join=2, sealed=True)
    userdata = authorizing_userdata(make_key(key))
    head = spec.head.model_copy(update={"userdata": userdata, "environment": {
        **spec.head.environment, "RAY_INCLUDE_DASHBOARD": "true"}})
    pools = [pool.model_copy(update={"userdata": userdata, "environment": {
        **pool.environment, "RAY_RESOURCES": f'{{"pool-{n}": 100}}'}})
        for n, pool in enumerate(spec.worker_pools)]
    return spec.model_copy(update={"head": head, "worker_pools": pools})


@ray.remote(num_cpus=1)
def where() -> tuple[str, int, str]:
    """The node's address, and the user and Python the task ran with there."""
    return ray.util.get_node_ip_address(), os.getuid(), sys.prefix


def test_a_sealed_cluster_is_reached_over_ssh_alone_and_locked_with_its_own_token(
        platform: LocalPlatform, tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    spec = _spec(key)
    client = fast_client(platform)
    # --8<-- [start:locked]
    host_keys = HostKeys(platform.ssh_known_hosts)  # the nodes' host public key
    login = SSHLogin("yd-agent", SecretStr(key.read_text()), host_keys=host_keys)
    with RayDogCluster(spec, client, ssh=login) as cluster:
        head = cluster.head_node_public_ip or cluster.head_node_private_ip
        with RayTunnels(head, "yd-agent", private_key_file=key,
                        host_keys=host_keys) as tunnels:
            ray.init(tunnels.ray_client_address, **cluster.ray_client_kwargs())
            # --8<-- [end:locked]
            try:
                wait_for_ray_nodes(3, timeout=120)
                on_pool = [where.options(resources={f"pool-{n}": 1}) for n in range(2)]
                ran = {n: set(ray.get([on_pool[n].remote() for _ in range(3)])) for n in range(2)}
                nodes = {resource: node["NodeManagerAddress"] for node in ray.nodes()
                         if node["Alive"] for resource in node["Resources"]
                         if resource.startswith("pool-")}
                jobs = _jobs_api(tunnels.dashboard_url, cluster.ray_client_kwargs())
                # A pool added later gets the token through the head too, and its nodes join.
                late = spec.worker_pools[0].model_copy(update={"name": "late", "max_count": 2})
                pool_id = cluster.add_worker_pool(late)
                wait_for_ray_nodes(4, timeout=120)
                cluster.resize_worker_pool("late", 2)
                wait_for_ray_nodes(5, timeout=120)
                report = cluster.remove_worker_pool(pool_id)
            finally:
                ray.shutdown()
            refused = refused_job(tunnels.ray_client_address)
        direct = wait_until_listening(cluster.head_node_private_ip, 10001, timeout=0)
    agent = pwd.getpwnam("yd-agent").pw_uid
    assert ran == {n: {(nodes[f"pool-{n}"], agent, LOCAL_IMAGE_VENV)} for n in range(2)}
    assert nodes["pool-0"] != nodes["pool-1"]
    assert cluster.head_node_private_ip not in nodes.values()
    assert pool_id in " ".join(report.ended)
    assert jobs == {"submit without the token": 401, "submit with another token": 403,
                    "submitted jobs, as listed with the token": []}
    assert refused.returncode != 0 and "answer" not in refused.stdout
    assert not direct, "the firewall lets this machine reach the head at SSH alone"
    assert not _ssh_transports()


def _jobs_api(dashboard_url: str, client_kwargs: dict) -> dict[str, object]:
    """What the dashboard's Jobs API (through the tunnel) answers a job submission without the
    cluster's token and with a wrong one, and then, with the token, which submitted jobs it holds
    (the Ray Client's own driver is listed too, with no submission id)."""
    (_, bearer), = client_kwargs["_metadata"]
    jobs, job = f"{dashboard_url}/api/jobs/", {"entrypoint": "touch /tmp/submitted"}
    return {
        "submit without the token": requests.post(jobs, json=job, timeout=30).status_code,
        "submit with another token": requests.post(
            jobs, json=job, headers={"Authorization": f"Bearer {'0' * 64}"}, timeout=30
        ).status_code,
        "submitted jobs, as listed with the token": [
            job for job in requests.get(jobs, headers={"Authorization": bearer}, timeout=30).json()
            if job["submission_id"]],
    }
