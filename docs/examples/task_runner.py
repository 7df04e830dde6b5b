"""The ways to choose a task runner's cluster, and placing tasks on worker pools.

Run by tests/test_docs.py against a temporary Prefect server; README.md and docs/task-runner.md
show its sections. Building runners and defining flows does no I/O: nothing is provisioned here.
"""

# --8<-- [start:first]
from prefect import flow, task

from prefect_raydog import RayDogTaskRunner


@task
def simulate(seed: int) -> float:
    return (seed % 97) / 97.0


@flow(task_runner=RayDogTaskRunner(cluster="gpu-cluster"))  # a saved RayDogClusterConfig block
def sweep(n: int = 1000):
    return sum(simulate.map(range(n)).result())
# --8<-- [end:first]


from prefect_raydog import RayDogClusterConfig, placement, pool_resource  # noqa: E402

# A saved block for the example to name (on a YellowDog account, your cluster template).
RayDogClusterConfig.local("http://127.0.0.1:8765", "key-id", "key-secret").save(
    "gpu-cluster", overwrite=True
)

# --8<-- [start:alternatives]
# 1. A saved RayDogClusterConfig block, by name (the usual form; required for deployments):
#    RayDogTaskRunner(cluster="gpu-cluster"), as above.

# 2. A block instance. A saved or loaded block is stored by its name; an unsaved one is kept in
#    this process under a token, so the pickled runner never carries its secrets.
RayDogTaskRunner(cluster=RayDogClusterConfig.load("gpu-cluster"))

# 3. No argument: the `local` preset. A local YellowDog platform is started on demand and a head
#    node plus two worker nodes are provisioned on it (see local-platform.md).
RayDogTaskRunner()

# 4. Attach to a running Ray cluster; nothing is provisioned or torn down.
RayDogTaskRunner(address="ray://10.0.0.5:10001")
# --8<-- [end:alternatives]

assert RayDogTaskRunner(cluster=RayDogClusterConfig.load("gpu-cluster")) == RayDogTaskRunner(
    cluster="gpu-cluster"
)


# --8<-- [start:placement]
@task
def train(data: list[float]) -> float:
    return sum(data) / len(data)


@task
def score(model: float) -> float:
    return model * 2


@flow(task_runner=RayDogTaskRunner(cluster="mixed-cluster"))
def train_and_score(data: list[float]):
    with placement(worker_pool="gpu", num_gpus=1):      # any Ray task options
        model = train.submit(data)
    with placement(memory=2 * 1024**3):
        return score.submit(model).result()
# --8<-- [end:placement]


assert pool_resource("gpu") == "raydog-pool-gpu"
