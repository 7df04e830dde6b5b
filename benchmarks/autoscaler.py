"""Figures of the RayDog Autoscaler on the local platform's process nodes, with Ray's own
autoscaler on a `ray up` cluster from `docs/examples/autoscaler-local.yaml`:

- `scale_up_s`: from a pending demand (a 1-CPU task on a cluster with no worker) to the new Ray
  node being alive, minus the template's boot delay;
- `api_calls_per_scale_up`: YellowDog API calls made in that interval;
- `node_seconds_ratio_vs_fixed`: worker node-seconds (instance created to terminated) of a session
  with a burst of work (3 tasks of 1 CPU) on the autoscaled cluster, over the same session on a
  fixed pool of 3 workers (min_workers = max_workers = 3), measured in the same run.

    python benchmarks/autoscaler.py --json      # full figures (about 4 minutes)
    python benchmarks/autoscaler.py --quick     # a smoke run (two `ray up` sessions, not three)
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
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from yellowdog_client.model import InstanceSearch, InstanceStatus, WorkerPoolSearch

from prefect_raydog.local import LocalPlatform

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "autoscaler-local.yaml"
RAY = str(Path(sys.executable).parent / "ray")
BOOT_DELAY_S = 0.0  # the `local/process` template's

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
print("DONE", len(ray.get([work.remote() for _ in range(3)])), flush=True)
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
                               "head_api_url": platform.node_url}
        config["provider"]["task_environment"]["RAYDOG_VENV"] = sys.prefix
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

    def worker_node_seconds(self) -> float:
        """Seconds from creation to termination (or now) of every worker instance."""
        client = self.platform.client
        now = datetime.now(timezone.utc)
        total = 0.0
        for pool in client.worker_pool_client.get_worker_pools(
                WorkerPoolSearch(namespace=self.namespace)).iterate():
            if pool.name.endswith("-head"):
                continue
            detail = client.worker_pool_client.get_worker_pool_by_id(pool.id)
            for instance in client.compute_client.get_instances(InstanceSearch(
                    computeRequirementId=detail.computeRequirementId)).iterate():
                end = (instance.statusChangedTime
                       if instance.status == InstanceStatus.TERMINATED else now)
                total += (end - instance.createdTime).total_seconds()
        return total

    def workers(self) -> int:
        status = self._status()
        return sum(int(line.split()[0]) for line in status.splitlines()
                   if line.strip().endswith(" cpu") and line.split()[0].isdigit())

    @staticmethod
    def wait(condition: Any, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(1.0)

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


def burst_session(platform: LocalPlatform, directory: Path, idle_minutes: float,
                  work_s: float, quiet_s: float, fixed: bool,
                  first: Callable[[Session], None] | None = None) -> float:
    """Worker node-seconds of: up, quiet, a burst of 3 x `work_s`, quiet until the autoscaled
    workers are gone (the same length for the fixed pool), down. `first(session)` runs on
    the cluster before all that."""
    session = Session(platform, directory, idle_minutes, min_workers=3 if fixed else 0)
    session.up()
    try:
        if first is not None:
            first(session)
        if fixed:
            session.wait(lambda: session.workers() >= 3, "the fixed pool's workers")
        started = time.monotonic()
        time.sleep(quiet_s)
        session.submit(BURST.format(seconds=work_s))
        time.sleep(quiet_s + idle_minutes * 60 + 10)
        elapsed = time.monotonic() - started
        node_seconds = session.worker_node_seconds()
    finally:
        session.down()
    print(f"{'fixed' if fixed else 'autoscaled'}: {node_seconds:.1f} worker node-seconds "
          f"over a {elapsed:.0f} s session", file=sys.stderr)
    return node_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    args = parser.parse_args()
    idle_minutes, work_s, quiet_s = (0.1, 3.0, 3.0) if args.quick else (0.25, 20.0, 20.0)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as data_dir, LocalPlatform(
            data_dir=Path(data_dir)) as platform:
        if platform.runner is None or platform.runner.network.mode != "bridge":
            raise SystemExit("the autoscaler benchmark needs process nodes on a bridge (root)")
        figures: dict[str, float] = {}
        if not args.quick:  # a smoke run scales up on the autoscaled burst's cluster instead
            first = Path(data_dir) / "scale-up"
            first.mkdir()
            session = Session(platform, first, idle_minutes)
            session.up()
            try:
                figures |= scale_up(platform, session)
            finally:
                session.down()
        node_seconds = {}
        for fixed in (False, True):
            directory = Path(data_dir) / ("fixed" if fixed else "autoscaled")
            directory.mkdir()
            node_seconds[fixed] = burst_session(
                platform, directory, idle_minutes, work_s, quiet_s, fixed,
                first=(lambda session: figures.update(scale_up(platform, session)))
                if args.quick and not fixed else None)
        figures["node_seconds_ratio_vs_fixed"] = round(node_seconds[False] / node_seconds[True],
                                                       3)
    if not args.json:
        print("RayDog Autoscaler on the local platform's process nodes:", file=sys.stderr)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
