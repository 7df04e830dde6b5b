"""Commands on the head node over SSH, with the cluster YAML's `auth` (OpenSSH's own client, so
its config and agent apply) and its host keys checked; used by `ray up` to deliver credentials
and to reach the tag store."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.autoscaler._private.command_runner import SSHCommandRunner

from prefect_raydog.errors import HostKeyRefused
from prefect_raydog.host_keys import HostKeys

SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR")
KNOWN_HOSTS_DIR = Path("~/.ray/raydog-known-hosts")


def host_key_options(host_keys: HostKeys, cluster_name: str, node_id: str) -> dict[str, str]:
    """OpenSSH options that check node `node_id`'s host key with `host_keys`, through a
    known_hosts file of that node's own (where OpenSSH keeps a key learned on first use)."""
    directory = KNOWN_HOSTS_DIR.expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    return host_keys.openssh_options(directory / f"{cluster_name}-{node_id}")


class RemoteCommandFailed(RuntimeError):
    """A command on the head node failed; the message has its exit code and error output."""


@dataclass(frozen=True)
class RemoteShell:
    """Runs shell commands as `user` on `address` with the private key `key_file`, checking the
    host key with `host_key_options` (`host_key_options()`)."""

    address: str
    user: str
    key_file: Path
    host_key_options: dict[str, str]
    port: int = 22

    def run(self, command: str, stdin: str | None = None, timeout: float = 30.0) -> str:
        """Run `command` (text on stdin, never in argv) and return its output. A host key
        that the options refuse raises `HostKeyRefused` (no login was tried)."""
        options = [f"-o{name}={value}" for name, value in self.host_key_options.items()]
        result = subprocess.run(
            ["ssh", "-i", str(self.key_file), "-p", str(self.port), *SSH_OPTIONS, *options,
             f"{self.user}@{self.address}", command],
            input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
        if result.returncode == 255 and "Host key verification failed" in result.stderr:
            seen = re.search(r"SHA256:[A-Za-z0-9+/]+", result.stderr)
            raise HostKeyRefused(
                f"The SSH host key of {self.address}{f' ({seen.group()})' if seen else ''} is "
                "not one that provider.ssh_known_hosts gives for it (OpenSSH: Host key "
                "verification failed): another machine may be answering at that address; if "
                "the image's host key changed, pin the new one")
        if result.returncode != 0:
            raise RemoteCommandFailed(
                f"`{command}` on {self.user}@{self.address} exited {result.returncode}: "
                f"{result.stderr.strip()}")
        return result.stdout

    def wait_until_reachable(self, timeout: float, check: Callable[[], None]) -> None:
        """Wait until SSH logins work (a booting machine starts sshd late); `check()` raises
        to stop waiting (when the machine's task has ended)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.run("true", timeout=15)
                return
            except (RemoteCommandFailed, subprocess.TimeoutExpired):
                check()
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)


class CheckedSSHCommandRunner(SSHCommandRunner):
    """Ray's SSH command runner with `host_key_options` in place of Ray's, which check no
    host key (StrictHostKeyChecking=no, no known_hosts file)."""

    def __init__(self, host_key_options: dict[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ssh_options.arg_dict.update(host_key_options)

    def run(self, cmd: str | None = None, *args: Any, ssh_options_override_ssh_key: str = "",
            **kwargs: Any) -> str:
        # Ray's override makes fresh options for the same key, without host key checks: the
        # runner's own options already use the YAML's key.
        return super().run(cmd, *args, **kwargs)
