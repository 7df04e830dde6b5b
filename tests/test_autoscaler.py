"""The RayDog Autoscaler end to end on the local platform's sealed nodes, behind its firewall (this
machine reaches them at SSH alone, Ray Client included): `ray up` from the example YAML in
`docs/examples`, Ray's own autoscaler on the head node using RayDogNodeProvider, the cluster
locked with a Ray token of its own (refused without it; the head gives it to each worker it
adds), `ray submit`, scale-up and idle scale-down, no secret in any YellowDog document, a flow's
tasks on workers added for it, workers replaced when their machine fails to boot or is killed,
`ray dashboard` reaching the head's loopback dashboard through SSH, and `ray down` leaving
nothing. One cluster serves the tests of this module, in order. docs/autoscaler.md shows the
tunnel and the flow of tests/test_autoscaler.py and tests/autoscaler_helpers.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import ray
import requests
from autoscaler_helpers import RAY, RayCluster, hold_on_three_workers, ray_client
from conftest import assert_nothing_left, wait_for
from helpers import free_port
from prefect import flow, task
from process_nodes import node_networking
from ray.autoscaler.tags import (
    NODE_KIND_HEAD,
    STATUS_UP_TO_DATE,
    TAG_RAY_LAUNCH_CONFIG,
    TAG_RAY_NODE_KIND,
    TAG_RAY_NODE_STATUS,
)
from test_locked_head import ray_job, refused_job
from yellowdog_client.model import (
    InstanceSearch,
    NodeSearch,
    NodeStatus,
    TaskSearch,
    TaskStatus,
    WorkerPoolSearch,
    WorkRequirementSearch,
)

from prefect_raydog.autoscaler import RayDogNodeProvider
from prefect_raydog.forwarding import TcpForwarder
from prefect_raydog.local import LocalPlatform
from prefect_raydog.task_runners import RayDogTaskRunner

pytestmark = [pytest.mark.ray, pytest.mark.system_packages("openssh-server", "rsync")]

RESTARTED_MONITORS_VIEW = """
import json, os, yaml
from prefect_raydog.autoscaler import RayDogNodeProvider
from prefect_raydog.forwarding import TcpForwarder

config = yaml.safe_load(open(os.path.expanduser("~/ray_bootstrap_config.yaml")))
provider = RayDogNodeProvider(config["provider"], config["cluster_name"])
print("VIEW", json.dumps({n: provider.node_tags(n) for n in provider.non_terminated_nodes({})}))
print("KEY", config["provider"]["auth"]["ssh_private_key"])
"""

NEEDS_THREE_CPUS = """
import time
import ray

ray.init(address="auto")  # the head's cluster, never a new local one

@ray.remote(num_cpus=1)
def hold():
    time.sleep(20)
    return ray.get_runtime_context().get_node_id()

print("NODES", len(set(ray.get([hold.remote() for _ in range(3)]))))
"""


# Where the flow test's Prefect API answers the nodes: a port of this machine that the
# firewall lets them reach, standing in for a Prefect server on the internet (Prefect Cloud).
PUBLIC_API_PORT = free_port()


@pytest.fixture(scope="module")
def local_platform() -> Iterator[LocalPlatform]:
    """Sealed nodes behind the firewall, as on a YellowDog account: this machine reaches them
    at SSH alone, and they reach this machine at the API and PUBLIC_API_PORT alone."""
    with LocalPlatform(firewall=True, public_host_ports=(PUBLIC_API_PORT,)) as platform:
        yield platform


@pytest.fixture(scope="module")
def public_prefect_api(local_platform: LocalPlatform, prefect_api: str) -> Iterator[str]:
    """The run's Prefect server, served to the nodes at the public port."""
    target = urlsplit(prefect_api)
    with TcpForwarder(local_platform.host_address, (target.hostname, target.port),
                      port=PUBLIC_API_PORT) as forwarder:
        yield urlunsplit(target._replace(netloc=f"{local_platform.host_address}:{forwarder.port}"))


@pytest.fixture(scope="module")
def cluster(local_platform: LocalPlatform, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[RayCluster]:
    if local_platform.runner is None or local_platform.runner.network.mode != "bridge":
        pytest.fail("the autoscaler tests need process nodes on a bridge (root)")
    bridge = local_platform.runner.network.bridge
    # The head.sh default (the example turns it off to spare a small machine).
    ray_cluster = RayCluster(local_platform, tmp_path_factory.mktemp("autoscaler"),
                             provider__task_environment__RAY_INCLUDE_DASHBOARD="true")
    try:
        ray_cluster.up()
        # `ray up` returns once the head node runs; its task starts Ray a few seconds later.
        wait_for(lambda: "Node status" in ray_cluster.ray(
            "exec", str(ray_cluster.path), "ray status", check=False).stdout,
            120, interval=2.0, what="ray status to answer on the head")
        yield ray_cluster
    finally:
        if _live_requirements(ray_cluster):
            ray_cluster.down()
    assert_nothing_left(local_platform, timeout=60)
    wait_for(lambda: node_networking(bridge) == [], 30, what="the nodes' namespaces to go")


def _live_requirements(cluster: RayCluster) -> list:
    work = cluster.platform.client.work_client
    return [summary for summary in work.get_work_requirements(
        WorkRequirementSearch(namespace=cluster.namespace)).iterate()
        if not summary.status.finished]


def _pools(cluster: RayCluster) -> dict[str, str]:
    """Live pool name -> id in the cluster's namespace."""
    pools = cluster.platform.client.worker_pool_client
    return {pool.name: pool.id for pool in pools.get_worker_pools(
        WorkerPoolSearch(namespace=cluster.namespace)).iterate() if not pool.status.finished}


def _worker_tasks(cluster: RayCluster) -> dict:
    """Every worker task (Ray node) the cluster has had, by id."""
    work = cluster.platform.client.work_client
    (requirement,) = _live_requirements(cluster)
    return {task.id: task for task in work.get_tasks(TaskSearch(
        workRequirementId=requirement.id)).iterate() if task.name.startswith("cpu-")}


def _node_ip(cluster: RayCluster, node_id: str) -> str:
    return cluster.platform.client.worker_pool_client.get_node_by_id(
        node_id).details.privateIpAddress


def _head_ip(cluster: RayCluster) -> str:
    work = cluster.platform.client.work_client
    (requirement,) = _live_requirements(cluster)
    (head,) = [task for task in work.get_tasks(TaskSearch(
        workRequirementId=requirement.id)).iterate()
        if task.name.startswith("head-") and not task.status.finished]
    return _node_ip(cluster, head.nodeId)


def _provider(cluster: RayCluster, monkeypatch: pytest.MonkeyPatch) -> RayDogNodeProvider:
    """The provider as `ray up` on this machine makes it: what it reports to Ray."""
    for name in ("YD_API_URL", "YD_API_KEY_ID", "YD_API_KEY_SECRET", "HOME"):
        monkeypatch.setenv(name, cluster.environment[name])
    config = RayDogNodeProvider.bootstrap_config(cluster.config)
    return RayDogNodeProvider(config["provider"], config["cluster_name"])


def _held_on(gate: object, count: int) -> dict[int, str] | None:
    """Held task index -> the Ray node its latest attempt runs on, once `count` have started."""
    latest = dict(ray.get(gate.seen.remote()))
    return latest if len(latest) >= count else None


def _no_live_workers(cluster: RayCluster) -> bool:
    return not [task for task in _worker_tasks(cluster).values() if not task.status.finished]


def _running_nodes(cluster: RayCluster, pool_id: str) -> int:
    pools = cluster.platform.client.worker_pool_client
    return sum(1 for node in pools.get_nodes(NodeSearch(workerPoolId=pool_id)).iterate()
               if node.status == NodeStatus.RUNNING)


def test_ray_up_makes_one_work_requirement_whose_head_runs_rays_autoscaler(
        cluster: RayCluster) -> None:
    (requirement,) = _live_requirements(cluster)
    assert requirement.name.startswith("raydog-local-") and len(requirement.name) == 21
    cluster_id = requirement.name[-8:]
    assert list(_pools(cluster)) == [f"raydog-local-{cluster_id}-head"]
    # `ray up` returns once the head node runs; its task starts Ray a few seconds later.
    wait_for(lambda: "Node status" in cluster.ray("exec", str(cluster.path), "ray status",
                                                  check=False).stdout,
             120, interval=2.0, what="ray status to answer on the head")
    monitor = cluster.exec("cat /tmp/ray/session_latest/logs/monitor.log")
    assert "prefect_raydog.autoscaler.RayDogNodeProvider" in monitor


def test_the_cluster_is_locked_and_the_head_gives_its_token_to_the_workers_it_adds(
        cluster: RayCluster) -> None:
    with cluster.tunnel() as tunnels:
        refused = refused_job(tunnels.ray_client_address)
        # The task needs a CPU, which only a worker the autoscaler adds for it has.
        accepted = ray_job(tunnels.ray_client_address, RAY_AUTH_MODE="token",
                           RAY_AUTH_TOKEN=cluster.token())
    assert refused.returncode != 0 and "answer" not in refused.stdout
    assert accepted.stdout.split() == ["answer", "42"], accepted.stderr[-3000:]
    assert _worker_tasks(cluster), "a worker node ran it"


def test_a_job_needing_three_cpus_scales_workers_up_then_idle_ones_down(
        cluster: RayCluster, tmp_path: Path) -> None:
    script = tmp_path / "needs_three_cpus.py"
    script.write_text(NEEDS_THREE_CPUS)
    result = cluster.ray("submit", str(cluster.path), str(script), timeout=300)
    assert "NODES 3" in result.stdout

    work = cluster.platform.client.work_client
    (requirement,) = _live_requirements(cluster)
    workers = [task for task in work.get_tasks(TaskSearch(
        workRequirementId=requirement.id)).iterate() if task.name.startswith("cpu-")]
    assert len(workers) >= 3
    pool_id = next(pid for name, pid in _pools(cluster).items() if name.endswith("-cpu"))

    def scaled_down() -> bool:
        return _no_live_workers(cluster) and _running_nodes(cluster, pool_id) == 0

    wait_for(scaled_down, 120, interval=1.0, what="idle workers to be removed, pool to shrink")
    ended = [work.get_task_by_id(task.id).status for task in workers]
    assert all(status == TaskStatus.ABORTED for status in ended), ended


def test_no_secret_in_any_yellowdog_document(cluster: RayCluster) -> None:
    client = cluster.platform.client
    secret = cluster.platform.key_secret
    (requirement,) = _live_requirements(cluster)
    documents = [client.work_client.get_work_requirement_by_id(requirement.id)]
    documents += list(client.work_client.get_tasks(
        TaskSearch(workRequirementId=requirement.id)).iterate())
    for pool_id in _pools(cluster).values():
        pool = client.worker_pool_client.get_worker_pool_by_id(pool_id)
        documents += [pool, client.compute_client.get_compute_requirement_by_id(
            pool.computeRequirementId)]
    text = json.dumps([repr(document) for document in documents])
    assert cluster.platform.key_id in cluster.exec("cat ~/.raydog/credentials.json")
    assert secret not in text
    assert "-rw-------" in cluster.exec("ls -l ~/.raydog/credentials.json")
    token = cluster.token()
    assert "RAYDOG_TOKEN_FILE" in text and token not in text
    assert [output for output in cluster.up_outputs if token in output] == []
    assert "-rw-------" in cluster.exec("ls -l ~/.ray/auth_token")


def test_a_second_ray_up_reattaches_to_the_running_cluster(cluster: RayCluster) -> None:
    (before,) = _live_requirements(cluster)
    result = cluster.up()
    assert "No head node found" not in result.stdout + result.stderr
    (after,) = _live_requirements(cluster)
    assert after.id == before.id


def test_ray_dashboard_reaches_the_heads_loopback_dashboard_which_wants_the_token(
        cluster: RayCluster) -> None:
    # On the head's loopback only: not even the head's own private address serves it.
    assert _head_accepts(cluster, "127.0.0.1", 8265)
    assert not _head_accepts(cluster, _head_ip(cluster), 8265)
    port = free_port()
    tunnel = subprocess.Popen([RAY, "dashboard", "--port", str(port), str(cluster.path)],
                              env=cluster.environment, cwd=cluster.directory,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    jobs = f"http://127.0.0.1:{port}/api/jobs/"
    try:
        wait_for(lambda: _answers(jobs), 60, interval=0.5, what="ray dashboard's tunnel")
        assert requests.get(jobs, timeout=30).status_code == 401
        with_token = requests.get(
            jobs, headers={"Authorization": f"Bearer {cluster.token()}"}, timeout=30)
        assert with_token.status_code == 200 and isinstance(with_token.json(), list)
    finally:
        os.killpg(tunnel.pid, signal.SIGTERM)
        tunnel.wait(30)


def _head_accepts(cluster: RayCluster, host: str, port: int) -> bool:
    """Whether a connection from the head node to `host`:`port` is accepted."""
    probe = (f"import socket; socket.create_connection(('{host}', {port}), 5); "
             "print('ACCEPTED')")
    return "ACCEPTED" in cluster.ray("exec", str(cluster.path), f'python -c "{probe}"',
                                     check=False).stdout


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=5)
    except requests.ConnectionError:
        return False
    return True


def test_a_restarted_monitor_finds_the_same_nodes_and_tags(
        cluster: RayCluster, tmp_path: Path) -> None:
    script = tmp_path / "view.py"
    script.write_text(RESTARTED_MONITORS_VIEW)
    output = cluster.ray("submit", str(cluster.path), str(script)).stdout
    view = json.loads(output.split("VIEW ", 1)[1].splitlines()[0])
    # The head's provider logs in to the workers with the key `ray up` copied to the head.
    assert output.split("KEY ", 1)[1].splitlines()[0] == "~/ray_bootstrap_key.pem"
    work = cluster.platform.client.work_client
    (requirement,) = _live_requirements(cluster)
    live_tasks = [task for task in work.get_tasks(TaskSearch(
        workRequirementId=requirement.id)).iterate() if not task.status.finished]
    assert sorted(view) == sorted(task.id for task in live_tasks), (view, live_tasks)
    # The head's tags, whatever workers an earlier test left running.
    (head,) = [task.id for task in live_tasks if task.name.startswith("head-")]
    tags = view[head]
    # Written by `ray up` on this machine, read by a new provider on the head.
    assert tags[TAG_RAY_NODE_KIND] == NODE_KIND_HEAD
    assert tags[TAG_RAY_NODE_STATUS] == STATUS_UP_TO_DATE and tags[TAG_RAY_LAUNCH_CONFIG]


@task
def where_it_runs(x: int) -> tuple[str, str]:
    time.sleep(1)
    return os.environ["YD_TASK_ID"], ray.util.get_node_ip_address()


def test_a_flow_runs_its_tasks_on_workers_the_autoscaler_adds_for_it(
        cluster: RayCluster, public_prefect_api: str) -> None:
    # Workers an earlier test started are removed once idle; those the flow runs on are new.
    wait_for(lambda: _no_live_workers(cluster), 120, interval=1.0, what="no worker to be left")
    token = cluster.token()
    with cluster.tunnel() as tunnels:
        # --8<-- [start:flow]
        runner = RayDogTaskRunner(
            address=tunnels.ray_client_address,  # Ray Client through SSH
            node_api_url=public_prefect_api,  # a Prefect API that the nodes reach
            init_kwargs={"_metadata": [("authorization", f"Bearer {token}")]},
        )

        @flow(task_runner=runner)
        def on_the_cluster() -> list[tuple[str, str]]:
            return where_it_runs.map(range(2)).result()
        # --8<-- [end:flow]

        ran_on = on_the_cluster()
    workers = _worker_tasks(cluster)
    assert ran_on and all(task_id in workers for task_id, _ in ran_on), (ran_on, list(workers))
    for task_id, ip in ran_on:
        assert ip == _node_ip(cluster, workers[task_id].nodeId)


def _failed_boots(cluster: RayCluster) -> int:
    """Machines of the cluster's pools, live or ended, that ended without ever getting an
    address."""
    clients = cluster.platform.client
    pools = [clients.worker_pool_client.get_worker_pool_by_id(summary.id) for summary in
             clients.worker_pool_client.get_worker_pools(
                 WorkerPoolSearch(namespace=cluster.namespace)).iterate()]
    return sum(1 for pool in pools for instance in clients.compute_client.get_instances(
        InstanceSearch(computeRequirementId=pool.computeRequirementId)).iterate()
        if instance.status.name == "TERMINATED" and not instance.privateIpAddress)


def test_a_worker_whose_machine_fails_to_boot_still_joins_on_a_replacement(
        cluster: RayCluster) -> None:
    # The next machine to boot, in whichever pool: an idle pool may have ended since the last
    # test, and the autoscaler then provisions a new one.
    failed_before = _failed_boots(cluster)
    cluster.platform.fail_node_boot(1)
    try:
        with cluster.tunnel() as tunnels, ray_client(tunnels.ray_client_address,
                                                     cluster.token()) as gate:
            refs = hold_on_three_workers(gate)
            started = wait_for(lambda: _held_on(gate, 3), 240, interval=1.0,
                               what="three worker nodes to run the held tasks")
            ray.get(gate.open.remote())
            ran_on = ray.get(refs, timeout=120)
    finally:
        cluster.platform.clear_faults()
    assert _failed_boots(cluster) == failed_before + 1
    assert sorted(ran_on) == sorted(started.values()) and len(set(ran_on)) == 3
    workers = _worker_tasks(cluster)
    assert all(workers[node].status == TaskStatus.EXECUTING for node in ran_on)


def test_a_killed_worker_is_reported_terminated_and_replaced_while_demand_remains(
        cluster: RayCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    platform = cluster.platform
    with cluster.tunnel() as tunnels, ray_client(tunnels.ray_client_address,
                                                 cluster.token()) as gate:
        refs = hold_on_three_workers(gate)
        victim = wait_for(lambda: _held_on(gate, 3), 240, interval=1.0,
                          what="three worker nodes to run the held tasks")[0]
        platform.kill_node(_worker_tasks(cluster)[victim].nodeId)

        def moved() -> str | None:
            node = _held_on(gate, 3)[0]
            return node if node != victim else None

        replacement = wait_for(moved, 240, interval=1.0,
                               what="the killed node's task to run again on a new node")
        provider = _provider(cluster, monkeypatch)
        live = provider.non_terminated_nodes({})
        assert victim not in live and replacement in live
        assert provider.is_terminated(victim) and provider.is_running(replacement)
        ray.get(gate.open.remote())
        ran_on = ray.get(refs, timeout=120)
    assert victim not in ran_on and replacement in ran_on
    killed = platform.client.work_client.get_task_by_id(victim)
    assert killed.status == TaskStatus.FAILED
    assert killed.errors[0].errorType == "ALLOCATION_LOST"


def test_ray_down_leaves_nothing(cluster: RayCluster) -> None:
    cluster.down()
    assert not _live_requirements(cluster)
    deadline = time.monotonic() + 60
    while _pools(cluster) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _pools(cluster) == {}
