"""TCP forwarding with the standard library alone: a listener that joins each connection it
accepts to one target, and the join itself, for sockets and SSH channels alike. The relay on
this machine, the SSH reverse forward and the head's API door (`HeadDoor`, shipped to the head
by value) are made of it."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any, Protocol

logger = logging.getLogger("prefect_raydog.forwarding")


class Stream(Protocol):
    """A socket, or anything that reads and writes like one (a paramiko `Channel`)."""

    def recv(self, size: int) -> bytes: ...
    def sendall(self, data: bytes) -> Any: ...
    def close(self) -> None: ...


def no_delay(sock: socket.socket) -> socket.socket:
    """`sock` with TCP_NODELAY: requests and replies are small, and without it each waits for a
    delayed ACK (40 ms)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def join(a: Stream, b: Stream, name: str = "raydog-forward",
         closed: Callable[[], None] = lambda: None) -> None:
    """Copy `a` to `b` and `b` to `a`, each way in a daemon thread, until either end closes;
    then close both and call `closed`."""
    for src, dst in ((a, b), (b, a)):
        threading.Thread(target=_copy, args=(src, dst, (a, b), closed), name=name,
                         daemon=True).start()


def _copy(src: Stream, dst: Stream, ends: tuple[Stream, Stream],
          closed: Callable[[], None]) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except (OSError, EOFError):
        pass
    finally:
        for end in ends:
            _close(end)
        closed()


def _close(end: Stream) -> None:
    # A socket's shutdown() ends a recv() that another thread is in, which close() may not. An
    # SSH channel's close() does, and its shutdown() would send an EOF even for a channel the
    # server has freed, which OpenSSH answers by ending the whole connection. A channel whose
    # connection has gone raises EOFError or paramiko's errors, not OSError.
    if isinstance(end, socket.socket):
        with contextlib.suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        end.close()


def connect(address: tuple[str, int], timeout: float | None = None) -> socket.socket:
    """A connection to `address` (given up after `timeout`), blocking and with TCP_NODELAY."""
    sock = socket.create_connection(address, timeout=timeout)
    sock.settimeout(None)
    return no_delay(sock)


class TcpForwarder:
    """Forwards each TCP connection accepted on `host` (at `port`, by default a free one) to
    `target`: an address, or a function that opens a stream (an SSH channel); until closed,
    which closes the connections it joined too."""

    def __init__(self, host: str, target: tuple[str, int] | Callable[[], Stream],
                 name: str = "raydog-forward", port: int = 0) -> None:
        self._open_upstream = target if callable(target) else lambda: connect(target)
        self._name = name
        self._server = socket.create_server((host, port))
        self.port: int = self._server.getsockname()[1]
        self._open: set[Stream] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name=name, daemon=True).start()

    def __enter__(self) -> TcpForwarder:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        _close(self._server)
        with self._lock:
            for sock in list(self._open):
                _close(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                if self._server.fileno() == -1:
                    return
                continue
            try:
                upstream = self._open_upstream()
            except Exception as error:  # noqa: BLE001 - an SSH channel refused, a target down
                logger.debug("%s: no way to its target: %s", self._name, error)
                _close(client)
                continue
            with self._lock:
                self._open.update((client, upstream))
            join(no_delay(client), upstream, self._name,
                 closed=lambda pair=(client, upstream): self._forget(pair))

    def _forget(self, pair: tuple[Stream, Stream]) -> None:
        with self._lock:
            self._open.difference_update(pair)


class HeadDoor:
    """A Ray actor on the head: opens the port that the head's SSH server forwards from its
    loopback to the driver's Prefect API (`target_port`) to the workers, on the head's private
    address `host`. It lives as long as the driver's Ray job."""

    def __init__(self, host: str, target_port: int) -> None:
        self._forwarder = TcpForwarder(host, ("127.0.0.1", target_port), "raydog-api-door")

    def port(self) -> int:
        """The port the workers connect to."""
        return self._forwarder.port

    def close(self) -> None:
        self._forwarder.close()
