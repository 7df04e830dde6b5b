"""This process's one Ray connection: connecting (retrying while a new head's client server
starts), disconnecting, and the lock every session holds for both."""

from __future__ import annotations

import logging
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from prefect.utilities.importtools import lazy_import

ray = lazy_import("ray")

# Each `ray.init` retries for up to 30 s by itself; past this, a head's client server is gone.
CLIENT_CONNECT_TIMEOUT_S = 120.0
# One Ray connection per process: every session connects and disconnects under this lock.
CONNECTION_LOCK = threading.Lock()
ALREADY_CONNECTED = (
    "This process is already connected to a Ray cluster, so RayDogTaskRunner cannot connect to "
    "the cluster it would provision: call ray.shutdown() first, or pass "
    "RayDogTaskRunner(address=...) to use the connected cluster."
)


def connect(address: str, init_kwargs: dict[str, Any], logger: Any,
            stop: threading.Event | None = None) -> None:
    """Connect to Ray, retrying while a new head's client server is still starting (until
    `stop` is set: the flow run ended while its cluster was starting)."""
    kwargs = {"namespace": "prefect", "log_to_driver": False, **init_kwargs}
    if address == "local":
        kwargs.setdefault("include_dashboard", False)
    deadline, attempt = time.monotonic() + CLIENT_CONNECT_TIMEOUT_S, 0
    if address.startswith("ray://"):  # connect as soon as a starting head's port is open
        from prefect_raydog.cluster.client import wait_until_listening

        head = urlsplit(address)
        stopped = stop.is_set if stop is not None else (lambda: False)
        wait_until_listening(head.hostname, head.port or 10001, CLIENT_CONNECT_TIMEOUT_S, stopped)
        check_not_stopped(stop)
    while True:
        attempt += 1
        try:
            with CONNECTION_LOCK, _signal_handlers_kept(), _connection_noise_hidden():
                if ray.is_initialized():  # another session connected meanwhile
                    raise RuntimeError(ALREADY_CONNECTED)
                ray.init(address, **kwargs)
            break
        except ConnectionError as exc:
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                raise ConnectionError(
                    f"Could not connect to the Ray cluster at {address} after {attempt} "
                    f"attempts in {CLIENT_CONNECT_TIMEOUT_S:g} s: {exc}"
                ) from exc
            time.sleep(min(0.2 * attempt, 2.0))
    alive = [node for node in ray.nodes() if node.get("Alive")]
    logger.info("Connected to the Ray cluster at %s: %d node(s).", address, len(alive))


def disconnect() -> None:
    with CONNECTION_LOCK:
        ray.shutdown()


def check_not_stopped(stop: threading.Event | None) -> None:
    """Give up a start that `stop` ended: the flow run ended while its cluster was starting."""
    if stop is not None and stop.is_set():
        raise RuntimeError("The flow run ended while the Ray cluster was starting.")


@contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """Keep the flow engine's SIGTERM/SIGINT handlers across `ray.init`.

    On the main thread Ray installs its own, which call `sys.exit`: a worker's cancel signal
    would then reach the engine as SystemExit instead of its TerminationSignal, and a
    cancelled run would end Crashed rather than Cancelled."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)


@contextmanager
def _connection_noise_hidden() -> Iterator[None]:
    """Hide Ray's warnings about an attempt that `connect` retries (it raises its own error
    when attempts run out) and about signal handlers that are kept on purpose."""
    ray_worker_log = logging.getLogger("ray._private.worker")

    def not_about_handlers(record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()

    ray_worker_log.addFilter(not_about_handlers)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Ray Client connection timed out")
            yield
    finally:
        ray_worker_log.removeFilter(not_about_handlers)
