"""RayTunnels against a real OpenSSH server that the test starts on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from pathlib import Path
from typing import NamedTuple

import paramiko
import pytest
from conftest import wait_for
from helpers import free_port
from round_trips import QUARTILE_BOUND_MS, split_reply_ms, split_reply_server

from prefect_raydog import HostKeyRefused, HostKeys
from prefect_raydog.forwarding import HeadDoor
from prefect_raydog.tunnels import RayTunnels, ssh_socket

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
pytestmark = [
    pytest.mark.system_packages("openssh-server"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to log in as root"),
]


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"echo:" + self.request.recv(1024))


@pytest.fixture
def echo_ports():
    servers = [socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tuple(server.server_address[1] for server in servers)
    for server in servers:
        server.shutdown()
        server.server_close()


class Server(NamedTuple):
    port: int
    key: Path
    host_keys: HostKeys
    """Its host key, pinned."""
    log: Path


@pytest.fixture
def sshd(tmp_path: Path):
    """An sshd on 127.0.0.1 that accepts a fresh key for root, with a fresh host key."""
    key = tmp_path / "id_ed25519"
    host_key = tmp_path / "host_ed25519"
    for path in (key, host_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    (tmp_path / "authorized_keys").write_text(Path(f"{key}.pub").read_text())
    port = free_port()
    config = tmp_path / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {host_key}\n"
        f"AuthorizedKeysFile {tmp_path}/authorized_keys\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nAllowTcpForwarding yes\n"
        f"PidFile {tmp_path}/sshd.pid\nUsePAM no\nLogLevel VERBOSE\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    log = tmp_path / "sshd.log"
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                               stderr=log.open("wb"))
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait(timeout=10)
            pytest.fail(f"sshd did not start listening on port {port}: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    try:
        yield Server(port, key, HostKeys(Path(f"{host_key}.pub").read_text()), log)
    finally:
        process.terminate()
        process.wait(timeout=10)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _ask(port: int, message: bytes) -> bytes:
    """The whole answer, to its end (a tunnel may pass it on in parts)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(message)
        answer = b""
        while chunk := sock.recv(1024):
            answer += chunk
        return answer


def test_tunnels_forward_each_remote_port_through_ssh_with_a_private_key(sshd, echo_ports):
    with RayTunnels(
        "127.0.0.1", "root", private_key_file=sshd.key, ssh_port=sshd.port,
        remote_ports=echo_ports, host_keys=sshd.host_keys,
    ) as tunnels:
        local = tunnels.local_ports
        assert set(local) == set(echo_ports)
        assert all(local_port not in echo_ports for local_port in local.values())
        # Many short connections, each closed by the server first: a channel closed twice
        # once sent an EOF for a channel the server had freed, and sshd ended the connection.
        for remote_port, local_port in local.items():
            answers = [_ask(local_port, b"hi%d" % i) for i in range(100)]
            assert answers == [b"echo:hi%d" % i for i in range(100)], remote_port
        assert tunnels.is_open


def test_the_head_is_listening_only_once_its_own_port_accepts(sshd):
    """This end of a tunnel accepts from the start; `head_listening` asks the head's port, so
    the runner's connect waits for a starting head there rather than in Ray Client's backoff."""
    port = free_port("127.0.0.1")
    with RayTunnels("127.0.0.1", "root", private_key_file=sshd.key, ssh_port=sshd.port,
                    remote_ports=(port,), host_keys=sshd.host_keys) as tunnels:
        socket.create_connection(("127.0.0.1", tunnels.local_ports[port]), timeout=5).close()
        assert not tunnels.head_listening(port)
        with socket.create_server(("127.0.0.1", port)):
            assert tunnels.head_listening(port)
        assert not tunnels.head_listening(port)
    assert not tunnels.head_listening(port)


def test_a_tunnel_forwards_a_split_reply_without_waiting_for_a_delayed_ack(sshd):
    with (
        split_reply_server() as (_, remote_port),
        RayTunnels(
            "127.0.0.1", "root", private_key_file=sshd.key, ssh_port=sshd.port,
            remote_ports=(remote_port,), host_keys=sshd.host_keys,
        ) as tunnels,
    ):
        quick = split_reply_ms(tunnels.local_ports[remote_port])
    assert quick < QUARTILE_BOUND_MS, f"the fastest quarter through the tunnel took {quick:.1f} ms"


def test_a_reverse_forward_and_the_head_door_carry_a_split_reply_and_end_with_the_tunnels(sshd):
    """The nodes' way to a Prefect API on this machine: the head's door (`HeadDoor`, here on the
    SSH server's machine) to the port that the SSH server forwards back over the connection."""
    with split_reply_server() as address:
        tunnels = RayTunnels("127.0.0.1", "root", private_key_file=sshd.key, ssh_port=sshd.port,
                             remote_ports=(address[1],), host_keys=sshd.host_keys)
        with tunnels:
            head_port = tunnels.forward_from_head(address)
            door = HeadDoor("127.0.0.1", head_port)
            try:
                quick = split_reply_ms(door.port())
            finally:
                door.close()
        wait_for(lambda: not _listening(head_port), what="the SSH server to end the forward")
    assert quick < QUARTILE_BOUND_MS, f"the fastest quarter through the door took {quick:.1f} ms"


def test_tunnels_over_an_open_connection_carry_a_split_reply_and_leave_it_open(sshd):
    """As the runner's: tunnels over the SSH connection that delivered the cluster's token."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(sshd.host_keys)
    client.connect("127.0.0.1", sshd.port, "root", key_filename=str(sshd.key),
                   sock=ssh_socket("127.0.0.1", sshd.port), allow_agent=False,
                   look_for_keys=False)
    try:
        with split_reply_server() as (_, remote_port):
            transport = client.get_transport()
            with RayTunnels.over(transport, "127.0.0.1", remote_ports=(remote_port,)) as tunnels:
                quick = split_reply_ms(tunnels.local_ports[remote_port])
            assert transport.is_active(), "the given connection was closed with the tunnels"
    finally:
        client.close()
    assert quick < QUARTILE_BOUND_MS, f"the fastest quarter through the tunnel took {quick:.1f} ms"


def test_default_tunnels_are_ray_client_and_dashboard(sshd):
    tunnels = RayTunnels("127.0.0.1", "root", private_key_file=sshd.key, ssh_port=sshd.port,
                         host_keys=sshd.host_keys)
    assert tunnels.remote_ports == (10001, 8265)
    tunnels.start_tunnels()
    try:
        local = tunnels.local_ports
        assert tunnels.ray_client_address == f"ray://127.0.0.1:{local[10001]}"
        assert tunnels.dashboard_url == f"http://127.0.0.1:{local[8265]}"
        for local_port in local.values():  # each one is a listening end of the tunnel
            socket.create_connection(("127.0.0.1", local_port), timeout=5).close()
    finally:
        tunnels.stop_tunnels()


def test_a_wrong_key_fails_with_a_clear_connection_error(sshd, tmp_path):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    tunnels = RayTunnels("127.0.0.1", "root", private_key_file=other, ssh_port=sshd.port,
                         host_keys=sshd.host_keys)
    with pytest.raises(ConnectionError, match="Could not open SSH tunnels to 127.0.0.1"):
        tunnels.start_tunnels()


def _fingerprint(public_key: Path) -> str:
    """OpenSSH's own fingerprint of a .pub file."""
    return subprocess.run(["ssh-keygen", "-l", "-f", str(public_key)], check=True,
                          capture_output=True, text=True).stdout.split()[1]


def test_a_head_with_another_host_key_than_the_pinned_one_is_refused_before_login(
    sshd, tmp_path
):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "pin")],
                   check=True)
    tunnels = RayTunnels("127.0.0.1", "root", private_key_file=sshd.key, ssh_port=sshd.port,
                         host_keys=HostKeys((tmp_path / "pin.pub").read_text()))
    with pytest.raises(HostKeyRefused) as refused:
        tunnels.start_tunnels()
    seen = _fingerprint(tmp_path / "host_ed25519.pub")
    assert str(refused.value).startswith(
        f"The SSH host key of [127.0.0.1]:{sshd.port} is ssh-ed25519 {seen}, not a key that "
        f"ssh_known_hosts gives for it (ssh-ed25519 {_fingerprint(tmp_path / 'pin.pub')})")
    assert not tunnels.is_open
    _wait_for_log(sshd.log, "Connection closed by")
    assert "publickey" not in sshd.log.read_text(), "no login was tried: no key was offered"


def test_by_default_the_host_key_must_be_in_the_users_known_hosts(sshd, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(HostKeyRefused, match=(
        rf"host key of \[127.0.0.1\]:{sshd.port} \(ssh-ed25519 SHA256:\S+\) is not known: no "
        r"line of ~/.ssh/known_hosts covers that address")):
        RayTunnels("127.0.0.1", "root", private_key_file=sshd.key, ssh_port=sshd.port
                   ).start_tunnels()
    # As OpenSSH writes it: the address with its port, hashed.
    known_hosts = tmp_path / ".ssh" / "known_hosts"
    known_hosts.parent.mkdir()
    host_key = (tmp_path / "host_ed25519.pub").read_text()
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {host_key}")
    subprocess.run(["ssh-keygen", "-H", "-f", str(known_hosts)], check=True, capture_output=True)
    assert known_hosts.read_text().startswith("|1|")
    with RayTunnels("127.0.0.1", "root", private_key_file=sshd.key, ssh_port=sshd.port
                    ) as tunnels:
        socket.create_connection(("127.0.0.1", tunnels.local_ports[10001]), timeout=5).close()


def _wait_for_log(log: Path, text: str) -> None:
    deadline = time.monotonic() + 30
    while text not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert text in log.read_text(), log.read_text()


def test_missing_key_file_is_rejected_before_connecting(tmp_path):
    with pytest.raises(ValueError, match="private_key_file .* is not a readable file"):
        RayTunnels("127.0.0.1", "root", private_key_file=tmp_path / "absent")


def test_a_key_file_under_home_is_found_through_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True
    )
    RayTunnels("127.0.0.1", "root", private_key_file="~/k")  # no "is not a readable file"
