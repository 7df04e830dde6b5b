"""`relay_api`: a relay (`TcpForwarder`) from an address the nodes reach to this process's
loopback Prefect API, and the URL the nodes use; `forwardable_api_url`, which API a relay or the
SSH connection's door can serve."""

from __future__ import annotations

import threading
from contextlib import ExitStack
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from prefect_raydog.forwarding import TcpForwarder
from prefect_raydog.runner.shipping import on_loopback

_SHARED: dict[tuple[str, tuple[str, int]], TcpForwarder] = {}
_SHARED_LOCK = threading.Lock()


def shared_relay(host: str, target: tuple[str, int]) -> TcpForwarder:
    """The process's relay from `host` to `target`, opened on first use and left open.

    Ray worker processes of a cluster that outlives a flow run serve later flow runs, and
    Prefect's event and log workers in them keep the API URL they first used.
    """
    with _SHARED_LOCK:
        relay = _SHARED.get((host, target))
        if relay is None:
            relay = _SHARED[(host, target)] = TcpForwarder(host, target, "raydog-api-relay")
        return relay


def relay_api(host: str, logger: Any, stack: ExitStack | None = None) -> str | None:
    """Relay this process's Prefect API on `host` and return the URL the nodes use: for as long
    as `stack` lasts, or (no `stack`: a cluster that is only attached to) for the process.
    Only an API that `forwardable_api_url` names is relayed; any other goes to the nodes
    unchanged: then this returns None.
    """
    api_url = forwardable_api_url(logger, f"a relay (on {host})")
    if api_url is None:
        return None
    parts = urlsplit(api_url)
    target = (parts.hostname or "127.0.0.1", parts.port or 80)
    relay = (shared_relay(host, target) if stack is None
             else stack.enter_context(TcpForwarder(host, target, "raydog-api-relay")))
    url = urlunsplit(parts._replace(netloc=f"{host}:{relay.port}"))
    logger.info("Nodes reach the Prefect API at %s, a relay to %s on this machine's loopback.",
                url, api_url)
    return url


def forwardable_api_url(logger: Any, forwarder: str) -> str | None:
    """This process's Prefect API URL when it is plain http on this machine's loopback
    (Prefect's temporary server, started now if none runs, or `prefect server start` there),
    which `forwarder` serves to the nodes; else None, and the nodes use the URL unchanged
    (Prefect Cloud, a server the nodes reach, any https URL, whose TLS host name a forwarder's
    address would not match)."""
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    if api_url is not None and (urlsplit(api_url).scheme != "http" or not on_loopback(api_url)):
        logger.info("Nodes use the Prefect API at %s unchanged: %s serves only a plain-http "
                    "Prefect API on this machine's loopback.", api_url, forwarder)
        return None
    return api_url or _ephemeral_api_url()


def _ephemeral_api_url() -> str:
    """The URL of the temporary server Prefect starts when no API URL is set."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url
