"""The autoscaler's part of a Ray cluster YAML: RayDog 2.0's `provider` and `node_config` keys
plus a few of ours, validated with the offending key named; `file:` values read relative to the
YAML; and where the application key comes from (never from a YellowDog document)."""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from prefect_raydog.host_keys import HostKeys
from prefect_raydog.spec import check_name

DEFAULT_API_URL = "https://api.yellowdog.ai"
RAYDOG_DIR = ".raydog"
CREDENTIALS_FILE = f"{RAYDOG_DIR}/credentials.json"
CLUSTER_FILE = f"{RAYDOG_DIR}/cluster.json"
TOKEN_FILE = ".ray/auth_token"
"""The cluster's Ray token on each node, relative to the agent's home: Ray's own default path,
so that a driver on the head (`ray submit`, `ray exec`) finds it without being told."""
HEAD_KEY_FILE = "~/ray_bootstrap_key.pem"
"""Where `ray up` copies the YAML's `auth.ssh_private_key` on the head."""


class AutoscalerConfigError(ValueError):
    """The cluster YAML's provider or node config is invalid; the message names the key."""


class ProviderConfig(BaseModel):
    """The `provider:` section (RayDog 2.0's keys, then ours)."""

    model_config = ConfigDict(extra="ignore", hide_input_in_errors=True)

    cluster_namespace: str
    cluster_tag: str | None = None
    cluster_lifetime_hours: float = Field(default=1.0, gt=0)
    head_node_build_timeout_minutes: float = Field(default=10.0, gt=0)
    ray_head_node_task_script: str | None = None
    ray_worker_node_task_script: str | None = None
    files_to_upload: list[str] = Field(default_factory=list)
    head_node_tag_server_port: int | None = None
    # Ours.
    credentials_block: str | None = None
    api_url: str | None = None
    head_api_url: str | None = None
    idle_node_shutdown_minutes: float = Field(default=1.0, ge=0)
    task_environment: dict[str, str] = Field(default_factory=dict)
    ssh_known_hosts: str | None = None
    ssh_trust_first_use: bool = False

    @field_validator("cluster_namespace")
    @classmethod
    def _namespace(cls, value: str) -> str:
        return check_name(value)

    @field_validator("cluster_tag")
    @classmethod
    def _tag(cls, value: str | None) -> str | None:
        return None if not value else check_name(value)

    def host_keys(self) -> HostKeys:
        """The policy for the nodes' SSH host keys; `AutoscalerConfigError` when it has no keys
        and no trust on first use, or a bad line."""
        if not self.ssh_known_hosts and not self.ssh_trust_first_use:
            raise AutoscalerConfigError(
                "Invalid cluster YAML: provider.ssh_known_hosts: required: the nodes' SSH host "
                "public key (the image's /etc/ssh/ssh_host_ed25519_key.pub line, or "
                "`file:PATH`) or known_hosts lines; or set provider.ssh_trust_first_use: true")
        try:
            return HostKeys(self.ssh_known_hosts or "", trust_first_use=self.ssh_trust_first_use,
                            source="provider.ssh_known_hosts")
        except ValueError as error:
            raise AutoscalerConfigError(f"Invalid cluster YAML: {error}") from None

    @property
    def lifetime(self) -> timedelta:
        return timedelta(hours=self.cluster_lifetime_hours)

    @property
    def build_timeout(self) -> timedelta:
        return timedelta(minutes=self.head_node_build_timeout_minutes)

    @property
    def idle_node_shutdown(self) -> timedelta:
        return timedelta(minutes=self.idle_node_shutdown_minutes)


class NodeConfig(BaseModel):
    """One node type's `node_config:` (RayDog 2.0's keys)."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    compute_requirement_template: str = Field(min_length=1)
    images_id: str | None = None
    userdata: str | None = None
    extra_userdata: str | None = None
    metrics_enabled: bool | None = None

    @property
    def full_userdata(self) -> str | None:
        parts = [part for part in (self.userdata, self.extra_userdata) if part]
        return "\n".join(parts) if parts else None


def parse(model: type[BaseModel], data: Any, where: str) -> Any:
    """Validate `data`, raising AutoscalerConfigError that names `where` and each bad key."""
    try:
        return model.model_validate(data or {})
    except ValidationError as error:
        problems = "; ".join(
            f"{where}.{'.'.join(str(p) for p in item['loc'])}: {item['msg']}"
            for item in error.errors())
        raise AutoscalerConfigError(f"Invalid cluster YAML: {problems}") from None


def config_dir() -> Path:
    """Where `file:` values are read from: the directory of the YAML on the command line
    (`ray up cluster.yaml`), else the current directory."""
    for argument in sys.argv[1:]:
        if argument.endswith((".yaml", ".yml")) and Path(argument).is_file():
            return Path(argument).resolve().parent
    return Path.cwd()


def read_file_values(section: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    """Replace `file:<path>` values of `keys` in `section` by the file's text, in place."""
    base = config_dir()
    for key in keys:
        value = section.get(key)
        if isinstance(value, str) and value.startswith("file:"):
            path = base / Path(value.removeprefix("file:")).expanduser()
            try:
                section[key] = path.read_text()
            except OSError as error:
                raise AutoscalerConfigError(
                    f"Invalid cluster YAML: {where}.{key}: cannot read {str(path)!r}: "
                    f"{error.strerror}") from None


class Credentials(BaseModel):
    """A YellowDog application key and API URL."""

    key_id: str
    key_secret: SecretStr
    url: str = DEFAULT_API_URL

    def to_json(self) -> str:
        return json.dumps({"key_id": self.key_id, "key_secret": self.key_secret.get_secret_value(),
                           "url": self.url})


def credentials(provider: ProviderConfig, home: Path | None = None) -> Credentials:
    """The key: the file `ray up` delivered to the head (on the head), else the named Prefect
    block, else YD_API_KEY_ID / YD_API_KEY_SECRET / YD_API_URL."""
    delivered = (home or Path.home()) / CREDENTIALS_FILE
    if delivered.is_file():
        return Credentials.model_validate_json(delivered.read_text())
    if provider.credentials_block:
        from prefect_raydog.blocks import YellowDogCredentials

        block = YellowDogCredentials.load(provider.credentials_block)
        key_id, secret = block.resolved_key()
        return Credentials(key_id=key_id, key_secret=secret,
                           url=provider.api_url or block.resolved_api_url())
    key_id, secret = os.environ.get("YD_API_KEY_ID"), os.environ.get("YD_API_KEY_SECRET")
    if not key_id or not secret:
        raise AutoscalerConfigError(
            "No YellowDog application key: set YD_API_KEY_ID and YD_API_KEY_SECRET, or name a "
            "YellowDogCredentials block in provider.credentials_block")
    return Credentials(key_id=key_id, key_secret=SecretStr(secret),
                       url=provider.api_url or os.environ.get("YD_API_URL") or DEFAULT_API_URL)
