"""The RayDog Builder: one Ray cluster as one YellowDog work requirement plus one provisioned worker
pool per node group, built, resized and torn down through the unmodified yellowdog-sdk.

Example:
    ```python
    with RayDogCluster(spec, key_id="...", key_secret="...") as cluster:
        ray.init(f"ray://{cluster.head_node_private_ip}:10001")
    ```
"""

from prefect_raydog.cluster.builder import HeadNodeAddress, RayDogCluster
from prefect_raydog.cluster.client import DEFAULT_API_URL, create_client, wait_for_ray_nodes
from prefect_raydog.cluster.saved import RayDogClusterProxy, sweep
from prefect_raydog.cluster.teardown import ShutdownReport
from prefect_raydog.cluster.token_auth import SSHLogin

__all__ = [
    "DEFAULT_API_URL",
    "HeadNodeAddress",
    "RayDogCluster",
    "RayDogClusterProxy",
    "SSHLogin",
    "ShutdownReport",
    "create_client",
    "sweep",
    "wait_for_ray_nodes",
]
