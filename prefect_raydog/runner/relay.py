"""`TcpRelay`: forwards TCP connections from an address the nodes reach to the Prefect API;
`relay_api` opens one for this process's loopback API and says the URL the nodes use."""

from __future__ import annotations

import contextlib
import socket
import threading
from contextlib import ExitStack
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from prefect_raydog.runner.shipping import on_loopback

_SHARED: dict[tuple[str, tuple[str, int]], TcpRelay] = {}
_SHARED_LOCK = threading.Lock()


class TcpRelay:
    """Forwards TCP connections from an address that nodes reach to the loopback Prefect API."""

    def __init__(self, host: str, target: tuple[str, int]) -> None:
        self._target = target
        self._server = socket.create_server((host, 0))
        self.port = self._server.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="raydog-api-relay", daemon=True).start()

    def __enter__(self) -> TcpRelay:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._server.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
                upstream = socket.create_connection(self._target)
            except OSError:
                if self._server.fileno() == -1:
                    return
                continue
            for sock in (client, upstream):
                # Requests and replies are small: without it each waits for a delayed ACK.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._open.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._open.discard(src)


def shared_relay(host: str, target: tuple[str, int]) -> TcpRelay:
    """The process's relay from `host` to `target`, opened on first use and left open.

    Ray worker processes of a cluster that outlives a flow run serve later flow runs, and
    Prefect's event and log workers in them keep the API URL they first used.
    """
    with _SHARED_LOCK:
        relay = _SHARED.get((host, target))
        if relay is None:
            relay = _SHARED[(host, target)] = TcpRelay(host, target)
        return relay


def relay_api(host: str, logger: Any, stack: ExitStack | None = None) -> str | None:
    """Relay this process's Prefect API on `host` and return the URL the nodes use: for as long
    as `stack` lasts, or (no `stack`: a cluster that is only attached to) for the process.

    Only a plain-http API on this machine's loopback (Prefect's temporary server, or
    `prefect server start` there) is relayed. Any other (Prefect Cloud, a server the nodes
    reach, any https URL, whose TLS host name a relay's address would not match) goes to the
    nodes unchanged: then this returns None.
    """
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    if api_url is not None and (urlsplit(api_url).scheme != "http" or not on_loopback(api_url)):
        logger.info("Nodes use the Prefect API at %s unchanged: a relay (on %s) serves only a "
                    "plain-http Prefect API on this machine's loopback.", api_url, host)
        return None
    api_url = api_url or _ephemeral_api_url()
    parts = urlsplit(api_url)
    target = (parts.hostname, parts.port or 80)
    relay = (shared_relay(host, target) if stack is None
             else stack.enter_context(TcpRelay(host, target)))
    url = urlunsplit(parts._replace(netloc=f"{host}:{relay.port}"))
    logger.info("Nodes reach the Prefect API at %s, a relay to %s on this machine's loopback.",
                url, api_url)
    return url


def _ephemeral_api_url() -> str:
    """The URL of the temporary server Prefect starts when no API URL is set."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url
