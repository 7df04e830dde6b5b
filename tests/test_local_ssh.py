"""SSH into process nodes of the local platform, as into a cloud VM: a node whose userdata holds
a public key accepts that key as `yd-agent` on its public address and shows the node's own view
(hostname, private /tmp, home); nodes without a key, or another key, are refused."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from conftest import wait_for
from helpers import authorizing_userdata
from process_nodes import Pools, process_pools
from yellowdog_client.model import (
    ComputeRequirementTemplateUsage,
    NodeSearch,
    NodeWorkerTarget,
    NodeWorkerTargetType,
    ProvisionedWorkerPoolProperties,
    TaskStatus,
    WorkerPoolStatus,
)

from prefect_raydog.local import LocalPlatform

pytestmark = pytest.mark.system_packages("openssh-server")


def make_key(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return (path.parent / f"{path.name}.pub").read_text().strip()


def ssh(key: Path, address: str, command: str, known_hosts: str, stdin: str | None = None
        ) -> subprocess.CompletedProcess[str]:
    """`command` run over OpenSSH as yd-agent (reading `stdin`), the node's host key checked
    against `known_hosts` (the platform's `ssh_known_hosts`)."""
    pinned = Path(key).with_name(f"{Path(key).name}.known_hosts")
    pinned.write_text(f"{known_hosts}\n")
    return subprocess.run(
        ["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
         "-o", f"UserKnownHostsFile={pinned}", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
         f"yd-agent@{address}", command],
        input=stdin, capture_output=True, text=True, timeout=60)


def provision(pools: Pools, tag: str, user_data: str | None) -> str:
    pool = pools.client.worker_pool_client.provision_worker_pool(
        ComputeRequirementTemplateUsage(
            templateId="local/process", requirementName=f"pool-{uuid.uuid4().hex[:8]}",
            requirementNamespace=pools.namespace, targetInstanceCount=1, userData=user_data),
        ProvisionedWorkerPoolProperties(
            createNodeWorkers=NodeWorkerTarget(NodeWorkerTargetType.PER_NODE, 1),
            workerTag=tag, maxNodes=1))
    pools.pool_ids.append(pool.id)
    return pool.id


def node_of(pools: Pools, pool_id: str):
    client = pools.client.worker_pool_client
    wait_for(lambda: client.get_worker_pool_by_id(pool_id).status == WorkerPoolStatus.IDLE,
             30, what="the pool's node to be up")
    (node,) = client.get_nodes(NodeSearch(workerPoolId=pool_id)).iterate()
    return node


@pytest.fixture
def pools(platform: LocalPlatform):
    if platform.runner is None or platform.runner.network.mode != "bridge":
        pytest.fail("SSH into process nodes needs bridge networking (root)")
    with process_pools(platform) as workspace:
        yield workspace


def test_a_key_in_userdata_opens_ssh_on_the_nodes_public_address(
        pools: Pools, tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    public = make_key(key)
    user_data = authorizing_userdata(public)
    pool_id = provision(pools, "ssh", user_data)
    node = node_of(pools, pool_id)
    (task,) = pools.run("ssh", ["echo from-the-task > /tmp/mark; sleep 300"])
    pools.wait_task(task.id, TaskStatus.EXECUTING)

    result = ssh(key, node.details.publicIpAddress, known_hosts=pools.platform.ssh_known_hosts,
                 command='hostname; echo "$HOME"; whoami; cat /tmp/mark; command -v python3; '
                 'cat /proc/1/cmdline | tr "\\0" " "; echo; ls /proc | grep -c "^[0-9]"')
    assert result.returncode == 0, result.stderr
    hostname, home, user, mark, python, first, count = result.stdout.split("\n")[:7]
    assert hostname == node.details.hostname
    assert Path(home).name == "home" and user == "root"
    assert mark == "from-the-task"
    assert python.startswith("/")
    # The login shares the task's PID namespace, as on a VM: it sees the task and few others.
    assert first.strip() == "/bin/bash taskdata.txt" and int(count) < 10

    other = tmp_path / "other"
    make_key(other)
    assert ssh(other, node.details.publicIpAddress, "true",
               pools.platform.ssh_known_hosts).returncode == 255


def test_a_node_without_a_key_in_userdata_runs_no_ssh_server(
        pools: Pools, tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    make_key(key)
    node = node_of(pools, provision(pools, "nossh", "#!/bin/bash\necho no keys here\n"))
    result = ssh(key, node.details.publicIpAddress, "true", pools.platform.ssh_known_hosts)
    assert result.returncode == 255
    assert "refused" in result.stderr.lower()
