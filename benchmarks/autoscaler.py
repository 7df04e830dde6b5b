"""Figures of the RayDog Autoscaler on the local platform's sealed nodes, behind its firewall,
with Ray's own autoscaler on a `ray up` cluster from `docs/examples/autoscaler-local.yaml`:

- `scale_up_s`: from a pending demand (a 1-CPU task on a cluster with no worker) to the new Ray
  node being alive, minus the template's boot delay;
- `api_calls_per_scale_up`: YellowDog API calls made in that interval;
- `node_seconds_ratio_vs_fixed`: worker node-seconds (instance created to terminated) of a session
  with a burst of work (3 tasks of 1 CPU) on the autoscaled cluster, over the same session on a
  fixed pool of 3 workers (min_workers = max_workers = 3), measured in the same run.

    python benchmarks/autoscaler.py --json      # full figures (about 4 minutes)
    python benchmarks/autoscaler.py --quick     # a short run (two `ray up` sessions, not three)
    python benchmarks/autoscaler.py --smoke     # proves it runs (seconds; figures meaningless)

`--smoke` goes through every step of `--quick` at the smallest sizes: one fixed worker and a
burst of one short task, idle timeouts of about a second, the two sessions side by side, and the
autoscaled one ends once its workers are gone (not after a fixed quiet time). Each stage's time
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from yellowdog_client.model import InstanceSearch, InstanceStatus, WorkerPoolSearch

from prefect_raydog.local import LocalPlatform

from stages import stage
from stopping import stop_in_order_on_sigterm

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "autoscaler-local.yaml"
RAY = str(Path(sys.executable).parent / "ray")
BOOT_DELAY_S = 0.0  # the `local/vm` template's

SCALE_UP = """
import sys, time, ray
ray.init()
alive = lambda: sum(1 for node in ray.nodes() if node["Alive"])
before = alive()
print("DEMAND", flush=True)
started = time.time()
ray.remote(num_cpus=1)(lambda: 1).remote()
while alive() <= before:
    time.sleep(0.05)
print("ALIVE", time.time() - started, flush=True)
"""

BURST = """
import time, ray
ray.init()
@ray.remote(num_cpus=1)
def work():
    time.sleep({seconds})
print("DONE", len(ray.get([work.remote() for _ in range({tasks})])), flush=True)
"""


class Session:
    """One `ray up` cluster, its own namespace, driven through Ray's CLI."""

    def __init__(self, platform: LocalPlatform, directory: Path, idle_minutes: float,
                 min_workers: int = 0) -> None:
        self.platform, self.directory = platform, directory
        self.namespace = f"bench-{uuid.uuid4().hex[:8]}"
        key = directory / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        config = yaml.safe_load(EXAMPLE.read_text())
        config["idle_timeout_minutes"] = idle_minutes
        config["provider"] |= {"cluster_namespace": self.namespace,
                               "head_api_url": platform.node_url,
                               "ssh_known_hosts": platform.ssh_known_hosts}
        config["auth"]["ssh_private_key"] = str(key)
        config["available_node_types"]["cpu"]["min_workers"] = min_workers
        self.path = directory / "cluster.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.environment = {**os.environ, "YD_API_URL": platform.url,
                            "YD_API_KEY_ID": platform.key_id,
                            "YD_API_KEY_SECRET": platform.key_secret,
                            "RAY_UP_enable_autoscaler_v2": "0", "HOME": str(directory)}

    def ray(self, *arguments: str) -> str:
        result = subprocess.run([RAY, *arguments], capture_output=True, text=True,
                                env=self.environment, cwd=self.directory, timeout=600)
        if result.returncode != 0:
            raise RuntimeError(f"ray {arguments[0]} failed: {result.stderr[-3000:]}")
        return result.stdout

    def up(self) -> None:
        self.ray("up", "-y", "--no-config-cache", str(self.path))
        self.wait(lambda: "Node status" in self._status(), "Ray to start on the head")

    def _status(self) -> str:
        try:
            return self.ray("exec", str(self.path), "ray status")
        except RuntimeError:
            return ""

    def submit(self, script: str, on_line: Any = None) -> str:
        """Run `script` on the head; `on_line(line)` sees its output as it comes."""
        path = self.directory / "job.py"
        path.write_text(script)
        process = subprocess.Popen([RAY, "submit", str(self.path), str(path)], text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   env=self.environment, cwd=self.directory)
        output = []
        for line in process.stdout:
            output.append(line)
            if on_line is not None:
                on_line(line)
        if process.wait() != 0:
            raise RuntimeError(f"ray submit failed: {''.join(output)[-3000:]}")
        return "".join(output)

    def _worker_instances(self) -> Iterator[Any]:
        client = self.platform.client
        for pool in client.worker_pool_client.get_worker_pools(
                WorkerPoolSearch(namespace=self.namespace)).iterate():
            if pool.name.endswith("-head"):
                continue
            detail = client.worker_pool_client.get_worker_pool_by_id(pool.id)
            yield from client.compute_client.get_instances(InstanceSearch(
                computeRequirementId=detail.computeRequirementId)).iterate()

    def worker_node_seconds(self) -> float:
        """Seconds from creation to termination (or now) of every worker instance."""
        now = datetime.now(timezone.utc)
        total = 0.0
        for instance in self._worker_instances():
            end = (instance.statusChangedTime
                   if instance.status == InstanceStatus.TERMINATED else now)
            total += (end - instance.createdTime).total_seconds()
        return total

    def live_workers(self) -> int:
        """Worker instances the platform has not terminated."""
        return sum(instance.status != InstanceStatus.TERMINATED
                   for instance in self._worker_instances())

    def workers(self) -> int:
        status = self._status()
        return sum(int(line.split()[0]) for line in status.splitlines()
                   if line.strip().endswith(" cpu") and line.split()[0].isdigit())

    @staticmethod
    def wait(condition: Any, what: str, timeout: float = 300, interval: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(interval)

    def down(self) -> None:
        self.ray("down", "-y", str(self.path))


def scale_up(platform: LocalPlatform, session: Session) -> dict[str, float]:
    figures: dict[str, float] = {}

    def on_line(line: str) -> None:
        if line.startswith("DEMAND"):
            platform.reset_api_calls()
        elif line.startswith("ALIVE"):
            calls = platform.api_calls()
            print(f"API calls during the scale-up: {calls}", file=sys.stderr)
            figures["api_calls_per_scale_up"] = sum(calls.values())
            figures["scale_up_s"] = round(float(line.split()[1]) - BOOT_DELAY_S, 2)

    session.submit(SCALE_UP, on_line)
    return figures


@dataclass(frozen=True)
class Sizes:
    idle_minutes: float
    work_s: float
    quiet_s: float
    workers: int
    """The fixed pool's workers, and the burst's 1-CPU tasks."""
    smoke: bool = False
    """The two sessions side by side; the autoscaled one ends once its workers are gone, the
    fixed one after its burst."""


FULL = Sizes(idle_minutes=0.25, work_s=20.0, quiet_s=20.0, workers=3)
QUICK = Sizes(idle_minutes=0.1, work_s=3.0, quiet_s=3.0, workers=3)
SMOKE = Sizes(idle_minutes=0.02, work_s=0.5, quiet_s=0.0, workers=1, smoke=True)


def burst_session(platform: LocalPlatform, directory: Path, sizes: Sizes, fixed: bool,
                  first: Callable[[Session], None] | None = None) -> float:
    """Worker node-seconds of: up, quiet, a burst of `sizes.workers` x `work_s`, quiet until the
    autoscaled workers are gone (the same length for the fixed pool), down. `first(session)`
    runs on the cluster before all that."""
    kind = "fixed" if fixed else "autoscaled"
    session = Session(platform, directory, sizes.idle_minutes,
                      min_workers=sizes.workers if fixed else 0)
    session.up()
    stage(f"{kind}: ray up")
    try:
        if first is not None:
            first(session)
            stage(f"{kind}: scale-up")
        if fixed:
            session.wait(lambda: session.workers() >= sizes.workers, "the fixed pool's workers")
            stage(f"{kind}: workers up")
        started = time.monotonic()
        time.sleep(sizes.quiet_s)
        session.submit(BURST.format(seconds=sizes.work_s, tasks=sizes.workers))
        stage(f"{kind}: burst")
        if not sizes.smoke:
            time.sleep(sizes.quiet_s + sizes.idle_minutes * 60 + 10)
        elif not fixed:
            session.wait(lambda: session.live_workers() == 0, "the idle workers to go",
                         interval=0.2)
        stage(f"{kind}: quiet")
        elapsed = time.monotonic() - started
        node_seconds = session.worker_node_seconds()
    finally:
        session.down()
        stage(f"{kind}: ray down")
    print(f"{kind}: {node_seconds:.1f} worker node-seconds over a {elapsed:.0f} s session",
          file=sys.stderr)
    return node_seconds


def main() -> None:
    stop_in_order_on_sigterm()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", action="store_true",
                       help="a short run: scale up on the autoscaled burst's cluster")
    modes.add_argument("--smoke", action="store_true",
                       help="as --quick at the smallest sizes: proves the benchmark runs, "
                            "its figures mean nothing")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    short = args.quick or args.smoke
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as data_dir, LocalPlatform(
            data_dir=Path(data_dir), firewall=True) as platform:
        if platform.runner is None or platform.runner.network.mode != "bridge":
            raise SystemExit("the autoscaler benchmark needs process nodes on a bridge (root)")
        stage("platform up")
        figures: dict[str, float] = {}
        if not short:  # a short run scales up on the autoscaled burst's cluster instead
            first = Path(data_dir) / "scale-up"
            first.mkdir()
            session = Session(platform, first, sizes.idle_minutes)
            session.up()
            try:
                figures |= scale_up(platform, session)
            finally:
                session.down()
            stage("scale-up session")

        def session_of(fixed: bool) -> float:
            directory = Path(data_dir) / ("fixed" if fixed else "autoscaled")
            directory.mkdir()
            return burst_session(
                platform, directory, sizes, fixed,
                first=(lambda session: figures.update(scale_up(platform, session)))
                if short and not fixed else None)

        kinds = (False, True)
        if sizes.smoke:  # side by side, as their figures are not kept
            with ThreadPoolExecutor(len(kinds)) as sessions:
                node_seconds = dict(zip(kinds, sessions.map(session_of, kinds), strict=True))
        else:
            node_seconds = {fixed: session_of(fixed) for fixed in kinds}
        stage("both burst sessions")
        figures["node_seconds_ratio_vs_fixed"] = round(node_seconds[False] / node_seconds[True],
                                                       3)
    stage("platform down")
    if not args.json:
        print("RayDog Autoscaler on the local platform's process nodes:", file=sys.stderr)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
