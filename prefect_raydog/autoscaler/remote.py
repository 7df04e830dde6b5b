"""Commands on the head node over SSH, with the cluster YAML's `auth` (OpenSSH's own client, so
its config and agent apply); used by `ray up` to deliver credentials and to reach the tag store."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SSH_OPTIONS = (
    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
    "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
)


class RemoteCommandFailed(RuntimeError):
    """A command on the head node failed; the message has its exit code and error output."""


@dataclass(frozen=True)
class RemoteShell:
    """Runs shell commands as `user` on `address` with the private key `key_file`."""

    address: str
    user: str
    key_file: Path
    port: int = 22

    def run(self, command: str, stdin: str | None = None, timeout: float = 30.0) -> str:
        """Run `command` (text on stdin, never in argv) and return its output."""
        result = subprocess.run(
            ["ssh", "-i", str(self.key_file), "-p", str(self.port), *SSH_OPTIONS,
             f"{self.user}@{self.address}", command],
            input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
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
