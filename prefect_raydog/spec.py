"""The specification of a RayDog cluster as data: what to provision for the head node, the worker
pools and the optional observability node, validated before anything is provisioned."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LOCAL_PROCESS_TEMPLATE = "local/process"
LOCAL_SEALED_TEMPLATE = "local/vm"
LOCAL_IMAGE_VENV = "/opt/yellowdog/image/venv"
"""Where a sealed local node (`local/vm`) finds the venv of its image."""
LOCAL_NODE_ENVIRONMENT = {
    "RAY_INCLUDE_DASHBOARD": "false",
    "RAY_INCLUDE_LOG_MONITOR": "false",
    "RAY_OBJECT_STORE_MEMORY": "100000000",
    "RAY_METRICS_EXPORT_PORT": "",
    "RAY_NUM_CPUS": "1",
    "RAY_gcs_rpc_server_reconnect_timeout_s": "5",
}
"""What the package's head and worker scripts are told on the local platform's nodes, many to a
small machine: no dashboard (about 190 MiB and 2-3 s of start on two cores) and no log monitor (a
Python process per node; task output reaches Prefect through its API), a small object store,
metrics on a port Ray picks (nodes on loopback share ports), one CPU per worker, and a worker
that gives up 5 s after its head is gone instead of 60."""
NAME_MAX_LENGTH = 60
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
NAME_RULE = "lower-case letters, digits, '-' and '_', starting with a letter or digit"

# The Builder names each build's entities `{cluster name}-{build ID}-...` so that it can tell
# what it made from what another build of the same name made; the longest such suffix is the
# observability worker tag's.
BUILD_ID_LENGTH = 6
LONGEST_DERIVED_SUFFIX = f"-{'0' * BUILD_ID_LENGTH}-observability-00"
CLUSTER_NAME_MAX_LENGTH = NAME_MAX_LENGTH - len(LONGEST_DERIVED_SUFFIX)


def check_name(value: str, max_length: int = NAME_MAX_LENGTH) -> str:
    """Apply YellowDog's naming rules, saying exactly which one a value breaks."""
    if not value:
        raise ValueError("must not be empty")
    if len(value) > max_length:
        raise ValueError(f"{value!r} is {len(value)} characters long; at most {max_length} allowed")
    if not NAME_PATTERN.match(value):
        raise ValueError(f"{value!r} may contain only {NAME_RULE}")
    return value


def _positive(value: timedelta | None) -> timedelta | None:
    if value is not None and value <= timedelta(0):
        raise ValueError(f"must be positive, got {value}")
    return value


class NodeGroupSpec(BaseModel):
    """The machines and task script of one kind of Ray node (the head or observability node)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    template_id: str = Field(
        min_length=1,
        title="Compute requirement template",
        description="The YellowDog compute requirement template ID, or its 'namespace/name'.",
    )
    images_id: str | None = Field(
        default=None,
        title="Images ID",
        description="The machine image or image family ID; the template's own when empty.",
    )
    userdata: str | None = Field(
        default=None,
        title="Node userdata",
        description="A script each node runs at boot, before YellowDog's agent starts tasks.",
    )
    instance_tags: dict[str, str] | None = Field(
        default=None,
        title="Instance tags",
        description="Cloud provider tags applied to every instance.",
    )
    metrics_enabled: bool | None = Field(
        default=None,
        title="Metrics enabled",
        description="Whether YellowDog collects node metrics for this group's worker pool.",
    )
    script: str | None = Field(
        default=None,
        title="Task script",
        description=(
            "The bash script a node runs as its Ray task; the package's default when empty. "
            "It must trap EXIT with 'ray stop' and run 'ray start --block'."
        ),
    )
    script_file: Path | None = Field(
        default=None,
        title="Task script file",
        description="A file holding the task script, instead of the script text.",
    )
    environment: dict[str, str] = Field(
        default_factory=dict,
        title="Task environment",
        description="Extra environment variables for this group's task, e.g. RAYDOG_VENV.",
    )

    @field_validator("template_id")
    @classmethod
    def _template_id_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a compute requirement template, not be blank")
        return value.strip()

    @model_validator(mode="after")
    def _one_script_source(self) -> NodeGroupSpec:
        if self.script is not None and self.script_file is not None:
            raise ValueError("give either 'script' or 'script_file', not both")
        if self.script_file is not None and not self.script_file.is_file():
            raise ValueError(f"script_file {str(self.script_file)!r} is not a readable file")
        return self

    def script_text(self, default_name: str) -> str:
        """The task script: the given text, the given file's text, or the named package default."""
        if self.script is not None:
            return self.script
        if self.script_file is not None:
            return self.script_file.read_text()
        from prefect_raydog.scripts import load

        return load(default_name)


class WorkerPoolSpec(NodeGroupSpec):
    """A pool of identical Ray worker nodes, provisioned as one YellowDog worker pool."""

    name: str | None = Field(
        default=None,
        title="Pool name",
        description=(
            "The pool's name within the cluster, used to add tasks to it, resize or remove it; "
            "its task group's name ('worker-nodes-NN') when empty."
        ),
    )
    count: int = Field(
        default=1,
        ge=1,
        le=10_000,
        title="Nodes",
        description="How many Ray worker nodes the pool starts with (a pool without a range).",
    )
    min_count: int | None = Field(
        default=None,
        ge=0,
        le=10_000,
        title="Minimum nodes",
        description=(
            "With max_count, makes the pool adaptive: it starts with this many nodes and the "
            "task runner grows it to max_count while task runs wait and shrinks it back when "
            "its nodes sit idle; count is then not used."
        ),
    )
    max_count: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        title="Maximum nodes",
        description=(
            "How far the pool may be resized (the top of its range with min_count); the "
            "starting node count when empty."
        ),
    )

    @field_validator("name")
    @classmethod
    def _name_rules(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value)

    @model_validator(mode="after")
    def _max_not_below_count(self) -> WorkerPoolSpec:
        if self.min_count is not None:
            if self.max_count is None:
                raise ValueError("min_count needs max_count too: a range has both ends")
            if self.max_count < self.min_count:
                raise ValueError(
                    f"max_count ({self.max_count}) is below min_count ({self.min_count})"
                )
        elif self.max_count is not None and self.max_count < self.count:
            raise ValueError(f"max_count ({self.max_count}) is below count ({self.count})")
        return self

    @property
    def adaptive(self) -> bool:
        """Whether the pool has a range (min_count to max_count) that a task runner adapts."""
        return self.min_count is not None

    @property
    def start_count(self) -> int:
        """How many nodes the pool starts with: min_count for a range, else count."""
        return self.min_count if self.min_count is not None else self.count

    @property
    def floor(self) -> int:
        """The fewest nodes the pool may be resized to."""
        return self.min_count if self.min_count is not None else 1

    @property
    def node_limit(self) -> int:
        """The most nodes the pool's YellowDog worker pool may scale to."""
        return self.max_count or self.count


class ClusterSpec(BaseModel):
    """One Ray cluster on YellowDog: one work requirement plus one worker pool per node group."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str = Field(
        title="Cluster name",
        description=(
            "The prefix of the work requirement's and every worker pool's name (each build adds "
            f"its own build ID), at most {CLUSTER_NAME_MAX_LENGTH} characters."
        ),
    )
    namespace: str = Field(
        title="Namespace",
        description="The YellowDog namespace holding the work requirement and worker pools.",
    )
    tag: str | None = Field(
        default=None,
        title="Tag",
        description="A tag on the work and compute requirements, used to sweep orphans.",
    )
    head: NodeGroupSpec = Field(
        title="Head node",
        description="The machine and task script of the Ray head node.",
    )
    worker_pools: list[WorkerPoolSpec] = Field(
        default_factory=list,
        title="Worker pools",
        description="The pools of Ray worker nodes started with the cluster.",
    )
    observability: NodeGroupSpec | None = Field(
        default=None,
        title="Observability node",
        description="An optional node started before the head; its address reaches every task.",
    )
    cluster_lifetime: timedelta = Field(
        default=timedelta(hours=1),
        title="Cluster lifetime",
        description=(
            "The longest the cluster may live: YellowDog ends every node task after this, "
            "even if the process that built the cluster has died."
        ),
    )
    idle_node_shutdown: timedelta | None = Field(
        default=timedelta(minutes=3),
        title="Idle node shutdown",
        description="YellowDog shuts down a node idle for this long; never when unset.",
    )
    idle_pool_shutdown: timedelta | None = Field(
        # Longer than the build timeout: worker pools sit idle until the head node runs.
        default=timedelta(minutes=15),
        title="Idle pool shutdown",
        description=(
            "YellowDog shuts down a worker pool idle for this long; never when unset. Keep it "
            "longer than the build timeout, as worker pools are idle until the head node runs."
        ),
    )
    build_timeout: timedelta = Field(
        default=timedelta(minutes=10),
        title="Build timeout",
        description="How long to wait for the head node (and required workers) to start.",
    )
    workers_to_join: int = Field(
        default=0,
        ge=0,
        title="Workers that must join",
        description="How many worker node tasks must be running before the build returns.",
    )

    @field_validator("name")
    @classmethod
    def _cluster_name_rules(cls, value: str) -> str:
        return check_name(value, CLUSTER_NAME_MAX_LENGTH)

    @field_validator("namespace")
    @classmethod
    def _namespace_rules(cls, value: str) -> str:
        return check_name(value)

    @field_validator("tag")
    @classmethod
    def _tag_rules(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value)

    @field_validator("cluster_lifetime", "build_timeout")
    @classmethod
    def _required_positive(cls, value: timedelta) -> timedelta:
        return _positive(value)

    @field_validator("idle_node_shutdown", "idle_pool_shutdown")
    @classmethod
    def _not_negative(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value < timedelta(0):
            raise ValueError(f"must not be negative, got {value}")
        return value

    @model_validator(mode="after")
    def _pools_consistent(self) -> ClusterSpec:
        names = [pool.name for pool in self.worker_pools if pool.name is not None]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"worker pool names must be unique; repeated: {duplicates}")
        total = sum(pool.start_count for pool in self.worker_pools)
        if self.workers_to_join > total:
            raise ValueError(
                f"workers_to_join ({self.workers_to_join}) exceeds the {total} worker nodes "
                "of the worker pools"
            )
        return self

    @classmethod
    def for_local_platform(
        cls,
        name: str,
        namespace: str = "local",
        pool_sizes: Sequence[int] = (1,),
        *,
        sealed: bool = False,
        venv: str | None = None,
        environment: dict[str, str] | None = None,
        **fields: object,
    ) -> ClusterSpec:
        """A cluster of the local platform's process nodes (`local_node`); one pool per size."""
        node = local_node(sealed, venv, environment)
        return cls(
            name=name,
            namespace=namespace,
            head=NodeGroupSpec(**node),
            worker_pools=[WorkerPoolSpec(count=size, **node) for size in pool_sizes],
            **fields,
        )


def local_node(sealed: bool = False, venv: str | None = None,
               environment: dict[str, str] | None = None) -> dict[str, Any]:
    """The fields of a node group of the local platform's process nodes that run the package's
    head and worker scripts with Ray from `venv` and `LOCAL_NODE_ENVIRONMENT`. `sealed` nodes
    are as a cloud's (`local/vm`: they see only their image, whose venv is the default); others
    share this interpreter's, the default."""
    if venv is None:
        venv = LOCAL_IMAGE_VENV if sealed else sys.prefix
    env = {**LOCAL_NODE_ENVIRONMENT, "RAYDOG_VENV": venv, **(environment or {})}
    template = LOCAL_SEALED_TEMPLATE if sealed else LOCAL_PROCESS_TEMPLATE
    return {"template_id": template, "environment": env}
