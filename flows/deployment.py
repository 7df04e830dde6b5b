"""Deploying a flow that provisions its Ray cluster from saved blocks.

The flow names a `RayDogClusterConfig` block; the block holds the YellowDog credentials, so the
deployment stores block names and never a secret. Save the blocks once (in the UI, or with
`python flows/deployment.py save-blocks`), then either serve the flow from this process:

    python flows/deployment.py serve

or deploy it to a process work pool with `prefect.yaml` (next to this file), from the
repository root:

    prefect work-pool create raydog-pool --type process
    prefect --no-prompt deploy --all --prefect-file flows/prefect.yaml
    prefect worker start --pool raydog-pool
"""

from __future__ import annotations

import os
import sys

from prefect import flow, task

from prefect_raydog import RayDogClusterConfig, RayDogTaskRunner, YellowDogCredentials
from prefect_raydog.spec import NodeGroupSpec, WorkerPoolSpec

CLUSTER_BLOCK = "raydog-demo-cluster"


@task
def score(item: int) -> float:
    return (item % 97) / 97.0


@flow(task_runner=RayDogTaskRunner(cluster=CLUSTER_BLOCK))
def nightly_scoring(items: int = 1000) -> float:
    return sum(score.map(range(items)).result()) / items


def save_blocks() -> None:
    """Save the credentials (from YD_API_KEY_ID / YD_API_KEY_SECRET) and the cluster template."""
    credentials = YellowDogCredentials(api_key_id=os.environ.get("YD_API_KEY_ID"))
    credentials.save("raydog-demo-credentials", overwrite=True)
    RayDogClusterConfig(
        credentials=credentials,
        namespace="prefect-raydog",
        head=NodeGroupSpec(template_id="yd-demo/rayhead"),
        worker_pools=[WorkerPoolSpec(template_id="yd-demo/rayworker", name="cpu", count=4)],
    ).save(CLUSTER_BLOCK, overwrite=True)


if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else "serve"
    if command == "save-blocks":
        save_blocks()
    else:
        nightly_scoring.serve(name="nightly-scoring", cron="0 2 * * *")
