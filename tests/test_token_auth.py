"""A cluster reached over SSH is locked with a Ray token of its own: the runner builds it, writes
the token into each node's file over SSH (the workers through the head), runs its tasks, and
the head refuses a Ray Client without the token. The token is in no task's environment,
userdata, task output or log. The Builder given an `SSHLogin` refuses a bad key before
anything is provisioned, and fails a build whose head refuses the key or shows another host
key, leaving nothing (its locked cluster end to end: tests/test_cluster_sealed.py)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import threading
import uuid
from pathlib import Path

import paramiko
import pytest
import ray
from conftest import assert_nothing_left
from helpers import authorizing_userdata, head_ips
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from pydantic import SecretStr
from test_local_ssh import make_key
from yellowdog_client.model import ComputeRequirementSearch, TaskSearch, WorkRequirementSearch

from prefect_raydog import ClusterSpec, HostKeys, RayDogCluster, SSHLogin
from prefect_raydog.blocks import RayDogClusterConfig
from prefect_raydog.cluster import create_client
from prefect_raydog.cluster.token_auth import RAY_TOKEN_FILE
from prefect_raydog.errors import ClusterBuildError
from prefect_raydog.task_runners import RayDogTaskRunner

pytestmark = [pytest.mark.ray, pytest.mark.system_packages("openssh-server")]
BLOCK = "local-locked-cluster"


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> Path:
    """A fresh SSH key; its public half is in `key.userdata`."""
    key = tmp_path_factory.mktemp("ssh") / "id_ed25519"
    (key.parent / "userdata").write_text(authorizing_userdata(make_key(key)))
    return key


def authorizing(group, key: Path):
    """The node group with userdata that authorizes `key`."""
    return group.model_copy(update={"userdata": (key.parent / "userdata").read_text()})


@pytest.fixture(scope="module")
def block(prefect_api, local_platform, key) -> str:
    """A block whose head and worker nodes accept the key, reached through an SSH tunnel."""
    config = RayDogClusterConfig.local(local_platform.url, local_platform.key_id,
                                       local_platform.key_secret, worker_nodes=1,
                                       ssh_known_hosts=local_platform.ssh_known_hosts)
    config.model_copy(update={
        "ssh_tunnel": True, "ssh_private_key": SecretStr(key.read_text()),
        "head": authorizing(config.head, key),
        "worker_pools": [authorizing(config.worker_pools[0], key)],
    }).save(BLOCK, overwrite=True)
    return BLOCK


@task
def node_ip(x: int) -> tuple[int, str]:
    return x + 1, ray.util.get_node_ip_address()


def _ssh_transports() -> list[paramiko.Transport]:
    return [thread for thread in threading.enumerate()
            if isinstance(thread, paramiko.Transport) and thread.is_active()]


def _probe(key: Path, head: str, known_hosts: str) -> tuple[str, object, object]:
    """The head's token file, read over SSH, and a Ray Client job without and with it."""
    from test_local_ssh import ssh  # here: the flow that calls this travels to the nodes
    from test_locked_head import ray_job, refused_job

    token = ssh(key, head, f"cat ~/{RAY_TOKEN_FILE}", known_hosts).stdout
    refused = refused_job(f"ray://{head}:10001")
    accepted = ray_job(f"ray://{head}:10001", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return token, refused, accepted


def platform_records(platform) -> tuple[list[dict], list[str], list[str]]:
    """What the platform recorded, read over its API: every task (environment, task data), the
    userdata of every compute requirement, and every task's output."""
    client = create_client(platform.key_id, platform.key_secret, platform.url)
    try:
        tasks = [
            dataclasses.asdict(item)
            for requirement in client.work_client.get_work_requirements(
                WorkRequirementSearch(namespace="local")).iterate()
            for item in client.work_client.get_tasks(
                TaskSearch(workRequirementId=requirement.id)).iterate()
        ]
        userdata = [
            source.userData or ""
            for requirement in client.compute_client.get_compute_requirements(
                ComputeRequirementSearch(namespace="local")).iterate()
            for source in requirement.provisionStrategy.sources
        ]
    finally:
        client.close()
    return tasks, userdata, [platform.task_output(item["id"]) for item in tasks]


def test_a_cluster_reached_over_ssh_is_token_locked_and_the_token_leaks_nowhere(
    block, key, platform, caplog, capfd
):
    caplog.set_level(logging.DEBUG)
    known_hosts = platform.ssh_known_hosts

    @flow(task_runner=RayDogTaskRunner(cluster=block, api_relay_address=platform.host_address))
    def locked():
        results = node_ip.map(range(2)).result()
        (head,) = head_ips()
        return results, head, *_probe(key, head, known_hosts), len(_ssh_transports())

    state = locked(return_state=True)
    results, head, token, refused, accepted, transports = state.result()
    assert [value for value, _ in results] == [1, 2]
    assert {ip for _, ip in results} - {head}, "the tasks ran on the worker node"
    assert len(token) == 64, "the head's token file holds the cluster's token"
    # Ray Client retries a refused handshake until it gives up: "ray client connection timeout".
    assert refused.returncode != 0 and "answer" not in refused.stdout
    assert accepted.stdout.split() == ["answer", "42"], accepted.stderr[-3000:]
    assert transports == 1, "one SSH connection carries the token's delivery and the tunnel"

    assert_nothing_left(platform)
    assert not ray.is_initialized() and not _ssh_transports()
    tasks, userdata, outputs = platform_records(platform)
    locked_tasks = [item for item in tasks
                    if (item.get("environment") or {}).get("RAYDOG_TOKEN_FILE") == RAY_TOKEN_FILE]
    assert len(locked_tasks) >= 2, "the head's and the worker's tasks name the token file"
    assert any("authorized_keys" in text for text in userdata), "the userdata was read"
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[state.state_details.flow_run_id])))
    assert logs, "the flow run's logs were read"
    captured = capfd.readouterr()
    places = {
        "task records": json.dumps(tasks, default=str), "userdata": "\n".join(userdata),
        "task output": "\n".join(outputs), "flow run log": "\n".join(log.message for log in logs),
        "captured logs": caplog.text, "stdout": captured.out, "stderr": captured.err,
        "environment": json.dumps(dict(os.environ)),
    }
    assert [where for where, text in places.items() if token in text] == []


def test_an_unreadable_ssh_key_is_refused_before_anything_is_provisioned(platform):
    spec = ClusterSpec.for_local_platform(f"badkey-{uuid.uuid4().hex[:6]}")
    client = create_client(platform.key_id, platform.key_secret, platform.url)
    try:
        with pytest.raises(ValueError, match="ssh_private_key: not a private key paramiko"):
            RayDogCluster(spec, client, ssh=SSHLogin("yd-agent", SecretStr("not a key")))
    finally:
        client.close()
    assert platform.api_calls() == {}


def test_a_head_that_does_not_accept_the_key_fails_the_build_and_leaves_nothing(key, platform):
    spec = ClusterSpec.for_local_platform(f"refused-{uuid.uuid4().hex[:6]}")  # no key in userdata
    client = create_client(platform.key_id, platform.key_secret, platform.url)
    login = SSHLogin("yd-agent", SecretStr(key.read_text()),
                     host_keys=HostKeys(platform.ssh_known_hosts))
    try:
        cluster = RayDogCluster(spec, client, ssh=login)
        with pytest.raises(ClusterBuildError, match="Writing the Ray token to the head") as error:
            cluster.build()
    finally:
        client.close()
    assert "Cleaned up: " in str(error.value) and not _ssh_transports()
    assert_nothing_left(platform)


def test_a_head_with_another_host_key_than_the_pinned_one_fails_the_build_before_any_login(
    key, platform, tmp_path
):
    spec = ClusterSpec.for_local_platform(f"hostkey-{uuid.uuid4().hex[:6]}")
    spec = spec.model_copy(update={"head": authorizing(spec.head, key)})
    pinned = HostKeys(make_key(tmp_path / "other"))  # not the nodes' host key
    client = create_client(platform.key_id, platform.key_secret, platform.url)
    try:
        cluster = RayDogCluster(spec, client, ssh=SSHLogin(
            "yd-agent", SecretStr(key.read_text()), host_keys=pinned))
        with pytest.raises(ClusterBuildError) as error:
            cluster.build()
    finally:
        client.close()
    head = cluster.head_node_public_ip or cluster.head_node_private_ip
    seen = _fingerprint(platform.ssh_known_hosts)
    assert f"failed: HostKeyRefused: The SSH host key of {head} is {seen}, not a key" in str(
        error.value)
    assert "Cleaned up: " in str(error.value) and not _ssh_transports()
    assert_nothing_left(platform)


def _fingerprint(known_hosts_line: str) -> str:
    """OpenSSH's own type and fingerprint of a known_hosts line's key."""
    key_type, key = known_hosts_line.split()[1:3]
    output = subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=f"{key_type} {key}\n",
                            check=True, capture_output=True, text=True).stdout
    return f"{key_type} {output.split()[1]}"
