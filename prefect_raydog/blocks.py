"""Prefect blocks for RayDog: YellowDog credentials and the template of a cluster that a flow run
provisions, both editable in the Prefect UI and validated by the Builder's specification models."""

from __future__ import annotations

import copy
import os
import re
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from prefect.blocks.abstract import CredentialsBlock
from prefect.blocks.core import Block
from pydantic import (
    ConfigDict,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from prefect_raydog.spec import (
    CLUSTER_NAME_MAX_LENGTH,
    ClusterSpec,
    NodeGroupSpec,
    WorkerPoolSpec,
    check_name,
    local_node,
)

if TYPE_CHECKING:
    from yellowdog_client import PlatformClient

    from prefect_raydog.cluster import SSHLogin
    from prefect_raydog.host_keys import HostKeys

DEFAULT_API_URL = "https://api.yellowdog.ai"
DOCUMENTATION_URL = "https://github.com/yellowdog/prefect-raydog#readme"
_DURATION = TypeAdapter(timedelta)
# "-" plus 8 hex digits identify one flow run's cluster among others from the same block.
_RUN_SUFFIX_LENGTH = 9
# What the UI sends for an idle shutdown switched to Never (null in Python).
NEVER = "never"


def _one_type(schema: dict[str, Any]) -> None:
    """Show an optional scalar as its own type, left empty when unset: no `type | null` switch.
    Where empty is not the default (an idle shutdown: null means never), an After | Never switch
    stays; its Never side is a one-choice select, as the UI shows a null type as an error text."""
    branches = schema.get("anyOf")
    if not branches or {"type": "null"} not in branches or len(branches) != 2:
        return
    (kind,) = [branch for branch in branches if branch != {"type": "null"}]
    if "$ref" in kind:
        return
    if schema.get("default") is not None:
        kind["title"] = "After"
        branches[branches.index({"type": "null"})] = {
            "title": "Never", "type": "string", "enum": [NEVER], "const": NEVER
        }
        _in_seconds(schema, kind)
        return
    del schema["anyOf"]
    schema.pop("default", None)
    schema.update({key: value for key, value in kind.items() if key not in schema})
    _in_seconds(schema, schema)


def _in_seconds(field: dict[str, Any], kind: dict[str, Any]) -> None:
    """A duration as the UI's number of seconds, instead of ISO 8601 text like 'PT1H'."""
    if kind.get("format") != "duration":
        return
    kind["format"] = "time-delta"
    field["title"] = f"{field['title']} (seconds)"
    if isinstance(field.get("default"), str):
        field["default"] = f"{_DURATION.validate_python(field['default']).total_seconds():g}"


def _inline(schema: dict[str, Any], specs: dict[str, Any]) -> dict[str, Any]:
    """A `$ref` to a spec model replaced by the model, keeping the field's title and description."""
    name = schema.get("$ref", "").rsplit("/", 1)[-1]
    if name not in specs:
        return schema
    model = copy.deepcopy(specs[name])
    model.pop("title"), model.pop("description")
    return {**model, **{key: value for key, value in schema.items() if key != "$ref"}}


def _optional_spec(field: dict[str, Any], specs: dict[str, Any]) -> bool:
    """Whether a field is `SomeSpec | None`, as the observability node is."""
    branches = field.get("anyOf", [])
    return (
        len(branches) == 2 and branches[1] == {"type": "null"}
        and branches[0].get("$ref", "").rsplit("/", 1)[-1] in specs
    )


def _all_optional(field: dict[str, Any]) -> dict[str, Any]:
    """An optional node group as a form of its own, none when left empty: a `Yes | No` switch
    would show its No side as the UI's "Property is type None"."""
    field.pop("required", None)
    field.pop("default", None)
    return field


def _shape_for_forms(schema: dict[str, Any]) -> dict[str, Any]:
    """Prefect's block schema, shaped for the UI's forms: nested models under the field's title
    (not the class name), optional scalars without a `type | null` switch, no file paths."""
    definitions = schema.get("definitions", {})
    specs = {name: spec for name, spec in definitions.items() if "block_type_slug" not in spec}
    for model in definitions.values():
        model["properties"].pop("script_file", None)
        for field in model["properties"].values():
            _one_type(field)
    properties = schema["properties"]
    for name, field in properties.items():
        _one_type(field)
        _in_seconds(field, field)
        if "items" in field:
            field["items"] = _inline(field["items"], specs)
            field.setdefault("default", [])
        if _optional_spec(field, specs):
            (spec, _) = field.pop("anyOf")
            properties[name] = _all_optional(_inline({**field, **spec}, specs))
        elif field.get("$ref", "").rsplit("/", 1)[-1] in specs:
            properties[name] = _inline(field, specs)
        elif "$ref" in field:
            # A nested block: the UI titles its picker with the block's own schema.
            nested = definitions[field["$ref"].rsplit("/", 1)[-1]]
            nested.update(title=field["title"], description=field["description"])
    for name in specs:
        del definitions[name]
    return schema


class YellowDogCredentials(CredentialsBlock):
    """An application key for the YellowDog Platform, and the API it belongs to.

    Empty fields fall back to the environment variables `YD_API_KEY_ID`, `YD_API_KEY_SECRET`
    and `YD_API_URL`, as RayDog does.

    Example:
        ```python
        from prefect_raydog import YellowDogCredentials

        credentials = YellowDogCredentials.load("BLOCK_NAME")
        client = credentials.get_client()
        ```
    """

    # Inputs stay out of validation errors: they may hold the key secret in plain text.
    model_config = ConfigDict(hide_input_in_errors=True)
    _block_type_name = "YellowDog Credentials"
    _documentation_url = DOCUMENTATION_URL

    api_key_id: str | None = Field(
        default=None,
        title="Application key ID",
        description="The ID of a YellowDog application key; YD_API_KEY_ID when empty.",
    )
    api_key_secret: SecretStr | None = Field(
        default=None,
        title="Application key secret",
        description="The secret of the application key; YD_API_KEY_SECRET when empty.",
    )
    api_url: str | None = Field(
        default=None,
        title="API URL",
        description=f"The YellowDog API to use; YD_API_URL, else {DEFAULT_API_URL}, when empty.",
    )

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The block's schema as the Prefect UI's forms should show it."""
        return _shape_for_forms(super().model_json_schema(*args, **kwargs))

    def resolved_api_url(self) -> str:
        """The API URL these credentials use, after the environment fallback."""
        return self.api_url or os.environ.get("YD_API_URL") or DEFAULT_API_URL

    def resolved_key(self) -> tuple[str, SecretStr]:
        """The application key ID and secret, after the environment fallback."""
        key_id = self.api_key_id or os.environ.get("YD_API_KEY_ID")
        secret = self.api_key_secret or (
            SecretStr(os.environ["YD_API_KEY_SECRET"]) if os.environ.get("YD_API_KEY_SECRET")
            else None
        )
        missing = [
            name for name, value in (("api_key_id", key_id), ("api_key_secret", secret))
            if not value
        ]
        if missing:
            raise ValueError(
                f"YellowDogCredentials: {' and '.join(missing)} not set and not in the environment "
                "(YD_API_KEY_ID / YD_API_KEY_SECRET); fill in the block or set the variables."
            )
        return key_id, secret

    def get_client(self) -> PlatformClient:
        """A `yellowdog_client.PlatformClient` authenticated with this key."""
        from prefect_raydog.cluster import create_client

        key_id, secret = self.resolved_key()
        return create_client(key_id, secret, self.resolved_api_url())


def _spec_field(model: type, name: str, **overrides: Any) -> Any:
    """The Builder's own field definition, so title, description and limits live in one place."""
    field = copy.copy(model.model_fields[name])
    for attribute, value in overrides.items():
        setattr(field, attribute, value)
    return field


class RayDogClusterConfig(Block):
    """The template of a Ray cluster on YellowDog that a flow run provisions for its duration:
    head node, worker pools, lifetimes, and the credentials to provision it with.

    Example:
        ```python
        from prefect_raydog import RayDogClusterConfig, RayDogTaskRunner

        config = RayDogClusterConfig.load("BLOCK_NAME")

        @flow(task_runner=RayDogTaskRunner(cluster="BLOCK_NAME"))
        def my_flow(): ...
        ```
    """

    # Inputs stay out of validation errors: they may hold the key secret in plain text.
    # Durations are saved as seconds, as the UI's duration inputs show and send them.
    model_config = ConfigDict(hide_input_in_errors=True, ser_json_timedelta="float")
    _block_type_name = "RayDog Cluster Config"
    _documentation_url = DOCUMENTATION_URL

    credentials: YellowDogCredentials = Field(
        default_factory=YellowDogCredentials,
        title="YellowDog credentials",
        description="The YellowDog application key to provision the cluster with.",
    )
    cluster_name_prefix: str = Field(
        default="raydog",
        title="Cluster name prefix",
        description=(
            "Each flow run's cluster is named this plus a short run ID; lower-case letters, "
            "digits, '-' and '_'."
        ),
    )
    namespace: str = _spec_field(ClusterSpec, "namespace", default="prefect-raydog")
    tag: str | None = _spec_field(ClusterSpec, "tag")
    head: NodeGroupSpec = _spec_field(ClusterSpec, "head")
    worker_pools: list[WorkerPoolSpec] = _spec_field(ClusterSpec, "worker_pools")
    observability: NodeGroupSpec | None = _spec_field(
        ClusterSpec, "observability",
        description=(
            "An optional node started before the head, its address given to every task; "
            "none when its template is empty."
        ),
    )
    cluster_lifetime: timedelta = _spec_field(ClusterSpec, "cluster_lifetime")
    idle_node_shutdown: timedelta | None = _spec_field(ClusterSpec, "idle_node_shutdown")
    idle_pool_shutdown: timedelta | None = _spec_field(ClusterSpec, "idle_pool_shutdown")
    build_timeout: timedelta = _spec_field(ClusterSpec, "build_timeout")
    workers_to_join: int = _spec_field(ClusterSpec, "workers_to_join")
    api_relay_address: str | None = Field(
        default=None,
        title="Prefect API relay address",
        description=(
            "An address of the flow's machine that the nodes reach: the runner relays a "
            "loopback Prefect API there for the flow run. Empty: the nodes use the flow's URL, "
            "or with an SSH tunnel, a loopback API through the SSH connection."
        ),
    )
    ssh_tunnel: bool = Field(
        default=False,
        title="Connect through an SSH tunnel",
        description=(
            "Reach the head node's Ray Client port through SSH to its public IP; the cluster "
            "is then locked with a Ray token, written into each node over SSH with this key. "
            "A Prefect API on the flow's loopback reaches the nodes through the same SSH "
            "connection (a reverse forward the head opens to the workers)."
        ),
    )
    ssh_username: str = Field(
        default="yd-agent",
        title="SSH user name",
        description="The user to log in as on the nodes (the agent's) when tunnelling.",
    )
    ssh_private_key: SecretStr | None = Field(
        default=None,
        title="SSH private key",
        description=(
            "The private key (PEM or OpenSSH text) for the SSH tunnel. Empty: a key is made for "
            "each cluster and authorized in its nodes' userdata."
        ),
    )
    ssh_known_hosts: str | None = Field(
        default=None,
        title="SSH host keys",
        description=(
            "The host keys the nodes may present: the image's host public key (a .pub line, "
            "valid for every node) or OpenSSH known_hosts lines (`*` patterns allowed). A node "
            "with another key is refused. Required with the SSH tunnel, unless trust on first "
            "use is on."
        ),
    )
    ssh_trust_first_use: bool = Field(
        default=False,
        title="Trust each node's first SSH host key",
        description=(
            "Accept the host key a node presents the first time the cluster connects to it "
            "(a later change is refused), for nodes that the SSH host keys do not cover."
        ),
    )

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The block's schema as the Prefect UI's forms should show it."""
        return _shape_for_forms(super().model_json_schema(*args, **kwargs))

    @field_validator(
        "cluster_lifetime", "idle_node_shutdown", "idle_pool_shutdown", "build_timeout",
        mode="before",
    )
    @classmethod
    def _seconds_as_text(cls, value: Any) -> Any:
        """The UI sends a duration's seconds as text ("3600")."""
        if isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?", value.strip()):
            return float(value)
        return value

    @field_validator("observability", mode="before")
    @classmethod
    def _empty_form_is_none(cls, value: Any) -> Any:
        """The UI sends an observability form left empty as empty fields: no such node."""
        if isinstance(value, dict) and not any(value.values()):
            return None
        return value

    @field_validator("idle_node_shutdown", "idle_pool_shutdown", mode="before")
    @classmethod
    def _never_from_the_ui(cls, value: Any) -> Any:
        return None if value == NEVER else value

    @field_serializer("idle_node_shutdown", "idle_pool_shutdown", when_used="json")
    def _never_to_the_ui(self, value: timedelta | None) -> float | str:
        """Saved as the UI's After seconds or Never, so that an edit form opens on the same."""
        return NEVER if value is None else value.total_seconds()

    @field_validator("cluster_name_prefix")
    @classmethod
    def _prefix_rules(cls, value: str) -> str:
        return check_name(value, CLUSTER_NAME_MAX_LENGTH - _RUN_SUFFIX_LENGTH)

    @model_validator(mode="after")
    def _valid_as_a_cluster(self) -> RayDogClusterConfig:
        self.to_spec(f"{self.cluster_name_prefix}-{'0' * (_RUN_SUFFIX_LENGTH - 1)}")
        if self.ssh_tunnel and self.ssh_private_key is None:
            from prefect_raydog.cluster.token_auth import check_groups_take_a_key

            check_groups_take_a_key(self)
        if self.ssh_tunnel and not self.ssh_known_hosts and not self.ssh_trust_first_use:
            raise ValueError(
                "ssh_known_hosts: required when ssh_tunnel is on: the nodes' SSH host public "
                "key (the image's /etc/ssh/ssh_host_ed25519_key.pub line) or known_hosts lines; "
                "or turn on ssh_trust_first_use to accept each node's first key")
        self.host_keys()
        return self

    def host_keys(self) -> HostKeys:
        """A new policy for the host keys of one cluster's nodes: `ssh_known_hosts`, and trust
        on first use when `ssh_trust_first_use` is on."""
        from prefect_raydog.host_keys import HostKeys

        return HostKeys(self.ssh_known_hosts or "", trust_first_use=self.ssh_trust_first_use)

    def ssh_login(self) -> SSHLogin | None:
        """The login to the nodes of a cluster reached over SSH (`ssh_tunnel`), which locks it
        with a Ray token delivered over SSH: with `ssh_private_key`, or else a key made now for
        one cluster and authorized in its nodes' userdata; None without the tunnel."""
        from prefect_raydog.cluster import SSHLogin

        if not self.ssh_tunnel:
            return None
        if self.ssh_private_key is None:
            return SSHLogin.generated(self.ssh_username, self.host_keys())
        return SSHLogin(self.ssh_username, self.ssh_private_key, host_keys=self.host_keys())

    def cluster_name(self, run_id: uuid.UUID | None = None) -> str:
        """A cluster name for one flow run, unique among clusters made from this config."""
        suffix = (run_id or uuid.uuid4()).hex[: _RUN_SUFFIX_LENGTH - 1]
        return f"{self.cluster_name_prefix}-{suffix}"

    def to_spec(self, name: str) -> ClusterSpec:
        """The Builder's specification of this cluster, named `name`."""
        fields = self.model_dump(include=set(ClusterSpec.model_fields) - {"name"})
        fields.update(head=self.head, worker_pools=self.worker_pools,
                      observability=self.observability)
        try:
            return ClusterSpec(name=name, **fields)
        except ValidationError as exc:
            raise ValueError(_describe(exc)) from None

    @classmethod
    def local(
        cls, api_url: str, api_key_id: str, api_key_secret: str, worker_nodes: int = 2,
        environment: dict[str, str] | None = None, ssh_known_hosts: str | None = None,
        sealed: bool = False,
    ) -> RayDogClusterConfig:
        """The `local` preset: a head and one pool of `worker_nodes` on a local platform, its
        nodes' SSH host key pinned when given (`LocalPlatform.ssh_known_hosts`).

        `sealed` nodes are as a cloud's (`local/vm`: only their image, tasks as `yd-agent`,
        behind the platform's firewall), reached over SSH with the pinned host key, and their
        cluster locked with a Ray token; else process nodes that share this machine's Python."""
        if sealed and not ssh_known_hosts:
            raise ValueError("ssh_known_hosts: required for sealed nodes, which are reached "
                             "over SSH (LocalPlatform.ssh_known_hosts)")
        node = local_node(sealed, environment=environment)
        head = NodeGroupSpec(**node)
        workers = WorkerPoolSpec(name="workers", count=worker_nodes, **node)
        return cls(
            credentials=YellowDogCredentials(
                api_key_id=api_key_id, api_key_secret=SecretStr(api_key_secret), api_url=api_url
            ),
            cluster_name_prefix="local",
            namespace="local",
            tag="prefect-raydog-local",
            head=head,
            worker_pools=[workers],
            cluster_lifetime=timedelta(hours=1),
            build_timeout=timedelta(minutes=3),
            workers_to_join=worker_nodes,
            ssh_tunnel=sealed,
            ssh_known_hosts=ssh_known_hosts,
        )


def _describe(exc: ValidationError) -> str:
    """One line per problem: the field's path and what is wrong with it."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "cluster"
        lines.append(f"{where}: {re.sub(r'^Value error, ', '', error['msg'])}")
    return "Invalid RayDog cluster config: " + "; ".join(lines)
