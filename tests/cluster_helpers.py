"""Shared helpers of the Builder's tests: a local platform with extra templates, fast clients,
and specs."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from conftest import assert_nothing_left

from prefect_raydog.local import LocalPlatform
from prefect_raydog.spec import ClusterSpec, NodeGroupSpec, WorkerPoolSpec

SIMULATED = "local/simulated"
SLOW_BOOT = "test/slow-boot"
ONE_SECOND_BOOT = "test/one-second-boot"
NAMESPACE = "raydog-tests"
TEMPLATES_TOML = f"""
[templates."{SLOW_BOOT}"]
mode = "simulated"
boot_delay_s = 600

[templates."{ONE_SECOND_BOOT}"]
mode = "simulated"
boot_delay_s = 1.0
"""
_names = itertools.count(1)


def start_platform(tmp_dir: Path, network: str = "loopback") -> LocalPlatform:
    templates = tmp_dir / "templates.toml"
    templates.write_text(TEMPLATES_TOML)
    return LocalPlatform(templates=templates, network=network).start()


def fast_client(platform: LocalPlatform):
    """A client that retries once, quickly, so injected faults cost milliseconds."""
    return platform.make_client(max_attempts=1, initial_interval=0.02, max_interval=0.05)


def unique_name(prefix: str = "c") -> str:
    return f"{prefix}-{next(_names)}-{int(time.time() * 1000) % 100000}"


def simulated_spec(pools: int = 2, nodes: int = 1, **overrides) -> ClusterSpec:
    fields = {
        "name": unique_name(),
        "namespace": NAMESPACE,
        "tag": "builder-tests",
        "head": NodeGroupSpec(template_id=SIMULATED, script="sleep infinity"),
        "worker_pools": [
            WorkerPoolSpec(template_id=SIMULATED, count=nodes, script="sleep infinity")
            for _ in range(pools)
        ],
    }
    fields.update(overrides)
    return ClusterSpec(**fields)


__all__ = ["assert_nothing_left", "fast_client", "simulated_spec", "start_platform", "unique_name"]
