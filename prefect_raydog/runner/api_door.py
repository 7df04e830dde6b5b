"""How the nodes reach a Prefect API on this machine when the session reaches its head over
SSH: the SSH connection forwards a port on the head's loopback to the API (`ssh -R`), and a Ray
actor on the head (`forwarding.HeadDoor`) opens that port to the workers on the head's private
address. Nothing on this machine listens beyond loopback, and the nodes need no way in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from prefect.utilities.importtools import lazy_import

from prefect_raydog import forwarding
from prefect_raydog.runner.connection import HEAD_RESOURCE

if TYPE_CHECKING:
    import ray

    from prefect_raydog.tunnels import RayTunnels

ray = lazy_import("ray")
DOOR_START_TIMEOUT_S = 60.0


class ApiDoor:
    """The head's door to this machine's loopback Prefect API at `api_url`, open while this
    object and the Ray job (the actor's) last and the tunnels stay open."""

    def __init__(self, tunnels: RayTunnels, head_ip: str, api_url: str) -> None:
        parts = urlsplit(api_url)
        head_port = tunnels.forward_from_head((parts.hostname or "127.0.0.1", parts.port or 80))
        ray.cloudpickle.register_pickle_by_value(forwarding)  # the head may run another version
        door = ray.remote(num_cpus=0, resources={HEAD_RESOURCE: 0.001})(forwarding.HeadDoor)
        self._actor = door.remote(head_ip, head_port)
        self._port = self._actor.port.remote()
        self._parts = parts
        self._head_ip = head_ip
        self.api_url = api_url

    def url(self, logger: Any) -> str:
        """The URL the nodes use, once the door is open."""
        port = ray.get(self._port, timeout=DOOR_START_TIMEOUT_S)
        url = urlunsplit(self._parts._replace(netloc=f"{self._head_ip}:{port}"))
        logger.info("Nodes reach the Prefect API at %s: the head's door to %s on this machine's "
                    "loopback, through the SSH connection.", url, self.api_url)
        return url
