"""RayDogTaskRunner provisioning a real cluster on the local platform, through the real SDK,
with a real Prefect API: the `local` preset's sealed nodes (only their image, tasks as
`yd-agent`) behind the platform's firewall, reached over SSH, the nodes reaching the API
through the same connection."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
from conftest import wait_for
from flow_scripts import LOCAL_PRESET_FLOW, LONG_FLOW
from helpers import head_ips, sealed_preset
from prefect import flow, get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.runtime import flow_run
from prefect.settings import PREFECT_API_URL
from process_nodes import Footprint

from prefect_raydog.blocks import RayDogClusterConfig
from prefect_raydog.local import LocalPlatform
from prefect_raydog.runner.placement import POOL_RESOURCE_PREFIX
from prefect_raydog.spec import LOCAL_IMAGE_VENV
from prefect_raydog.task_runners import RayDogTaskRunner, placement

pytestmark = pytest.mark.ray
BLOCK = "local-test-cluster"
# For tests that need no second worker: each node costs the 2-core machine seconds of CPU.
ONE_WORKER_BLOCK = "local-test-cluster-1"


@pytest.fixture(scope="module")
def local_platform():
    """Nodes behind a cloud's firewall: this module's flows reach them over SSH alone."""
    with LocalPlatform(firewall=True) as platform:
        yield platform


@pytest.fixture(scope="module")
def saved_config(prefect_api, local_platform):
    config = sealed_preset(local_platform)
    config.save(BLOCK, overwrite=True)
    sealed_preset(local_platform, worker_nodes=1).save(ONE_WORKER_BLOCK, overwrite=True)
    return config


@pytest.fixture
def runner(saved_config, platform):
    return RayDogTaskRunner(cluster=BLOCK)


@pytest.fixture
def one_worker_runner(saved_config, platform):
    return RayDogTaskRunner(cluster=ONE_WORKER_BLOCK)


@task
def node_ip(x: int) -> tuple[int, str]:
    get_run_logger().info("task %d says hello", x)
    return x + 1, ray.util.get_node_ip_address()


class NodesSeen:
    """The worker nodes the flow's tasks have run on so far (a Ray actor)."""

    def __init__(self) -> None:
        self.ips: set[str] = set()

    def add(self, ip: str) -> int:
        self.ips.add(ip)
        return len(self.ips)


@task
def node_ip_on_both_workers(x: int) -> tuple[int, str]:
    """`node_ip`, whose first run holds its node's one CPU until a task has run on another node:
    without it, a worker node that Ray gives every quick task first can run them all while the
    other still imports Prefect."""
    ip = ray.util.get_node_ip_address()
    seen = ray.remote(num_cpus=0)(NodesSeen).options(
        name="nodes-seen", get_if_exists=True, lifetime="detached").remote()
    give_up = time.monotonic() + 120  # then the test's own assertion says what went wrong
    while ray.get(seen.add.remote(ip)) < 2 and x == 0 and time.monotonic() < give_up:
        time.sleep(0.05)
    return node_ip.fn(x)


def test_one_flow_run_maps_nests_and_calls_a_subflow_on_its_one_cluster(runner, platform):
    """200 mapped tasks on both worker nodes with their logs in the API, a task that submits
    another from its worker, and a subflow: all on the cluster provisioned once for the run,
    whose secret reaches no node."""
    @flow(task_runner=runner)
    def child():
        return node_environment.submit().result()

    @flow(task_runner=runner)
    def parent():
        results = node_ip_on_both_workers.map(range(200)).result()
        nested = submits_from_its_worker.submit(1).result()
        return results, nested, child(), head_ips(), flow_run.id, node_user.submit().result()

    results, ((inner_value, inner_ip), outer_ip), environment, heads, flow_run_id, user = parent()
    assert user == ("yd-agent", LOCAL_IMAGE_VENV)  # a sealed node's, from its image
    assert [value for value, _ in results] == [x + 1 for x in range(200)]
    ips = {ip for _, ip in results}
    assert len(ips) == 2
    assert not ips & heads
    assert inner_value == 2
    assert inner_ip not in heads and outer_ip not in heads
    assert platform.api_calls().get("POST /work/requirements", 0) == 1
    assert saved_secret() not in str(environment)
    assert environment.get("PREFECT_API_URL", "").find("127.0.0.1") == -1

    # The subflow's own run aside.
    expected = {"node_ip_on_both_workers": 200, "node_ip": 1, "submits_from_its_worker": 1}
    wait_for(lambda: expected.items() <= _completed_task_names(flow_run_id).items(),
             timeout=60, what="Completed states of every task run in the API")
    logs = wait_for(lambda: _hello_logs(flow_run_id, 201), timeout=30, what="task logs")
    assert saved_secret() not in "".join(log.message for log in logs)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
    summary = [a for a in artifacts
               if a.key == "raydog-cluster" and str(a.flow_run_id) == flow_run_id]
    assert summary and "node-hours" in summary[0].data
    assert saved_secret() not in summary[0].data
    heading = summary[0].data.splitlines()[0]  # the cluster is named for the flow run
    assert heading.endswith(f"-{flow_run_id.replace('-', '')[:8]}`"), heading
    _assert_start_logged_as_it_happened(logs)


def _assert_start_logged_as_it_happened(logs) -> None:
    """The eager start's lines in the flow run's log carry the times they were logged: the
    workers joined as many seconds after the provisioning line as the joined line says."""
    provisioning = next(log for log in logs if log.message.startswith("Provisioning Ray cluster"))
    joined = next(log for log in logs if "Ray worker node(s) joined after" in log.message)
    joined_s = float(joined.message.rsplit("after ", 1)[1].split(" s")[0])
    waited = (joined.timestamp - provisioning.timestamp).total_seconds()
    assert waited >= joined_s / 2 > 0, (waited, joined.message)


@task
def ray_namespace() -> str:
    return ray.get_runtime_context().namespace


def test_a_subflow_with_its_own_runner_runs_on_the_cluster_its_parent_provisioned(
        saved_config, platform):
    """One Ray connection per process: the subflow's `RayDogTaskRunner()` runs on the parent's
    cluster and connection (its Ray namespace), which stays usable after the subflow ends."""
    @flow(task_runner=RayDogTaskRunner())
    def child():
        return ray_namespace.submit().result()

    @flow(task_runner=RayDogTaskRunner(cluster=ONE_WORKER_BLOCK,
                                       init_kwargs={"namespace": "nested-parent"}))
    def parent():
        before = ray_namespace.submit().result()
        return before, child(), ray_namespace.submit().result()

    assert parent() == ("nested-parent",) * 3
    assert platform.api_calls().get("POST /work/requirements", 0) == 1


def _completed_task_names(flow_run_id) -> Counter:
    """How many of the flow run's task runs have a Completed state in the API, by task name."""
    with get_client(sync_client=True) as client:
        runs = []
        while len(runs) % 200 == 0:
            page = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                limit=200, offset=len(runs),
            )
            runs += page
            if not page:
                break
    return Counter(run.name.split("-")[0] for run in runs if run.state.is_completed())


def _hello_logs(flow_run_id, count):
    with get_client(sync_client=True) as client:
        logs, offset = [], 0
        while True:
            page = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                limit=200, offset=offset,
            )
            logs += page
            offset += len(page)
            if len(page) < 200:
                break
    hello = [log for log in logs if "says hello" in log.message]
    return logs if len(hello) >= count else None


def saved_secret() -> str:
    return RayDogClusterConfig.load(BLOCK).credentials.api_key_secret.get_secret_value()


def test_failing_task_fails_the_flow_and_tears_down(one_worker_runner):
    @task
    def boom():
        raise RuntimeError("boom on a node")

    @flow(task_runner=one_worker_runner)
    def failing():
        return boom.submit().result()

    with pytest.raises(RuntimeError, match="boom on a node"):
        failing()


@task
def node_user() -> tuple[str, str]:
    import getpass

    return getpass.getuser(), sys.prefix


@task
def node_environment() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_a_retried_flow_run_reuses_its_cluster(one_worker_runner, platform):
    attempts = []

    @flow(task_runner=one_worker_runner, retries=1)
    def flaky():
        value = node_ip.submit(1).result()[0]
        attempts.append(value)
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")
        return value

    assert flaky() == 2
    assert len(attempts) == 2
    assert platform.api_calls().get("POST /work/requirements", 0) == 1


@task
def submits_from_its_worker(x: int) -> tuple[tuple[int, str], str]:
    return node_ip.submit(x).result(), ray.util.get_node_ip_address()


def test_runner_pickles_without_the_secret(runner):
    assert saved_secret().encode() not in pickle.dumps(runner)


@pytest.fixture
def two_pool_runner(prefect_api, local_platform, platform):
    config = sealed_preset(local_platform)
    pool = config.worker_pools[0]
    config.worker_pools = [pool.model_copy(update={"name": n, "count": 1}) for n in ("a", "b")]
    config.save(f"{BLOCK}-2", overwrite=True)
    return RayDogTaskRunner(cluster=f"{BLOCK}-2")


def _pool_ips() -> dict[str, str]:
    return {resource.removeprefix(POOL_RESOURCE_PREFIX): node["NodeManagerAddress"]
            for node in ray.nodes() if node["Alive"]
            for resource in node["Resources"] if resource.startswith(POOL_RESOURCE_PREFIX)}


@task
def job_worker_logs() -> list[str]:
    """The log files of every worker process that the flow's Ray job started on this node."""
    import glob

    logs = ray._private.worker.global_worker.node.get_logs_dir_path()
    job = ray.get_runtime_context().get_job_id()
    return sorted(glob.glob(f"{logs}/worker-*-{job}-*.out"))


def test_placement_sends_tasks_to_the_named_pool(two_pool_runner):
    """Each pool's tasks run on its node, in the one worker process of the flow's job there:
    the connect's version probe and warm-up share it rather than start one each."""
    @flow(task_runner=two_pool_runner)
    def placed():
        futures, logs = {}, {}
        for pool in ("a", "b"):
            with placement(worker_pool=pool):
                futures[pool] = [node_ip.submit(x) for x in range(4)]
                logs[pool] = job_worker_logs.submit(wait_for=futures[pool])
        return ({pool: {f.result()[1] for f in fs} for pool, fs in futures.items()}, _pool_ips(),
                {pool: future.result() for pool, future in logs.items()})

    ran, pool_ips, logs = placed()
    assert pool_ips["a"] != pool_ips["b"]
    assert ran == {"a": {pool_ips["a"]}, "b": {pool_ips["b"]}}
    assert [len(files) for files in logs.values()] == [1, 1], logs


def _worker_node_ids(platform, cluster_name: str) -> list[str]:
    """The running worker nodes of the cluster `cluster_name`, whatever else the platform runs."""
    from yellowdog_client.model import NodeSearch

    pools = [p["id"] for p in platform.live_entities()["workerPools"]
             if p["name"].startswith(f"{cluster_name}-") and "wrkrs" in p["name"]]
    assert pools, f"no worker pool of {cluster_name} is live"
    nodes = [node for pool in pools for node in platform.client.worker_pool_client.get_nodes(
        NodeSearch(workerPoolId=pool)).iterate()]
    return [node.id for node in nodes if str(node.status).endswith("RUNNING")]


def test_killed_worker_node_gives_crashed_task_runs_reported_to_the_api(
    runner, platform, saved_config
):
    @task
    def slow(x: int) -> int:
        import time

        time.sleep(60)  # outlives the kill below: a run that completes never saw it
        return x

    # Its own name tells this flow's task runs from any an earlier test left RUNNING (the flow
    # holds nothing else: its context travels to the nodes with each task).
    name = f"doomed-{uuid.uuid4().hex[:8]}"

    @flow(task_runner=runner, name=name)
    def doomed():
        futures = slow.map(range(2))
        states = [future.wait() or future.state for future in futures]
        return [state.type.value for state in states], [str(f.task_run_id) for f in futures]

    def running_tasks():
        with get_client(sync_client=True) as client:
            return client.read_task_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[name])),
                task_run_filter=TaskRunFilter(
                    state=TaskRunFilterState(type=TaskRunFilterStateType(any_=["RUNNING"]))
                ),
            )

    def kill_the_workers_once_tasks_run():
        # Both task runs running, each on a node of its own: a task still waiting for a worker
        # when every node able to run it is gone waits for a new one (Ray's semantics: nothing
        # replaces these nodes here), and so would the flow. Every worker node is killed.
        running = wait_for(lambda: len(tasks := running_tasks()) == 2 and tasks, timeout=180,
                           interval=0.2, what="both task runs of this flow running")
        cluster_name = saved_config.cluster_name(running[0].flow_run_id)
        for node_id in _worker_node_ids(platform, cluster_name):
            platform.kill_node(node_id)

    with ThreadPoolExecutor(max_workers=1) as killer:
        killed = killer.submit(kill_the_workers_once_tasks_run)
        types, ids = doomed()
        killed.result()
    assert "CRASHED" in types
    crashed = ids[types.index("CRASHED")]

    def reported():
        with get_client(sync_client=True) as client:
            return client.read_task_run(crashed).state.type.value == "CRASHED"

    wait_for(reported, timeout=30, what="the Crashed state in the API")


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_signal_to_a_running_flow_process_tears_the_cluster_down(
    saved_config, platform, tmp_path, signum
):
    script, marker = tmp_path / "flow.py", tmp_path / "submitted"
    script.write_text(LONG_FLOW)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "RAY_AUTH_MODE": "disabled"}
    process = subprocess.Popen(
        [sys.executable, str(script), ONE_WORKER_BLOCK, str(marker)],
        env=env,
    )
    try:
        wait_for(marker.exists, timeout=180, interval=0.2, what="tasks submitted")
        assert platform.live_entities()["workRequirements"]
        footprint = Footprint.of(process.pid)
        process.send_signal(getattr(signal, signum))
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode != 0
    footprint.wait_gone(time.monotonic())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_flow_on_the_local_preset_ended_by_a_signal_leaves_no_node_process_or_namespace(
    prefect_api, tmp_path, signum
):
    script, marker = tmp_path / "flow.py", tmp_path / "submitted"
    script.write_text(LOCAL_PRESET_FLOW)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "RAY_AUTH_MODE": "disabled"}
    process = subprocess.Popen([sys.executable, str(script), str(marker)], env=env)
    try:
        wait_for(lambda: marker.exists() or process.poll() is not None, timeout=300,
                 interval=0.2, what="tasks submitted")
        assert marker.exists(), f"the flow ended ({process.returncode}) before submitting tasks"
        footprint = wait_for(lambda: (found := Footprint.of(process.pid)).names().count(
            "raylet") == 3 and found, timeout=60, what="a raylet on each of the three nodes")
        assert (footprint.bridge is not None) == (os.geteuid() == 0)
        ended = time.monotonic()
        process.send_signal(signum)
        process.wait(timeout=120)
        seconds = footprint.wait_gone(ended, timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    print(f"{signum.name}: nothing of the flow's platform left {seconds:.2f} s after the signal")
