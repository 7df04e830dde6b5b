"""Platform client helpers for the Builder: making a client, parallel calls, deadlines, error
classification, and waiting for a Ray cluster's client port and for a connected cluster's nodes."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from datetime import timedelta
from typing import TypeVar

import requests
from pydantic import SecretStr
from yellowdog_client import PlatformClient
from yellowdog_client.model import ApiKey, RetryProperties, ServicesSchema
from yellowdog_client.model.exceptions import InternalServerException, NotAuthorisedException

DEFAULT_API_URL = "https://api.yellowdog.ai"
MAX_PARALLEL_CALLS = 32
FIRST_POLL_S = 0.02

T = TypeVar("T")


def create_client(
    key_id: str,
    key_secret: str | SecretStr,
    url: str = DEFAULT_API_URL,
    *,
    max_attempts: int = RetryProperties.DEFAULT_MAX_ATTEMPTS,
    initial_retry_interval: timedelta = RetryProperties.DEFAULT_INITIAL_RETRY_INTERVAL,
) -> PlatformClient:
    """A PlatformClient for an application key; the secret may be a plain str or a SecretStr."""
    secret = key_secret.get_secret_value() if isinstance(key_secret, SecretStr) else key_secret
    retry = RetryProperties(maxAttempts=max_attempts, initialInterval=initial_retry_interval)
    return PlatformClient.create(
        ServicesSchema(defaultUrl=url, retry=retry), ApiKey(key_id, secret)
    )


def client_or_credentials(
    owner: str, client: PlatformClient | None, key_id: str | None,
    key_secret: str | SecretStr | None, url: str,
) -> PlatformClient:
    """The client given, or one made from an application key."""
    if client is not None:
        return client
    if not key_id or not key_secret:
        raise ValueError(f"{owner} needs a PlatformClient or both key_id and key_secret")
    return create_client(key_id, key_secret, url)


class Deadline:
    def __init__(self, timeout: timedelta) -> None:
        self.timeout = timeout
        self._end = time.monotonic() + timeout.total_seconds()

    def remaining(self) -> float:
        return self._end - time.monotonic()


def parallel(calls: Sequence[Callable[[], T]]) -> list[T]:
    """Run calls concurrently; raise the first error after every started call has finished, so
    that whatever a call created is recorded before anyone tears it down."""
    if len(calls) == 1:
        return [calls[0]()]
    executor = ThreadPoolExecutor(max_workers=min(MAX_PARALLEL_CALLS, max(len(calls), 1)))
    futures = [executor.submit(call) for call in calls]
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in done:
            if future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        return [future.result() for future in futures]
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def is_not_found(error: BaseException) -> bool:
    response = getattr(error, "response", None)
    return isinstance(error, requests.HTTPError) and getattr(response, "status_code", 0) == 404


def is_transient(error: BaseException) -> bool:
    if isinstance(error, (requests.ConnectionError, requests.Timeout, InternalServerException)):
        return True
    status = getattr(getattr(error, "response", None), "status_code", 0) or 0
    return isinstance(error, requests.HTTPError) and (status >= 500 or status == 429)


def is_key_refused(error: BaseException | None) -> bool:
    """Whether YellowDog refused the key somewhere in this error's chain of causes."""
    while error is not None:
        if isinstance(error, NotAuthorisedException):
            return True
        error = error.__cause__ or error.__context__
    return False


def wait_for_ray_nodes(count: int, timeout: float = 120.0) -> int:
    """Wait until the Ray cluster this process is connected to (`ray.init` first) has `count`
    alive nodes, the head included; return how many it has."""
    import ray

    deadline = time.monotonic() + timeout
    interval = FIRST_POLL_S
    while True:
        alive = sum(1 for node in ray.nodes() if node["Alive"])
        if alive >= count:
            return alive
        if time.monotonic() > deadline:
            raise TimeoutError(f"Only {alive} of {count} Ray nodes joined within {timeout} s")
        time.sleep(interval)
        interval = min(interval * 1.5, 1.0)


def wait_until_listening(
    host: str, port: int, timeout: float, stop: Callable[[], bool] = lambda: False
) -> bool:
    """Wait until `host:port` accepts a TCP connection (or `timeout` seconds pass, or `stop()`);
    return whether it does. `ray.init` against a Ray Client port that is not open yet backs off
    (gRPC's reconnect delays of 1, 1.6, 2.6 s and more, then Ray Client's sleeps of 5 s and
    more), so it would notice a starting head seconds after it listens, and could not be
    stopped meanwhile."""
    return wait_until(lambda: _accepts(host, port), timeout, stop)


def wait_until(condition: Callable[[], bool], timeout: float,
               stop: Callable[[], bool] = lambda: False) -> bool:
    """Wait until `condition()` (or `timeout` seconds pass, or `stop()`); return whether it
    holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or stop():
            return False
        time.sleep(0.05)
    return True


def _accepts(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return False
    return True
