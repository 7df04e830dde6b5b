"""Isolation that makes each process node of the local platform behave like a separate machine:
its own PID, mount and UTS namespaces, and (as root) its own network namespace on a bridge, with
a private address on the cluster network and a public one."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from prefect_raydog.local.nodes import NodeBootError
from prefect_raydog.local.reaper import (
    NETNS_CONFIG,
    Reaper,
    delete_namespace,
    remove_bridge,
    veth_of,
)

NODE_NAMESPACES = ("--pid", "--fork", "--mount-proc", "--kill-child", "--mount", "--uts")
"""`unshare` flags that give a task its own PID tree, mounts and hostname; when the tree's first
process ends, the kernel ends the rest, and killing `unshare` kills the tree (`--kill-child`)."""

BRIDGE_PREFIX = "ydl"
SUBNET_TEMPLATE = "10.251.{index}.0/24"
PUBLIC_SUBNET_TEMPLATE = "10.252.{index}.0/24"
LOCK_DIR = Path("/run/prefect-raydog")
LOOPBACK = "127.0.0.1"


class IsolationUnavailable(RuntimeError):
    """Process nodes cannot be isolated on this machine; the message says why."""


@dataclass(frozen=True)
class NodeSandbox:
    """One node's isolation: where it is reachable and the command prefix that enters it."""

    name: str
    address: str
    """The node's private address, on the cluster network; its hostname resolves to it."""
    public_address: str
    """Where machines outside the cluster network reach the node (its firewall permitting)."""
    hostname: str
    enter: tuple[str, ...]
    """Prefix for a command to run it in fresh PID/mount/UTS namespaces inside the node."""
    hosts_file_in_netns: bool
    """True when `ip netns exec` already puts the node's own hosts file over `/etc/hosts`."""
    enter_sharing_pids: tuple[str, ...] = ()
    """Like `enter`, but in the host's PID namespace (for an SSH server whose logins join a
    task's PID namespace); empty where the node has no network of its own."""


class NodeNetwork(Protocol):
    """Creates and removes node sandboxes; `host_address` is where nodes reach the host."""

    mode: str
    host_address: str

    def close_host(self, host_ports: tuple[int, ...], node_ports: tuple[int, ...]) -> None: ...

    def add_node(self, hostname: str) -> NodeSandbox: ...

    def remove_node(self, sandbox: NodeSandbox) -> None: ...

    def close(self) -> None: ...


def open_network(mode: str = "auto", bridge_index: int | None = None) -> NodeNetwork:
    """The node network for `mode` ("auto", "bridge" or "loopback"); "auto" prefers a bridge,
    the one numbered `bridge_index` when it is free."""
    if mode not in ("auto", "bridge", "loopback"):
        raise ValueError(f"Unknown network mode {mode!r}: use 'auto', 'bridge' or 'loopback'")
    if mode == "loopback":
        return LoopbackNetwork()
    try:
        return BridgeNetwork(bridge_index)
    except IsolationUnavailable as error:
        if mode == "bridge":
            raise
        bridge_reason = str(error)
    try:
        return LoopbackNetwork()
    except IsolationUnavailable as error:
        raise IsolationUnavailable(
            f"{error}; a bridge is not possible either: {bridge_reason}") from error


def _run(*command: str, stdin: str | None = None) -> str:
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise NodeBootError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result.stdout


def _probe(*command: str) -> str | None:
    """None when `command` works, else the reason it does not."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    return None if result.returncode == 0 else result.stderr.strip() or f"exit {result.returncode}"


class LoopbackNetwork:
    """Nodes share the host's network and report 127.0.0.1; PIDs, mounts and hostname are
    private (through an unprivileged user namespace when not root)."""

    mode = "loopback"
    host_address = LOOPBACK

    def __init__(self) -> None:
        user = () if os.geteuid() == 0 else ("--user", "--map-root-user")
        self._enter = ("unshare", *user, *NODE_NAMESPACES, "--")
        reason = _probe(*self._enter, "/bin/true")
        if reason is not None:
            raise IsolationUnavailable(
                f"process nodes need their own PID and mount namespaces "
                f"(`{' '.join(self._enter[:-1])}`), which this machine refuses: {reason}")

    def close_host(self, host_ports: tuple[int, ...], node_ports: tuple[int, ...]) -> None:
        raise IsolationUnavailable("a firewall between the nodes and this machine needs the "
                                   "bridge network (root): loopback nodes share its network")

    def add_node(self, hostname: str) -> NodeSandbox:
        return NodeSandbox(name=hostname, address=LOOPBACK, public_address=LOOPBACK,
                           hostname=hostname, enter=self._enter, hosts_file_in_netns=False)

    def remove_node(self, sandbox: NodeSandbox) -> None:
        """Nothing to remove: a loopback node's namespaces end with its processes."""

    def close(self) -> None:
        """Nothing to remove: loopback nodes create nothing on the host."""


class BridgeNetwork:
    """One bridge per platform carrying two /24s, the cluster's private network and a public
    one; each node gets a network namespace with an address on each, no default route, and its
    hostname resolving to its private address. This machine holds an address on each too: nodes
    reach it at its public one (`host_address`). A `Reaper` removes them all if the platform dies
    without closing the network."""

    mode = "bridge"

    def __init__(self, preferred_index: int | None = None) -> None:
        if os.geteuid() != 0:
            raise IsolationUnavailable("a bridge for node networks needs root (CAP_NET_ADMIN)")
        if shutil.which("ip") is None:
            raise IsolationUnavailable("a bridge for node networks needs `ip` (iproute2)")
        reason = _probe("unshare", "--net", "--pid", "--fork", "--mount", "--uts", "/bin/true")
        if reason is not None:
            raise IsolationUnavailable(f"network and PID namespaces are refused here: {reason}")
        self._lock = threading.Lock()
        self._lock_file, self.index = _claim_bridge_index(preferred_index)
        self.bridge = f"{BRIDGE_PREFIX}{self.index}"
        self.reaper = Reaper(self.bridge, self._lock_file.fileno(), self._lock_file.name)
        self.subnet = ipaddress.ip_network(SUBNET_TEMPLATE.format(index=self.index))
        self.public_subnet = ipaddress.ip_network(PUBLIC_SUBNET_TEMPLATE.format(index=self.index))
        self.private_host_address = str(self.subnet.network_address + 1)
        self.host_address = str(self.public_subnet.network_address + 1)
        self._free = list(range(2, self.subnet.num_addresses - 1))
        self._used: dict[str, int] = {}
        self._firewall: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        try:
            _run("ip", "-batch", "-", stdin=(
                f"link add {self.bridge} type bridge\n"
                f"addr add {self.private_host_address}/{self.subnet.prefixlen} dev {self.bridge}\n"
                f"addr add {self.host_address}/{self.public_subnet.prefixlen} dev {self.bridge}\n"
                f"link set {self.bridge} up\n"))
        except NodeBootError as error:
            self.close()
            raise IsolationUnavailable(f"cannot create bridge {self.bridge}: {error}") from error

    def close_host(self, host_ports: tuple[int, ...], node_ports: tuple[int, ...]) -> None:
        """From now on, this machine is outside the cluster network and each new node behind a
        cloud's firewall: it reaches this machine's public address on `host_ports` alone, and
        its own public address answers (this machine or another node) on `node_ports` alone, a
        security group's open ports; its private address answers only the cluster network."""
        self._firewall = (host_ports, node_ports)

    def _firewall_rules(self, public_address: str) -> str:
        """Policy routing in a node's namespace, since nodes have no other route: from its
        public address the node sends only from an open port (its answers) or to an open port
        of another public address, and to this machine only at its open ports. So a connection
        to a closed port gets no answer, and one that the node opens and the firewall refuses
        fails at once with EACCES, where a cloud would drop it. This machine keeps its private
        address, so that what it sends there goes to the bridge (unanswered), not out to its
        gateway."""
        if self._firewall is None:
            return ""
        host_ports, node_ports = self._firewall
        rule = "rule add"
        return "".join(
            [f"{rule} to {self.host_address}/32 ipproto tcp dport {port} lookup main pref 100\n"
             for port in host_ports]
            + [f"{rule} from {public_address}/32 ipproto tcp sport {port} lookup main pref 110\n"
               for port in node_ports]
            + [f"{rule} to {self.public_subnet} ipproto tcp dport {port} lookup main pref 110\n"
               for port in node_ports]
            + [f"{rule} to {self.host_address}/32 prohibit pref 120\n",
               f"{rule} to {self.private_host_address}/32 prohibit pref 120\n",
               f"{rule} from {public_address}/32 prohibit pref 120\n"])

    def add_node(self, hostname: str) -> NodeSandbox:
        with self._lock:
            if not self._free:
                raise NodeBootError(f"bridge {self.bridge} has no free address for {hostname}")
            host_number = self._free.pop(0)
        name = f"{self.bridge}-{host_number}"
        address = str(self.subnet.network_address + host_number)
        public_address = str(self.public_subnet.network_address + host_number)
        try:
            self._create_namespace(name, address, public_address, hostname)
        except NodeBootError:
            delete_namespace(name)
            with self._lock:
                self._free.insert(0, host_number)
            raise
        with self._lock:
            self._used[name] = host_number
        return NodeSandbox(name=name, address=address, public_address=public_address,
                           hostname=hostname,
                           enter=("ip", "netns", "exec", name, "unshare", *NODE_NAMESPACES, "--"),
                           hosts_file_in_netns=True,
                           enter_sharing_pids=("ip", "netns", "exec", name, "unshare", "--mount",
                                               "--uts", "--"))

    def _create_namespace(self, name: str, address: str, public_address: str,
                          hostname: str) -> None:
        config = NETNS_CONFIG / name
        config.mkdir(parents=True, exist_ok=True)
        (config / "hosts").write_text(f"127.0.0.1 localhost\n{address} {hostname}\n")
        veth = veth_of(name)
        _run("ip", "-batch", "-", stdin=(
            f"netns add {name}\n"
            f"link add {veth} type veth peer name eth0 netns {name}\n"
            f"link set {veth} master {self.bridge} up\n"))
        _run("ip", "-n", name, "-batch", "-", stdin=(
            f"addr add {address}/{self.subnet.prefixlen} dev eth0\n"
            f"addr add {public_address}/{self.public_subnet.prefixlen} dev eth0\n"
            "link set eth0 up\nlink set lo up\n" + self._firewall_rules(public_address)))

    def remove_node(self, sandbox: NodeSandbox) -> None:
        delete_namespace(sandbox.name)
        with self._lock:
            host_number = self._used.pop(sandbox.name, None)
            if host_number is not None:
                self._free.append(host_number)

    def close(self) -> None:
        with self._lock:
            if self._lock_file.closed:
                return
            names = list(self._used)
            self._used.clear()
        for name in names:
            delete_namespace(name)
        remove_bridge(self.bridge)
        # The reaper shares our lock: it must be gone before the lock file is removed.
        self.reaper.release()
        _unlock(self._lock_file)


def _claim_bridge_index(preferred: int | None = None) -> tuple[IO[str], int]:
    """A bridge index that no live platform holds (an flock on its lock file, released when the
    holder dies) and no existing interface or route uses; `preferred` first, if given."""
    LOCK_DIR.mkdir(parents=True, exist_ok=True)
    _remove_leftovers_of_dead_platforms()
    links = set(_run("ip", "-o", "link", "show").split())
    routes = _run("ip", "-4", "route", "show", "table", "all")
    first = [] if preferred is None else [preferred]
    for index in [*first, *range(256)]:
        lock_file = _lock(index)
        if lock_file is None:
            continue
        bridge = f"{BRIDGE_PREFIX}{index}"
        subnets = (SUBNET_TEMPLATE.format(index=index), PUBLIC_SUBNET_TEMPLATE.format(index=index))
        if f"{bridge}:" in links or any(_overlaps(subnet, routes) for subnet in subnets):
            _unlock(lock_file)
            continue
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        return lock_file, index
    raise IsolationUnavailable("no free bridge index: 256 local platforms hold one already")


def _lock(index: int) -> IO[str] | None:
    """The locked lock file of bridge `index`, or None when a live platform holds it."""
    path = LOCK_DIR / f"{BRIDGE_PREFIX}{index}.lock"
    lock_file = path.open("a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The holder may have unlinked the file between our open and our lock.
        if os.fstat(lock_file.fileno()).st_ino == os.stat(path).st_ino:
            return lock_file
    except (BlockingIOError, FileNotFoundError):
        pass
    lock_file.close()
    return None


def _unlock(lock_file: IO[str]) -> None:
    """Remove the lock file while still holding it, then release it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock_file.name)
    lock_file.close()


def _remove_leftovers_of_dead_platforms() -> None:
    """A lock file that nobody holds was left by a platform that died: remove its bridge,
    namespaces and hosts files, which nothing else can own while we hold the lock."""
    for path in LOCK_DIR.glob(f"{BRIDGE_PREFIX}*.lock"):
        index = path.name.removeprefix(BRIDGE_PREFIX).removesuffix(".lock")
        lock_file = _lock(int(index)) if index.isdigit() else None
        if lock_file is not None:
            remove_bridge(f"{BRIDGE_PREFIX}{index}")
            _unlock(lock_file)


def _overlaps(subnet: str, routes: str) -> bool:
    network = ipaddress.ip_network(subnet)
    for line in routes.splitlines():
        destination = line.split()[0] if line.split() else ""
        if destination[:1].isdigit():
            try:
                if ipaddress.ip_network(destination, strict=False).overlaps(network):
                    return True
            except ValueError:
                continue
    return False
