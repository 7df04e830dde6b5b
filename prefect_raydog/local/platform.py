"""`LocalPlatform`: a YellowDog Platform on loopback for trying things and for tests. It serves
the REST API that the unmodified `yellowdog-sdk` expects and runs process nodes' tasks locally."""

from __future__ import annotations

import asyncio
import errno
import functools
import secrets
import socket
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import uvicorn
from yellowdog_client import PlatformClient
from yellowdog_client.model import ApiKey, RetryProperties, ServicesSchema

from prefect_raydog.local.api import ApiCalls, create_app
from prefect_raydog.local.faults import FaultPlan
from prefect_raydog.local.images import CACHE, DISTRIBUTION, ensure_layer
from prefect_raydog.local.nodes import NodeRunner
from prefect_raydog.local.package_mirror import PREFIX, PackageMirror
from prefect_raydog.local.state import PlatformState
from prefect_raydog.local.templates import TemplateCatalogue

STARTUP_TIMEOUT_S = 30.0
BIND_ATTEMPTS = 5


def package_mirror() -> PackageMirror:
    """The package index of the nodes' network: the driver's index, mirrored, with
    prefect-raydog served from a wheel of the driver's own copy (the images' top layer)."""
    own_wheel = functools.cache(lambda: ensure_layer().parent)
    return PackageMirror(CACHE / "mirror", local=lambda: {DISTRIBUTION: own_wheel()})


class LocalPlatform:
    """A local YellowDog Platform: `with LocalPlatform() as platform:` gives `platform.url`,
    `platform.key_id`, `platform.key_secret` and a ready `platform.client`; leaving the block
    stops every node and the server."""

    def __init__(
        self,
        templates: Path | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        network: str = "auto",
        data_dir: Path | None = None,
        key_id: str | None = None,
        key_secret: str | None = None,
        base_path: str = "",
        bridge_index: int | None = None,
        firewall: bool | None = False,
        public_host_ports: tuple[int, ...] = (),
    ) -> None:
        self.host, self.port, self.network = host, port, network
        self.firewall, self.public_host_ports = firewall, public_host_ports
        self.bridge_index = bridge_index
        self.templates = TemplateCatalogue(templates)
        self.data_dir = data_dir
        self.key_id = key_id or f"local-{secrets.token_hex(4)}"
        self.key_secret = key_secret or secrets.token_urlsafe(24)
        self.base_path = base_path.rstrip("/")
        self.faults = FaultPlan()
        self._api_calls = ApiCalls()
        self.state: PlatformState | None = None
        self.runner: NodeRunner | None = None
        self.url = ""
        self._client: PlatformClient | None = None
        self._server: uvicorn.Server | None = None
        self._sockets: list[socket.socket] = []
        self._thread: threading.Thread | None = None
        self._temporary_dir: tempfile.TemporaryDirectory[str] | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> LocalPlatform:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> LocalPlatform:
        if self._server is not None:
            raise RuntimeError("LocalPlatform is already started")
        reason = self._create_runner()
        if self.firewall is None:
            self.firewall = self.sealed_nodes
        self.state = PlatformState(self.templates, self.runner, reason)
        self.state.start()
        try:
            self._start_server()
            if self.firewall:
                self._close_host(reason)
        except BaseException:
            self.stop()
            raise
        return self

    def _close_host(self, no_runner_because: str) -> None:
        """Nodes reach this machine only at the API and `public_host_ports`, as cloud machines
        reach YellowDog and the internet; this machine reaches nodes only at SSH."""
        from prefect_raydog.local.network import IsolationUnavailable
        from prefect_raydog.local.ssh import SSH_PORT

        if self.runner is None:
            raise IsolationUnavailable(f"firewall=True needs process nodes: {no_runner_because}")
        self.runner.close_host((self.port, *self.public_host_ports), (SSH_PORT,))

    def _create_runner(self) -> str:
        """Create the process node runner; return why process nodes are unavailable if not."""
        try:
            from prefect_raydog.local.agent import ProcessAgent
        except ImportError as error:
            return f"the process agent cannot be imported ({error})"
        if self.data_dir is None:
            self._temporary_dir = tempfile.TemporaryDirectory(prefix="yd-local-")
            self.data_dir = Path(self._temporary_dir.name)
        try:
            self.runner = ProcessAgent.create(self.data_dir, self.network,
                                              bridge_index=self.bridge_index)
            self.bridge_index = getattr(self.runner.network, "index", None)
        except Exception as error:  # simulated nodes must work whatever stops process nodes
            return f"{type(error).__name__}: {error}"
        return ""

    def _start_server(self) -> None:
        assert self.state is not None
        app = create_app(
            self.state, self.faults, self._api_calls, self.key_id, self.key_secret, self.base_path,
            (package_mirror().router(),),
        )
        config = uvicorn.Config(
            app,
            host=self.host,
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=30,
        )
        self._server = uvicorn.Server(config)
        self._sockets = self._bind()
        self.faults.drop_connection = self._drop_connection
        self._thread = threading.Thread(target=self._serve, name="yd-local-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while (
            not self._server.started and self._thread.is_alive() and (time.monotonic() < deadline)
        ):
            time.sleep(0.01)
        if not self._server.started:
            raise RuntimeError(f"The local platform could not listen on {self.host}:{self.port}")
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{self.port}{self.base_path}"
        if self.runner is not None:
            self.runner.package_index = f"http://{self.host_address}:{self.port}{PREFIX}/simple"

    def _bind(self) -> list[socket.socket]:
        """The API's sockets: on `host`, and also on the nodes' bridge when `host` is loopback,
        so that a node (e.g. a Ray head running Ray's autoscaler) reaches the API as a cloud
        VM reaches YellowDog's."""
        addresses = [self.host]
        if self.host == "127.0.0.1" and self.host_address != self.host:
            addresses.append(self.host_address)
        # A port free on loopback may be taken on the bridge: then try another (if ours to pick).
        for _ in range(BIND_ATTEMPTS - 1):
            try:
                return self._bind_once(addresses)
            except OSError as error:
                if error.errno != errno.EADDRINUSE or self.port:
                    raise
        return self._bind_once(addresses)

    def _bind_once(self, addresses: list[str]) -> list[socket.socket]:
        sockets: list[socket.socket] = []
        try:
            for address in addresses:
                # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they
                # are TCP, and without it every reply waits for the client's delayed ACK.
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
                sockets.append(listener)
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                port = sockets[0].getsockname()[1] if len(sockets) > 1 else self.port
                listener.bind((address, port))
        except OSError:
            for listener in sockets:
                listener.close()
            raise
        return sockets

    @property
    def node_url(self) -> str:
        """The API's URL as process nodes reach it (the host's bridge address on a bridge)."""
        return self.url.replace(f"//{self.host}:", f"//{self.host_address}:", 1)

    def _serve(self) -> None:
        assert self._server is not None
        asyncio.run(self._server.serve(sockets=self._sockets))

    def stop(self) -> None:
        """Stop the scheduler, every node and the server. Safe to call twice."""
        if self.runner is not None:
            # A boot in its userdata would hold up the scheduler's stop for minutes.
            self.runner.abort_boots()
        if self.state is not None:
            self.state.stop()
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STARTUP_TIMEOUT_S)
        self._server = self._thread = self._client = None
        for listener in self._sockets:
            listener.close()
        self._sockets = []
        if self._temporary_dir is not None:
            self._temporary_dir.cleanup()
            self._temporary_dir = None

    def _drop_connection(self, client: tuple[str, int] | None) -> None:
        server = self._server
        if server is None or client is None:
            return
        for connection in list(server.server_state.connections):
            if tuple(getattr(connection, "client", None) or ()) == tuple(client):
                connection.transport.abort()

    # ---- clients ---------------------------------------------------------------------------

    @property
    def host_address(self) -> str:
        """Where node processes reach services that run on this machine."""
        return self.runner.host_address if self.runner is not None else "127.0.0.1"

    @property
    def sealed_nodes(self) -> bool:
        """Whether nodes can be sealed as cloud VMs (`local/vm`, the firewall, SSH): process
        nodes on a bridge."""
        return self.runner is not None and self.runner.network.mode == "bridge"

    @property
    def ssh_known_hosts(self) -> str | None:
        """The known_hosts line of the SSH host key every process node presents (one per data
        directory, as an image's), for any address; None without process nodes."""
        if self.runner is None or self.data_dir is None:
            return None
        from prefect_raydog.local import ssh

        key_type, key = Path(f"{ssh.host_key(self.data_dir)}.pub").read_text().split()[:2]
        return f"* {key_type} {key}\n"

    def keep_ssh_host_key(self, directory: Path) -> None:
        """Give the nodes the SSH host key kept in `directory` (made there first when missing),
        so that it stays the same across restarts; before any node boots."""
        if self.runner is not None and self.data_dir is not None:
            from prefect_raydog.local import ssh

            ssh.keep_host_key(directory, self.data_dir)

    @property
    def client(self) -> PlatformClient:
        """A `PlatformClient` with the SDK's default settings (retries included)."""
        if self._client is None:
            self._client = PlatformClient.create(
                ServicesSchema(defaultUrl=self.url), ApiKey(self.key_id, self.key_secret)
            )
        return self._client

    def make_client(
        self, max_attempts: int = 3, initial_interval: float = 10.0, max_interval: float = 60.0
    ) -> PlatformClient:
        """A new `PlatformClient` with its own retry settings (intervals in seconds)."""
        retry = RetryProperties(
            maxAttempts=max_attempts,
            initialInterval=timedelta(seconds=initial_interval),
            maxInterval=timedelta(seconds=max_interval),
        )
        schema = ServicesSchema(defaultUrl=self.url, retry=retry)
        return PlatformClient.create(schema, ApiKey(self.key_id, self.key_secret))

    # ---- the control API, from Python ------------------------------------------------------

    def _state(self) -> PlatformState:
        if self.state is None:
            raise RuntimeError("LocalPlatform is not started")
        return self.state

    def live_entities(self) -> dict[str, list[dict[str, Any]]]:
        """Every live work requirement, pool, compute requirement, node, instance and node
        process; empty lists when nothing is live."""
        return self._state().live_entities()

    def api_calls(self) -> dict[str, int]:
        """Calls per `"METHOD /route/{template}"` since the start or the last reset."""
        return self._api_calls.snapshot()

    def reset_api_calls(self) -> None:
        self._api_calls.reset()

    def task_output(self, task_id: str) -> str:
        return self._state().task_output(task_id)

    def node_boot_output(self, node_id: str) -> str:
        """What node `node_id`'s userdata printed at boot, ending with its exit status (nodes of
        a template with an image run their userdata); empty when it ran none."""
        return self.runner.boot_output(node_id) if self.runner is not None else ""

    def kill_node(self, node_id: str) -> None:
        self._state().kill_node(node_id)

    def fail_node_boot(self, count: int = 1, worker_pool_id: str | None = None) -> None:
        self._state().fail_node_boot(count, worker_pool_id)

    def end_everything(self) -> None:
        """Cancel every unfinished work requirement and shut down every worker pool."""
        self._state().end_everything()

    def clear_faults(self) -> None:
        """Forget every pending fault and boot failure."""
        self.faults.clear()
        self._state().clear_boot_failures()
