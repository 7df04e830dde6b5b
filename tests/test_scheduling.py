"""pytest-xdist keeps each module's tests on one worker: they share its clusters and saved blocks
(scheduling.py). The run inside reports to this run's Prefect server, if it needs one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from scheduling import group_of

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["tests/test_cluster_spec.py", "tests/test_local_templates.py"]


def test_each_module_runs_on_one_worker_of_its_own():
    environment = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-v", *MODULES], cwd=ROOT, env=environment,
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    workers = defaultdict(set)
    for worker, module in re.findall(r"^\[(gw\d+)\] .*? (?:PASSED|SKIPPED) (tests/\w+\.py)::",
                                     result.stdout, re.MULTILINE):
        workers[module].add(worker)
    assert set(workers) == set(MODULES)
    assert all(len(ran_on) == 1 for ran_on in workers.values()), dict(workers)
    assert len(set.union(*workers.values())) == 2, "the two modules ran side by side"


def test_ray_up_sessions_share_one_group_and_the_other_benchmark_runs_spread():
    smoke = "tests/test_benchmarks_smoke.py::test_benchmark_smoke_run_prints_its_figures"
    ray_up = {group_of("tests/test_autoscaler.py::test_ray_down_leaves_nothing"),
              group_of("tests/test_autoscaler_failures.py::test_any"),
              group_of(f"{smoke}[autoscaler.py]")}
    assert len(ray_up) == 1
    assert group_of(f"{smoke}[runner.py]") != group_of(f"{smoke}[adaptive.py]")
