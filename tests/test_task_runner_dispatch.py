"""Dispatch behaviour of RayDogTaskRunner on a plain local Ray instance and a real Prefect API."""

from __future__ import annotations

import asyncio
import os
import pickle

import pytest
import ray
from prefect import flow, tags, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.testing.utilities import prefect_test_harness

from prefect_raydog.task_runners import RayDogTaskRunner

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="module", autouse=True)
def prefect_api():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module", autouse=True)
def local_ray(prefect_api):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


RUNNER = RayDogTaskRunner(address="local")


@task
def add_one(x: int) -> int:
    return x + 1


@task
def where() -> int:
    return os.getpid()


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


def test_mapped_tasks_return_correct_results_from_other_processes():
    @flow(task_runner=RUNNER)
    def mapped():
        return add_one.map(range(200)).result(), where.submit().result()

    results, pid = mapped()
    assert results == [x + 1 for x in range(200)]
    assert pid != os.getpid()


def test_dependencies_pass_results_downstream():
    @flow(task_runner=RUNNER)
    def chain():
        a = add_one.submit(1)
        b = add_one.submit(a)
        c = add_one.submit(b, wait_for=[a])
        return c.result()

    assert chain() == 4


def test_async_tasks_run():
    @flow(task_runner=RUNNER)
    async def async_flow():
        return double_async.map(range(5)).result()

    assert asyncio.run(async_flow()) == [0, 2, 4, 6, 8]


def test_failing_task_fails_the_flow():
    @flow(task_runner=RUNNER)
    def failing():
        return fail.submit(3).result()

    with pytest.raises(ValueError, match="bad input 3"):
        failing()


def test_task_run_states_reach_the_api():
    @flow(task_runner=RUNNER)
    def mapped():
        add_one.map(range(20)).wait()
        from prefect.runtime import flow_run

        return flow_run.id

    flow_run_id = mapped()
    runs = _task_runs(flow_run_id)
    assert len(runs) == 20
    assert {r.state.type.value for r in runs} == {"COMPLETED"}


def test_tags_changed_between_submits_reach_each_task_run():
    @flow(task_runner=RUNNER)
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
                              node_api_url="http://10.0.0.2:4200/api")
    copy = runner.duplicate()
    assert copy == runner
    assert copy._config() == runner._config()
    assert pickle.loads(pickle.dumps(runner)) == runner
    assert RayDogTaskRunner(cluster="a") != RayDogTaskRunner(cluster="b")


def test_cluster_and_address_together_are_rejected():
    with pytest.raises(ValueError, match="either `cluster`"):
        RayDogTaskRunner(cluster="a", address="local")


@task
def sleep_long() -> str:
    import time

    time.sleep(60)
    return "not cancelled"


def test_cancel_all_on_the_template_reaches_the_running_copy():
    import threading
    import time

    runner = RayDogTaskRunner(address="local", init_kwargs={"namespace": "cancel-test"})

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


def test_entering_inside_a_ray_worker_attaches_without_provisioning():
    @ray.remote
    def enter_on_worker():
        runner = RayDogTaskRunner(cluster="never-loaded")
        with runner:
            return runner._session is None

    assert ray.get(enter_on_worker.remote())
