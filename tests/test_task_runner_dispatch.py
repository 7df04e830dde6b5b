"""Dispatch behaviour of RayDogTaskRunner attached through Ray Client to a cluster on the local
platform, with a real Prefect API that the nodes reach through a relay."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import threading
import time
from collections import Counter
from urllib.parse import urlsplit, urlunsplit

import pytest
import ray
from conftest import wait_for
from helpers import worker_node_ids
from prefect import flow, tags, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Completed, Running
from prefect_ray.context import remote_options

from prefect_raydog.blocks import RayDogClusterConfig
from prefect_raydog.cluster import RayDogCluster
from prefect_raydog.forwarding import TcpForwarder
from prefect_raydog.runner.connection import connect
from prefect_raydog.runner.recorded import wait_for_final_states
from prefect_raydog.task_runners import RayDogTaskRunner

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("prefect_api")]


@pytest.fixture(scope="module")
def address(prefect_api, local_platform):
    """A cluster on the local platform, this process connected to it through Ray Client."""
    config = RayDogClusterConfig.local(
        local_platform.url, local_platform.key_id, local_platform.key_secret
    )
    api = urlsplit(PREFECT_API_URL.value())
    host = local_platform.host_address
    with TcpForwarder(host, (api.hostname, api.port)) as relay, temporary_settings(
        updates={PREFECT_API_URL: urlunsplit(api._replace(netloc=f"{host}:{relay.port}"))}
    ), RayDogCluster(config.to_spec(config.cluster_name()),
                     client=config.credentials.get_client()) as cluster:
        address = f"ray://{cluster.head_node_private_ip}:10001"
        connect(address, {}, logging.getLogger(__name__))
        try:
            yield address
        finally:
            ray.shutdown()
            # Send what is queued for the relayed URL while the relay is open: left queued, it
            # would be retried against the closed relay when the session's Prefect server stops.
            EventsWorker.drain_all()
            APILogWorker.drain_all()


@pytest.fixture
def runner(address):
    return RayDogTaskRunner(address=address)


@task
def add_one(x: int) -> int:
    return x + 1


@task
def where() -> str:
    return ray.get_runtime_context().get_node_id()


@task
async def double_async(x: int) -> int:
    await asyncio.sleep(0)
    return 2 * x


@task
def fail(x: int) -> int:
    raise ValueError(f"bad input {x}")


@task
def current_tags() -> list[str]:
    from prefect.context import TaskRunContext

    return sorted(TaskRunContext.get().task_run.tags)


def _task_runs(flow_run_id):
    with get_client(sync_client=True) as client:
        runs, offset = [], 0
        while True:
            page = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                limit=200, offset=offset,
            )
            runs += page
            offset += len(page)
            if len(page) < 200:
                return runs


def test_mapped_tasks_return_correct_results_from_other_processes(runner):
    @flow(task_runner=runner)
    def mapped():
        return add_one.map(range(200)).result(), where.submit().result()

    results, node = mapped()
    assert results == [x + 1 for x in range(200)]
    assert node in worker_node_ids()


def test_dependencies_pass_results_downstream(runner):
    @flow(task_runner=runner)
    def chain():
        a = add_one.submit(1)
        b = add_one.submit(a)
        c = add_one.submit(b, wait_for=[a])
        return c.result()

    assert chain() == 4


def test_async_tasks_run(runner):
    @flow(task_runner=runner)
    async def async_flow():
        return double_async.map(range(5)).result()

    assert asyncio.run(async_flow()) == [0, 2, 4, 6, 8]


def test_failing_task_fails_the_flow(runner):
    @flow(task_runner=runner)
    def failing():
        return fail.submit(3).result()

    with pytest.raises(ValueError, match="bad input 3"):
        failing()


def test_task_run_states_reach_the_api(runner):
    @flow(task_runner=runner)
    def mapped():
        add_one.map(range(20)).wait()
        from prefect.runtime import flow_run

        return flow_run.id

    flow_run_id = mapped()
    runs = _task_runs(flow_run_id)
    assert len(runs) == 20
    assert {r.state.type.value for r in runs} == {"COMPLETED"}


def test_every_final_state_is_in_the_api_when_a_flow_of_many_tasks_returns(runner):
    @flow(task_runner=runner)
    def many():
        add_one.map(range(200)).wait()
        from prefect.runtime import flow_run

        return flow_run.id

    flow_run_id = many()
    states = Counter(r.state.type.value for r in _task_runs(flow_run_id))
    with get_client(sync_client=True) as client:
        flow_state = client.read_flow_run(flow_run_id).state.type.value
    assert (flow_state, states) == ("COMPLETED", {"COMPLETED": 200})


def test_the_wait_for_final_states_lasts_while_the_api_records_more_then_logs_the_shortfall():
    """Runs recorded one by one over longer than the stall time: the wait sees them all; the
    one never recorded is counted alone, in the flow run's log."""
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(flow(lambda: None, name="recorded-wait"))
        runs = [
            client.create_task_run(add_one, flow_run_id=flow_run.id, dynamic_key=str(i),
                                   state=Running())
            for i in range(6)
        ]

        def complete_one_by_one():
            for run in runs[:-1]:
                time.sleep(0.5)
                client.set_task_run_state(run.id, Completed(), force=True)

        completer = threading.Thread(target=complete_one_by_one)
        completer.start()
        started = time.monotonic()
        missing = wait_for_final_states(b"".join(run.id.bytes for run in runs), 1.5,
                                        flow_run.id, "the-cluster")
        waited = time.monotonic() - started
        completer.join()
    assert (missing, waited > 2.5) == (1, True)

    def shortfall() -> list[str]:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
        return [log.message for log in logs if "has not recorded" in log.message]

    (message,) = wait_for(shortfall, timeout=30, what="the shortfall in the flow run's log")
    assert "final state of 1 of the 6 task runs that finished on cluster the-cluster" in message
    assert "in the last 1.5 s" in message


def test_tags_changed_between_submits_reach_each_task_run(runner):
    @flow(task_runner=runner)
    def tagged():
        plain = current_tags.submit()
        with tags("blue"):
            blue = current_tags.submit()
        return plain.result(), blue.result()

    plain, blue = tagged()
    assert "blue" not in plain
    assert "blue" in blue


def test_duplicate_equals_and_pickles_every_field():
    runner = RayDogTaskRunner(address="ray://10.0.0.1:10001", init_kwargs={"namespace": "x"},
                              node_api_url="http://10.0.0.2:4200/api", driverless_grace_s=5)
    copy = runner.duplicate()
    assert copy == runner
    assert copy._config() == runner._config()
    assert pickle.loads(pickle.dumps(runner)) == runner
    assert RayDogTaskRunner(cluster="a") != RayDogTaskRunner(cluster="b")
    assert RayDogTaskRunner(driverless_grace_s=None) != RayDogTaskRunner()


@pytest.mark.parametrize("grace", [0, -1.0])
def test_a_driverless_grace_that_is_not_positive_is_rejected(grace):
    with pytest.raises(ValueError, match="driverless_grace_s must be a positive number"):
        RayDogTaskRunner(driverless_grace_s=grace)


@task
def worker_process() -> tuple[str, int, float]:
    """The node and Ray worker process that ran this task run, and the CPUs Ray assigned it."""
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    return ray.util.get_node_ip_address(), os.getpid(), cpus


def test_remote_options_take_what_ray_remote_takes_max_calls_1_gives_each_run_a_new_worker(
        runner):
    """`max_calls`, which `.options()` refuses, means what it means on `@ray.remote`."""
    @flow(task_runner=runner)
    def consecutive():
        with remote_options(max_calls=1):
            return [worker_process.submit().result() for _ in range(3)]

    workers = [(ip, pid) for ip, pid, _ in consecutive()]
    assert len(set(workers)) == len(workers), workers


def test_remote_options_that_options_takes_still_apply(runner):
    @flow(task_runner=runner)
    def half_a_cpu():
        with remote_options(num_cpus=0.5):
            return worker_process.submit().result()

    assert half_a_cpu()[2] == 0.5


def test_a_subflow_with_its_own_runner_runs_on_the_cluster_of_its_attached_parent(runner):
    """One Ray connection per process: the subflow's `RayDogTaskRunner()` would provision a
    cluster of its own; it runs on the one its parent is attached to instead."""
    @flow(task_runner=RayDogTaskRunner())
    def child():
        return worker_process.submit().result()[0]

    @flow(task_runner=runner)
    def parent():
        inner = child()
        outer = worker_process.submit().result()[0]
        return inner, outer, {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}

    inner, outer, cluster_ips = parent()
    assert {inner, outer} <= cluster_ips


def test_cluster_and_address_together_are_rejected():
    with pytest.raises(ValueError, match="either `cluster`"):
        RayDogTaskRunner(cluster="a", address="local")


@task
def sleep_long() -> str:
    import time

    time.sleep(60)
    return "not cancelled"


def test_cancel_all_on_the_template_reaches_the_running_copy(address):
    import threading
    import time

    runner = RayDogTaskRunner(address=address, init_kwargs={"namespace": "cancel-test"})

    @flow(task_runner=runner)
    def cancellable():
        future = sleep_long.submit()
        threading.Timer(3, runner.cancel_all).start()
        started = time.monotonic()
        future.wait()
        return future.state, time.monotonic() - started

    state, waited = cancellable()
    assert state.is_crashed()
    assert waited < 30


def test_entering_inside_a_ray_worker_attaches_without_provisioning(address):
    @ray.remote
    def enter_on_worker():
        runner = RayDogTaskRunner(cluster="never-loaded")
        with runner:
            return runner._session is None

    assert ray.get(enter_on_worker.remote())


def test_finished_task_runs_leave_no_future_or_ray_reference_on_the_driver(runner):
    """Per task run the driver keeps only its 16-byte id once the flow lets go of its futures."""
    import gc
    import weakref

    def refs_held() -> int:
        gc.collect()
        return len(ray.util.client.ray.worker.reference_count)

    @flow(task_runner=runner)
    def mapped():
        futures = add_one.map(range(30))
        assert [f.result() for f in futures] == [x + 1 for x in range(30)]
        return [weakref.ref(f) for f in futures], refs_held()

    # Weak references to this flow's own futures: earlier tests' tracebacks may hold (then free)
    # futures of their own, so a count of every future in the process says nothing.
    futures, refs_during = mapped()
    refs_after = refs_held()
    assert len(futures) == 30 and not [f for f in futures if f() is not None]
    assert refs_during - refs_after >= 30


def test_a_future_whose_outcome_callback_ray_dropped_still_ends(runner):
    """The wait asks Ray itself once Ray holds an outcome the session never delivered."""
    import uuid

    from prefect_raydog.task_runners import RayDogFuture

    driver = socket.gethostname()

    def rebuild() -> UnreadableOnTheDriver:
        if socket.gethostname() == driver:
            raise ValueError("unreadable on the driver")
        return UnreadableOnTheDriver()

    class UnreadableOnTheDriver:
        """Made on a node, read by the head's Ray Client server, unreadable on the driver: Ray
        Client drops the completion callback of such a result (it logs "Callback error")."""

        def __reduce__(self):
            return rebuild, ()

    @ray.remote(num_cpus=0, max_retries=0)
    def unreadable() -> UnreadableOnTheDriver:
        return UnreadableOnTheDriver()

    @flow(task_runner=runner)
    def dropped():
        ref = unreadable.remote()
        future = RayDogFuture(uuid.uuid4(), ref)
        future._waiters, delivered = [], []  # as a session's future: the outcome comes to _settle
        ref._on_completed(lambda outcome: (delivered.append(outcome), future._settle(outcome)))
        future.wait()
        return future.state.type.value, delivered

    state, delivered = dropped()
    assert state == "CRASHED" and delivered == []


def test_finished_futures_hold_no_state_object_yet_read_the_state_the_api_recorded(runner):
    """The driver keeps final states packed: holding 100 finished futures holds no Prefect State
    object, and each future still reads the state the API recorded and feeds a downstream."""
    import gc

    from prefect.runtime import flow_run
    from prefect.states import State

    def states_held() -> int:
        gc.collect()
        return sum(isinstance(o, State) for o in gc.get_objects())

    @flow(task_runner=runner)
    def mapped():
        futures = add_one.map(range(100))
        futures.wait()
        held = states_held()
        read = {f.task_run_id: (f.state.id, f.state.type.value) for f in futures}
        downstream = add_one.submit(futures[0], wait_for=[futures[1]]).result()
        return held, read, futures.result(), downstream, flow_run.id

    before = states_held()
    held, read, results, downstream, flow_run_id = mapped()
    assert held - before < 10
    assert results == [x + 1 for x in range(100)] and downstream == 2
    recorded = {r.id: (r.state.id, r.state.type.value) for r in _task_runs(flow_run_id)}
    assert read == {id_: recorded[id_] for id_ in read}
    assert {type_ for _, type_ in read.values()} == {"COMPLETED"}


@task
def large(n: int) -> bytes:
    return bytes(range(256)) * (n // 256)


def test_a_result_too_large_to_pack_comes_back_whole(runner):
    @flow(task_runner=runner)
    def big():
        future = large.submit(256 * 1024)
        future.wait()
        return future.state.is_completed(), future.result()

    completed, result = big()
    assert completed and result == bytes(range(256)) * 1024


@task
def api_url_on_node() -> str:
    from prefect.settings import get_current_settings

    return str(get_current_settings().api.url)


def test_attached_flow_runs_give_nodes_one_relayed_api_url_that_outlives_each_run(
        address, local_platform):
    """Ray workers of an attached cluster serve later flow runs, and Prefect's event and log
    workers in them keep the API URL they first used: the relay must outlive the flow run."""
    import httpx
    from prefect.runtime import flow_run

    host = local_platform.host_address

    @flow(task_runner=RayDogTaskRunner(address=address, api_relay_address=host))
    def report():
        return api_url_on_node.submit().result(), flow_run.id

    first_url, _ = report()
    assert urlsplit(first_url).hostname == host
    assert httpx.get(f"{first_url}/health", timeout=10).json() is True
    second_url, flow_run_id = report()
    assert second_url == first_url
    assert [run.state.type.value for run in _task_runs(flow_run_id)] == ["COMPLETED"]


@task
def warmed_at() -> float | None:
    from prefect_raydog.runner import node

    return node.warmed_at


def test_a_runner_that_connects_warms_its_job_workers_for_the_first_tasks(address):
    """A new connection is a new Ray job with new worker processes: the runner warms one per
    worker CPU while the flow starts, and the flow's first tasks run in them."""
    ray.shutdown()  # so that the runner connects (a new job) instead of using this connection
    try:

        @flow(task_runner=RayDogTaskRunner(address=address))
        def first_tasks() -> list[float | None]:
            return [future.result() for future in [warmed_at.submit() for _ in range(2)]]

        warmed = first_tasks()
    finally:
        connect(address, {}, logging.getLogger(__name__))
    assert all(at is not None for at in warmed), warmed


OPENS_WITHOUT_PREFECT = """
import pickle, sys
pickle.loads(sys.stdin.buffer.read())
print(sorted(m for m in sys.modules if m.split(".")[0] in ("prefect", "prefect_ray")
             or m in ("prefect_raydog.runner.node", "prefect_raydog.task_runners")))
"""


def test_what_the_heads_ray_client_server_forwards_opens_without_prefect():
    """Over Ray Client, the head's server unpickles each function, argument and outcome it
    forwards: a task run's call (here with a state, a future and its dependencies inside) goes
    as one payload only a worker opens, so the server never imports Prefect (which cost each
    flow run's connection about 1.7 s of CPU on the head); the call's references come out."""
    import subprocess
    import sys
    import uuid

    from prefect.client.schemas.objects import TaskRunResult

    from prefect_raydog.runner.outcome import Outcome
    from prefect_raydog.runner.remote import (
        dumps_with_refs,
        loads_with_refs,
        run_task_run,
        warm_process,
    )
    from prefect_raydog.task_runners import RayDogFuture

    upstream = ray.ObjectRef(b"u" * 28)
    call = {"parameters": {"x": Completed(data=1), "y": upstream},
            "wait_for": [RayDogFuture(task_run_id=uuid.uuid4(), wrapped_future=upstream)],
            "dependencies": {"x": [TaskRunResult(id=uuid.uuid4())]}, "asset_context": {}}
    payload, refs = dumps_with_refs(call)
    forwarded = pickle.dumps((run_task_run, warm_process, payload,
                              Outcome("10.0.0.2", pickle.dumps(Completed()))))
    opened = subprocess.run([sys.executable, "-c", OPENS_WITHOUT_PREFECT], input=forwarded,
                            capture_output=True, check=True)
    assert opened.stdout.decode().strip() == "[]"
    assert refs == [upstream, upstream]
    reopened = loads_with_refs(payload, refs)
    assert reopened["parameters"]["y"] is upstream
    assert reopened["wait_for"][0].wrapped_future is upstream
