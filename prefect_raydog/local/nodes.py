"""The contract between the platform's state, which decides what runs where, and the agent that
runs a process node's tasks. The state calls a `NodeRunner`; it never touches processes itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class NodeAddress:
    """Where a booted node can be reached, as its instance reports it."""

    private_ip: str
    public_ip: str
    hostname: str


@dataclass(frozen=True)
class TaskLaunch:
    """One task for a node's worker to run, as the YellowDog agent receives it."""

    task_id: str
    task_type: str
    arguments: list[str]
    task_data: str | None
    environment: dict[str, str] = field(default_factory=dict)
    """The task's own environment plus the `YD_*` variables the state knows."""


@dataclass(frozen=True)
class NodeImage:
    """The image a sealed node boots from: the driver's node requirements plus `packages`, or,
    `bare`, a base image with the machine's system Python alone (its userdata installs the
    rest, as on a base Ubuntu image)."""

    packages: tuple[str, ...] = ()
    bare: bool = False


class NodeBootError(RuntimeError):
    """A node could not be started; the state reports its instance as failed to boot."""


class NodeRunner(Protocol):
    """Runs the processes of `process` nodes. Every method may be called from any thread."""

    host_address: str
    """The address on which node processes reach services running on the platform's host."""

    package_index: str | None
    """The package index that sealed nodes' images name (PIP_INDEX_URL, UV_DEFAULT_INDEX): the
    platform's mirror, as an image made for a private cloud network names the network's."""

    def close_host(self, host_ports: tuple[int, ...], node_ports: tuple[int, ...]) -> None:
        """Nodes booted from now on reach the host only on `host_ports` and answer it only from
        `node_ports` (a firewall); raises when the nodes share the host's network."""
        ...

    def boot_node(self, node_id: str, hostname: str, user_data: str | None = None,
                  image: NodeImage | None = None) -> NodeAddress:
        """Give the node its isolation (namespaces, address) and return where it is reachable;
        start an SSH server there when `user_data` holds OpenSSH public keys to authorize. With
        an `image`, the node is sealed as a VM booted from it: `user_data` runs as root first
        (raising `NodeBootError` when it fails), then tasks and logins run as `yd-agent`."""
        ...

    def boot_output(self, node_id: str) -> str:
        """What the node's userdata printed at boot, ending with its exit status; empty when it
        ran none."""
        ...

    def run_task(self, node_id: str, launch: TaskLaunch, on_exit: Callable[[int], None]) -> None:
        """Start the task without blocking; call `on_exit(exit_code)` once, from any thread, when
        its process ends (a negative code means it was killed by that signal)."""
        ...

    def abort_boots(self) -> None:
        """End every boot still running its userdata, and any started from now on, as failed:
        the platform is stopping."""
        ...

    def abort_task(self, task_id: str) -> None:
        """SIGTERM the task's whole process group, then SIGKILL after a grace period."""
        ...

    def stop_node(self, node_id: str, kill: bool = False) -> None:
        """End every process of the node and remove its isolation. `kill=True` ends them with
        SIGKILL at once, as when a machine dies. A node still booting has its userdata ended,
        which fails its boot. Idempotent."""
        ...

    def task_output(self, task_id: str) -> str:
        """The task's combined stdout and stderr so far (`taskoutput.txt`)."""
        ...

    def processes(self) -> list[int]:
        """PIDs of every live process of every node."""
        ...

    def close(self) -> None:
        """Stop every node and remove everything the runner created on the host."""
        ...
