"""SSH tunnels from this machine to a RayDog head node's public IP, so that Ray Client (10001) and
the Ray dashboard (8265) can be reached where only SSH is open; and forwards the other way, from
the head's loopback to this machine, over the same connection (its own, or one it is given)."""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import paramiko
from pydantic import SecretStr

from prefect_raydog.forwarding import TcpForwarder, connect, join, no_delay
from prefect_raydog.host_keys import HostKeys, host_name

logger = logging.getLogger("prefect_raydog.tunnels")

RAY_CLIENT_PORT = 10001
DASHBOARD_PORT = 8265
SSH_TIMEOUT_S = 30.0
KEEPALIVE_S = 10
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


class _QuickAckSocket(socket.socket):
    """The SSH connection's socket, acknowledging each read at once: OpenSSH's sshd sends a
    forwarded reply's second part only once the first is acknowledged (it sets no TCP_NODELAY
    on a connection without a terminal), and a delayed ACK takes 40 ms."""

    def recv(self, size: int, flags: int = 0) -> bytes:
        data = super().recv(size, flags)
        if _QUICKACK is not None:  # Linux only; it lasts until the kernel's next ACK decision
            self.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        return data


def ssh_socket(host: str, port: int, timeout: float = SSH_TIMEOUT_S) -> socket.socket:
    """A socket connected to an SSH server, for paramiko: writes with TCP_NODELAY and
    acknowledges each read at once, so forwarded replies are not held back."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = no_delay(_QuickAckSocket(family, socket.SOCK_STREAM))
    sock.settimeout(timeout)
    try:
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    return sock


def _secret(value: str | SecretStr | None) -> str | None:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


class RayTunnels:
    """Forwards local ports to ports on the head node over one SSH connection.

    By default it forwards Ray Client and the dashboard, each to a free local port (or the given
    `local_ports`, in the order of `remote_ports`). The head's host key must be one that
    `host_keys` accepts (by default, as OpenSSH: a key of ~/.ssh/known_hosts for that address),
    else `start_tunnels()` raises `HostKeyRefused` before logging in. Use as a context manager,
    or call `start_tunnels()` / `stop_tunnels()` as in RayDog. `RayTunnels.over(transport, ...)`
    uses an SSH connection that is already open (and leaves it open).
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
            if not private_key_file.is_file():
                raise ValueError(
                    f"private_key_file {str(private_key_file)!r} is not a readable file")
        if local_ports is not None and len(local_ports) != len(remote_ports):
            raise ValueError("local_ports must give one local port per remote port")
        self._login = (ssh_user, ssh_port, private_key_file, _secret(private_key_password),
                       _secret(password), key, host_keys)
        self._set_up(head_ip, remote_ports, local_ports or (0,) * len(remote_ports),
                     remote_host, None)

    @classmethod
    def over(cls, transport: paramiko.Transport, head_ip: str,
             remote_ports: tuple[int, ...] = (RAY_CLIENT_PORT, DASHBOARD_PORT)) -> RayTunnels:
        """Tunnels over `transport`, an open SSH connection to the head at `head_ip` (such as
        the one that delivered the cluster's token); `stop_tunnels()` leaves it open."""
        tunnels = cls.__new__(cls)
        tunnels._set_up(head_ip, remote_ports, (0,) * len(remote_ports), "127.0.0.1", transport)
        return tunnels

    def _set_up(self, head_ip: str, remote_ports: tuple[int, ...],
                local_ports: tuple[int, ...], remote_host: str,
                transport: paramiko.Transport | None) -> None:
        self.head_ip = head_ip
        self.remote_ports = remote_ports
        self._local_ports = local_ports
        self._remote_host = remote_host
        self._transport = transport
        self._owns_transport = transport is None
        self._forwarders: list[TcpForwarder] = []
        self._reverse_ports: list[int] = []

    def __repr__(self) -> str:
        return f"RayTunnels(head_ip={self.head_ip!r}, remote_ports={self.remote_ports})"

    def start_tunnels(self) -> None:
        if self._transport is None:
            self._transport = self._log_in()
        transport = self._transport
        try:
            for remote_port, local_port in zip(self.remote_ports, self._local_ports,
                                               strict=True):
                self._forwarders.append(TcpForwarder(
                    "127.0.0.1", lambda port=remote_port: self._channel_to(transport, port),
                    f"raydog-tunnel-{remote_port}", port=local_port))
        except OSError as error:
            self.stop_tunnels()
            raise self._error(error) from error
        logger.info("SSH tunnels to %s open: %s", self.head_ip, self.local_ports)

    def stop_tunnels(self) -> None:
        for forwarder in self._forwarders:
            forwarder.close()
        self._forwarders.clear()
        transport, self._transport = self._transport, None
        if transport is not None and self._owns_transport:
            transport.close()
        elif transport is not None:
            for port in self._reverse_ports:
                try:
                    transport.cancel_port_forward("127.0.0.1", port)
                except (paramiko.SSHException, OSError) as error:
                    logger.debug("Ending the forward from the head's port %d: %s", port, error)
        self._reverse_ports.clear()

    def __enter__(self) -> RayTunnels:
        self.start_tunnels()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop_tunnels()

    @property
    def is_open(self) -> bool:
        """Whether the SSH connection is up."""
        return self._transport is not None and self._transport.is_active()

    def forward_from_head(self, target: tuple[str, int]) -> int:
        """Forward a free port on the head's loopback to `target` on this machine, over the
        same SSH connection (`ssh -R 127.0.0.1:0:HOST:PORT`): connections that the head makes
        there reach `target` without any listener here. Returns the head's port."""
        if self._transport is None:
            raise RuntimeError("RayTunnels: start_tunnels() first")

        def accept(channel: paramiko.Channel, *_addresses: Any) -> None:
            try:
                upstream = connect(target, SSH_TIMEOUT_S)
            except OSError as error:
                logger.warning("A forwarded connection to %s failed: %s", target, error)
                channel.close()
                return
            join(channel, upstream, "raydog-ssh-reverse")

        port = int(self._transport.request_port_forward("127.0.0.1", 0, handler=accept))
        self._reverse_ports.append(port)
        return port

    def head_listening(self, port: int = RAY_CLIENT_PORT) -> bool:
        """Whether the head accepts connections at `port` (a channel to it opens): this end of
        the tunnel accepts them from the start."""
        if self._transport is None or not self._transport.is_active():
            return False
        try:
            self._channel_to(self._transport, port).close()
        except (paramiko.SSHException, EOFError, OSError):
            return False
        return True

    @property
    def local_ports(self) -> dict[int, int]:
        """The local port forwarding to each remote port."""
        return {remote: forwarder.port
                for remote, forwarder in zip(self.remote_ports, self._forwarders, strict=True)}

    @property
    def ray_client_address(self) -> str:
        """The address to pass to `ray.init()`."""
        return f"ray://127.0.0.1:{self.local_ports[RAY_CLIENT_PORT]}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.local_ports[DASHBOARD_PORT]}"

    def _channel_to(self, transport: paramiko.Transport, port: int) -> paramiko.Channel:
        return transport.open_channel("direct-tcpip", (self._remote_host, port),
                                      ("127.0.0.1", 0), timeout=SSH_TIMEOUT_S)

    def _log_in(self) -> paramiko.Transport:
        """The SSH connection: the head's host key checked first (a refusal raises
        `HostKeyRefused` before any credential is sent), then each key and the password."""
        user, port, key_file, key_password, password, key, host_keys = self._login
        try:
            keys = [key] if key is not None else []
            if key_file is not None:
                keys.append(paramiko.PKey.from_path(key_file, key_password))
            transport = paramiko.Transport(ssh_socket(self.head_ip, port))
        except (OSError, paramiko.SSHException) as error:
            raise self._error(error) from error
        try:
            transport.start_client(timeout=SSH_TIMEOUT_S)
            (host_keys or HostKeys.user_known_hosts()).check(
                host_name(self.head_ip, port), transport.get_remote_server_key())
            self._authenticate(transport, user, keys, password)
        except BaseException as error:
            transport.close()
            if isinstance(error, (OSError, paramiko.SSHException)):
                raise self._error(error) from error
            raise
        transport.set_keepalive(KEEPALIVE_S)
        return transport

    @staticmethod
    def _authenticate(transport: paramiko.Transport, user: str, keys: list[paramiko.PKey],
                      password: str | None) -> None:
        for key in keys:
            try:
                transport.auth_publickey(user, key)
                return
            except paramiko.AuthenticationException:
                continue
        if password:
            transport.auth_password(user, password)
            return
        raise paramiko.AuthenticationException(f"no key or password was accepted for {user!r}")

    def _error(self, error: BaseException) -> ConnectionError:
        return ConnectionError(
            f"Could not open SSH tunnels to {self.head_ip} for ports {self.remote_ports}: "
            f"{type(error).__name__}: {error}")
