"""The deployment recipe of docs/deployments.md, run as written against the local platform: a
local platform started by `prefect-raydog local start`, a block saved for it, a process work
pool, `prefect deploy`, a worker and `prefect deployment run --watch`. The flow run completes,
its tasks run on the platform's worker nodes, and nothing is left. Only `prefect server start`
is left out: the session's Prefect server stands in for it, at its own URL."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import wait_for
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from process_nodes import Footprint
from yellowdog_client import PlatformClient
from yellowdog_client.model import (
    ApiKey,
    ServicesSchema,
    WorkerPoolSearch,
    WorkerPoolStatus,
    WorkRequirementSearch,
    WorkRequirementStatus,
)

pytestmark = pytest.mark.ray
REPO = Path(__file__).parent.parent
PAGE = REPO / "docs" / "deployments.md"
SECTION = "## Try it without an account"


def recipe_commands() -> list[str]:
    """The recipe's shell blocks, in order."""
    section = PAGE.read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^( *)```bash\n(.*?)^\1```", section, re.S | re.M)
    return [textwrap.dedent(body).strip() for _, body in blocks]


@contextmanager
def in_background(command: str, env: dict[str, str], ready: str, log: Path) -> Iterator[Path]:
    """Run a long-running command of the recipe, its output in `log`, until it prints `ready`;
    afterwards end it as Ctrl-C does, and wait until nothing of it is left."""
    with log.open("w") as output:
        process = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: ready in log.read_text() or process.poll() is not None,
            timeout=120,
            interval=0.2,
            what=f"{command!r} to print {ready!r}",
        )
        assert process.poll() is None, log.read_text()
        yield log
    finally:
        footprint = Footprint.of(process.pid)
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        footprint.wait_gone(time.monotonic())


def run(command: str, env: dict[str, str], timeout: float = 120) -> str:
    result = subprocess.run(
        ["bash", "-e", "-c", command],
        cwd=REPO,
        env=env,
        timeout=timeout,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-5000:]}"
    return result.stdout


def live_on(identity: dict) -> list[str]:
    client = PlatformClient.create(
        ServicesSchema(defaultUrl=identity["url"]),
        ApiKey(identity["key_id"], identity["key_secret"]),
    )
    try:
        requirements = client.work_client.get_work_requirements(
            WorkRequirementSearch(statuses=[s for s in WorkRequirementStatus if not s.finished])
        ).list_all()
        pools = client.worker_pool_client.get_worker_pools(
            WorkerPoolSearch(statuses=[s for s in WorkerPoolStatus if not s.finished])
        ).list_all()
        return [r.name for r in requirements] + [p.name for p in pools]
    finally:
        client.close()


def test_the_deployment_recipe_runs_a_flow_on_local_platform_nodes(prefect_api, tmp_path):
    server, set_url, platform, setup, worker, deployment_run = recipe_commands()
    assert server == "prefect server start"
    assert set_url.startswith("prefect config set PREFECT_API_URL=")
    # A new user's Prefect home; the session's server stands in for `prefect server start`.
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": prefect_api,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "NO_COLOR": "1",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "0",
    }
    run(set_url, env)
    with in_background(platform, env, "Press Ctrl-C", tmp_path / "platform.log"):
        identity = json.loads((tmp_path / "prefect" / "raydog-local" / "platform.json").read_text())
        run(setup, env)
        with in_background(worker, env, "started", tmp_path / "worker.log") as worker_log:
            watched = run(deployment_run, env, timeout=600)
            flow_run_id = uuid.UUID(re.search(r"UUID: ([0-9a-f-]{36})", watched)[1])
            # The run is Completed before its process has torn the cluster down.
            wait_for(lambda: not live_on(identity), timeout=60, what="the cluster's teardown")
            summary = wait_for(
                lambda: _cluster_artifact(flow_run_id), timeout=30, what="the cluster artifact"
            )
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(flow_run_id)
        assert flow_run.state.is_completed(), watched[-3000:] + worker_log.read_text()[-3000:]
        assert f"## RayDog cluster `local-{flow_run_id.hex[:8]}`" in summary, summary
        per_node = [int(n) for n in re.findall(r"^\| [\d.]+ \| (\d+) \|$", summary, re.M)]
        # Both workers ran tasks, unless one finished them all before the other took any.
        assert 1 <= len(per_node) <= 2 and sum(per_node) == 100, summary
        # The platform's nodes sit behind its firewall: the run reached them over SSH alone.
        logs = _flow_run_log(flow_run_id)
        assert re.search(r"Connected to the Ray cluster at ray://127\.0\.0\.1:", logs), logs
        assert "the head's door" in logs and "through the SSH connection" in logs, logs


def _flow_run_log(flow_run_id: uuid.UUID) -> str:
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return "\n".join(log.message for log in logs)


def _cluster_artifact(flow_run_id: uuid.UUID) -> str | None:
    flow_runs = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=flow_runs)
    return next((a.data for a in artifacts if a.key == "raydog-cluster"), None)
