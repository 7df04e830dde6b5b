"""The Prefect API URL the nodes get: on connect, the runner's probe of each node tries it and a
URL they cannot reach fails the flow run before any task, with one error naming it; an API that
is not plain http on this machine's loopback (here an https one) reaches them unchanged, with
no relay opened even when a relay address is set, and an https one on loopback is refused
before anything is provisioned."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import re
import socket
import ssl
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import ray
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import free_port, no_task_ran
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.runtime import flow_run
from prefect.settings import (
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
    PREFECT_API_URL,
    temporary_settings,
)

from prefect_raydog.blocks import RayDogClusterConfig
from prefect_raydog.runner.versions import NodeAPIUnreachableError
from prefect_raydog.task_runners import RayDogTaskRunner

pytestmark = pytest.mark.ray


@task
def api_url_on_node() -> str:
    from prefect.settings import get_current_settings

    return str(get_current_settings().api.url)


def one_worker(platform) -> RayDogClusterConfig:
    return RayDogClusterConfig.local(platform.url, platform.key_id, platform.key_secret,
                                     worker_nodes=1)


def test_a_node_api_url_that_nothing_serves_fails_on_connect_before_any_task(
    prefect_api, platform
) -> None:
    url = f"http://{platform.host_address}:{free_port(platform.host_address)}/api"
    name = f"unreached-{uuid.uuid4().hex[:8]}"

    @flow(name=name, task_runner=RayDogTaskRunner(cluster=one_worker(platform), node_api_url=url))
    def unreached() -> str:
        return api_url_on_node.submit().result()

    with pytest.raises(NodeAPIUnreachableError) as raised:
        unreached()
    # The worker may have joined by then, and is named too if so (after the head).
    assert re.fullmatch(
        rf"The cluster's nodes cannot reach the Prefect API at {re.escape(url)}, the URL the "
        r"runner gives them \(the head [\d.]+( and worker pool workers [\d.]+)?: \[Errno 111\] "
        r"Connection refused\), so no task was sent to them\. Give the nodes a Prefect API URL "
        r"that they reach with RayDogTaskRunner\(node_api_url=\.\.\.\), or, for a Prefect API "
        r"served on this machine's loopback, set api_relay_address \(on the runner or the "
        r"cluster block\) to an address of this machine that the nodes reach \(see \"The "
        r"cluster's nodes cannot reach the Prefect API\" in docs/troubleshooting\.md\)\.",
        str(raised.value),
    ), str(raised.value)
    assert no_task_ran(name)
    assert not ray.is_initialized()


def test_an_https_api_reaches_the_nodes_unchanged_and_no_relay_is_opened(
    prefect_api, platform
) -> None:
    """A relay would rewrite an https URL's host, which TLS host name checks refuse: the nodes
    get the URL as it is, here served by a TLS front on the platform's bridge address."""
    host = platform.host_address
    api = urlsplit(prefect_api)
    runner = RayDogTaskRunner(cluster=one_worker(platform), api_relay_address=host)

    @flow(task_runner=runner)
    def over_https() -> tuple[str, set[int], object]:
        return api_url_on_node.submit().result(), listening_ports(host), flow_run.id

    with https_front(host, (api.hostname, api.port)) as port:
        url = f"https://{host}:{port}{api.path}"
        with temporary_settings(updates={PREFECT_API_URL: url,
                                         PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
            before = listening_ports(host)
            try:
                node_url, during, flow_run_id = over_https()
                with get_client(sync_client=True) as client:
                    task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                        id=FlowRunFilterId(any_=[flow_run_id])))
            finally:
                # Send what is queued for the https URL while its front is still up.
                EventsWorker.drain_all()
                APILogWorker.drain_all()
    assert node_url == url
    assert during == before, f"listening on {host} during the flow run: {during - before}"
    states = [run.state.type.value for run in task_runs]
    assert states == ["COMPLETED"]


def test_an_https_api_on_loopback_is_refused_before_anything_is_provisioned(
    prefect_api, platform
) -> None:
    """A relay cannot carry an https API (its TLS host name would not match the relay's
    address), and the nodes cannot reach this machine's loopback."""
    api = urlsplit(prefect_api)
    runner = RayDogTaskRunner(cluster=one_worker(platform), api_relay_address=platform.host_address)

    @flow(task_runner=runner)
    def over_loopback_https() -> str:
        return api_url_on_node.submit().result()

    with https_front("127.0.0.1", (api.hostname, api.port)) as port:
        url = f"https://127.0.0.1:{port}{api.path}"
        with temporary_settings(updates={PREFECT_API_URL: url,
                                         PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
            try:
                with pytest.raises(RuntimeError) as raised:
                    over_loopback_https()
            finally:
                EventsWorker.drain_all()
                APILogWorker.drain_all()
    assert str(raised.value) == (
        f"The Prefect API URL {url} is on loopback, which the cluster's nodes cannot reach. An "
        "https API is not relayed (the relay's address would fail the nodes' TLS host name "
        "checks): serve it on an address the nodes reach, or pass "
        "RayDogTaskRunner(node_api_url=...)."
    )
    assert platform.api_calls().get("POST /work/requirements", 0) == 0


def listening_ports(host: str) -> set[int]:
    """The TCP ports on which something listens at the IPv4 address `host` (/proc/net/tcp)."""
    wanted = socket.inet_aton(host)[::-1].hex().upper()
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, port = fields[1].split(":")
        if address == wanted and fields[3] == "0A":  # TCP_LISTEN
            ports.add(int(port, 16))
    return ports


@contextmanager
def https_front(host: str, target: tuple[str, int]) -> Iterator[int]:
    """An https server on `host` (a self-signed certificate for that address) that passes each
    connection on to the plain-http `target`; yields its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as directory:
        context.load_cert_chain(*self_signed(host, Path(directory)))
    loop = asyncio.new_event_loop()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*target)
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    server = loop.run_until_complete(asyncio.start_server(serve, host, 0, ssl=context))
    thread = threading.Thread(target=loop.run_forever, name="https-front", daemon=True)
    thread.start()
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        asyncio.run_coroutine_threadsafe(stop_serving(server), loop).result()
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def stop_serving(server: asyncio.Server) -> None:
    server.close()
    current = asyncio.current_task()
    for other in asyncio.all_tasks():
        if other is not current:
            other.cancel()


def self_signed(host: str, directory: Path) -> tuple[Path, Path]:
    """A certificate for the IP address `host`, signed by its own key: (its file, the key's)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file
