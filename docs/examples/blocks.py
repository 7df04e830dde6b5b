"""Saving and loading the two blocks, and the messages of a block that cannot be used.

Run by tests/test_docs.py against a temporary Prefect server; README.md and docs/blocks.md show
its sections.
"""

import os
from datetime import timedelta

from pydantic import SecretStr

# --8<-- [start:readme]
from prefect_raydog import NodeGroupSpec, RayDogClusterConfig, WorkerPoolSpec, YellowDogCredentials

credentials = YellowDogCredentials(api_key_id="...", api_key_secret="...")
credentials.save("yellowdog", overwrite=True)
RayDogClusterConfig(
    credentials=credentials,
    namespace="ray",
    head=NodeGroupSpec(template_id="my-namespace/ray-head"),
    worker_pools=[WorkerPoolSpec(name="cpu", template_id="my-namespace/ray-worker", count=4)],
).save("gpu-cluster", overwrite=True)
# --8<-- [end:readme]

os.environ.pop("YD_API_URL", None)
os.environ.pop("YD_API_KEY_ID", None)
os.environ["YD_API_KEY_SECRET"] = "secret-from-the-environment"

# --8<-- [start:credentials]
credentials = YellowDogCredentials(api_key_id="app-key-id")    # secret from YD_API_KEY_SECRET
credentials.save("yd-prod", overwrite=True)

credentials = YellowDogCredentials.load("yd-prod")
client = credentials.get_client()        # a yellowdog_client.PlatformClient
credentials.resolved_api_url()           # 'https://api.yellowdog.ai'
credentials.resolved_key()               # ('app-key-id', SecretStr('**********'))
# --8<-- [end:credentials]
assert credentials.resolved_api_url() == "https://api.yellowdog.ai"
assert credentials.resolved_key() == ("app-key-id", SecretStr("secret-from-the-environment"))

# --8<-- [start:config]
config = RayDogClusterConfig(
    credentials=YellowDogCredentials.load("yd-prod"),
    tag="nightly",
    head=NodeGroupSpec(template_id="yd-demo/rayhead"),
    worker_pools=[
        WorkerPoolSpec(template_id="yd-demo/rayworker", name="cpu", count=4, max_count=8),
    ],
    workers_to_join=4,
    cluster_lifetime=timedelta(hours=2),
)
config.save("cpu-cluster", overwrite=True)

config = RayDogClusterConfig.load("cpu-cluster")
config.to_spec(config.cluster_name())    # the Builder's ClusterSpec, e.g. name 'raydog-5ceb2dc0'
# --8<-- [end:config]
assert config.to_spec(config.cluster_name()).worker_pools[0].max_count == 8
