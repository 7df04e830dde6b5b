"""The example flows run as users run them: `flows/local_platform_demo.py` exits 0 after printing
what each of its two bash tasks printed, each on its own node, and `flows/quickstart.py` (the
README's main command) spreads its map over the two worker nodes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

FLOWS = Path(__file__).parent.parent / "flows"
DEMO = FLOWS / "local_platform_demo.py"


def test_local_platform_demo_runs_a_task_on_each_node_and_ends_cleanly() -> None:
    result = subprocess.run(
        [sys.executable, str(DEMO)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout
    for task in ("hello-0", "hello-1"):
        assert task in output
    task_ids = re.findall(r"YD_TASK_ID:\s+(ydid:task:\S+)", output)
    instance_ids = re.findall(r"YD_INSTANCE_ID:\s+(i-\w+)", output)
    hostnames = re.findall(r"hostname:\s+(yd-\w+)", output)
    assert len(set(task_ids)) == 2
    assert len(set(instance_ids)) == 2
    assert len(set(hostnames)) == 2, "each task ran on its own node"
    assert "nothing is left live" in output


def test_quickstart_runs_its_map_on_the_worker_nodes():
    """The README's main command: the quickstart flow on the local preset."""
    result = subprocess.run(
        [sys.executable, str(FLOWS / "quickstart.py")], capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if "tasks ran on node" in line]
    assert len(lines) == 2 and sum(int(line.split()[0]) for line in lines) == 300
