"""`prefect-raydog local start` runs the platform in the foreground, prints what a client needs,
and stops cleanly on Ctrl-C, SIGTERM or SIGHUP; killed, it leaves no node process or namespace
either; a bad templates file is an error that says what is wrong."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import wait_for
from process_nodes import Footprint, Pools
from yellowdog_client import PlatformClient
from yellowdog_client.model import ApiKey, ServicesSchema, TaskStatus, WorkerPoolSearch

START = [sys.executable, "-c", "from prefect_raydog.cli import app; app()", "local", "start"]
ENVIRONMENT = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "RAY_AUTH_MODE": "disabled"}
TREE = "sleep 300 & sleep 300 & echo started; wait"


@contextmanager
def local_start(*options: str) -> Iterator[tuple[subprocess.Popen[str], PlatformClient]]:
    """`local start` in a child process, and a client of the platform it printed; afterwards the
    child is ended and nothing of it is left. Without --state-dir, a new one of its own."""
    if "--state-dir" not in options:
        options = (*options, "--state-dir", tempfile.mkdtemp(prefix="raydog-local-state-"))
    process = subprocess.Popen([*START, *options], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=ENVIRONMENT)
    footprint = None
    try:
        printed = ""
        for line in process.stdout:
            printed += line
            if "Press Ctrl-C" in line:
                break
        url = re.search(r"(http://127\.0\.0\.1:\d+)", printed).group(1)
        key_id = re.search(r"key id:\s+(\S+)", printed).group(1)
        key_secret = re.search(r"key secret:\s+(\S+)", printed).group(1)
        footprint = Footprint.of(process.pid)
        process.printed = printed  # type: ignore[attr-defined]
        yield process, PlatformClient.create(ServicesSchema(defaultUrl=url),
                                             ApiKey(key_id, key_secret))
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        if footprint is not None:
            footprint.wait_gone(time.monotonic())


def test_local_start_prints_url_and_key_and_stops_on_ctrl_c() -> None:
    with local_start("--network", "loopback") as (process, client):
        assert client.worker_pool_client.get_worker_pools(WorkerPoolSearch()).list_all() == []
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0


def test_a_restart_with_the_same_state_dir_keeps_the_url_and_key(tmp_path: Path) -> None:
    with local_start("--network", "loopback", "--state-dir", str(tmp_path)) as (first, client):
        first.send_signal(signal.SIGINT)
        assert first.wait(30) == 0
    with local_start("--network", "loopback", "--state-dir", str(tmp_path)) as (second, _):
        assert client.worker_pool_client.get_worker_pools(WorkerPoolSearch()).list_all() == []
        heading = [line for line in second.printed.splitlines() if "key" in line or "http" in line]
        # The URL, the key and the nodes' SSH host key.
        assert all(line in first.printed for line in heading) and len(heading) == 4
        busy = subprocess.run([*START, "--network", "loopback", "--state-dir", str(tmp_path)],
                              capture_output=True, text=True, env=ENVIRONMENT, timeout=60)
        assert busy.returncode == 2 and "already running" in busy.stdout


@pytest.mark.parametrize(("signum", "network"), [
    (signal.SIGTERM, "auto"), (signal.SIGHUP, "auto"), (signal.SIGKILL, "auto"),
    # No bridge, so no reaper: the kernel alone ends the nodes (parent-death signal).
    (signal.SIGKILL, "loopback"),
], ids=["SIGTERM", "SIGHUP", "SIGKILL", "SIGKILL-loopback"])
def test_local_start_ended_by_a_signal_leaves_no_node_process_or_namespace(
        signum: signal.Signals, network: str) -> None:
    with local_start("--network", network) as (process, client):
        pools = Pools(None, client)
        pools.wait_idle(pools.provision(2, "tree"), timeout=60)
        for task in pools.run("tree", [TREE, TREE]):
            pools.wait_task(task.id, TaskStatus.EXECUTING, timeout=60)
        footprint = wait_for(lambda: (found := Footprint.of(process.pid)).names().count(
            "sleep") == 4 and found, timeout=60, what="both task trees to start")
        assert (footprint.bridge is not None) == (network == "auto" and os.geteuid() == 0)
        ended = time.monotonic()
        process.send_signal(signum)
        assert process.wait(60) == (-signal.SIGKILL if signum == signal.SIGKILL else 0)
        seconds = footprint.wait_gone(ended)
    print(f"{signum.name} ({network}): nothing of the platform left {seconds:.2f} s after it")


def test_local_start_refuses_a_bad_templates_file(tmp_path: Path) -> None:
    templates = tmp_path / "templates.toml"
    templates.write_text('[templates."no-slash"]\n')
    result = subprocess.run(
        [*START, "--templates", str(templates)],
        capture_output=True,
        text=True,
        env=ENVIRONMENT,
        timeout=60,
    )
    assert result.returncode == 2
    assert "must be 'namespace/name'" in result.stdout


def test_local_start_refuses_a_firewall_where_nodes_get_no_bridge(tmp_path: Path) -> None:
    result = subprocess.run(
        [*START, "--network", "loopback", "--firewall", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, env=ENVIRONMENT, timeout=60,
    )
    assert result.returncode == 1
    assert "needs the bridge network" in result.stdout
    assert "pass --no-firewall" in result.stdout
