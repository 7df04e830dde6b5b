"""RayDogTaskRunner paths that decide whether anything leaks: a cluster that fails to provision,
and a Prefect API the nodes could not reach. Faults are injected in the local platform."""

from __future__ import annotations

import pytest
from conftest import assert_nothing_left
from prefect import flow, task

from prefect_raydog.blocks import RayDogClusterConfig
from prefect_raydog.errors import ClusterBuildError
from prefect_raydog.task_runners import RayDogTaskRunner

pytestmark = pytest.mark.ray
BLOCK = "local-failures-cluster"


@pytest.fixture(scope="module")
def saved_config(prefect_api, local_platform):
    RayDogClusterConfig.local(
        local_platform.url, local_platform.key_id, local_platform.key_secret
    ).save(BLOCK, overwrite=True)


@task
def add_one(x: int) -> int:
    return x + 1


def test_a_provisioning_failure_tears_down_then_later_submits_say_the_cluster_failed(
    saved_config, platform
):
    platform.faults.add("503", "/work/taskGroups/*/tasks", "POST", count=1000)
    runner = RayDogTaskRunner(cluster=BLOCK, api_relay_address=platform.host_address)

    @flow(task_runner=runner)
    def doomed() -> tuple[BaseException, BaseException]:
        with pytest.raises(ClusterBuildError) as first:
            add_one.submit(1)
        platform.clear_faults()
        assert_nothing_left(platform)
        with pytest.raises(RuntimeError, match="The Ray cluster could not start") as later:
            add_one.submit(2)
        return first.value, later.value

    first, later = doomed()
    assert platform.api_calls().get("POST /work/requirements", 0) == 1
    assert str(first) in str(later)


def test_a_loopback_api_url_is_refused_before_anything_is_provisioned(saved_config, platform):
    @flow(task_runner=RayDogTaskRunner(cluster=BLOCK))
    def unreachable_api() -> int:
        return add_one.submit(1).result()

    with pytest.raises(RuntimeError, match="is on loopback, which the cluster's nodes cannot"):
        unreachable_api()
    assert platform.api_calls().get("POST /work/requirements", 0) == 0
