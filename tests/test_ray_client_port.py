"""Connecting to a starting head waits for its Ray Client port to listen, then connects at once
(`ray.init` alone would back off for seconds while the port is closed)."""

from __future__ import annotations

import socket
import threading
import time

from prefect_raydog.cluster.client import wait_until_listening


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_wait_returns_once_the_port_listens_and_not_before() -> None:
    port, listening = _free_port(), []

    def listen_later() -> None:
        time.sleep(0.5)
        listening.append(socket.create_server(("127.0.0.1", port)))

    threading.Thread(target=listen_later, daemon=True).start()
    try:
        assert wait_until_listening("127.0.0.1", port, timeout=60)
        assert listening, "the wait returned before the port listened"
    finally:
        for server in listening:
            server.close()


def test_the_wait_gives_up_when_told_to_stop() -> None:
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    assert not wait_until_listening("127.0.0.1", _free_port(), timeout=60, stop=stop.is_set)
    assert stop.is_set()
