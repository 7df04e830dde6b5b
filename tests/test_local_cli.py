"""`prefect-raydog local start` runs the platform in the foreground, prints what a client needs,
and stops cleanly on Ctrl-C; a bad templates file is an error that says what is wrong."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from yellowdog_client import PlatformClient
from yellowdog_client.model import ApiKey, ServicesSchema, WorkerPoolSearch

START = [sys.executable, "-c", "from prefect_raydog.cli import app; app()", "local", "start"]
ENVIRONMENT = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "RAY_AUTH_MODE": "disabled"}


def test_local_start_prints_url_and_key_and_stops_on_ctrl_c() -> None:
    process = subprocess.Popen(
        [*START, "--network", "loopback"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENVIRONMENT,
    )
    try:
        printed = ""
        for line in process.stdout:
            printed += line
            if "Press Ctrl-C" in line:
                break
        url = re.search(r"(http://127\.0\.0\.1:\d+)", printed).group(1)
        key_id = re.search(r"key id:\s+(\S+)", printed).group(1)
        key_secret = re.search(r"key secret:\s+(\S+)", printed).group(1)
        client = PlatformClient.create(ServicesSchema(defaultUrl=url), ApiKey(key_id, key_secret))
        assert client.worker_pool_client.get_worker_pools(WorkerPoolSearch()).list_all() == []
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


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
