"""How a RayDogTaskRunner's cluster ends outside the happy path: its guardian, or the platform's
own backstop, after the flow process is SIGKILLed, and deployment runs by a process worker,
completed or cancelled; on the `local` preset's sealed nodes behind the platform's firewall,
reached over SSH."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import wait_for
from flow_scripts import LONG_FLOW
from helpers import sealed_preset, what_is_live
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL
from prefect.states import Cancelling
from prefect.workers.process import ProcessWorker
from process_nodes import Footprint

from prefect_raydog.local import LocalPlatform

pytestmark = pytest.mark.ray
BLOCK = "local-lifecycle-cluster"
SHORT_LIVED_BLOCK = "local-short-lived-cluster"
# The platform's backstop ends the cluster this long after it starts: it must outlast
# provisioning and the first submit (workers joined after 33 s at load 19 on 2 cores), and the
# test waits for it, so it is no longer than that needs.
SHORT_LIFETIME = timedelta(seconds=75)
POOL = "lifecycle-process-pool"


@pytest.fixture(scope="module")
def local_platform():
    with LocalPlatform(firewall=True) as platform:
        yield platform


@pytest.fixture(scope="module")
def saved_configs(prefect_api, local_platform):
    config = sealed_preset(local_platform)
    config.save(BLOCK, overwrite=True)
    short_lived = config.model_copy(update={
        "cluster_lifetime": SHORT_LIFETIME,
        "idle_node_shutdown": timedelta(seconds=2),
        "idle_pool_shutdown": timedelta(seconds=5),
    })
    short_lived.save(SHORT_LIVED_BLOCK, overwrite=True)


def _prefect_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
            "RAY_AUTH_MODE": "disabled", **extra}


def _start_long_flow(block: str, platform, tmp_path) -> tuple[subprocess.Popen, uuid.UUID]:
    """LONG_FLOW in a process of its own session; returns once its two task runs are Running in
    the API (so the API knows what to end), with its flow run id."""
    script, marker = tmp_path / "flow.py", tmp_path / "flow-run-id"
    script.write_text(LONG_FLOW)
    process = subprocess.Popen(
        [sys.executable, str(script), block, str(marker)],
        env=_prefect_env(), start_new_session=True,
    )
    flow_run_id = uuid.UUID(wait_for(lambda: marker.exists() and marker.read_text(),
                                     timeout=180, interval=0.2, what="tasks submitted"))
    wait_for(lambda: _task_run_states(flow_run_id) == ["RUNNING", "RUNNING"], timeout=60,
             interval=0.2, what="both task runs Running in the API")
    return process, flow_run_id


def _task_run_states(flow_run_id: uuid.UUID) -> list[str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return sorted(run.state.type.value for run in runs if run.state)


def _guardian_of(pid: int) -> int:
    """The guardian process that the flow process `pid` started."""
    for child in Footprint.of(pid).processes:
        with contextlib.suppress(OSError):
            if b"prefect_raydog.runner.guardian" in Path(f"/proc/{child}/cmdline").read_bytes():
                return child
    pytest.fail(f"No guardian process under the flow process {pid}")


def test_sigkilled_flow_process_s_guardian_ends_its_cluster_and_crashes_its_task_runs(
    saved_configs, platform, tmp_path
):
    """A flow run on a block with default settings, its process killed with SIGKILL: nothing of
    its cluster is left on the platform within two minutes, and its task runs end Crashed."""
    process, flow_run_id = _start_long_flow(BLOCK, platform, tmp_path)
    try:
        _guardian_of(process.pid)
        footprint = Footprint.of(process.pid)
        killed = time.monotonic()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        seconds = wait_for(lambda: not what_is_live(platform) and time.monotonic() - killed,
                           timeout=180, interval=0.1, what="nothing of the cluster left")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    print(f"Nothing of the SIGKILLed flow's cluster left on the platform after {seconds:.1f} s")
    assert seconds <= 120
    wait_for(lambda: _task_run_states(flow_run_id) == ["CRASHED", "CRASHED"], timeout=30,
             interval=0.2, what="both task runs Crashed")
    footprint.wait_gone(killed)  # the guardian too, its work done


def test_sigkilled_flow_process_and_guardian_leave_the_cluster_to_the_platform_backstop(
    saved_configs, platform, tmp_path
):
    """The flow's machine lost: the flow process and its guardian killed with SIGKILL."""
    process, _ = _start_long_flow(SHORT_LIVED_BLOCK, platform, tmp_path)
    try:
        footprint = Footprint.of(process.pid)
        os.kill(_guardian_of(process.pid), signal.SIGKILL)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    footprint.wait_gone(time.monotonic())
    assert platform.live_entities()["workRequirements"]
    wait_for(lambda: not what_is_live(platform), timeout=SHORT_LIFETIME.total_seconds() + 30,
             interval=0.5, what="the platform to end the orphaned cluster")


DEPLOYED_FLOW = """
import json, pathlib, time
import ray
from prefect import flow, task
from prefect_raydog.task_runners import RayDogTaskRunner

@task
def node_ip(x: int, sleep: float):
    time.sleep(sleep)
    return x + 1, ray.util.get_node_ip_address()

@flow(task_runner=RayDogTaskRunner(cluster={block!r}))
def deployed(out: str, count: int = 4, sleep: float = 0.0):
    futures = node_ip.map(range(count), sleep=sleep)
    pathlib.Path(out + ".submitted").write_text("submitted")
    heads = [n["NodeManagerAddress"] for n in ray.nodes()
             if n["Alive"] and not n["Resources"].get("CPU")]
    pathlib.Path(out).write_text(json.dumps({{"results": futures.result(), "heads": heads}}))
"""


@pytest.fixture(scope="module")
def deployment(saved_configs, local_platform, tmp_path_factory):
    """A deployment of DEPLOYED_FLOW on a process work pool, and a worker serving that pool."""
    source = tmp_path_factory.mktemp("deployed")
    (source / "deployed_flow.py").write_text(
        DEPLOYED_FLOW.format(block=BLOCK)
    )
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(
            name=POOL, type="process",
            base_job_template=ProcessWorker.get_default_base_job_template(),
        ))
    deployed = flow.from_source(source=str(source), entrypoint="deployed_flow.py:deployed")
    deployed.deploy(name="lifecycle", work_pool_name=POOL, print_next_steps=False)
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process"],
        env=_prefect_env(PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="0"),
        cwd=source, start_new_session=True,
    )
    try:
        yield "deployed/lifecycle"
    finally:
        footprint = Footprint.of(worker.pid)
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        footprint.wait_gone(time.monotonic())


def _flow_run_state(flow_run_id: uuid.UUID):
    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state


def test_a_deployment_run_by_a_process_worker_runs_tasks_on_worker_nodes(
    deployment, platform, tmp_path
):
    out = tmp_path / "results.json"
    flow_run = run_deployment(deployment, parameters={"out": str(out)}, timeout=0)
    state = wait_for(lambda: (s := _flow_run_state(flow_run.id)) and s.is_final() and s,
                     timeout=120, interval=0.5, what="the deployment run to finish")
    assert state.is_completed(), state
    recorded = json.loads(out.read_text())
    assert [value for value, _ in recorded["results"]] == [1, 2, 3, 4]
    ips = {ip for _, ip in recorded["results"]}
    assert ips and not ips & set(recorded["heads"])
    wait_for(lambda: not what_is_live(platform), timeout=30, what="the cluster to be torn down")


def _task_run_states(flow_run_id: uuid.UUID) -> list[str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    return sorted(run.state.type.value for run in runs if run.state)


def test_cancelling_a_deployment_run_cancels_its_task_runs_and_tears_the_cluster_down(
    deployment, platform, tmp_path
):
    out = tmp_path / "results.json"
    flow_run = run_deployment(
        deployment, parameters={"out": str(out), "count": 2, "sleep": 600}, timeout=0
    )
    submitted = tmp_path / "results.json.submitted"
    wait_for(submitted.exists, timeout=120, interval=0.2, what="tasks submitted")
    assert platform.live_entities()["workRequirements"]
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
    state = wait_for(lambda: (s := _flow_run_state(flow_run.id)) and s.is_final() and s,
                     timeout=60, interval=0.5, what="the cancelled run to finish")
    wait_for(lambda: not what_is_live(platform), timeout=45, what="the cluster to be torn down")
    assert not out.exists()
    assert state.is_cancelled(), f"a cancelled deployment run ended {state.type.value}"
    wait_for(lambda: _task_run_states(flow_run.id) == ["CANCELLED"] * 2, timeout=30,
             what="both task runs to be Cancelled")
