"""`SessionSettings`: what a session takes from the task runner that opens it, fixed at entry;
and unsaved config blocks, kept in this process while a runner refers to them."""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect_raydog.blocks import RayDogClusterConfig

# Unsaved config blocks by token, so a pickled runner never carries their secrets. An entry
# lasts while something holds its block: the runners that refer to it, or the caller.
UNSAVED_CONFIGS: weakref.WeakValueDictionary[str, RayDogClusterConfig] = (
    weakref.WeakValueDictionary()
)


@dataclass(frozen=True)
class SessionSettings:
    """A runner's configuration as its session uses it.

    Args:
        cluster: a saved block's name, an unsaved block's token, or `None` for the local preset.
        address: a running Ray cluster to attach to instead of provisioning one.
        init_kwargs: extra keyword arguments for `ray.init`.
        node_api_url: the Prefect API URL that nodes use, when it differs from this process's.
        api_relay_address: an address of this machine where the Prefect API is relayed.
        driverless_grace_s: how long a provisioned head lasts with no Ray driver connected.
        logger: the runner's logger, for what is logged outside a flow run.
        unsaved_config: the block behind an unsaved token, held while the session lasts.
    """

    cluster: str | None
    address: str | None
    init_kwargs: Mapping[str, Any]
    node_api_url: str | None
    api_relay_address: str | None
    driverless_grace_s: float | None
    logger: Any = field(compare=False, repr=False)
    unsaved_config: RayDogClusterConfig | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> tuple:
        """The configuration that sessions are shared by in a process."""
        return (self.cluster, self.address, repr(sorted(self.init_kwargs.items())))


def cluster_reference(cluster: str | RayDogClusterConfig | None) -> str | None:
    """A block name for `cluster`; an unsaved block is kept in this process, by token."""
    if cluster is None or isinstance(cluster, str):
        return cluster
    name = getattr(cluster, "_block_document_name", None)
    if name and not getattr(cluster, "_is_anonymous", False):
        return name
    token = f"unsaved:{uuid.uuid4().hex}"
    UNSAVED_CONFIGS[token] = cluster
    return token


def unsaved_config(reference: str | None) -> RayDogClusterConfig | None:
    """The unsaved block behind `reference`, if it is a token this process still holds."""
    if reference is None or not reference.startswith("unsaved:"):
        return None
    return UNSAVED_CONFIGS.get(reference)
