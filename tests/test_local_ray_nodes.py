"""Process nodes of the local platform running the local RayDog scripts unchanged form one Ray
cluster that a driver on the host reaches with Ray Client; aborting one worker's task stops that
node only."""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import assert_nothing_left, wait_for
from helpers import free_port
from process_nodes import Pools, process_pools
from yellowdog_client.model import NodeSearch, TaskStatus

from prefect_raydog import scripts
from prefect_raydog.local import LocalPlatform
from prefect_raydog.spec import LOCAL_NODE_ENVIRONMENT

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray


@pytest.fixture(params=["bridge", "loopback"])
def pools(request: pytest.FixtureRequest) -> Iterator[Pools]:
    """Process pools on the session's platform (bridge nodes where root), or on a platform of
    its own whose nodes share the host's loopback network."""
    if request.param == "bridge":
        platform = request.getfixturevalue("platform")
        if platform.host_address == "127.0.0.1":
            pytest.skip("the session's platform has no bridge here")
        with process_pools(platform, abort_grace_s=10) as workspace:
            yield workspace
        return
    with LocalPlatform(network="loopback") as platform:
        with process_pools(platform, abort_grace_s=10) as workspace:
            yield workspace
        assert_nothing_left(platform)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def connect(address: str, attempts: int = 3) -> None:
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address, logging_level="ERROR")
            return
        except ConnectionError:
            if attempt == attempts:
                raise
            time.sleep(2)


def alive_nodes() -> list[dict]:
    return [node for node in ray.nodes() if node["Alive"]]


@ray.remote(num_cpus=1)
def hostname() -> str:
    time.sleep(0.05)
    return socket.gethostname()


def test_head_and_two_workers_form_one_cluster_and_one_worker_stops_alone(pools: Pools) -> None:
    started = time.monotonic()
    head_pool, worker_pool = pools.provision(1, "rayhead"), pools.provision(2, "rayworker")
    pools.wait_idle(head_pool)
    environment = {**LOCAL_NODE_ENVIRONMENT, "RAYDOG_VENV": sys.prefix}
    client_port = 10001
    if pools.platform.host_address == "127.0.0.1":
        client_port = free_port()
        environment.update(RAY_NODE_IP_ARGS="--node-ip-address=127.0.0.1",
                           RAY_HEAD_PORT=str(free_port()), RAY_CLIENT_PORT=str(client_port))
    head_task = pools.run("rayhead", [scripts.load("head")], environment)[0]
    pools.wait_task(head_task.id, TaskStatus.EXECUTING)
    executing = time.monotonic()
    head = pools.client.worker_pool_client.find_nodes(NodeSearch(workerPoolId=head_pool))[0]
    head_ip = head.details.privateIpAddress
    pools.wait_idle(worker_pool)
    worker_tasks = pools.run("rayworker", [scripts.load("worker")] * 2, {
        **environment, "RAY_HEAD_IP": head_ip, "RAY_RESOURCES": json.dumps({"local-pool": 1})})
    wait_for(lambda: port_open(head_ip, client_port), 60, 0.2, "the head's Ray Client port")
    try:
        connect(f"ray://{head_ip}:{client_port}")
        connected = time.monotonic()
        wait_for(lambda: len(alive_nodes()) == 3, 60, 0.5, "three live Ray nodes")
        workers = {node["NodeManagerHostname"] for node in alive_nodes()
                   if node["Resources"].get("local-pool")}
        assert len(workers) == 2
        assert set(ray.get([hostname.remote() for _ in range(20)])) <= workers

        aborting = time.monotonic()
        pools.client.work_client.cancel_task_by_id(worker_tasks[0].id, True)
        pools.wait_task(worker_tasks[0].id, TaskStatus.ABORTED)
        aborted = time.monotonic()
        wait_for(lambda: len(alive_nodes()) == 2, 30, 0.5, "the aborted worker to leave")
        survivors = ray.get([hostname.remote() for _ in range(10)])
        assert len(set(survivors)) == 1 and set(survivors) < workers
        for task in (head_task, worker_tasks[1]):
            assert pools.client.work_client.get_task_by_id(task.id).status == \
                TaskStatus.EXECUTING
    finally:
        ray.shutdown()
    print(f"\nhead EXECUTING -> Ray Client connected: {connected - executing:.1f} s; "
          f"worker abort -> its tree gone: {aborted - aborting:.1f} s; "
          f"provision -> cluster of 3 used: {time.monotonic() - started:.1f} s")
