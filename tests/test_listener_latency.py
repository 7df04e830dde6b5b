"""Requests answered in a millisecond or two, not after a delayed ACK (about 40 ms): every
listener the project makes must send small replies at once (TCP_NODELAY)."""

from __future__ import annotations

import socket
import statistics
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from yellowdog_client.model import WorkRequirement

from prefect_raydog.local import LocalPlatform
from prefect_raydog.runner.relay import _TcpRelay

# A healthy round trip here is 1-5 ms even on a loaded 2-core machine; a reply held back by
# Nagle's algorithm until the client's delayed ACK takes 40 ms or more.
MEDIAN_BOUND_MS = 20.0
ROUND_TRIPS = 60


def _median_ms(round_trip) -> float:
    times = []
    for _ in range(ROUND_TRIPS):
        start = time.perf_counter()
        round_trip()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def test_a_platform_request_is_answered_without_waiting_for_a_delayed_ack(
    platform: LocalPlatform,
) -> None:
    work = platform.client.work_client
    requirement = work.add_work_requirement(
        WorkRequirement(namespace="latency", name=f"latency-{uuid.uuid4().hex[:8]}")
    )
    try:
        median = _median_ms(lambda: work.get_work_requirement_by_id(requirement.id))
    finally:
        work.cancel_work_requirement_by_id(requirement.id)
    assert median < MEDIAN_BOUND_MS, f"median platform request took {median:.1f} ms"


@pytest.fixture
def split_reply_server() -> Iterator[tuple[str, int]]:
    """A server that answers each 1-byte request in two writes, as an HTTP server writes a
    header and then a body: the second write is the one Nagle holds back."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        connection, _ = server.accept()
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with connection:
            while not stop.is_set() and connection.recv(1):
                connection.sendall(b"head")
                time.sleep(0.002)  # so the relay reads the two apart, as it does over a network
                connection.sendall(b"body")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()
    stop.set()
    server.close()


def test_the_api_relay_forwards_a_split_reply_without_waiting_for_a_delayed_ack(
    split_reply_server: tuple[str, int],
) -> None:
    with _TcpRelay("127.0.0.1", split_reply_server) as relay:
        client = socket.create_connection(("127.0.0.1", relay.port))
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def round_trip() -> None:
            client.sendall(b"?")
            received = b""
            while len(received) < 8:
                received += client.recv(8 - len(received))
            assert received == b"headbody"

        with client:
            median = _median_ms(round_trip)
    assert median < MEDIAN_BOUND_MS, f"median relayed round trip took {median:.1f} ms"
