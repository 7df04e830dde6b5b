"""A flow on a node set up as on a YellowDog account with a base image: the node has the
machine's system Python alone, and its userdata is the package's own `node-userdata.sh` as
`prefect-raydog node-requirements --userdata` prints it, which installs the driver's versions
into the head and worker scripts' default venv, offline: from the package mirror of the nodes'
network (the local platform's, standing in for a cloud subnet's). Behind the firewall, reached
over SSH, as every sealed node."""

from __future__ import annotations

import os
import pwd
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from helpers import sealed_preset
from prefect import flow, task

from prefect_raydog.local import LocalPlatform
from prefect_raydog.local.images import node_requirements, node_userdata
from prefect_raydog.spec import NodeGroupSpec
from prefect_raydog.task_runners import RayDogTaskRunner

pytestmark = pytest.mark.ray
BASE_IMAGE = "local/base-vm"
SCRIPTS_VENV = "/opt/yellowdog/agent/venv"  # head.sh's and worker.sh's default RAYDOG_VENV


@pytest.fixture(scope="module")
def local_platform() -> Iterator[LocalPlatform]:
    with LocalPlatform(firewall=True) as platform:
        yield platform


def on_a_base_image(group: NodeGroupSpec) -> NodeGroupSpec:
    """`group` on base-image nodes set up by the package's userdata, with the scripts' venv."""
    environment = {k: v for k, v in group.environment.items() if k != "RAYDOG_VENV"}
    return group.model_copy(update={"template_id": BASE_IMAGE, "userdata": node_userdata(),
                                    "environment": environment})


@task
def what_the_node_has() -> dict[str, object]:
    return {"python": sys.prefix, "uid": os.getuid(), "node": ray.util.get_node_ip_address(),
            "installed": Path("/opt/yellowdog/node-requirements.txt").read_text().split()}


def test_a_flow_runs_on_a_node_that_the_packages_userdata_set_up_from_the_mirror(
        prefect_api: str, local_platform: LocalPlatform, platform: LocalPlatform) -> None:
    # One node, the head, runs the tasks: each node installs the whole list, and every node of a
    # cluster needs the same image (Ray refuses a node whose Python differs in its patch).
    config = sealed_preset(local_platform, worker_nodes=1)
    head = on_a_base_image(config.head)
    head = head.model_copy(update={"environment": {**head.environment,
                                                   "RAY_HEAD_ARGS": "--num-cpus=1"}})
    config = config.model_copy(update={"head": head, "worker_pools": [], "workers_to_join": 0})

    @flow(task_runner=RayDogTaskRunner(cluster=config))
    def on_base_image_nodes() -> tuple[dict[str, object], set[str]]:
        return what_the_node_has.submit().result(), {
            node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}

    ran, nodes = on_base_image_nodes()
    assert ran["python"] == SCRIPTS_VENV
    assert ran["uid"] == pwd.getpwnam("yd-agent").pw_uid
    assert nodes == {ran["node"]}, "the task ran on the head, the cluster's one node"
    assert ran["installed"] == node_requirements()
