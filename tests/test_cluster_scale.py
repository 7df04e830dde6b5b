"""The Builder's API calls grow with the number of pools, not of nodes: 100 pools of 100
simulated nodes build and shut down with about as many calls as 100 pools of one node."""

from __future__ import annotations

import pytest
from cluster_helpers import assert_nothing_left, fast_client, simulated_spec, start_platform

from prefect_raydog.cluster import RayDogCluster


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    local = start_platform(tmp_path_factory.mktemp("platform"))
    yield local
    local.stop()


def _calls_to_build_and_shut_down(platform, pools: int, nodes: int) -> dict[str, int]:
    cluster = RayDogCluster(simulated_spec(pools=pools, nodes=nodes), client=fast_client(platform))
    platform.reset_api_calls()
    cluster.build()
    report = cluster.shut_down()
    calls = platform.api_calls()
    assert len(report.ended) == 1 + 2 * (pools + 1) and not report.failed
    assert_nothing_left(platform, timeout=120)
    return calls


def _without_polls(calls: dict[str, int]) -> int:
    return sum(count for route, count in calls.items() if route != "GET /work/tasks/{task_id}")


def test_100_pools_of_100_nodes_take_as_many_calls_as_100_pools_of_one_node(platform):
    small = _calls_to_build_and_shut_down(platform, pools=100, nodes=1)
    large = _calls_to_build_and_shut_down(platform, pools=100, nodes=100)
    assert _without_polls(large) == _without_polls(small)
    assert large["POST /workerPools/provisioned/template"] == 101
    assert large["POST /work/taskGroups/{group_id}/tasks"] == 101
    assert sum(large.values()) < 5 * 101
