"""A head locked with Ray's token authentication: the package's head.sh on a sealed node waits for
its token file, written over SSH after the task started, and then refuses Ray Client without it."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_for
from helpers import authorizing_userdata
from process_nodes import Pools, process_pools
from test_local_ssh import make_key, ssh
from test_local_vm import VM, listening
from yellowdog_client.model import NodeSearch

from prefect_raydog import scripts
from prefect_raydog.local import LocalPlatform
from prefect_raydog.local.images import ensure_image
from prefect_raydog.spec import LOCAL_NODE_ENVIRONMENT

TOKEN_FILE = ".raydog/ray-token"
RAY_JOB = """
import sys, ray
ray.init(sys.argv[1], logging_level="ERROR")
print("answer", ray.get(ray.remote(lambda: 6 * 7).remote()))
"""


@pytest.fixture
def pools(platform: LocalPlatform) -> Pools:
    ensure_image()
    if platform.runner is None or platform.runner.network.mode != "bridge":
        pytest.fail("sealed nodes need bridge networking (root)")
    with process_pools(platform) as workspace:
        yield workspace


def ray_job(address: str, **auth: str) -> subprocess.CompletedProcess[str]:
    """A Ray Client job from the host, in a process of its own (Ray keeps its auth mode)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return subprocess.run([sys.executable, "-c", RAY_JOB, address], capture_output=True,
                          text=True, timeout=300, env={**environment, **auth})


def refused_job(address: str) -> subprocess.CompletedProcess[str]:
    """`ray_job` without a token. Ray Client retries a refused handshake, waiting 5, 10 and 20 s,
    then gives up ("ray client connection timeout"); from 1 s, the same three tries take 7."""
    return ray_job(address, RAY_AUTH_MODE="disabled", RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S="1")


def _deliver(key: Path, address: str, token: str, known_hosts: str) -> None:
    """The token into the node's agent home over SSH, from stdin, never on a command line."""
    command = (f"umask 077 && mkdir -p ~/.raydog && cat > ~/{TOKEN_FILE}.part && "
               f"mv ~/{TOKEN_FILE}.part ~/{TOKEN_FILE}")
    result = ssh(key, address, command, known_hosts, stdin=token)
    assert result.returncode == 0, result.stderr


def test_a_head_with_a_token_file_refuses_ray_client_without_the_token(pools: Pools, tmp_path):
    key = tmp_path / "id_ed25519"
    public = make_key(key)
    user_data = authorizing_userdata(public)
    pool_id = pools.provision(1, "locked", VM, user_data)
    pools.wait_idle(pool_id, timeout=60)
    (node,) = pools.client.worker_pool_client.get_nodes(NodeSearch(workerPoolId=pool_id)).iterate()
    environment = {**LOCAL_NODE_ENVIRONMENT, "RAYDOG_VENV": "/opt/yellowdog/image/venv",
                   "RAY_HEAD_ARGS": "--num-cpus=1", "RAYDOG_TOKEN_FILE": TOKEN_FILE}
    (head,) = pools.run("locked", [scripts.load("head")], environment)
    token = secrets.token_hex(32)
    _deliver(key, node.details.publicIpAddress, token, pools.platform.ssh_known_hosts)
    address = node.details.privateIpAddress
    wait_for(lambda: listening(address, 10001, head.id, pools), 120, 0.5, "Ray Client on the head")

    refused = refused_job(f"ray://{address}:10001")
    assert refused.returncode != 0 and "answer" not in refused.stdout
    accepted = ray_job(f"ray://{address}:10001", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    assert accepted.stdout.split() == ["answer", "42"], accepted.stderr[-3000:]
    assert token not in pools.platform.task_output(head.id)
