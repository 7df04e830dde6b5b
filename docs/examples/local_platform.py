"""The local platform from Python: a client, a pool, more templates, faults and inspection.

Run by tests/test_docs.py; docs/local-platform.md shows its sections. Every pool here is of
simulated nodes, so it starts no process.
"""

import time  # noqa: I001
from pathlib import Path  # noqa: I001 (each section of the docs shows its own imports)

# --8<-- [start:client-imports]
from yellowdog_client import PlatformClient
from yellowdog_client.model import ApiKey, ServicesSchema

# --8<-- [end:client-imports]
# --8<-- [start:pool-imports]
from yellowdog_client.model import (
    ComputeRequirementTemplateUsage,
    NodeWorkerTarget,
    NodeWorkerTargetType,
    ProvisionedWorkerPoolProperties,
    WorkerPoolSearch,
)

from prefect_raydog.local import LocalPlatform

# --8<-- [end:pool-imports]

with LocalPlatform() as started:
    URL, KEY_ID, KEY_SECRET = started.url, started.key_id, started.key_secret
    # --8<-- [start:client]
    client = PlatformClient.create(
        ServicesSchema(defaultUrl=URL),   # e.g. "http://127.0.0.1:8765"
        ApiKey(KEY_ID, KEY_SECRET),       # as `prefect-raydog local start` prints them
    )
    # --8<-- [end:client]
    assert client.worker_pool_client.get_worker_pools(WorkerPoolSearch()).list_all() == []

# --8<-- [start:pool]
with LocalPlatform() as platform:
    client = platform.client  # a yellowdog_client PlatformClient for this platform
    pool = client.worker_pool_client.provision_worker_pool(
        ComputeRequirementTemplateUsage(
            templateId="local/simulated", requirementName="sims",
            requirementNamespace="demo", targetInstanceCount=3),
        ProvisionedWorkerPoolProperties(
            createNodeWorkers=NodeWorkerTarget(NodeWorkerTargetType.PER_NODE, 1),
            workerTag="sim", maxNodes=3),
    )
    ...
    client.worker_pool_client.shutdown_worker_pool_by_id(pool.id)
# --8<-- [end:pool]
    assert not platform.live_entities()["workerPools"]

with LocalPlatform() as platform:
    pool = platform.client.worker_pool_client.provision_worker_pool(
        ComputeRequirementTemplateUsage(
            templateId="local/simulated", requirementName="sims",
            requirementNamespace="demo", targetInstanceCount=3),
        ProvisionedWorkerPoolProperties(
            createNodeWorkers=NodeWorkerTarget(NodeWorkerTargetType.PER_NODE, 1),
            workerTag="sim", maxNodes=3),
    )
    # --8<-- [start:inspection]
    platform.live_entities()
    # {'workRequirements': [], 'workerPools': [{'id': 'ydid:wrkrpool:000000:...', 'name': 'sims',
    #   'status': 'IDLE'}], 'computeRequirements': [...], 'nodes': [...], 'instances': [...],
    #  'processes': []}
    platform.api_calls()        # {'POST /workerPools/provisioned/template': 1, ...}
    platform.reset_api_calls()
    # --8<-- [end:inspection]
    assert [p["name"] for p in platform.live_entities()["workerPools"]] == ["sims"]
    while not (nodes := platform.live_entities()["nodes"]):  # its instances are still booting
        time.sleep(0.05)
    node_id = nodes[0]["id"]

    # --8<-- [start:faults]
    client = platform.make_client(max_attempts=3, initial_interval=0.1)
    # The next two GET /workerPools answer 503; the SDK retries and succeeds.
    platform.faults.add("503", path="/workerPools", method="GET", count=2)
    client.worker_pool_client.get_worker_pools(WorkerPoolSearch()).list_all()
    print(platform.api_calls())  # {'GET /workerPools': 3}

    platform.fail_node_boot(count=1)          # the next node to boot (of any pool) fails to boot
    platform.fail_node_boot(2, worker_pool_id=pool.id)
    platform.kill_node(node_id)               # the machine dies: see "How a task ends"
    platform.clear_faults()                   # forget pending call faults and boot failures
    platform.end_everything()                 # cancel every work requirement, shut down every pool
    # --8<-- [end:faults]
    assert platform.api_calls() == {"GET /workerPools": 3}, platform.api_calls()

# --8<-- [start:templates]
with LocalPlatform(templates=Path("docs/examples/templates.toml")) as platform:
    print(platform.templates.ids())
# ['local/base-vm', 'local/big-process', 'local/process', 'local/simulated', 'local/slow-boot',
#  'local/vm']
# --8<-- [end:templates]
    assert platform.templates.ids() == [
        "local/base-vm", "local/big-process", "local/process", "local/simulated",
        "local/slow-boot", "local/vm"]
