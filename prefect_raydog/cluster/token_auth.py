"""Ray's token authentication for a cluster reached over SSH: a fresh token per cluster, made on
the driver's side and written into each node's token file over SSH (the head directly, the
workers through the head), so that it never lands in a task's environment, userdata or log."""

from __future__ import annotations

import io
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko
from pydantic import SecretStr

from prefect_raydog.errors import ClusterBuildError, HostKeyRefused
from prefect_raydog.host_keys import HostKeys
from prefect_raydog.tunnels import KEEPALIVE_S, ssh_socket

logger = logging.getLogger("prefect_raydog.cluster")

RAY_TOKEN_FILE = ".raydog/ray-token"
"""Where the node scripts find the token: relative to the agent's home (`RAYDOG_TOKEN_FILE`)."""
_SSH_TIMEOUT_S = 30.0
_FOLLOW_INTERVAL_S = 1.0


def write_token_command(token_file: str) -> str:
    """A shell command that writes its stdin to `~/token_file`: umask 077, renamed into place,
    so that a node script never reads half a token."""
    return (f"umask 077 && mkdir -p \"$(dirname ~/{token_file})\" && "
            f"cat > ~/{token_file}.part && mv ~/{token_file}.part ~/{token_file}")


_AUTHORIZE_KEY = """# RayDog: the SSH key made for this cluster, for its tunnel and token delivery
install -d -m 700 -o {user} ~{user}/.ssh
cat >> ~{user}/.ssh/authorized_keys <<'END_OF_RAYDOG_KEY'
{key}
END_OF_RAYDOG_KEY
chown {user}: ~{user}/.ssh/authorized_keys && chmod 600 ~{user}/.ssh/authorized_keys
"""


@dataclass(frozen=True)
class SSHLogin:
    """How to log in to a cluster's nodes over SSH: the head on its public address (else its
    private one), the workers through the head; each node's host key checked by `host_keys`.
    `generated()` makes a key for one cluster, which the Builder authorizes in each node's
    userdata."""

    username: str
    private_key: SecretStr
    """The private key's text (OpenSSH or PEM; Ed25519, ECDSA or RSA, no passphrase)."""
    port: int = 22
    host_keys: HostKeys = field(default_factory=HostKeys.user_known_hosts)
    """The host keys the nodes may present; by default, as OpenSSH, ~/.ssh/known_hosts."""
    authorize_in_userdata: bool = False
    """True: the Builder puts the public key into each node's userdata (`authorizing`)."""

    @classmethod
    def generated(cls, username: str, host_keys: HostKeys) -> SSHLogin:
        """A login with a new Ed25519 key, authorized for `username` by the nodes' userdata."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        text = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption()).decode()
        return cls(username, SecretStr(text), host_keys=host_keys, authorize_in_userdata=True)

    def authorizing(self, userdata: str | None) -> str | None:
        """`userdata` that also authorizes this login's key (first, after its `#!` line), when
        the key is the cluster's own; raises `ValueError` for userdata that is not a shell
        script (see `check_userdata`)."""
        if not self.authorize_in_userdata:
            return userdata
        check_userdata(userdata)
        key = self.key()
        snippet = _AUTHORIZE_KEY.format(user=self.username,
                                        key=f"{key.get_name()} {key.get_base64()} raydog")
        if userdata is None:
            return f"#!/bin/bash\n{snippet}"
        shebang, _, rest = userdata.partition("\n")
        return f"{shebang}\n{snippet}{rest}"

    def key(self) -> paramiko.PKey:
        text = self.private_key.get_secret_value()
        for kind in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
            try:
                return kind.from_private_key(io.StringIO(text))
            except (paramiko.SSHException, ValueError):
                continue
        raise ValueError(
            "ssh_private_key: not a private key paramiko can read (OpenSSH or PEM text of an "
            "Ed25519, ECDSA or RSA key without a passphrase)"
        )


def check_userdata(userdata: str | None, where: str = "userdata") -> None:
    """Raise `ValueError` naming `where` unless a shell snippet can go into `userdata` (none,
    or a script with a `#!` line), as a key made for the cluster needs."""
    if userdata is not None and not userdata.startswith("#!"):
        raise ValueError(
            f"{where}: not a shell script (no #! line), so the SSH key made for the cluster "
            "cannot be authorized in it: give ssh_private_key (a key the image or userdata "
            "authorizes), or start the userdata with #!/bin/bash")


def check_groups_take_a_key(cluster: Any) -> None:
    """`check_userdata` for each node group of `cluster` (a `ClusterSpec`, or a block with the
    same `head`, `worker_pools` and `observability`)."""
    groups = [("head", cluster.head), ("observability", cluster.observability),
              *((f"worker_pools[{i}]", pool) for i, pool in enumerate(cluster.worker_pools))]
    for where, group in groups:
        if group is not None:
            check_userdata(group.userdata, f"{where}.userdata")


class TokenAuth:
    """A cluster's Ray token and its delivery: `environment` goes into every node task (the
    token file's path), `deliver_to_head` writes the file on the head, `follow` writes it on
    each worker node as it comes up, `close` ends the SSH connection.

    Ray Client presents the token with `ray_client_kwargs()`, on that connection alone; or,
    for a cluster that outlives this process, from the file `save()` writes. A `token` given
    (the autoscaler's monitor on a head, reading the head's own) is delivered instead of a
    fresh one, to `token_file` (relative to the agent's home) on each node.
    """

    def __init__(self, login: SSHLogin, token: SecretStr | None = None,
                 token_file: str = RAY_TOKEN_FILE) -> None:
        self.login = login
        self.token_file = token_file
        self._key = login.key()
        self._token = token or SecretStr(secrets.token_hex(32))
        self._head: paramiko.SSHClient | None = None
        self._delivered: set[str] = set()
        self._delivery = threading.Condition()
        self._last_failure = ""
        self._closing = threading.Event()
        self._follower: threading.Thread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"TokenAuth(username={self.login.username!r}, delivered={len(self._delivered)})"

    @property
    def environment(self) -> dict[str, str]:
        """What each node task needs in its environment: the token file's path, not the token."""
        return {"RAYDOG_TOKEN_FILE": self.token_file}

    def ray_client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `ray.init("ray://...")`: Ray Client sends the token as gRPC
        metadata on this connection only (`RAY_AUTH_TOKEN` would be the whole process's)."""
        return {"_metadata": [("authorization", f"Bearer {self._token.get_secret_value()}")]}

    def save(self, path: Path) -> None:
        """Write the token to `path`, readable by this user alone (0600, renamed into place),
        for Ray's `RAY_AUTH_TOKEN_PATH`."""
        part = path.with_name(f"{path.name}.part")
        part.unlink(missing_ok=True)
        with os.fdopen(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            file.write(self._token.get_secret_value())
        part.replace(path)

    def wait_for_workers(self, count: int, timeout_s: float) -> str | None:
        """Wait until `follow` has written the token on `count` worker nodes; None once it has,
        else (after `timeout_s`) what is missing and the last failure."""
        with self._delivery:
            if self._delivery.wait_for(lambda: len(self._delivered) >= count, timeout_s):
                return None
            missing = f"{count - len(self._delivered)} of {count} worker nodes lack it"
            return f"{missing}: {self._last_failure}" if self._last_failure else missing

    def deliver_to_head(self, address: str) -> None:
        """Log in to the head at `address` and write its token file; the connection stays open
        for the workers. Raises `ClusterBuildError` when the head cannot be reached."""
        try:
            self._head = self._connect(address)
            self._write(self._head, address)
        except (OSError, paramiko.SSHException, HostKeyRefused) as error:
            raise ClusterBuildError(
                f"Writing the Ray token to the head node {address} over SSH as "
                f"{self.login.username!r} failed: {type(error).__name__}: {error}"
            ) from error

    def deliver_to_worker(self, private_ip: str) -> None:
        """Write the token file on a worker node, logging in through the head once
        `deliver_to_head` has connected to it, else directly (from the head itself)."""
        channel = None
        if self._head is not None:
            if (transport := self._head.get_transport()) is None:
                raise ConnectionError("the SSH connection to the head node has ended")
            channel = transport.open_channel("direct-tcpip", (private_ip, self.login.port),
                                             ("127.0.0.1", 0), timeout=_SSH_TIMEOUT_S)
        client = self._connect(private_ip, sock=channel)
        try:
            self._write(client, private_ip)
        finally:
            client.close()

    def follow(self, worker_nodes: Callable[[], dict[str, str]]) -> None:
        """Deliver to each worker node that `worker_nodes()` ({node id: private IP}) lists,
        once, in the background until `close()`; a node that fails is tried again."""
        self._follower = threading.Thread(target=self._follow, args=(worker_nodes,),
                                          daemon=True, name="raydog-token")
        self._follower.start()

    def _follow(self, worker_nodes: Callable[[], dict[str, str]]) -> None:
        warned: set[str] = set()
        while not self._closing.is_set():
            try:
                nodes = worker_nodes()
            except Exception as error:
                logger.debug("Listing the worker nodes for their Ray token failed: %s", error)
                nodes = {}
            for node_id, address in nodes.items():
                if node_id in self._delivered or self._closing.is_set():
                    continue
                try:
                    self.deliver_to_worker(address)
                    with self._delivery:
                        self._delivered.add(node_id)
                        self._delivery.notify_all()
                except (OSError, paramiko.SSHException, HostKeyRefused) as error:
                    self._last_failure = f"{address}: {type(error).__name__}: {error}"
                    if node_id not in warned:
                        warned.add(node_id)
                        logger.warning("Writing the Ray token to worker node %s (%s) failed, "
                                       "trying again: %s: %s", node_id, address,
                                       type(error).__name__, error)
            self._closing.wait(_FOLLOW_INTERVAL_S)

    def close(self) -> None:
        """Stop following the workers and end the SSH connection to the head."""
        self._closing.set()
        if self._follower is not None and self._follower is not threading.current_thread():
            self._follower.join()
        with self._lock:
            if self._head is not None:
                self._head.close()
                self._head = None

    @property
    def head_transport(self) -> paramiko.Transport | None:
        """The open SSH connection to the head (`deliver_to_head`), for tunnels over it."""
        with self._lock:
            return self._head.get_transport() if self._head is not None else None

    def _connect(self, address: str, sock: Any = None) -> paramiko.SSHClient:
        """A login to `address`: through `sock` (a channel through the head), else on a
        connection of its own that sends forwarded replies at once (`ssh_socket`)."""
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(self.login.host_keys)
        try:
            client.connect(address, self.login.port, self.login.username, pkey=self._key,
                           sock=sock or ssh_socket(address, self.login.port, _SSH_TIMEOUT_S),
                           timeout=_SSH_TIMEOUT_S, banner_timeout=_SSH_TIMEOUT_S,
                           auth_timeout=_SSH_TIMEOUT_S, allow_agent=False, look_for_keys=False)
            if (transport := client.get_transport()) is not None:
                transport.set_keepalive(KEEPALIVE_S)
        except BaseException:
            client.close()
            raise
        return client

    def _write(self, client: paramiko.SSHClient, address: str) -> None:
        """The token into the node's file from stdin (umask 077, renamed into place)."""
        stdin, stdout, stderr = client.exec_command(write_token_command(self.token_file),
                                                    timeout=_SSH_TIMEOUT_S)
        stdin.write(self._token.get_secret_value())
        stdin.channel.shutdown_write()
        status = stdout.channel.recv_exit_status()
        if status != 0:
            error = stderr.read().decode(errors="replace").strip()[-500:]
            raise OSError(f"writing ~/{self.token_file} on {address} exited {status}: {error}")
