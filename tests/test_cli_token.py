"""`prefect-raydog up` with a login to the nodes leaves a cluster locked with a Ray token of its
own: kept in a 0600 file beside the state file, in nothing the platform records or the command
prints; Ray Client without it is refused, `RayDogTaskRunner(address=...)` with it (Ray reading
`RAY_AUTH_MODE` and `RAY_AUTH_TOKEN_PATH`) runs a task on a worker node; `down` ends the
cluster and deletes the file. A worker that cannot get the token ends the cluster `up` built."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from helpers import authorizing_userdata
from test_cli_clusters import assert_one_line_error, invoke
from test_local_ssh import make_key
from test_locked_head import refused_job
from test_token_auth import authorizing, platform_records

from prefect_raydog import ClusterSpec
from prefect_raydog.local import LocalPlatform

pytestmark = [pytest.mark.ray, pytest.mark.system_packages("openssh-server")]

ATTACHED_FLOW = """
import sys
import ray
from prefect import flow, task
from prefect_raydog.task_runners import RayDogTaskRunner

@task
def where() -> str:
    return ray.util.get_node_ip_address()

@flow(task_runner=RayDogTaskRunner(address=sys.argv[1], api_relay_address=sys.argv[2]))
def attached() -> str:
    return where.submit().result()

print("ran on", attached())
"""


def _spec_file(tmp_path: Path, workers: int = 2, workers_accept_the_key: bool = True,
               **fields: object) -> tuple[Path, Path]:
    """A local-platform cluster of a head and workers whose nodes accept a fresh key (or only
    its head does); the spec file and the key."""
    key = tmp_path / "id_ed25519"
    (tmp_path / "userdata").write_text(authorizing_userdata(make_key(key)))
    spec = ClusterSpec.for_local_platform(f"cli-locked-{uuid.uuid4().hex[:6]}",
                                          pool_sizes=(workers,), **fields)
    spec = spec.model_copy(update={"head": authorizing(spec.head, key), "worker_pools": [
        authorizing(pool, key) if workers_accept_the_key else pool
        for pool in spec.worker_pools]})
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(spec.model_dump(mode="json", exclude_none=True)))
    return path, key


def _attached_flow(head: str, host: str, token_file: Path, prefect_api: str) -> str:
    """ATTACHED_FLOW in a process of its own, with Ray's token variables as the user sets them."""
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("RAY_AUTH")}
    result = subprocess.run(
        [sys.executable, "-c", ATTACHED_FLOW, f"ray://{head}:10001", host],
        capture_output=True, text=True, timeout=600,
        env={**environment, "PREFECT_API_URL": prefect_api, "RAY_AUTH_MODE": "token",
             "RAY_AUTH_TOKEN_PATH": str(token_file)})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_up_with_an_ssh_key_locks_the_cluster_it_leaves_and_down_deletes_its_token(
    platform: LocalPlatform, prefect_api: str, tmp_path: Path
):
    spec, key = _spec_file(tmp_path)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(platform.ssh_known_hosts)
    state = tmp_path / "state.json"
    token_file = tmp_path / "state.json.ray-token"
    up = invoke(platform, "up", str(spec), "--state-file", str(state),
                "--ssh-key", str(key), "--ssh-known-hosts", str(known_hosts))
    try:
        assert up.exit_code == 0, up.output
        token, mode = token_file.read_text(), stat.S_IMODE(token_file.stat().st_mode)
        head = up.output.split("head private IP: ")[1].split()[0]
        public = up.output.split("head public IP:  ")[1].split()[0]
        refused = refused_job(f"ray://{head}:10001")
        ran_on = _attached_flow(head, platform.host_address, token_file, prefect_api)
    finally:
        down = invoke(platform, "down", str(state))
    assert len(token) == 64 and mode == 0o600, "the token, for this user alone"
    assert f"RAY_AUTH_TOKEN_PATH={token_file}" in up.output
    assert public != head and (f"From outside:    ssh -N -L 10001:127.0.0.1:10001 -L "
                               f"8265:127.0.0.1:8265 yd-agent@{public}, then") in up.output
    assert refused.returncode != 0 and "answer" not in refused.stdout
    ran = ran_on.split("ran on ")[1].split()[0]
    assert ran != head, "the task ran on a worker node"
    assert down.exit_code == 0, down.output
    assert f"deleted:      its Ray token {token_file}" in down.output
    assert not token_file.exists()
    tasks, userdata, outputs = platform_records(platform)
    places = {"up's output": up.output, "task records": json.dumps(tasks, default=str),
              "userdata": "\n".join(userdata), "task output": "\n".join(outputs)}
    assert [where for where, text in places.items() if token in text] == []


def test_a_worker_that_cannot_get_the_token_ends_the_cluster_up_leaves(
    platform: LocalPlatform, tmp_path: Path
):
    spec, key = _spec_file(tmp_path, workers=1, workers_accept_the_key=False,
                           build_timeout=timedelta(seconds=60))
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(platform.ssh_known_hosts)
    state = tmp_path / "state.json"
    up = invoke(platform, "up", str(spec), "--state-file", str(state),
                "--ssh-key", str(key), "--ssh-known-hosts", str(known_hosts))
    assert up.exit_code == 1, up.output
    assert "Error: Writing the Ray token to the worker nodes failed (1 of 1 worker nodes lack " \
           "it: " in up.output
    assert "was shut down" in up.output and "Ray token:" not in up.output
    assert not (tmp_path / "state.json.ray-token").exists()


def test_a_bad_ssh_key_or_host_key_file_is_one_line_before_anything_is_provisioned(
    platform: LocalPlatform, tmp_path: Path
):
    spec = tmp_path / "cluster.json"
    spec.write_text(ClusterSpec.for_local_platform("cli-badkey").model_dump_json())
    not_a_key, bad_hosts = tmp_path / "id", tmp_path / "known_hosts"
    not_a_key.write_text("not a key")
    bad_hosts.write_text("10.0.0.1 ssh-ed25519 not-base64!\n")
    assert_one_line_error(invoke(platform, "up", str(spec), "--ssh-key", str(not_a_key)),
                          f"--ssh-key: {not_a_key}: not a private key paramiko can read")
    assert_one_line_error(invoke(platform, "up", str(spec), "--ssh-key", str(tmp_path / "no")),
                          f"--ssh-key: cannot read {tmp_path / 'no'}: No such file")
    assert_one_line_error(
        invoke(platform, "up", str(spec), "--ssh-key", str(not_a_key),
               "--ssh-known-hosts", str(bad_hosts)),
        f"--ssh-known-hosts: {bad_hosts}: line 1: the key is not valid base64")
    assert platform.api_calls() == {}
