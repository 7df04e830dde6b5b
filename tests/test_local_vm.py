"""Sealed process nodes (`local/vm`), as hard as a cloud VM: a node sees only its image (the
driver's node requirements, built once per content hash), runs its userdata as root at boot (a
failing one keeps the node from registering), and runs tasks and SSH logins as `yd-agent`."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import pwd
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import wait_for
from helpers import authorizing_userdata
from process_nodes import Pools, process_pools
from test_local_ssh import make_key, ssh
from typer.testing import CliRunner
from yellowdog_client.model import InstanceSearch, NodeSearch, TaskStatus

from prefect_raydog import HostKeys, scripts
from prefect_raydog.cli import app
from prefect_raydog.cluster import SSHLogin
from prefect_raydog.local import LocalPlatform
from prefect_raydog.local.images import Image, ensure_image, node_requirements
from prefect_raydog.local.machine import PROJECT
from prefect_raydog.spec import LOCAL_NODE_ENVIRONMENT

VM = "local/vm"
BASE_SITE_PACKAGES = sysconfig.get_path("purelib", vars={"base": sys.base_prefix})


@pytest.fixture(scope="module")
def image() -> Image:
    """The driver's image, built once per machine (its cache is keyed by content) and reused."""
    return ensure_image()


@pytest.fixture
def pools(platform: LocalPlatform, image: Image) -> Pools:
    if platform.runner is None or platform.runner.network.mode != "bridge":
        pytest.fail("sealed nodes need bridge networking (root)")
    with process_pools(platform) as workspace:
        yield workspace


def run(pools: Pools, tag: str, script: str, user_data: str | None = None) -> str:
    """`script`'s output, run as a task on a new sealed node."""
    pool_id = pools.provision(1, tag, VM, user_data)
    pools.wait_idle(pool_id, timeout=60)
    (task,) = pools.run(tag, [script])
    pools.wait_task(task.id, TaskStatus.COMPLETED, TaskStatus.FAILED, timeout=60)
    output = pools.platform.task_output(task.id)
    assert pools.client.work_client.get_task_by_id(task.id).status == TaskStatus.COMPLETED, output
    return output


def test_a_task_sees_only_its_image(pools: Pools) -> None:
    output = run(
        pools,
        "image",
        f"""
python -c 'import prefect_raydog, prefect, ray; print(prefect_raydog.__file__, ray.__version__)'
python -c 'import pytest' 2>&1 | tail -1
for path in {PROJECT} {sys.prefix} {BASE_SITE_PACKAGES} {Path.home() / ".cache"} /opt/wheels; do
    ls -A "$path" 2>/dev/null | head -1 | sed "s|^|$path has |"
done
echo done
""",
    )
    lines = output.splitlines()
    module, ray_version = lines[0].split()
    assert module.startswith("/opt/yellowdog/image/app/prefect_raydog/")
    assert ray_version == importlib.metadata.version("ray")
    assert lines[1] == "ModuleNotFoundError: No module named 'pytest'"
    # The driver's checkout, venv, its interpreter's packages, HOME's cache (pip's, the images)
    # and local package registries are empty on the node.
    assert lines[2:] == ["done"], output


def test_tasks_run_as_yd_agent_in_directories_it_owns(pools: Pools) -> None:
    output = run(
        pools, "user", 'id -u; stat -c %U . "$HOME"; touch /opt/yellowdog/image/x 2>&1 || true'
    )
    uid, task_directory_owner, home_owner, refused = output.splitlines()[:4]
    assert int(uid) == pwd.getpwnam("yd-agent").pw_uid != 0
    assert task_directory_owner == home_owner == "yd-agent"
    assert "Read-only file system" in refused


def test_a_base_image_node_has_the_system_python_alone_and_a_disk_of_its_own(
        pools: Pools) -> None:
    # Each node's userdata writes where a VM's would: its own /opt/yellowdog and /root.
    user_data = ("#!/bin/bash\nhostname > /opt/yellowdog/written-by\n"
                 "hostname > /root/written-by\n")
    pool_id = pools.provision(2, "base", "local/base-vm", user_data)
    pools.wait_idle(pool_id, timeout=60)
    script = ("hostname; cat /opt/yellowdog/written-by /root/written-by; ls /root 2>&1; "
              "command -v python3; command -v python || echo no-python; "
              "python3 -c 'import prefect' 2>&1 | tail -1")
    tasks = pools.run("base", [script, script])
    outputs = []
    for task in tasks:
        pools.wait_task(task.id, TaskStatus.COMPLETED, TaskStatus.FAILED, timeout=60)
        outputs.append(pools.platform.task_output(task.id).splitlines())
    assert len({lines[0] for lines in outputs} | {""}) == 3, "one task on each node"
    for hostname, in_opt, in_root, listing, *rest in outputs:
        assert in_opt == in_root == hostname
        assert "Permission denied" in listing  # /root is root's, as on a VM
        assert rest == ["/usr/bin/python3", "no-python",
                        "ModuleNotFoundError: No module named 'prefect'"]
    assert not Path("/opt/yellowdog/written-by").exists()
    assert not Path("/root/written-by").exists()


def test_userdata_runs_as_root_at_boot_before_any_task(pools: Pools) -> None:
    user_data = "#!/bin/bash\nid -u\necho from-userdata > /tmp/boot-mark\n"
    output = run(pools, "userdata", "cat /tmp/boot-mark", user_data)
    assert output.strip() == "from-userdata"
    (node,) = pools.client.worker_pool_client.get_nodes(
        NodeSearch(workerPoolId=pools.pool_ids[-1])
    ).iterate()
    assert pools.platform.node_boot_output(node.id) == "0\nuserdata exit status: 0\n"


def test_a_node_whose_userdata_fails_never_registers(
    pools: Pools, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "prefect_raydog.local")
    pool_id = pools.provision(1, "broken", VM, "#!/bin/bash\necho cannot-install >&2\nexit 3\n")
    pool = pools.client.worker_pool_client.get_worker_pool_by_id(pool_id)
    compute = pools.client.compute_client
    (instance,) = wait_for(
        lambda: [
            instance
            for instance in compute.get_instances(
                InstanceSearch(computeRequirementId=pool.computeRequirementId)
            ).list_all()
            if instance.status.name == "TERMINATED"
        ],
        60,
        what="the node's instance to end",
    )
    assert pools.client.worker_pool_client.find_nodes(NodeSearch(workerPoolId=pool_id)) == []
    (record,) = [r for r in caplog.records if "failed to boot" in r.getMessage()]
    assert "exit 3" in record.getMessage() and "cannot-install" in record.getMessage()
    node_id = record.args[0]
    assert pools.platform.node_boot_output(node_id).endswith(
        "cannot-install\nuserdata exit status: 3\n"
    )


def _cluster_key(key: Path) -> str:
    """Userdata that authorizes a key made for a cluster (the Builder's, with no key given),
    and that key's private half in `key`."""
    login = SSHLogin.generated("yd-agent", HostKeys(""))
    key.write_text(login.private_key.get_secret_value())
    key.chmod(0o600)
    return login.authorizing("#!/bin/bash\nset -euo pipefail\n")


@pytest.mark.parametrize("key_from", ["given", "made for the cluster"])
def test_an_ssh_login_runs_as_yd_agent_from_the_image(
        pools: Pools, tmp_path: Path, key_from: str) -> None:
    key = tmp_path / "id_ed25519"
    user_data = (authorizing_userdata(make_key(key)) if key_from == "given"
                 else _cluster_key(key))
    pool_id = pools.provision(1, "login", VM, user_data)
    pools.wait_idle(pool_id, timeout=60)
    (node,) = pools.client.worker_pool_client.get_nodes(NodeSearch(workerPoolId=pool_id)).iterate()
    result = ssh(
        key,
        node.details.publicIpAddress,
        "id -u; whoami; python -c 'import prefect_raydog; print(prefect_raydog.__file__)'; "
        # Its home is its own, login files included (`ray up` appends to ~/.bashrc).
        "echo '# mine' >> ~/.bashrc && echo '# mine' >> ~/.profile && echo home-is-mine",
        pools.platform.ssh_known_hosts,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 4, result.stdout + result.stderr
    uid, name, module, home = result.stdout.splitlines()
    assert int(uid) == pwd.getpwnam("yd-agent").pw_uid and name == "yd-agent"
    assert module.startswith("/opt/yellowdog/image/app/")
    assert home == "home-is-mine"


RAY_JOB = """
import os, sys, ray
ray.init(sys.argv[1], logging_level="ERROR")
where = ray.remote(lambda: (os.getuid(), sys.prefix, ray.__file__)).remote()
print(*ray.get(where))
"""


def test_ray_starts_from_the_image_as_yd_agent_and_runs_a_task(pools: Pools) -> None:
    pool_id = pools.provision(1, "ray", VM)
    pools.wait_idle(pool_id, timeout=60)
    (node,) = pools.client.worker_pool_client.get_nodes(NodeSearch(workerPoolId=pool_id)).iterate()
    environment = {**LOCAL_NODE_ENVIRONMENT, "RAYDOG_VENV": "/opt/yellowdog/image/venv",
                   "RAY_HEAD_ARGS": "--num-cpus=1"}
    (head,) = pools.run("ray", [scripts.load("head")], environment)
    address = node.details.privateIpAddress
    wait_for(lambda: listening(address, 10001, head.id, pools), 120, 0.5, "Ray Client on the head")
    job = subprocess.run(
        [sys.executable, "-c", RAY_JOB, f"ray://{address}:10001"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert job.returncode == 0, job.stderr[-3000:]
    uid, prefix, module = job.stdout.split()
    assert int(uid) == pwd.getpwnam("yd-agent").pw_uid
    assert prefix == "/opt/yellowdog/image/venv"
    assert module.startswith("/opt/yellowdog/image/venv/")


def listening(address: str, port: int, task_id: str, pools: Pools) -> bool:
    """Whether `address:port` accepts connections; fails at once if the task has ended."""
    task = pools.client.work_client.get_task_by_id(task_id)
    assert task.status in (
        TaskStatus.EXECUTING,
        TaskStatus.DOWNLOADING,
        TaskStatus.PENDING,
        TaskStatus.READY,
        TaskStatus.ALLOCATED,
    ), pools.platform.task_output(task_id)
    with contextlib.suppress(OSError), socket.create_connection((address, port), 1):
        return True
    return False


def test_node_requirements_pin_the_drivers_versions_of_what_nodes_need() -> None:
    version = importlib.metadata.version
    lines = node_requirements(["pytest", "not-installed-here>=1"])
    assert lines[0] == f"prefect-raydog=={version('prefect-raydog')}"
    assert f"ray[client,default]=={version('ray')}" in lines
    assert f"prefect=={version('prefect')}" in lines
    assert lines[-2:] == [f"pytest=={version('pytest')}", "not-installed-here>=1"]
    # The package's own extras (docs, test) are not for nodes.
    assert not [line for line in lines if line.startswith(("mkdocs", "selenium"))]
    printed = CliRunner().invoke(app, ["node-requirements", "pytest"]).stdout.splitlines()
    assert printed == [
        f"# Python {sys.version_info[0]}.{sys.version_info[1]} (the node's must match)",
        *node_requirements(["pytest"]),
    ]


def test_userdata_runs_once_per_instance_not_again_when_a_stopped_one_starts(
    pools: Pools,
) -> None:
    pool_id = pools.provision(1, "restart", VM, "#!/bin/bash\necho booting\n")
    pools.wait_idle(pool_id, timeout=60)
    pool = pools.client.worker_pool_client.get_worker_pool_by_id(pool_id)
    compute = pools.client.compute_client

    def instance_is(status: str) -> bool:
        search = InstanceSearch(computeRequirementId=pool.computeRequirementId)
        return [i.status.name for i in compute.get_instances(search).list_all()] == [status]

    compute.stop_compute_requirement_by_id(pool.computeRequirementId)
    wait_for(lambda: instance_is("STOPPED"), 60, what="the instance to stop")
    compute.start_compute_requirement_by_id(pool.computeRequirementId)
    wait_for(lambda: instance_is("RUNNING"), 60, what="the instance to start again")
    pools.wait_idle(pool_id, timeout=60)
    (node,) = pools.client.worker_pool_client.get_nodes(NodeSearch(workerPoolId=pool_id)).iterate()
    assert pools.platform.node_boot_output(node.id) == "booting\nuserdata exit status: 0\n"
    (task,) = pools.run("restart", ["id -u"])
    pools.wait_task(task.id, TaskStatus.COMPLETED, timeout=60)


def test_a_pool_shut_down_while_its_node_runs_userdata_ends_it_and_the_node_never_registers(
    pools: Pools,
) -> None:
    pool_id = pools.provision(1, "slow-boot", VM, "#!/bin/bash\nsleep 600\n")
    booting = wait_for(pools.platform.runner.processes, 60, what="the userdata to run")
    pools.client.worker_pool_client.shutdown_worker_pool_by_id(pool_id)
    wait_for(
        lambda: not alive(booting),
        30,
        what="the userdata to end",
    )
    assert pools.client.worker_pool_client.find_nodes(NodeSearch(workerPoolId=pool_id)) == []


def test_a_platform_that_stops_ends_a_userdata_still_running(image: Image) -> None:
    with LocalPlatform() as platform:
        Pools(platform).provision(1, "slow-boot", VM, "#!/bin/bash\nsleep 600\n")
        booting = wait_for(platform.runner.processes, 60, what="the userdata to run")
    wait_for(lambda: not alive(booting), 10, what="the userdata to end")


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a zombie, killed and not yet reaped, is not)."""
    running = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                running.append(pid)
    return running
