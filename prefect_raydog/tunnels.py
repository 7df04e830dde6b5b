"""SSH tunnels from this machine to a RayDog head node's public IP, so that Ray Client (10001) and
the Ray dashboard (8265) can be reached where only SSH is open; and forwards the other way, from
the head's loopback to this machine, over the same connection."""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
from pathlib import Path
from typing import Any

import paramiko
from pydantic import SecretStr
from sshtunnel import BaseSSHTunnelForwarderError, SSHTunnelForwarder

from prefect_raydog.forwarding import join, no_delay
from prefect_raydog.host_keys import HostKeys, host_name

logger = logging.getLogger("prefect_raydog.tunnels")

RAY_CLIENT_PORT = 10001
DASHBOARD_PORT = 8265
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)
_SSH_TIMEOUT_S = 30.0


class _NoDelayForwarder(SSHTunnelForwarder):
    """sshtunnel's forwarder with TCP_NODELAY on both legs of each tunnel (neither library sets
    it): the local connections its servers accept, and the SSH connection, which also
    acknowledges each read at once; the head's host key checked by `host_keys` before login."""

    def __init__(self, *args: Any, host_keys: HostKeys, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.host_keys = host_keys

    def _connect_to_gateway(self) -> None:
        # sshtunnel's own login checks no host key (or one fixed key): this one checks the
        # server's key first, then tries each key and the password. A refused host key ends
        # start() with HostKeyRefused; a failed login leaves no transport, as sshtunnel's.
        self._transport = transport = self._get_transport()
        try:
            transport.start_client(timeout=_SSH_TIMEOUT_S)
            self.host_keys.check(host_name(self.ssh_host, self.ssh_port),
                                 transport.get_remote_server_key())
            for key in self.ssh_pkeys:
                with contextlib.suppress(paramiko.AuthenticationException):
                    transport.auth_publickey(self.ssh_username, key)
                    return
            if self.ssh_password:
                transport.auth_password(self.ssh_username, self.ssh_password)
                return
        except BaseException:
            self._stop_transport()
            raise
        self._stop_transport()

    def forward_from_remote(self, target: tuple[str, int]) -> int:
        """Have the SSH server listen on a free port of its loopback and send each connection
        made there to `target` on this machine (`ssh -R`); return that port."""

        def accept(channel: paramiko.Channel, *_addresses: Any) -> None:
            try:
                upstream = socket.create_connection(target, timeout=_SSH_TIMEOUT_S)
            except OSError as error:
                logger.warning("A forwarded connection to %s failed: %s", target, error)
                channel.close()
                return
            upstream.settimeout(None)
            join(channel, no_delay(upstream), "raydog-ssh-reverse")

        port = self._transport.request_port_forward("127.0.0.1", 0, handler=accept)
        return int(port)

    def _make_ssh_forward_server_class(self, remote_address: Any) -> type:
        server: type[socketserver.TCPServer] = super()._make_ssh_forward_server_class(
            remote_address
        )

        class NoDelayServer(server):  # type: ignore[misc, valid-type]
            def get_request(self) -> tuple[socket.socket, Any]:
                request, address = super().get_request()
                return no_delay(request), address

        return NoDelayServer

    def _get_transport(self) -> Any:
        # sshtunnel connects a socket given as its proxy: this one, so paramiko writes with
        # TCP_NODELAY and acknowledges at once (see _QuickAckSocket).
        family = socket.AF_INET6 if ":" in self.ssh_host else socket.AF_INET
        self.ssh_proxy = no_delay(_QuickAckSocket(family, socket.SOCK_STREAM))
        try:
            return super()._get_transport()
        finally:
            self.ssh_proxy = None


class _QuickAckSocket(socket.socket):
    """The SSH connection's socket, acknowledging each read at once: OpenSSH's sshd sends a
    forwarded reply's second part only once the first is acknowledged (it sets no TCP_NODELAY
    on a connection without a terminal), and a delayed ACK takes 40 ms."""

    def recv(self, size: int, flags: int = 0) -> bytes:
        data = super().recv(size, flags)
        if _QUICKACK is not None:  # Linux only; it lasts until the kernel's next ACK decision
            self.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return data


def _secret(value: str | SecretStr | None) -> str | None:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


class RayTunnels:
    """Forwards local ports to ports on the head node over one SSH connection.

    By default it forwards Ray Client and the dashboard, each to a free local port (or the given
    `local_ports`, in the order of `remote_ports`). The head's host key must be one that
    `host_keys` accepts (by default, as OpenSSH: a key of ~/.ssh/known_hosts for that address),
    else `start_tunnels()` raises `HostKeyRefused` before logging in. Use as a context manager,
    or call `start_tunnels()` / `stop_tunnels()` as in RayDog.
    """

    def __init__(
        self,
        head_ip: str,
        ssh_user: str,
        private_key_file: str | Path | None = None,
        private_key_password: str | SecretStr | None = None,
        password: str | SecretStr | None = None,
        *,
        ssh_port: int = 22,
        remote_ports: tuple[int, ...] = (RAY_CLIENT_PORT, DASHBOARD_PORT),
        local_ports: tuple[int, ...] | None = None,
        remote_host: str = "127.0.0.1",
        host_keys: HostKeys | None = None,
        key: paramiko.PKey | None = None,
    ) -> None:
        if private_key_file is None and password is None and key is None:
            raise ValueError("RayTunnels needs private_key_file, key or password to log in")
        if private_key_file is not None:
            private_key_file = Path(private_key_file).expanduser()
        if private_key_file is not None and not Path(private_key_file).is_file():
            raise ValueError(f"private_key_file {str(private_key_file)!r} is not a readable file")
        if local_ports is not None and len(local_ports) != len(remote_ports):
            raise ValueError("local_ports must give one local port per remote port")
        self.head_ip = head_ip
        self.remote_ports = remote_ports
        self._forwarder = _NoDelayForwarder(
            (head_ip, ssh_port),
            ssh_username=ssh_user,
            ssh_pkey=key or (str(private_key_file) if private_key_file else None),
            ssh_private_key_password=_secret(private_key_password),
            ssh_password=_secret(password),
            remote_bind_addresses=[(remote_host, port) for port in remote_ports],
            local_bind_addresses=[
                ("127.0.0.1", port) for port in (local_ports or (0,) * len(remote_ports))
            ],
            allow_agent=False,
            host_pkey_directories=[],
            set_keepalive=10.0,
            host_keys=host_keys or HostKeys.user_known_hosts(),
        )

    def __repr__(self) -> str:
        return f"RayTunnels(head_ip={self.head_ip!r}, remote_ports={self.remote_ports})"

    def start_tunnels(self) -> None:
        try:
            self._forwarder.start()
        except BaseSSHTunnelForwarderError as error:
            raise ConnectionError(
                f"Could not open SSH tunnels to {self.head_ip} "
                f"for ports {self.remote_ports}: {error}"
            ) from error
        logger.info("SSH tunnels to %s open: %s", self.head_ip, self.local_ports)

    def stop_tunnels(self) -> None:
        self._forwarder.stop()

    def __enter__(self) -> RayTunnels:
        self.start_tunnels()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop_tunnels()

    def forward_from_head(self, target: tuple[str, int]) -> int:
        """Forward a free port on the head's loopback to `target` on this machine, over the
        same SSH connection (`ssh -R 127.0.0.1:0:HOST:PORT`): connections that the head makes
        there reach `target` without any listener here. Returns the head's port."""
        return self._forwarder.forward_from_remote(target)

    @property
    def local_ports(self) -> dict[int, int]:
        """The local port forwarding to each remote port."""
        return dict(zip(self.remote_ports, self._forwarder.local_bind_ports, strict=True))

    @property
    def ray_client_address(self) -> str:
        """The address to pass to `ray.init()`."""
        return f"ray://127.0.0.1:{self.local_ports[RAY_CLIENT_PORT]}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.local_ports[DASHBOARD_PORT]}"
