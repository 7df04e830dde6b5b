"""RayDogTaskRunner paths that decide whether anything leaks: a cluster that fails to provision,
a Prefect API the nodes could not reach, worker nodes whose Ray never joins, a cluster kept for a
flow retry that never comes, a head reached through an SSH tunnel, and an address that nothing
answers at. Faults are injected in the
local platform or in the nodes' task scripts; each cluster is a head and one worker node."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from datetime import timedelta
from urllib.parse import urlsplit

import paramiko
import pytest
import ray
from conftest import assert_nothing_left, checked_use, wait_for
from helpers import head_ips, public_ips, tcp_listeners, what_is_live
from prefect import flow, task

from prefect_raydog.blocks import RayDogClusterConfig
from prefect_raydog.errors import ClusterBuildError, NodeTaskFailed
from prefect_raydog.local import LocalPlatform
from prefect_raydog.runner import parking
from prefect_raydog.task_runners import RayDogTaskRunner

pytestmark = pytest.mark.ray
BLOCK = "local-failures-cluster"
NEVER_JOINS_BLOCK = "local-never-joins-cluster"
TUNNEL_BLOCK = "local-tunnel-cluster"
# A worker node that boots and runs its task, but whose Ray never starts, so never joins.
NEVER_JOINS = "exec sleep 600\n"
# A head whose task runs (so the build returns), then ends before its Ray ever listens.
HEAD_DIES = "sleep 10\nexit 3\n"
HEAD_DIES_BLOCK = "local-head-dies-cluster"
# A worker node whose task runs, so the build returns, then ends before its Ray node joins (as
# when Ray refuses it: "Version mismatch").
WORKER_FAILS = "sleep 5\nexit 3\n"
WORKER_FAILS_BLOCK = "local-worker-fails-cluster"


def _config(platform, **update) -> RayDogClusterConfig:
    config = RayDogClusterConfig.local(
        platform.url, platform.key_id, platform.key_secret, worker_nodes=1
    )
    return config.model_copy(update=update)


@pytest.fixture(scope="module")
def saved_config(prefect_api, local_platform):
    config = _config(local_platform)
    config.save(BLOCK, overwrite=True)
    _config(local_platform, build_timeout=timedelta(seconds=20), worker_pools=[
        config.worker_pools[0].model_copy(update={"script": NEVER_JOINS})
    ]).save(NEVER_JOINS_BLOCK, overwrite=True)
    _config(local_platform, workers_to_join=0,
            head=config.head.model_copy(update={"script": HEAD_DIES})).save(HEAD_DIES_BLOCK,
                                                                            overwrite=True)
    _config(local_platform, build_timeout=timedelta(seconds=60), worker_pools=[
        config.worker_pools[0].model_copy(update={"script": WORKER_FAILS})
    ]).save(WORKER_FAILS_BLOCK, overwrite=True)


@pytest.fixture(scope="module")
def firewalled(prefect_api):
    """A platform whose nodes sit behind a cloud's firewall (they reach this machine at the API
    alone, and it reaches them at SSH alone), and a block that reaches its heads over SSH with
    a key made for each cluster (no key given: the nodes' userdata authorizes it)."""
    with LocalPlatform(firewall=True) as platform:
        _config(platform, ssh_tunnel=True, ssh_known_hosts=platform.ssh_known_hosts,
                ).save(TUNNEL_BLOCK, overwrite=True)
        yield platform


@task
def add_one(x: int) -> int:
    return x + 1


@task
def node_ip(x: int) -> tuple[int, str]:
    return x + 1, ray.util.get_node_ip_address()


def _ssh_peers() -> list[str]:
    """The SSH servers this process holds a connection to (the tunnel's, through paramiko)."""
    return [thread.getpeername()[0] for thread in threading.enumerate()
            if isinstance(thread, paramiko.Transport) and thread.is_active()]


def _ssh_processes() -> list[str]:
    """Processes started under this one (the platform's node processes included) that are SSH
    clients or servers."""
    from process_nodes import Footprint  # here: a flow that calls this travels to the nodes

    return [name for name in Footprint.of(os.getpid()).names() if name.startswith("ssh")]


def test_a_provisioning_failure_tears_down_then_later_submits_say_the_cluster_failed(
    saved_config, platform
):
    platform.faults.add("503", "/work/taskGroups/*/tasks", "POST", count=1000)
    runner = RayDogTaskRunner(cluster=BLOCK, api_relay_address=platform.host_address)

    @flow(task_runner=runner)
    def doomed() -> tuple[BaseException, BaseException]:
        with pytest.raises(ClusterBuildError) as first:
            add_one.submit(1)
        platform.clear_faults()
        assert_nothing_left(platform)
        with pytest.raises(RuntimeError, match="The Ray cluster could not start") as later:
            add_one.submit(2)
        return first.value, later.value

    first, later = doomed()
    assert platform.api_calls().get("POST /work/requirements", 0) == 1
    assert str(first) in str(later)


def test_a_loopback_api_url_is_refused_before_anything_is_provisioned(saved_config, platform):
    @flow(task_runner=RayDogTaskRunner(cluster=BLOCK))
    def unreachable_api() -> int:
        return add_one.submit(1).result()

    with pytest.raises(RuntimeError, match="is on loopback, which the cluster's nodes cannot"):
        unreachable_api()
    assert platform.api_calls().get("POST /work/requirements", 0) == 0


def test_worker_nodes_whose_ray_never_joins_fail_the_flow_naming_the_timeout_and_leave_nothing(
    saved_config, platform
):
    runner = RayDogTaskRunner(cluster=NEVER_JOINS_BLOCK, api_relay_address=platform.host_address)

    @flow(task_runner=runner)
    def stuck() -> str:
        with pytest.raises(TimeoutError) as raised:
            add_one.submit(1)
        assert not ray.is_initialized()
        assert_nothing_left(platform)
        with pytest.raises(RuntimeError, match="The Ray cluster could not start: Only 0 of 1"):
            add_one.submit(2)
        return str(raised.value)

    message = stuck()
    assert re.fullmatch(r"Only 0 of 1 Ray worker nodes joined cluster local-\w+ within its "
                        r"build_timeout \(20 s\); the cluster is torn down\.", message), message
    assert platform.api_calls().get("POST /work/requirements", 0) == 1


@pytest.mark.parametrize(("block", "message"), [
    pytest.param(HEAD_DIES_BLOCK, r"The head node's task ended FAILED \(.*exit code 3.*\) before "
                 r"Ray Client could connect to ray://", id="head"),
    pytest.param(WORKER_FAILS_BLOCK, r"The task of worker node \S+ of cluster local-\w+ ended "
                 r"FAILED \(.*exit code 3.*\) before its Ray node joined", id="worker"),
])
def test_a_node_whose_task_ends_before_the_runner_uses_it_fails_the_flow_saying_so(
    saved_config, platform, block, message
):
    """Not Ray Client's 120 s of connection attempts, nor the build timeout's wait for a worker
    that will never join: the runner asks the API how the node's task is."""
    runner = RayDogTaskRunner(cluster=block, api_relay_address=platform.host_address)

    @flow(task_runner=runner)
    def short_of_a_node() -> int:
        return add_one.submit(1).result()

    with pytest.raises(NodeTaskFailed) as raised:
        short_of_a_node()
    assert re.match(message, str(raised.value)), raised.value
    assert_nothing_left(platform)


def test_a_cluster_kept_for_a_retry_that_never_comes_is_torn_down_when_it_expires(
    saved_config, platform, monkeypatch
):
    # Long enough for the flow run to end after its runner parked the cluster, on a loaded machine.
    monkeypatch.setattr(parking, "PARK_MARGIN_S", 30.0)
    runner = RayDogTaskRunner(cluster=BLOCK, api_relay_address=platform.host_address)

    # The flow's own runner submits nothing and, lazy, attaches to nothing (an eager one would
    # try to connect in the background until the flow's exit); it stands in the flow's context,
    # which tasks carry to the nodes, where a thread pool's locks would not pickle.
    @flow(task_runner=RayDogTaskRunner(address="ray://127.0.0.1:1", provision="lazy"))
    def first_attempt():
        # The flow run is still running when the runner exits, as between a failed attempt and
        # its retry: the runner keeps the cluster for a retry, which here never comes.
        with runner:
            value, ip = runner.submit(node_ip, {"x": 1}).result()
            heads = head_ips()
        return value, ip, heads, runner._session_key() in parking.PARKED

    # The flow keeps no reference to the platform: its context travels to the nodes with tasks.
    value, ip, heads, parked = first_attempt()
    live = what_is_live(platform)
    assert value == 2 and ip not in heads
    assert parked
    assert live["workRequirements"] and live["workerPools"] and live["processes"]
    wait_for(lambda: not what_is_live(platform), timeout=90, interval=0.2,
             what="the parked cluster to expire and be torn down")
    assert runner._session_key() not in parking.PARKED
    assert not ray.is_initialized()


def test_an_eager_attach_to_an_unreachable_address_gives_up_when_the_flow_run_ends(
    prefect_api, caplog
):
    # Nothing listens on port 1: the background attach would wait out its connect timeout
    # (minutes) and hold the flow's exit that long, unless the flow run's end stops it.
    assert not ray.is_initialized()

    @flow(task_runner=RayDogTaskRunner(address="ray://127.0.0.1:1"))
    def submits_nothing():
        return 1

    with caplog.at_level(logging.WARNING, logger="prefect_raydog.runner.session"):
        assert submits_nothing() == 1
    assert ("The Ray cluster could not start: The flow run ended while the Ray cluster was "
            "starting.") in caplog.messages
    assert not ray.is_initialized()


@task
def node_ip_and_api_url(x: int) -> tuple[int, str, str]:
    from prefect.settings import PREFECT_API_URL

    return x + 1, ray.util.get_node_ip_address(), PREFECT_API_URL.value()


@pytest.mark.system_packages("openssh-server")
def test_a_runner_reaching_the_head_through_an_ssh_tunnel_runs_tasks_on_worker_nodes(
    firewalled, prefect_api
):
    """The nodes sit behind a firewall, and the flow's Prefect API is on this machine's
    loopback with no relay asked for: the runner reaches the head over SSH, the nodes reach the
    API through the same SSH connection (a reverse forward and the head's door), and nothing
    new listens here beyond loopback."""
    before = tcp_listeners(os.getpid())

    @flow(task_runner=RayDogTaskRunner(cluster=TUNNEL_BLOCK))
    def tunnelled():
        results = node_ip_and_api_url.map(range(4)).result()
        for head in head_ips() | set(_ssh_peers()):  # Ray Client's port: the firewall drops it
            with pytest.raises(TimeoutError):
                socket.create_connection((head, 10001), timeout=2)
        opened = tcp_listeners(os.getpid()) - before
        return results, head_ips(), _ssh_peers(), _ssh_processes(), opened

    with checked_use(firewalled) as platform:
        results, heads, peers, ssh_processes, opened = tunnelled()
    head_public_ips = public_ips(platform, heads)
    assert len(head_public_ips) == 1 and not head_public_ips & heads
    assert set(peers) == head_public_ips  # SSH to the head's public address
    assert [value for value, _, _ in results] == [1, 2, 3, 4]
    ips = {ip for _, ip, _ in results}
    assert len(ips) == 1 and not ips & heads
    api_hosts = {urlsplit(url).hostname for _, _, url in results}
    assert api_hosts == heads, f"the nodes used {api_hosts}, not the head's door"
    assert {urlsplit(url).path for _, _, url in results} == {urlsplit(prefect_api).path}
    assert opened and all(address.startswith("127.0.0.1:") for address in opened), opened
    assert ssh_processes
    assert_nothing_left(platform)
    assert not _ssh_peers() and not _ssh_processes()
    assert not ray.is_initialized()
