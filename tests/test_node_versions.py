"""On connect, the runner reads the versions each node's Python runs (Python minor, Ray, Prefect,
prefect-raydog) and fails before any task with one error naming every one that is not the
driver's. Each node here runs Ray from a small venv of its own (RAYDOG_VENV): the driver's
packages, linked, with prefect-raydog left out or installed at another version. And the
userdata that gives a real node the driver's versions."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ray
from cluster_helpers import NAMESPACE, unique_name
from helpers import free_port, no_task_ran
from prefect import flow, task
from typer.testing import CliRunner

from prefect_raydog.blocks import RayDogClusterConfig
from prefect_raydog.cli import app
from prefect_raydog.cluster import RayDogCluster
from prefect_raydog.cluster.client import wait_for_ray_nodes
from prefect_raydog.local.images import node_requirements
from prefect_raydog.runner.placement import pool_resource
from prefect_raydog.runner.versions import NodeAPIUnreachableError, NodeEnvironmentError
from prefect_raydog.spec import ClusterSpec
from prefect_raydog.task_runners import RayDogTaskRunner, placement

pytestmark = pytest.mark.ray
DISTRIBUTION = "prefect-raydog"
VERSION = importlib.metadata.version(DISTRIBUTION)
DRIVER_SITE = Path(sysconfig.get_path("purelib"))
CHECKOUT_PACKAGE = Path(__file__).resolve().parents[1] / "prefect_raydog"
RAY_COMMAND = "#!{python}\nimport sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n"


@pytest.fixture
def node_venv() -> Iterator[Callable[[str | None], Path]]:
    """Makes a node venv (outside /tmp, which a process node has its own of) with the driver's
    packages and prefect-raydog at `version`, or without it (None)."""
    made = tempfile.mkdtemp(prefix="raydog-node-venvs-", dir="/var/tmp")

    def make(version: str | None) -> Path:
        venv = Path(made) / (version or "none")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = next((venv / "lib").glob("python*/site-packages"))
        for entry in DRIVER_SITE.iterdir():
            if not entry.name.startswith(("prefect_raydog", "__editable__")):
                (site / entry.name).symlink_to(entry)
        if version is not None:
            (site / "prefect_raydog").symlink_to(CHECKOUT_PACKAGE)
            info = site / f"prefect_raydog-{version}.dist-info"
            info.mkdir()
            (info / "METADATA").write_text(
                f"Metadata-Version: 2.1\nName: {DISTRIBUTION}\nVersion: {version}\n"
            )
        ray_command = venv / "bin" / "ray"
        ray_command.write_text(RAY_COMMAND.format(python=venv / "bin" / "python"))
        ray_command.chmod(0o755)
        return venv

    yield make
    shutil.rmtree(made)


def runner_for(platform, head_venv: Path | None, worker_venv: Path | None) -> RayDogTaskRunner:
    """A runner for a head and one worker node, each running Ray from its venv (None: the
    driver's)."""
    config = RayDogClusterConfig.local(
        platform.url, platform.key_id, platform.key_secret, worker_nodes=1
    )

    def with_venv(group, venv: Path | None):
        if venv is None:
            return group
        return group.model_copy(update={"environment": {**group.environment,
                                                        "RAYDOG_VENV": str(venv)}})

    config.head = with_venv(config.head, head_venv)
    config.worker_pools = [with_venv(config.worker_pools[0], worker_venv)]
    return RayDogTaskRunner(cluster=config, api_relay_address=platform.host_address)


@task
def where_it_runs() -> tuple[str, str]:
    return sys.prefix, importlib.metadata.version(DISTRIBUTION)


def run_a_task(runner: RayDogTaskRunner, flow_name: str) -> tuple[str, str]:
    """Run a flow named `flow_name` of one task on `runner`; return the task's result."""

    @flow(name=flow_name, task_runner=runner)
    def one_task() -> tuple[str, str]:
        return where_it_runs.submit().result()

    return one_task()


def test_nodes_with_the_drivers_versions_in_their_own_venv_run_tasks(
    prefect_api, platform, node_venv
) -> None:
    venv = node_venv(VERSION)
    prefix, version = run_a_task(runner_for(platform, venv, venv), "versions-match")
    assert (prefix, version) == (str(venv), VERSION)


def test_a_head_without_prefect_raydog_fails_on_connect_before_any_task(
    prefect_api, platform, node_venv
) -> None:
    venv, name = node_venv(None), f"versions-{uuid.uuid4().hex[:8]}"
    with pytest.raises(NodeEnvironmentError) as raised:
        run_a_task(runner_for(platform, venv, venv), name)
    assert no_task_ran(name)
    # The worker may have joined by then, and is named too if so (after the head).
    assert re.fullmatch(
        "The Ray cluster's nodes do not run this driver's versions, so no task was sent to them: "
        rf"the node's Python at {venv}/bin/python \(the head [\d.]+( and worker pool workers "
        rf"[\d.]+)?\) has no prefect-raydog: install it with `pip install prefect-raydog=="
        rf"{re.escape(VERSION)}`\. Give the nodes the driver's versions: `prefect-raydog "
        "node-requirements` prints them, and with --userdata node userdata that installs them "
        "\\(see \"The Ray cluster's nodes do not run this driver's versions\" in "
        "docs/troubleshooting.md\\).",
        str(raised.value),
    ), str(raised.value)
    assert not ray.is_initialized()


def test_a_worker_pool_with_another_prefect_raydog_fails_before_any_task(
    prefect_api, platform, node_venv
) -> None:
    venv, name = node_venv("0.0.1"), f"versions-{uuid.uuid4().hex[:8]}"
    with pytest.raises(NodeEnvironmentError) as raised:
        run_a_task(runner_for(platform, None, venv), name)
    assert no_task_ran(name)
    message = str(raised.value)
    assert re.search(
        rf"[:;] prefect-raydog: the driver has {re.escape(VERSION)}, worker pool workers [\d.]+ "
        r"has 0\.0\.1\. ", message), message
    assert message.count("the driver has") == 1, message
    assert not ray.is_initialized()


def test_a_node_the_connect_check_did_not_see_checks_its_versions_and_api_at_its_first_task(
    prefect_api, platform, node_venv
) -> None:
    """A node that joins a cluster after the driver checked it (here: the process was already
    connected, so the runner checked no node) checks its own versions at its first task run,
    and then that it reaches the Prefect API it was given."""
    spec = ClusterSpec.for_local_platform(unique_name("versions"), NAMESPACE, workers_to_join=1)
    first = spec.worker_pools[0]

    def named(pool_name: str, **environment: str) -> dict[str, object]:
        resources = json.dumps({pool_resource(pool_name): 1000})
        return {"name": pool_name,
                "environment": {**first.environment, "RAY_RESOURCES": resources, **environment}}

    spec.worker_pools[0] = first.model_copy(update=named("first"))
    late = first.model_copy(update=named("late", RAYDOG_VENV=str(node_venv("0.0.1"))))
    with RayDogCluster(spec, client=platform.make_client()) as cluster:
        address = f"ray://{cluster.head_node_private_ip}:10001"
        ray.init(address, namespace="prefect", log_to_driver=False)
        try:
            cluster.add_worker_pool(late)
            wait_for_ray_nodes(3)

            @flow(task_runner=RayDogTaskRunner(address=address,
                                               api_relay_address=platform.host_address))
            def on_the_late_pool() -> tuple[str, str]:
                with placement(worker_pool="late"):
                    return where_it_runs.submit().result()

            with pytest.raises(NodeEnvironmentError) as raised:
                on_the_late_pool()

            unserved = f"http://{platform.host_address}:{free_port(platform.host_address)}/api"

            @flow(task_runner=RayDogTaskRunner(address=address, node_api_url=unserved))
            def given_an_api_it_cannot_reach() -> tuple[str, str]:
                with placement(worker_pool="first"):  # the driver's versions
                    return where_it_runs.submit().result()

            with pytest.raises(NodeAPIUnreachableError) as unreached:
                given_an_api_it_cannot_reach()
        finally:
            ray.shutdown()
    assert re.search(
        r"A node that joined the Ray cluster after the driver checked it cannot reach the "
        rf"Prefect API at {re.escape(unserved)} \(node [\d.]+: \[Errno 111\] Connection "
        r"refused\), so it runs no task run\. Give the nodes a Prefect API URL that they reach "
        r"with RayDogTaskRunner\(node_api_url=\.\.\.\), ",
        str(unreached.value),
    ), str(unreached.value)
    assert re.search(
        r"A node that joined the Ray cluster after the driver checked it does not run the "
        rf"driver's versions, so it runs no task run: prefect-raydog: the driver has "
        rf"{re.escape(VERSION)}, node [\d.]+ has 0\.0\.1\. ",
        str(raised.value),
    ), str(raised.value)


def test_node_userdata_makes_the_drivers_python_and_pinned_packages() -> None:
    printed = CliRunner().invoke(app, ["node-requirements", "--userdata", "pytest"]).stdout
    assert subprocess.run(["bash", "-n"], input=printed, text=True).returncode == 0
    # The script's own settings, as bash reads them: everything before its first command.
    settings = printed.split("\nif ", 1)[0]
    shown = subprocess.run(
        ["bash", "-c", settings + '\nprintf "%s\\n" "$PYTHON_VERSION" "$REQUIREMENTS"'],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    assert shown == [f"{sys.version_info[0]}.{sys.version_info[1]}", *node_requirements(["pytest"])]
