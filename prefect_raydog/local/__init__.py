"""The local YellowDog platform: a server on loopback that speaks YellowDog's REST API to the
unmodified `yellowdog-sdk` and runs each node of a worker pool on this machine."""

from prefect_raydog.local.platform import LocalPlatform
from prefect_raydog.local.templates import NodeMode, Template

__all__ = ["LocalPlatform", "NodeMode", "Template"]
