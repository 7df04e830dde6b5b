"""This process's one Ray connection: connecting (retrying while a new head's client server
starts), disconnecting, and the lock every session holds for both."""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from prefect.utilities.importtools import lazy_import

from prefect_raydog.errors import NodeTaskFailed
from prefect_raydog.runner import versions

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
HEAD_RESOURCE = "node:__internal_head__"
API_UNREACHABLE = (
    "The cluster's nodes cannot reach the Prefect API at {url}, the URL the runner gives them "
    "({why}), so no task was sent to them. " + versions.HOW_TO_REACH_THE_API
)
# The Ray nodes this process's connection has checked, by node id: the Prefect API URL each
# was found to reach (None: none was tried).
_CHECKED: dict[str, str | None] = {}


def connect(address: str, init_kwargs: dict[str, Any], logger: Any,
            stop: threading.Event | None = None,
            head_ended: Callable[[], str | None] | None = None,
            listening: Callable[[], bool] | None = None) -> None:
    """Connect to Ray, retrying while a new head's client server is still starting (until
    `stop` is set: the flow run ended while its cluster was starting; or until `head_ended()`
    says how the head's task ended). Through a tunnel, `listening()` says whether the head's
    client server listens. The nodes' versions are the caller's to check
    (`check_node_versions`), once the nodes it waits for have joined."""
    kwargs = {"namespace": "prefect", "log_to_driver": False, **init_kwargs}
    if address == "local":
        kwargs.setdefault("include_dashboard", False)
    with _logs_dropped(_TUNNEL_RETRY_NOISE):
        _connect(address, kwargs, stop, _Throttled(head_ended or (lambda: None)), listening)
    alive = [node for node in ray.nodes() if node.get("Alive")]
    logger.info("Connected to the Ray cluster at %s: %d node(s).", address, len(alive))


def _connect(address: str, kwargs: dict[str, Any], stop: threading.Event | None,
             ended: _Throttled, listening: Callable[[], bool] | None) -> None:
    deadline, attempt = time.monotonic() + CLIENT_CONNECT_TIMEOUT_S, 0
    if address.startswith("ray://"):  # connect as soon as a starting head's port is open
        from prefect_raydog.cluster.client import wait_until, wait_until_listening

        def stopped() -> bool:
            return (stop is not None and stop.is_set()) or bool(ended())

        head = urlsplit(address)
        if listening is None:
            wait_until_listening(head.hostname, head.port or 10001, CLIENT_CONNECT_TIMEOUT_S,
                                 stopped)
        else:
            wait_until(listening, CLIENT_CONNECT_TIMEOUT_S, stopped)
        check_not_stopped(stop)
        _check_head_running(address, ended())
    while True:
        attempt += 1
        try:
            with CONNECTION_LOCK, _signal_handlers_kept(), _connection_noise_hidden():
                if ray.is_initialized():  # another session connected meanwhile
                    raise RuntimeError(ALREADY_CONNECTED)
                _init(address, kwargs)
            break
        except ConnectionError as exc:
            _check_head_running(address, ended())
            if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                raise ConnectionError(
                    f"Could not connect to the Ray cluster at {address} after {attempt} "
                    f"attempts in {CLIENT_CONNECT_TIMEOUT_S:g} s: {exc}"
                ) from exc
            time.sleep(min(0.2 * attempt, 2.0))


class _Throttled:
    """`check()` at most every few seconds (it asks the platform's API); its answer is kept once
    it has one."""

    def __init__(self, check: Callable[[], str | None], every_s: float = 2.0) -> None:
        self._check, self._every_s = check, every_s
        self._next, self._answer = 0.0, None

    def __call__(self) -> str | None:
        if self._answer is None and time.monotonic() >= self._next:
            self._next = time.monotonic() + self._every_s
            self._answer = self._check()
        return self._answer


def _check_head_running(address: str, ended: str | None) -> None:
    if ended is not None:
        raise NodeTaskFailed(
            f"The head node's task ended {ended} before Ray Client could connect to {address}: "
            f"its task output (YellowDog's taskoutput.txt) says why."
        )


def disconnect() -> None:
    with CONNECTION_LOCK:
        _CHECKED.clear()
        ray.shutdown()


def check_not_stopped(stop: threading.Event | None) -> None:
    """Give up a start that `stop` ended: the flow run ended while its cluster was starting."""
    if stop is not None and stop.is_set():
        raise RuntimeError("The flow run ended while the Ray cluster was starting.")


def check_node_versions(meanwhile: Callable[[], object] | None = None,
                        timeout_s: float = CLIENT_CONNECT_TIMEOUT_S,
                        api_url: str | None = None) -> None:
    """Read the versions of each live node not checked yet with a probe task (no CPU, so it
    runs on the head too), and raise one `NodeEnvironmentError` naming every version that is
    not the driver's, before any task is sent; the same probe tries `api_url` (the Prefect API
    URL the nodes are given) and raises one `NodeAPIUnreachableError` when a node gets no
    answer there. `meanwhile` runs once every probe has answered and passed: work sent sooner
    would start a second worker process on each node while the probe's still starts; sent now,
    it takes the probe's, idle by then."""
    nodes = sorted((node for node in ray.nodes()
                    if node.get("Alive") and node["NodeID"] not in _CHECKED),
                   key=lambda node: (_place(node) != "the head", _place(node)))
    found = _probe(nodes, api_url, timeout_s)
    driver = versions.own()
    mismatched = _grouped(nodes, lambda node: versions.mismatches(driver, found[node["NodeID"]],
                                                                   "\0"))
    if mismatched:
        raise versions.error(line.replace("\0", _where(places))
                             for line, places in mismatched.items())
    unreached = _grouped(nodes, lambda node: filter(None, [found[node["NodeID"]]["api"]]))
    if unreached:
        why = "; ".join(f"{_where(places)}: {reason}" for reason, places in unreached.items())
        raise versions.NodeAPIUnreachableError(API_UNREACHABLE.format(url=api_url, why=why))
    if meanwhile is not None:
        meanwhile()
    _CHECKED.update(dict.fromkeys(found, api_url))


def nodes_reaching(api_url: str | None) -> list[str]:
    """The ids of the nodes that this connection found reaching `api_url`."""
    return [node for node, url in _CHECKED.items() if url is not None and url == api_url]


def _probe(nodes: list[dict[str, Any]], api_url: str | None, timeout_s: float
           ) -> dict[str, dict]:
    """What `versions.probe` found on each of `nodes`, by node id."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.cloudpickle.register_pickle_by_value(versions)  # runs where prefect-raydog is missing
    probe = ray.remote(num_cpus=0, max_retries=0)(versions.probe)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"],
                                                                              soft=False))
            .remote(api_url, versions.API_PROBE_TIMEOUT_S)
            for node in nodes]
    deadline, found = time.monotonic() + timeout_s, {}
    for node, ref in zip(nodes, refs, strict=True):
        try:
            found[node["NodeID"]] = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
        except Exception as exc:
            raise versions.NodeEnvironmentError(
                f"Could not read the versions of {_place(node)} ({node['NodeManagerAddress']}): "
                f"{exc}"
            ) from exc
    return found


def _grouped(nodes: list[dict[str, Any]], lines_of: Callable[[dict[str, Any]], Iterable[str]]
             ) -> dict[str, dict[str, list[str]]]:
    """Each line that `lines_of(node)` gives for some of `nodes`, with the places (and their
    addresses) that gave it."""
    by_line: dict[str, dict[str, list[str]]] = {}
    for node in nodes:
        for line in lines_of(node):
            places = by_line.setdefault(line, {})
            places.setdefault(_place(node), []).append(node["NodeManagerAddress"])
    return by_line


def _where(places: dict[str, list[str]]) -> str:
    return " and ".join(f"{place} {', '.join(addresses)}" for place, addresses in places.items())


def _place(node: dict[str, Any]) -> str:
    """Which part of the cluster a Ray node is: the head, a named worker pool or a worker."""
    from prefect_raydog.runner.placement import POOL_RESOURCE_PREFIX

    resources = node.get("Resources", {})
    if HEAD_RESOURCE in resources:
        return "the head"
    pools = [name.removeprefix(POOL_RESOURCE_PREFIX) for name in resources
             if name.startswith(POOL_RESOURCE_PREFIX)]
    return f"worker pool {pools[0]}" if pools else "a worker node"


def _init(address: str, kwargs: dict[str, Any]) -> None:
    """`ray.init`, with Ray Client's refusal of a head that runs another Python minor or Ray
    version (a multi-line "Version mismatch") made one `NodeEnvironmentError`."""
    try:
        ray.init(address, **kwargs)
    except RuntimeError as exc:
        found = re.findall(r"Ray: (\S+)\s+Python: (\d+\.\d+)", str(exc))
        if not str(exc).startswith("Version mismatch") or len(found) != 2:
            raise
        (head_ray, head_python), (own_ray, own_python) = found
        where = f"the head {urlsplit(address).hostname or address}"
        lines = versions.mismatches({"python": own_python, "ray": own_ray},
                                    {"python": head_python, "ray": head_ray}, where)
        raise versions.error(lines) from None


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
    with (_logs_dropped({"ray._private.worker": ("SIGTERM handler is not set",)}),
          warnings.catch_warnings()):
        warnings.filterwarnings("ignore", message="Ray Client connection timed out")
        yield


# What paramiko logs for each attempt through an SSH tunnel before the head's Ray Client port
# opens.
_TUNNEL_RETRY_NOISE = {"paramiko.transport": ("open FAILED",)}


@contextmanager
def _logs_dropped(noise: Mapping[str, tuple[str, ...]]) -> Iterator[None]:
    """Drop the records of each named logger that contain one of its texts."""

    def dropping(texts: tuple[str, ...]) -> Callable[[logging.LogRecord], bool]:
        return lambda record: not any(text in record.getMessage() for text in texts)

    installed = [(logging.getLogger(name), dropping(texts)) for name, texts in noise.items()]
    for logger, drop in installed:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger, drop in installed:
            logger.removeFilter(drop)
