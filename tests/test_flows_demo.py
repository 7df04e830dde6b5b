"""The example flows run as users run them: `flows/local_platform_demo.py` exits 0 after printing
what each of its two bash tasks printed, each on its own node, and leaves nothing running.
(`flows/quickstart.py`, the README's main command, is run as a new user runs it in
`test_readme_commands.py`.)"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from process_nodes import run_leaving_nothing

FLOWS = Path(__file__).parent.parent / "flows"
DEMO = FLOWS / "local_platform_demo.py"


def test_local_platform_demo_runs_a_task_on_each_node_and_ends_cleanly() -> None:
    result = run_leaving_nothing(
        [sys.executable, str(DEMO)],
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

