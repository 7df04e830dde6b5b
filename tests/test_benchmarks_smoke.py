"""The benchmarks still run: each one end to end in its smoke mode (`--smoke --json`: every step
at the smallest sizes), printing one JSON object with a number for every figure its speed goals
name (the project's goals list, kept outside the repo) and its issue asks for. The figures
themselves are measured by hand."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from numbers import Real
from pathlib import Path

import pytest
from conftest import wait_for
from helpers import tcp_listeners
from process_nodes import Footprint, run_leaving_nothing

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

EXPECTED_KEYS = {
    "adaptive.py": {"adaptive_node_seconds_ratio", "adaptive_wall_ratio", "eager_saved_s"},
    "local_platform.py": {"get_task_p50_ms", "get_task_p95_ms", "add_1000_tasks_s",
                          "provision_10000_nodes_s"},
    "builder.py": {"build_overhead_s", "shutdown_s_1_pool", "shutdown_s_10_pools",
                   "build_api_requests_30s_boot", "build_s_10000_nodes"},
    "autoscaler.py": {"scale_up_s", "api_calls_per_scale_up", "node_seconds_ratio_vs_fixed"},
    "runner.py": {"client_per_task_ms", "client_prefect_ray_per_task_ms",
                  "client_ratio_vs_prefect_ray", "client_states_saved_ratio_vs_prefect_ray",
                  "client_ratio_vs_raw_ray", "client_cold_ratio_vs_raw_ray", "driver_kb_per_task",
                  "first_task_after_ready_s", "ms_per_task_10k_over_500"},
}


# They report to the run's Prefect server rather than start one each.
RUNS_FLOWS = {"adaptive.py", "runner.py"}


@pytest.mark.parametrize("script", sorted(EXPECTED_KEYS))
def test_benchmark_smoke_run_prints_its_figures(script, request):
    command = [sys.executable, str(BENCHMARKS / script), "--smoke", "--json"]
    if script in RUNS_FLOWS:
        command += ["--prefect-api-url", request.getfixturevalue("prefect_api")]
    result = run_leaving_nothing(command, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert EXPECTED_KEYS[script] <= figures.keys()
    not_numbers = {key: figures[key] for key in EXPECTED_KEYS[script]
                   if not isinstance(figures[key], Real) or isinstance(figures[key], bool)}
    assert not not_numbers


def _serving_platform(pid: int) -> int | None:
    """The `prefect-raydog local start` process that the benchmark `pid` started, once it
    listens."""
    for child in Footprint.of(pid).processes:
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"local" in command and b"start" in command and tcp_listeners(child):
            return child
    return None


def test_a_benchmark_stopped_with_sigterm_stops_the_platform_it_started() -> None:
    """As `timeout` or `kill` stop a benchmark run in the background by a script (which starts
    it, and so its platform, with SIGINT ignored)."""
    benchmark = subprocess.Popen(
        ["bash", "-c", 'trap "" INT; exec "$@"', "bash",
         sys.executable, str(BENCHMARKS / "local_platform.py"), "--smoke", "--json"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with benchmark:
        wait_for(lambda: _serving_platform(benchmark.pid), 60, what="the benchmark's platform")
        footprint = Footprint.of(benchmark.pid)
        benchmark.terminate()
        assert benchmark.wait(60) == 128 + signal.SIGTERM, benchmark.stderr.read()[-3000:]
    footprint.wait_gone(time.monotonic())
