"""A local platform's identity kept in a state directory: its port, application key and bridge,
so that a restarted platform has the URL and key that saved blocks name."""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

IDENTITY_FILE = "platform.json"
LOCK_FILE = "lock"


class StateDirectoryBusy(RuntimeError):
    """Another live local platform holds the state directory."""


@dataclass
class PlatformIdentity:
    """What a restart keeps; `url`, `node_address` and `firewall` are those of the last
    start."""

    key_id: str
    key_secret: str
    port: int = 0
    bridge_index: int | None = None
    url: str = ""
    node_address: str = ""
    firewall: bool = False

    @classmethod
    def new(cls) -> PlatformIdentity:
        return cls(key_id=f"local-{secrets.token_hex(4)}", key_secret=secrets.token_urlsafe(24))


class StateDirectory:
    """A local platform's state directory, locked while its platform runs."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser()
        self._lock: IO[str] | None = None

    @property
    def identity_file(self) -> Path:
        return self.path / IDENTITY_FILE

    def lock(self) -> None:
        """Hold the directory for this process; raise `StateDirectoryBusy` if a platform has it."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = (self.path / LOCK_FILE).open("a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise StateDirectoryBusy(
                f"a local platform with state directory {self.path} is already running: stop "
                "it, or pass another --state-dir"
            ) from None
        self._lock = lock

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def load(self) -> PlatformIdentity | None:
        """The saved identity, or None before the first start."""
        if not self.identity_file.is_file():
            return None
        return PlatformIdentity(**json.loads(self.identity_file.read_text()))

    def save(self, identity: PlatformIdentity) -> None:
        """Write the identity (it holds the key secret: readable by the owner only)."""
        temporary = self.identity_file.with_suffix(".tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(asdict(identity), handle, indent=2)
        temporary.replace(self.identity_file)
