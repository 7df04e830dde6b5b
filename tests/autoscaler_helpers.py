"""Helpers for tests of the RayDog Autoscaler: a cluster YAML from `docs/examples` adapted to a
test (own namespace, fresh SSH key, small timeouts), Ray's CLI run against it, and Ray tasks held
on its workers through Ray Client."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
import yaml
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from prefect_raydog.local import LocalPlatform

# The head's Ray workers cannot import this module: Ray Client sends its code along.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "autoscaler-local.yaml"
RAY = str(Path(sys.executable).parent / "ray")


class RayCluster:
    """One `ray up` cluster on the local platform, driven through Ray's own CLI."""

    def __init__(self, platform: LocalPlatform, directory: Path, **changes: Any) -> None:
        self.platform = platform
        self.directory = directory
        self.namespace = f"ray-{uuid.uuid4().hex[:8]}"
        key = directory / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                       check=True)
        config = yaml.safe_load(EXAMPLE.read_text())
        config["provider"]["cluster_namespace"] = self.namespace
        config["provider"]["head_api_url"] = platform.node_url
        config["provider"]["ssh_known_hosts"] = platform.ssh_known_hosts
        config["auth"]["ssh_private_key"] = str(key)
        for path, value in changes.items():
            section = config
            *parents, last = path.split("__")
            for parent in parents:
                section = section[parent]
            section[last] = value
        self.config = config
        self.path = directory / "cluster.yaml"
        self.path.write_text(yaml.safe_dump(config))
        self.up_outputs: list[str] = []

    @property
    def environment(self) -> dict[str, str]:
        return {**os.environ, "YD_API_URL": self.platform.url,
                "YD_API_KEY_ID": self.platform.key_id,
                "YD_API_KEY_SECRET": self.platform.key_secret,
                "RAY_UP_enable_autoscaler_v2": "0", "HOME": str(self.directory)}

    def ray(self, *arguments: str, timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Ray's CLI; with `check=False`, a failed command returns an empty stdout."""
        result = subprocess.run([RAY, *arguments], capture_output=True, text=True,
                                env=self.environment, timeout=timeout, cwd=self.directory)
        if not check and result.returncode != 0:
            result.stdout = ""
        if check and result.returncode != 0:
            raise AssertionError(f"ray {' '.join(arguments)} exited {result.returncode}:\n"
                                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def up(self, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        result = self.ray("up", "-y", "--no-config-cache", str(self.path), **kwargs)
        self.up_outputs.append(result.stdout + result.stderr)
        return result

    def down(self) -> subprocess.CompletedProcess[str]:
        return self.ray("down", "-y", str(self.path))

    def exec(self, command: str) -> str:
        return self.ray("exec", str(self.path), command).stdout

    def head_public_ip(self) -> str:
        """The head's public address: only its SSH port answers this machine there."""
        return self.ray("get-head-ip", str(self.path)).stdout.strip().splitlines()[-1]

    @contextmanager
    def tunnel(self) -> Iterator[Any]:
        """Ray Client (and the dashboard) forwarded from this machine's loopback over SSH to
        the head, as docs/autoscaler.md tells a user: the firewall opens nothing else."""
        head_public_ip, ssh_known_hosts = self.head_public_ip(), self.platform.ssh_known_hosts
        key_file = self.config["auth"]["ssh_private_key"]
        # --8<-- [start:tunnel]
        from prefect_raydog.host_keys import HostKeys
        from prefect_raydog.tunnels import RayTunnels

        with RayTunnels(head_public_ip, "yd-agent", private_key_file=key_file,
                        host_keys=HostKeys(ssh_known_hosts)) as tunnels:
            address = tunnels.ray_client_address  # ray://127.0.0.1:PORT, while the tunnel lasts
            # --8<-- [end:tunnel]
            assert address.startswith("ray://127.0.0.1:")
            yield tunnels

    def token(self) -> str:
        """The cluster's Ray token, copied from the head's file as docs/autoscaler.md says;
        the copy must be this user's alone."""
        copy = self.directory / "cluster.token"
        self.ray("rsync-down", str(self.path), "~/.ray/auth_token", str(copy))
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
        token = copy.read_text()
        assert re.fullmatch("[0-9a-f]{64}", token), "one token in the file"
        return token


@ray.remote(num_cpus=0)
class Gate:
    """Holds Ray tasks until the test opens it; records the YellowDog task (Ray node) that each
    attempt of each held task started on."""

    def __init__(self) -> None:
        self.opened = False
        self.arrivals: list[tuple[int, str]] = []

    def arrive(self, index: int, node: str) -> None:
        self.arrivals.append((index, node))

    def is_open(self) -> bool:
        return self.opened

    def open(self) -> None:
        self.opened = True

    def seen(self) -> list[tuple[int, str]]:
        return list(self.arrivals)


@ray.remote(num_cpus=1, max_retries=3)
def held(gate: Any, index: int) -> str:
    """Wait at the gate on a worker node; the YellowDog task (Ray node id) it ran on."""
    node = os.environ["YD_TASK_ID"]
    ray.get(gate.arrive.remote(index, node))
    while not ray.get(gate.is_open.remote()):
        time.sleep(0.2)
    return node


def hold_on_three_workers(gate: Any) -> list[Any]:
    """Three held tasks, one on each of three worker nodes. A STRICT_SPREAD placement group
    keeps them apart: a task waiting in `ray.get` gives its CPU back, so two could share one."""
    group = placement_group([{"CPU": 1}] * 3, strategy="STRICT_SPREAD")
    return [held.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
        group, placement_group_bundle_index=index)).remote(gate, index) for index in range(3)]


def bearer(token: str) -> dict[str, Any]:
    """What `ray.init("ray://...")` presents the cluster's token with, on its connection only."""
    return {"_metadata": [("authorization", f"Bearer {token}")]}


@contextmanager
def ray_client(address: str, token: str) -> Iterator[Any]:
    """This process connected to the cluster's Ray Client server at `address` with the cluster's
    token; a Gate pinned to the head."""
    ray.init(address, namespace="autoscaler-tests", log_to_driver=False,
             **bearer(token))
    try:
        head = next(n["NodeID"] for n in ray.nodes()
                    if n["Alive"] and "node:__internal_head__" in n["Resources"])
        yield Gate.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            head, soft=False)).remote()
    finally:
        ray.shutdown()
