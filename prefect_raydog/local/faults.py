"""Fault injection for the local platform: the next N API calls that match a method and a path
pattern answer 503, 500 or 429 (with `Retry-After`), or have their connection dropped. Node
faults (boot failures, killed nodes) act on entities, so they live in `PlatformState`."""

from __future__ import annotations

import fnmatch
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any


class FaultKind(str, Enum):
    """What a matching call gets instead of its answer."""

    UNAVAILABLE = "503"
    INTERNAL_ERROR = "500"
    THROTTLED = "429"
    DROP = "drop"


@dataclass
class Fault:
    """The next `count` calls with this method (or any, `*`) whose path, without the base
    path, matches the glob `path` (e.g. `/work/tasks/*`) get `kind`."""

    kind: FaultKind
    path: str = "*"
    method: str = "*"
    count: int = 1
    retry_after_s: float | None = None
    taken: int = 0
    """How many calls got this fault so far."""

    def matches(self, method: str, path: str) -> bool:
        return self.method in ("*", method) and fnmatch.fnmatchcase(path, self.path)

    def to_wire(self) -> dict[str, Any]:
        """As the control route `POST /_local/faults` takes and answers it."""
        return {
            "kind": self.kind.value,
            "path": self.path,
            "method": self.method,
            "count": self.count,
            "retryAfterSeconds": self.retry_after_s,
        }


class FaultPlan:
    """The faults waiting to happen, consumed call by call, and every fault added since the last
    `forget()`, so that a test can check each was used. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._added: list[Fault] = []
        self.drop_connection: Callable[[tuple[str, int] | None], None] = lambda client: None
        """Set by the platform: aborts the TCP connection of the given client address."""

    def add(
        self,
        kind: FaultKind | str,
        path: str = "*",
        method: str = "*",
        count: int = 1,
        retry_after_s: float | None = None,
    ) -> Fault:
        if count < 1:
            raise ValueError(f"Fault count must be at least 1, got {count}")
        fault = Fault(FaultKind(kind), path, method.upper(), count, retry_after_s)
        if fault.kind is FaultKind.THROTTLED and fault.retry_after_s is None:
            fault.retry_after_s = 1.0
        with self._lock:
            self._faults.append(fault)
            self._added.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def pending(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def never_taken(self) -> list[Fault]:
        """The faults added since the last `forget()` that no call got."""
        with self._lock:
            return [fault for fault in self._added if not fault.taken]

    def forget(self) -> None:
        """Clear the faults, and the record of those added."""
        with self._lock:
            self._faults.clear()
            self._added.clear()

    def take(self, method: str, path: str) -> Fault | None:
        """The fault this call gets, if any; counts it as used."""
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.count -= 1
                    fault.taken += 1
                    if fault.count == 0:
                        self._faults.remove(fault)
                    return fault
        return None
