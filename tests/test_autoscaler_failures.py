"""The RayDog Autoscaler when things go wrong: a head node that cannot start fails `ray up` with
its task's error and leaves nothing behind; bad YAML is refused naming the key, before anything
is provisioned."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from autoscaler_helpers import RayCluster

from prefect_raydog.local import LocalPlatform

pytestmark = [pytest.mark.ray, pytest.mark.system_packages("openssh-server", "rsync")]


def test_a_head_that_cannot_start_fails_ray_up_with_its_error_and_leaves_nothing(
        platform: LocalPlatform, tmp_path: Path) -> None:
    cluster = RayCluster(platform, tmp_path, provider__ray_head_node_task_script=(
        "#!/bin/bash\necho the head cannot start >&2\nexit 3\n"))
    result = cluster.up(check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "The head node of cluster 'raydog-local' did not start" in output
    assert "exit code 3" in output
    # The `platform` fixture checks that nothing is left live.


def test_a_bad_node_config_key_is_refused_by_name_before_anything_is_provisioned(
        platform: LocalPlatform, tmp_path: Path) -> None:
    cluster = RayCluster(platform, tmp_path, available_node_types__cpu__node_config={
        "compute_requirement_template": "local/process", "instance_typo": "x"})
    result = cluster.up(check=False)
    assert result.returncode != 0
    assert "available_node_types.cpu.node_config.instance_typo" in result.stdout + result.stderr
    assert platform.api_calls().get("POST /workerPools/provisioned/template", 0) == 0


def test_a_head_with_another_host_key_than_the_pinned_one_fails_ray_up_and_leaves_nothing(
        platform: LocalPlatform, tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "pin")],
                   check=True)
    cluster = RayCluster(platform, tmp_path,
                         provider__ssh_known_hosts=(tmp_path / "pin.pub").read_text())
    result = cluster.up(check=False)
    assert result.returncode != 0
    seen = platform.ssh_known_hosts.split()[1:3]
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=" ".join(seen),
                                 capture_output=True, text=True, check=True).stdout.split()[1]
    assert re.search(rf"The SSH host key of \S+ \({re.escape(fingerprint)}\) is not one that "
                     "provider.ssh_known_hosts gives for it", result.stdout + result.stderr)
    # The `platform` fixture checks that nothing is left live.


def test_a_cluster_yaml_without_host_keys_is_refused_before_anything_is_provisioned(
        platform: LocalPlatform, tmp_path: Path) -> None:
    cluster = RayCluster(platform, tmp_path, provider__ssh_known_hosts=None)
    result = cluster.up(check=False)
    assert result.returncode != 0
    assert "provider.ssh_known_hosts: required" in result.stdout + result.stderr
    assert platform.api_calls().get("POST /workerPools/provisioned/template", 0) == 0


def test_the_provider_imports_without_prefect() -> None:
    code = ("import sys, prefect_raydog.autoscaler; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'prefect'], 'prefect'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
