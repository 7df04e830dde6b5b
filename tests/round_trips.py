"""Round trips through a listener the project makes, timed over many requests: a reply held
back by Nagle's algorithm until the client's delayed ACK takes 40 ms or more."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# A healthy round trip here is 1-5 ms. A delayed ACK holds back every one once the first few
# (TCP's quick-ACK start) are past, while load delays some at random: so the bound is on the
# fastest quarter, which load leaves quick and a delayed ACK does not.
QUARTILE_BOUND_MS = 20.0
ROUND_TRIPS = 60


def lower_quartile_ms(round_trip: Callable[[], None]) -> float:
    times = []
    for _ in range(ROUND_TRIPS):
        start = time.perf_counter()
        round_trip()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.quantiles(times, n=4)[0]


@contextmanager
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
                time.sleep(0.002)  # so a forwarder reads the two apart, as over a network
                connection.sendall(b"body")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()
    finally:
        stop.set()
        server.close()


def split_reply_ms(port: int) -> float:
    """The lower quartile of round trips to the split-reply server forwarded from `port`."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def round_trip() -> None:
            client.sendall(b"?")
            received = b""
            while len(received) < 8:
                received += client.recv(8 - len(received))
            assert received == b"headbody"

        return lower_quartile_ms(round_trip)
