"""Adaptive worker pools and eager provisioning of RayDogTaskRunner, on the local platform with
sealed nodes behind its firewall (reached over SSH), real Ray on them and a real Prefect API."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import ray
from conftest import assert_nothing_left, wait_for
from helpers import head_ips, sealed_preset
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.runtime import flow_run
from yellowdog_client.model import NodeSearch, NodeStatus, WorkRequirementSearch

from prefect_raydog.blocks import RayDogClusterConfig
from prefect_raydog.local import LocalPlatform
from prefect_raydog.runner import adaptive
from prefect_raydog.runner.heldlog import HeldRunLog
from prefect_raydog.spec import WorkerPoolSpec
from prefect_raydog.task_runners import RayDogTaskRunner, placement

pytestmark = pytest.mark.ray
SLOW_BOOT = "test/process-slow-boot"
# Time an eager runner would have used to start provisioning (it starts within milliseconds).
LAZY_PREPARES_S = 3.0


@pytest.fixture(scope="module")
def slow_platform(tmp_path_factory):
    templates = tmp_path_factory.mktemp("templates") / "templates.toml"
    templates.write_text(f'[templates."{SLOW_BOOT}"]\nmode = "process"\nboot_delay_s = 3.0\n'
                         'image = "driver"\n')
    with LocalPlatform(templates=templates, firewall=True) as platform:
        yield platform


@pytest.fixture
def platform(slow_platform):
    yield slow_platform
    assert_nothing_left(slow_platform)


@pytest.fixture
def quick_cooldown(monkeypatch):
    monkeypatch.setattr(adaptive, "COOLDOWN_S", 3.0)


def _config(platform: LocalPlatform, pools: list[dict], **fields) -> RayDogClusterConfig:
    config = sealed_preset(platform)
    template = config.worker_pools[0]
    worker_pools = [WorkerPoolSpec(**{**template.model_dump(exclude={"name", "count"}), **pool})
                    for pool in pools]
    # A generous build timeout: Ray starts slowly on a loaded machine.
    return config.model_copy(update={"worker_pools": worker_pools, "workers_to_join": 0,
                                     "build_timeout": timedelta(minutes=10), **fields})


def _pool_nodes(platform: LocalPlatform, pool_suffix: str) -> int:
    """Live nodes of the live pool whose name ends with `pool_suffix`, as the API records them."""
    pools = [p["id"] for p in platform.live_entities()["workerPools"]
             if p["name"].endswith(pool_suffix)]
    search = platform.client.worker_pool_client.get_nodes
    return sum(
        1 for pool in pools for node in search(NodeSearch(workerPoolId=pool)).iterate()
        if node.status in (NodeStatus.RUNNING, NodeStatus.LATE)
    )


class _Watch(threading.Thread):
    """The most nodes a pool had while the watch ran; touches `shrunk` once it fell back to 0
    (the flow waits for that file: it must not hold the platform, which cannot be pickled)."""

    def __init__(self, platform: LocalPlatform, pool_suffix: str, shrunk: Path) -> None:
        super().__init__(daemon=True)
        self.platform, self.pool_suffix, self.shrunk = platform, pool_suffix, shrunk
        self.most = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            nodes = _pool_nodes(self.platform, self.pool_suffix)
            self.most = max(self.most, nodes)
            if self.most and not nodes:
                self.shrunk.touch()


@task
def where(seconds: float) -> tuple[str, dict]:
    time.sleep(seconds)
    return ray.util.get_node_ip_address(), ray.get_runtime_context().get_assigned_resources()


def _artifact(flow_run_id) -> str:
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return next(a.data for a in artifacts if a.key == "raydog-cluster")


def _sizes(artifact: str, pool: str) -> list[int]:
    return [int(row.split("|")[3]) for row in artifact.splitlines() if f"| {pool} |" in row]


def test_adaptive_pools_grow_for_placed_and_mapped_tasks_and_shrink_after(
        prefect_api, platform, quick_cooldown, tmp_path):
    """One flow (one cluster, to keep CI short): a placement() on the empty pool 'extra' grows
    that pool; 30 mapped tasks grow the pools; both shrink back to 0 after."""
    # Shrunk nodes stop 1 s after their task is aborted (pools with a fixed size keep the
    # default: their nodes may boot before the head is ready, and sit idle until then).
    config = _config(platform, [{"name": "workers", "min_count": 0, "max_count": 3},
                                {"name": "extra", "min_count": 0, "max_count": 1}],
                     idle_node_shutdown=timedelta(seconds=1))
    shrunk = str(tmp_path / "shrunk")

    @flow(task_runner=RayDogTaskRunner(cluster=config))
    def bursty():
        with placement(worker_pool="extra"):
            _, placed = where.submit(0.1).result()
        results = where.map([2.0] * 30).result()
        deadline = time.monotonic() + 90
        while not os.path.exists(shrunk) and time.monotonic() < deadline:
            time.sleep(0.2)
        return placed, results, head_ips(), os.path.exists(shrunk), flow_run.id

    watch = _Watch(platform, "-01-wrkrs", Path(shrunk))
    watch.start()
    try:
        placed, results, heads, did_shrink, flow_run_id = bursty()
    finally:
        watch.done.set()
    assert "raydog-pool-extra" in placed
    ips = {ip for ip, _ in results}
    assert len(results) == 30 and ips and not ips & heads
    assert watch.most >= 1 and did_shrink
    artifact = _artifact(flow_run_id)
    assert "Adaptive pool sizes" in artifact
    workers, extra = _sizes(artifact, "workers"), _sizes(artifact, "extra")
    assert workers[0] == 0 and max(workers) > 0 and workers[-1] == 0, workers
    assert extra[:2] == [0, 1], extra


def test_held_start_lines_reach_the_run_log_with_the_time_they_were_logged():
    records: list[logging.LogRecord] = []
    run_log = logging.getLogger("raydog-tests.held-run-log")
    run_log.addHandler(_Collect(records))
    run_log.propagate = False
    run_log.setLevel(logging.INFO)
    held = HeldRunLog(logging.getLogger("raydog-tests.held-fallback"))
    held.info("Provisioning %s.", "x")
    logged_by = time.time()
    time.sleep(0.01)  # the flow run becomes known later
    held.attach(logging.LoggerAdapter(run_log, {"flow_run_id": "run-1"}))
    (record,) = records
    assert (record.getMessage(), record.flow_run_id) == ("Provisioning x.", "run-1")
    assert record.created <= logged_by


class _Collect(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.INFO)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _requirement_ids(platform: LocalPlatform) -> set[str]:
    requirements = platform.client.work_client.get_work_requirements(WorkRequirementSearch())
    return {summary.id for summary in requirements.list_all()}


def _newest_requirement_created(platform: LocalPlatform) -> datetime:
    requirements = platform.client.work_client.get_work_requirements(WorkRequirementSearch())
    return max(summary.createdTime for summary in requirements.list_all())


def test_eager_provisioning_starts_while_the_flow_prepares_and_lazy_at_the_first_submit(
        prefect_api, platform, tmp_path):
    """Eager gives the first result sooner because the cluster is on its way before the first
    submission: the order of the two events shows it, however loaded the machine."""
    config = _config(platform, [{"name": "workers", "count": 1}], workers_to_join=1)
    config = config.model_copy(update={"head": config.head.model_copy(
        update={"template_id": SLOW_BOOT})})

    def submitted_and_provisioned(provision: str) -> tuple[datetime, datetime]:
        known, prepared = _requirement_ids(platform), tmp_path / f"{provision}-prepared"

        def provisioning() -> set[str]:
            return _requirement_ids(platform) - known

        def prepare() -> None:
            """The flow's own work before its first task lasts until its eager cluster is on
            the way; a lazy one must not start in a few seconds of it."""
            try:
                if provision == "eager":
                    wait_for(provisioning, timeout=120, interval=0.1, what="eager provisioning")
                else:
                    time.sleep(LAZY_PREPARES_S)
                    assert not provisioning(), "a lazy runner provisioned before its first submit"
            finally:
                prepared.touch()

        @flow(task_runner=RayDogTaskRunner(cluster=config, provision=provision))
        def prepares_then_submits():
            while not prepared.exists():  # the flow's context travels to nodes: no platform here
                time.sleep(0.05)
            submitted = datetime.now(timezone.utc)
            where.submit(0.0).result()
            return submitted

        with ThreadPoolExecutor(max_workers=1) as preparing:
            preparation = preparing.submit(prepare)
            submitted = prepares_then_submits()
            preparation.result()
        # In the API's resolution, milliseconds.
        submitted = submitted.replace(microsecond=submitted.microsecond // 1000 * 1000)
        return submitted, _newest_requirement_created(platform)

    submitted, provisioned = submitted_and_provisioned("lazy")
    assert submitted <= provisioned, (submitted, provisioned)
    assert_nothing_left(platform)
    submitted, provisioned = submitted_and_provisioned("eager")
    assert provisioned < submitted, (submitted, provisioned)


def test_a_flow_run_that_never_submits_ends_its_eager_cluster(prefect_api, platform):
    config = _config(platform, [{"name": "workers", "count": 1}])
    made = len(platform.client.worker_pool_client.get_nodes(NodeSearch()).list_all())

    @flow(task_runner=RayDogTaskRunner(cluster=config))
    def submits_nothing():
        time.sleep(3)
        return "done"

    assert submits_nothing() == "done"
    assert_nothing_left(platform)
    assert len(platform.client.worker_pool_client.get_nodes(NodeSearch()).list_all()) > made
