"""Per-task overhead of RayDogTaskRunner against prefect_ray.RayTaskRunner on the path users take.

`python benchmarks/runner.py --json` prints one JSON object; `--quick` is a short run, `--smoke`
proves the benchmark runs (every step at the smallest sizes; its figures mean nothing).
One cluster is provisioned on an embedded local platform; both runners attach to it through
Ray Client (`ray://HEAD:10001`), in alternating rounds, and report to one Prefect server that
the nodes reach through a relay on the platform's host-side bridge address. Ray never runs on
this machine's own network. Plain `ray.remote` calls through the same Ray Client give the floor,
warm in the same rounds and cold in fresh driver processes (`--cold KIND ADDRESS TASKS` is one
such process). `first_task_after_ready_s` provisions a cluster through the runner itself on the
path a user takes by default (the sealed `local` preset on a second platform, behind its
firewall, reached over SSH), `first_task_after_ready_unsealed_s` one on the first platform's
open nodes; they, the cold runs and the flow of 10,000 tasks are not in the `--quick` run.
`--smoke` runs them all once (the sealed first task alone), with a few tasks each, one worker
node, and the cold runs side by side; it leaves out `first_task_attached_s` (its flow is the
first-task-after-ready one's). Each stage's time goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, task  # noqa: E402
from prefect.client.orchestration import get_client  # noqa: E402
from prefect.events.worker import EventsWorker  # noqa: E402
from prefect.logging.handlers import APILogWorker  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.settings import (  # noqa: E402
    PREFECT_API_URL,
    PREFECT_LOGGING_TO_API_BATCH_INTERVAL,
    temporary_settings,
)
from prefect_ray import RayTaskRunner  # noqa: E402

from prefect_raydog.blocks import RayDogClusterConfig  # noqa: E402
from prefect_raydog.cluster import RayDogCluster, wait_for_ray_nodes  # noqa: E402
from prefect_raydog.forwarding import TcpForwarder  # noqa: E402
from prefect_raydog.local import LocalPlatform  # noqa: E402
from prefect_raydog.runner.connection import connect  # noqa: E402
from prefect_raydog.task_runners import RayDogTaskRunner  # noqa: E402

import api_server  # noqa: E402
from stages import stage  # noqa: E402
from stopping import stop_in_order_on_sigterm  # noqa: E402


@dataclass(frozen=True)
class Scale:
    warm_up: int  # tasks each flow maps before the ones it times
    tasks: int
    rounds: int
    memory: tuple[int, int]  # tasks of the small and the large flow whose memory is compared
    worker_nodes: int = 2
    every_figure: bool = True  # also a cluster of the runner's, cold runs, one large flow
    cold_tasks: int = 200
    cold_rounds: int = 3
    large_flow_tasks: int = 10_000
    memory_warm_up: bool = True


FULL = Scale(warm_up=20, tasks=500, rounds=2, memory=(1000, 10_000))
QUICK = Scale(warm_up=20, tasks=20, rounds=1, memory=(50, 200), every_figure=False,
              memory_warm_up=False)
SMOKE = Scale(warm_up=2, tasks=5, rounds=1, memory=(5, 10), worker_nodes=1, cold_tasks=5,
              cold_rounds=1, large_flow_tasks=10, memory_warm_up=False)


@task
def add_one(x: int) -> int:
    return x + 1


@task
def started_at() -> tuple[float, float]:
    """When this task started, and when its Ray worker process started (epoch seconds)."""
    with open("/proc/self/stat") as stat:
        start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/stat") as stat:
        boot = next(int(line.split()[1]) for line in stat if line.startswith("btime"))
    return time.time(), boot + start_ticks / os.sysconf("SC_CLK_TCK")


def _timed_map(runner: Any, n: int, warm_up: int) -> tuple[float, str]:
    """Seconds from the start of a map of `n` trivial tasks (after `warm_up` of them) until all
    results are back."""

    @flow(task_runner=runner)
    def mapped() -> tuple[float, str]:
        add_one.map(range(warm_up)).result()
        start = time.perf_counter()
        results = add_one.map(range(n)).result()
        elapsed = time.perf_counter() - start
        assert results == [x + 1 for x in range(n)]
        return elapsed, str(flow_run.id)

    return mapped()


def _plus_one(x: int) -> int:
    return x + 1


def _raw_ray_map(n: int) -> float:
    """Seconds from the first of `n` plain `ray.remote` calls to the last result, through the
    Ray Client connection this process has."""
    import ray

    plus_one = ray.remote(_plus_one)
    start = time.perf_counter()
    results = ray.get([plus_one.remote(x) for x in range(n)])
    elapsed = time.perf_counter() - start
    assert results == [x + 1 for x in range(n)]
    return elapsed


def _raw_ray_timed_map(address: str, n: int, warm_up: int) -> float:
    """`_raw_ray_map` after the same warm-up as the runners', on a connection of its own."""
    import ray

    connect(address, {}, logging.getLogger("benchmark"))
    try:
        _raw_ray_map(warm_up)
        return _raw_ray_map(n)
    finally:
        ray.shutdown()


def _completed_count(flow_run_id: str) -> int:
    """How many of the flow run's task runs the API holds in a Completed state (one request)."""
    body = {
        "flow_runs": {"id": {"any_": [flow_run_id]}},
        "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
    }
    with get_client(sync_client=True) as client:
        response = client._client.post("/task_runs/count", json=body)
        response.raise_for_status()
        return response.json()


def _until_states_saved(runner: Any, n: int, warm_up: int, wait_s: float = 300
                        ) -> tuple[float, float, int]:
    """(results-back seconds, seconds until every task run's final state is in the API, how
    many final states it holds: all of them, unless `wait_s` passed first)."""
    start = time.perf_counter()
    elapsed, flow_run_id = _timed_map(runner, n, warm_up)
    map_started = start + (time.perf_counter() - start) - elapsed
    deadline = time.perf_counter() + wait_s
    while (saved := _completed_count(flow_run_id)) < n + warm_up and time.perf_counter() < deadline:
        time.sleep(0.2)
    return elapsed, time.perf_counter() - map_started, saved


def _first_task_at(runner: Any) -> tuple[float, float]:
    """When (epoch seconds) the first task of a new flow run started on a node, and when its
    worker process started."""

    @flow(task_runner=runner)
    def first() -> tuple[float, float]:
        return started_at.submit().result()

    return first()


def _first_task_after_start(runner: Any) -> float:
    start = time.time()
    return _first_task_at(runner)[0] - start


@contextlib.contextmanager
def _step_times() -> Iterator[dict[str, float]]:
    """When (epoch seconds) the runner's session got past each step to its first task: the
    head's node task running (`build` returned), Ray Client connected, the workers joined
    (when it warms them)."""
    from prefect_raydog.runner import attach, session

    at: dict[str, float] = {}

    def timed(step: str, function: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            result = function(*args, **kwargs)
            at.setdefault(step, time.time())
            return result

        return call

    def built(self: RayDogCluster, *args: Any, **kwargs: Any) -> Any:
        head = build(self, *args, **kwargs)
        at["head_running"] = time.time()
        threading.Thread(target=_until_listening, args=(head.private_ip, at), daemon=True).start()
        return head

    originals = build, _, _ = (RayDogCluster.build, attach.connect, session.warm_workers)
    RayDogCluster.build = built
    attach.connect = timed("connected", attach.connect)
    session.warm_workers = timed("workers_joined", session.warm_workers)
    try:
        yield at
    finally:
        RayDogCluster.build, attach.connect, session.warm_workers = originals


def _until_listening(host: str, at: dict[str, float]) -> None:
    """Note when the head's Ray Client port first accepts a connection."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, 10001), timeout=1):
            at["client_port_open"] = time.time()
            return
        time.sleep(0.05)


def _first_task_after_platform_ready(
    platform: LocalPlatform, config: RayDogClusterConfig, suffix: str = ""
) -> dict[str, float]:
    """Seconds from the platform running every node task to the first Prefect task running,
    for a cluster the runner provisions (the runner's own start-up cost), and to each step
    on the way there; each key ends with `suffix`."""
    from yellowdog_client.model import TaskSearch, WorkRequirementSearch

    relay = None if config.ssh_tunnel else platform.host_address
    runner = RayDogTaskRunner(cluster=config, api_relay_address=relay)
    with _step_times() as steps:
        first_task, process_started = _first_task_at(runner)
    steps["worker_process_started"] = process_started
    work = platform.client.work_client
    requirements = list(
        work.get_work_requirements(WorkRequirementSearch(namespace=config.namespace)).iterate()
    )
    newest = max(requirements, key=lambda requirement: requirement.createdTime)
    tasks = work.get_tasks(TaskSearch(workRequirementId=newest.id)).iterate()
    ready = max(task.startedTime.timestamp() for task in tasks)
    figures = {f"first_task_{step}_after_ready{suffix}_s": round(at - ready, 2)
               for step, at in steps.items()}
    return figures | {f"first_task_after_ready{suffix}_s": round(first_task - ready, 2)}


def _first_task_figures(platform: LocalPlatform, config: RayDogClusterConfig, scale: Scale
                        ) -> dict[str, float]:
    """The first task's figures on the path a user takes by default: sealed nodes behind a
    platform's firewall, reached over SSH; and (but in a smoke run) on `platform`'s open
    nodes, reached at their private addresses."""
    with LocalPlatform(firewall=True) as sealed:
        sealed_config = RayDogClusterConfig.local(
            sealed.url, sealed.key_id, sealed.key_secret, worker_nodes=scale.worker_nodes,
            ssh_known_hosts=sealed.ssh_known_hosts, sealed=True)
        figures = _first_task_after_platform_ready(sealed, sealed_config)
    stage("first task after ready, sealed (a cluster of its own)")
    if scale is not SMOKE:
        figures |= _first_task_after_platform_ready(platform, config, "_unsealed")
        stage("first task after ready, unsealed (a cluster of its own)")
    return figures


def _rss_kib() -> int:
    """Resident memory of this process once garbage is collected and free heap pages returned,
    so that the figure counts what is held, not what a peak left behind."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def _driver_rss_kib(runner: Any, n: int) -> int:
    """The driver's resident memory while a flow holds the futures of `n` finished tasks."""

    @flow(task_runner=runner)
    def many() -> int:
        futures = add_one.map(range(n))
        futures.wait()
        return _rss_kib()

    return many()


@contextlib.contextmanager
def _api_for_nodes(host: str) -> Iterator[str]:
    """Relay the loopback Prefect API on `host` (reached by this process and by the nodes),
    and make that the API URL of this process and of every task run."""
    api_url = PREFECT_API_URL.value()
    parts = urlsplit(api_url)
    with TcpForwarder(host, (parts.hostname, parts.port or 80)) as relay:
        relayed = urlunsplit(parts._replace(netloc=f"{host}:{relay.port}"))
        with temporary_settings(updates={PREFECT_API_URL: relayed}):
            try:
                yield relayed
            finally:
                # Send what is queued for the relayed URL while the relay is open: left queued,
                # it would be retried against the closed relay until the harness gives up.
                EventsWorker.drain_all()
                APILogWorker.drain_all()


@contextlib.contextmanager
def _provisioned(platform: LocalPlatform, config: RayDogClusterConfig, workers: int
                 ) -> Iterator[str]:
    """One cluster on the platform, its Ray workers joined; yields its Ray Client address."""
    import ray

    spec = config.to_spec(config.cluster_name())
    with RayDogCluster(spec, client=config.credentials.get_client()) as cluster:
        address = f"ray://{cluster.head_node_private_ip}:10001"
        connect(address, {}, logging.getLogger("benchmark"))  # retries while the head starts
        try:
            wait_for_ray_nodes(1 + workers, timeout=180)
        finally:
            ray.shutdown()
        yield address


def _client_figures(address: str, scale: Scale) -> dict[str, Any]:
    """Both runners and plain Ray through Ray Client to the same cluster, alternating round by
    round."""
    n, rounds, warm_up = scale.tasks, scale.rounds, scale.warm_up
    runners = {"ours": RayDogTaskRunner(address=address), "theirs": RayTaskRunner(address=address)}
    results: dict[str, list[float]] = {"ours": [], "theirs": [], "raw": []}
    saved: dict[str, list[float]] = {"ours": [], "theirs": []}
    for _ in range(rounds):
        for name, runner in runners.items():
            elapsed, until_saved, saved_states = _until_states_saved(runner, n, warm_up)
            if saved_states < n + warm_up:
                raise RuntimeError(f"{name}: the API holds {saved_states} of {n + warm_up} states")
            results[name].append(elapsed)
            saved[name].append(until_saved)
            stage(f"client round: {name}")
        results["raw"].append(_raw_ray_timed_map(address, n, warm_up))
        stage("client round: raw")
    ours, theirs = statistics.median(results["ours"]), statistics.median(results["theirs"])
    raw = statistics.median(results["raw"])
    ours_saved = statistics.median(saved["ours"])
    theirs_saved = statistics.median(saved["theirs"])
    figures = {
        "tasks": n,
        "rounds": rounds,
        "client_per_task_ms": round(1000 * ours / n, 2),
        "client_prefect_ray_per_task_ms": round(1000 * theirs / n, 2),
        "client_ratio_vs_prefect_ray": round(ours / theirs, 3),
        "client_raw_ray_per_task_ms": round(1000 * raw / n, 2),
        "client_ratio_vs_raw_ray": round(ours / raw, 3),
        "client_states_saved_per_task_ms": round(1000 * ours_saved / n, 2),
        "client_prefect_ray_states_saved_per_task_ms": round(1000 * theirs_saved / n, 2),
        "client_states_saved_ratio_vs_prefect_ray": round(ours_saved / theirs_saved, 3),
    }
    if scale.every_figure and scale is not SMOKE:  # the smoke run's first task is its own
        figures["first_task_attached_s"] = round(_first_task_after_start(runners["ours"]), 3)
        stage("first task attached")
    return figures


def _large_flow_figures(address: str, per_task_500_ms: float, scale: Scale) -> dict[str, Any]:
    """One flow of `large_flow_tasks` tasks (10,000 in full): per task against the 500-task
    rounds' figure, and how many of its final states the API holds at the end (all, or the
    figure says how many)."""
    runner = RayDogTaskRunner(address=address)
    n, warm_up = scale.large_flow_tasks, scale.warm_up
    elapsed, until_saved, saved = _until_states_saved(runner, n, warm_up, wait_s=120)
    per_task_ms = 1000 * elapsed / n
    figures = {
        "ms_per_task_10k": round(per_task_ms, 2),
        "ms_per_task_10k_over_500": round(per_task_ms / per_task_500_ms, 3),
        "final_states_in_api_10k": saved - warm_up,
    }
    if saved == n + warm_up:
        figures["ms_per_task_10k_states_saved"] = round(1000 * until_saved / n, 2)
    stage("large flow")
    return figures


def _cold_run(kind: str, address: str, tasks: int) -> float:
    """In a fresh driver process (so a new Ray job, new worker processes): seconds from the
    first submit of `tasks` mapped tasks to the last result. `kind` is "raw" (plain Ray),
    "ours", or "unwarmed" (ours without warming the job's workers)."""
    import ray

    if kind == "raw":
        # Plain Ray Client, as a Ray user connects: the runner's connect() would start the
        # job's worker processes with its version probes before the clock starts.
        ray.init(address, log_to_driver=False)
        try:
            return _raw_ray_map(tasks)
        finally:
            ray.shutdown()
    if kind == "unwarmed":
        from prefect_raydog.runner import attach

        attach.warm_workers = lambda: []

    @flow(task_runner=RayDogTaskRunner(address=address))
    def cold() -> float:
        start = time.perf_counter()
        results = add_one.map(range(tasks)).result()
        elapsed = time.perf_counter() - start
        assert results == [x + 1 for x in range(tasks)]
        return elapsed

    return cold()


def _cold_process(kind: str, address: str, tasks: int, environment: dict[str, str]
                  ) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, "--cold", kind, address, str(tasks)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment)


def _cold_seconds(kind: str, process: subprocess.Popen[str]) -> float:
    try:
        stdout, stderr = process.communicate(timeout=600)
    finally:
        process.kill()  # a no-op once it has exited
    if process.returncode:
        raise RuntimeError(f"the cold {kind} run failed: {stderr[-3000:]}")
    stage(f"cold run: {kind}")
    return json.loads(stdout.strip().splitlines()[-1])


def _cold_figures(address: str, api_url: str, scale: Scale) -> dict[str, Any]:
    """Cold runs, each in a fresh process, alternating kinds round by round (side by side in a
    smoke run, whose figures are not kept)."""
    kinds = ("ours", "unwarmed", "raw")
    elapsed: dict[str, list[float]] = {kind: [] for kind in kinds}
    environment = {**os.environ, "PREFECT_API_URL": api_url,
                   "PREFECT_LOGGING_TO_API_BATCH_INTERVAL":
                       str(PREFECT_LOGGING_TO_API_BATCH_INTERVAL.value())}
    for _ in range(scale.cold_rounds):
        if scale is SMOKE:
            started = {kind: _cold_process(kind, address, scale.cold_tasks, environment)
                       for kind in kinds}
            for kind, process in started.items():
                elapsed[kind].append(_cold_seconds(kind, process))
            continue
        for kind in kinds:
            process = _cold_process(kind, address, scale.cold_tasks, environment)
            elapsed[kind].append(_cold_seconds(kind, process))
    per_task = {
        kind: 1000 * statistics.median(times) / scale.cold_tasks for kind, times in elapsed.items()
    }
    return {
        "cold_per_task_ms": round(per_task["ours"], 2),
        "cold_unwarmed_per_task_ms": round(per_task["unwarmed"], 2),
        "cold_raw_ray_per_task_ms": round(per_task["raw"], 2),
        "client_cold_ratio_vs_raw_ray": round(per_task["ours"] / per_task["raw"], 3),
    }


def _memory_figures(address: str, scale: Scale) -> dict[str, Any]:
    small, large = scale.memory
    runner = RayDogTaskRunner(address=address)
    if scale.memory_warm_up:
        _driver_rss_kib(runner, small)  # warm up: imports, connections, caches
    before = _driver_rss_kib(runner, small)
    after = _driver_rss_kib(runner, large)
    stage("memory flows")
    return {
        f"driver_rss_mib_{small}": round(before / 1024, 1),
        f"driver_rss_mib_{large}": round(after / 1024, 1),
        "driver_kb_per_task": round(max(0, after - before) * 1.024 / (large - small), 2),
    }


def run(scale: Scale) -> dict[str, Any]:
    """Every figure, on clusters provisioned on one local platform."""
    with LocalPlatform() as platform:
        stage("platform up")
        config = RayDogClusterConfig.local(
            platform.url, platform.key_id, platform.key_secret, worker_nodes=scale.worker_nodes
        )
        first_task = {}
        if scale.every_figure:  # clusters of their own
            first_task = _first_task_figures(platform, config, scale)
        with (
            _api_for_nodes(platform.host_address) as api_url,
            _provisioned(platform, config, scale.worker_nodes) as address,
        ):
            stage("cluster provisioned")
            figures = _client_figures(address, scale)
            if scale.every_figure:
                figures |= _cold_figures(address, api_url, scale)
                figures |= _large_flow_figures(address, figures["client_per_task_ms"], scale)
            figures |= _memory_figures(address, scale)
    stage("cluster and platform down")
    return figures | first_task


def main() -> None:
    stop_in_order_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", action="store_true", help="a short run: the client figures")
    modes.add_argument("--smoke", action="store_true",
                       help="every step once at the smallest sizes: proves the benchmark runs, "
                            "its figures mean nothing")
    parser.add_argument("--cold", nargs=3, metavar=("KIND", "ADDRESS", "TASKS"),
                        help="one cold run in this process (the benchmark starts these)")
    api_server.add_argument(parser)
    args = parser.parse_args()
    if args.cold:
        kind, address, tasks = args.cold
        print(json.dumps(_cold_run(kind, address, int(tasks))))
        return
    # A smoke run's flows wait less for the nodes' last batch of logs when they end.
    batches = {PREFECT_LOGGING_TO_API_BATCH_INTERVAL: 0.2} if args.smoke else {}
    with temporary_settings(updates=batches), api_server.prefect_server(args.prefect_api_url):
        stage("Prefect server up")
        figures = run(SMOKE if args.smoke else QUICK if args.quick else FULL)
    stage("Prefect server down")
    if args.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:45} {value}")


if __name__ == "__main__":
    main()
