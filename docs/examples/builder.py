"""The Builder end to end: build, resize, save, shut down, end from saved state, sweep.

Run by tests/test_docs.py; docs/builder.md shows its sections. It runs against a local platform
whose `yd-demo/...` templates are simulated nodes (builder_templates.toml), so it starts no Ray.
"""

import tempfile
from pathlib import Path

# --8<-- [start:imports]
from prefect_raydog import (
    ClusterSpec,
    NodeGroupSpec,
    RayDogCluster,
    RayDogClusterProxy,
    WorkerPoolSpec,
    create_client,
    sweep,
)

# --8<-- [end:imports]
from prefect_raydog.local import LocalPlatform

templates = Path(__file__).with_name("builder_templates.toml")
with LocalPlatform(templates=templates) as platform, tempfile.TemporaryDirectory() as work:
    KEY_ID, KEY_SECRET, URL = platform.key_id, platform.key_secret, platform.url
    state_file = Path(work) / "demo.json"

    # --8<-- [start:build]
    spec = ClusterSpec(
        name="demo",
        namespace="ray",
        tag="nightly",
        head=NodeGroupSpec(template_id="yd-demo/ray-head"),
        worker_pools=[WorkerPoolSpec(template_id="yd-demo/ray-worker", name="cpu", count=2,
                                     max_count=8)],
    )

    # Context manager: build on entry, shut down on exit (also on error).
    with RayDogCluster(spec, key_id=KEY_ID, key_secret=KEY_SECRET, url=URL) as cluster:
        print(f"Ray Client address: ray://{cluster.head_node_private_ip}:10001")

    # Or step by step.
    client = create_client(KEY_ID, KEY_SECRET, URL)
    cluster = RayDogCluster(spec, client)
    head = cluster.build()                 # HeadNodeAddress(private_ip, public_ip)
    pool_id = cluster.add_worker_pool(template_id="yd-demo/ray-gpu", name="gpu", count=1)
    cluster.resize_worker_pool("cpu", 5)   # adds 3 node tasks; shrinking aborts the newest tasks
    cluster.remove_worker_pool_by_internal_name("gpu")   # or remove_worker_pool(pool_id)
    cluster.save_state_to_json_file(state_file)
    report = cluster.shut_down()           # ShutdownReport(ended, already_gone, failed)

    # From another process: end a cluster from its saved state.
    proxy = RayDogClusterProxy(client)
    proxy.load_saved_state_from_json_file(state_file)
    proxy.shut_down()

    # End the orphaned clusters in the namespace with the tag (head gone, lifetime passed, or
    # pools left with no work requirement) and leave the healthy ones; everything=True ends all.
    sweep(client, "ray", "nightly")
    client.close()                         # ends the client's event streams and connections
    # --8<-- [end:build]

    assert head.private_ip and not report.failed
    assert not any(platform.live_entities().values()), platform.live_entities()
