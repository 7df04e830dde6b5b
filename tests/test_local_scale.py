"""Thousands of simulated nodes are cheap: 100 pools of 100 `local/simulated` nodes provision
and shut down through the SDK in seconds."""

from __future__ import annotations

from conftest import wait_for
from yellowdog_client.model import (
    ComputeRequirementTemplateUsage,
    ProvisionedWorkerPoolProperties,
    WorkerPoolSearch,
    WorkerPoolStatus,
)

from prefect_raydog.local import LocalPlatform


def test_100_pools_of_100_simulated_nodes_provision_and_shut_down(platform: LocalPlatform) -> None:
    pools = platform.make_client(initial_interval=0.05).worker_pool_client
    search = WorkerPoolSearch(namespace="scale")
    created = [
        pools.provision_worker_pool(
            ComputeRequirementTemplateUsage(
                templateId="local/simulated",
                requirementName=f"pool-{n}",
                requirementNamespace="scale",
                targetInstanceCount=100,
            ),
            ProvisionedWorkerPoolProperties(workerTag=f"pool-{n}", maxNodes=100),
        )
        for n in range(100)
    ]
    wait_for(
        lambda: (
            sum(s.registeredNodeCount for s in pools.get_worker_pools(search).list_all()) == 10_000
        ),
        timeout=180,  # seconds on a quiet machine; minutes on a loaded one
        interval=0.1,
        what="10,000 nodes to register",
    )
    assert len(platform.live_entities()["nodes"]) == 10_000
    for pool in created:
        pools.shutdown_worker_pool_by_id(pool.id)
    wait_for(
        lambda: all(
            s.status == WorkerPoolStatus.TERMINATED
            for s in pools.get_worker_pools(search).list_all()
        ),
        timeout=180,  # seconds on a quiet machine; minutes on a loaded one
        interval=0.1,
        what="every pool to terminate",
    )
