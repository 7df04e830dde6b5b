"""The log of a cluster start that began before its flow run was known (an eager start): each
message goes to the runner's logger at once and to the flow run's log once the run is known."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any


class HeldRunLog:
    """A logger for a background start: holds its messages until `attach()` names the flow run's
    logger, then sends them there (each with the time it was logged) and everything after."""

    def __init__(self, fallback: logging.Logger | logging.LoggerAdapter) -> None:
        self._fallback = fallback
        self._target: Any = None
        self._held: list[tuple[float, int, str, tuple]] = []
        self._lock = threading.Lock()

    def log(self, level: int, msg: str, *args: Any) -> None:
        with self._lock:
            target = self._target
            if target is None:
                self._held.append((time.time(), level, msg, args))
        (target or self._fallback).log(level, msg, *args)

    def info(self, msg: str, *args: Any) -> None:
        self.log(logging.INFO, msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        self.log(logging.WARNING, msg, *args)

    def attach(self, run_logger: logging.Logger | logging.LoggerAdapter) -> None:
        """From now on, log to `run_logger`; first send it what was held."""
        with self._lock:
            if self._target is not None:
                return
            self._target = run_logger
            held, self._held = self._held, []
        for created, level, msg, args in held:
            _log_at(run_logger, created, level, msg, args)


def _log_at(
    target: logging.Logger | logging.LoggerAdapter,
    created: float,
    level: int,
    msg: str,
    args: tuple,
) -> None:
    """Log through `target` (an adapter adds its extra fields) a record made at `created`."""
    kwargs: dict[str, Any] = {}
    if isinstance(target, logging.LoggerAdapter):
        msg, kwargs = target.process(msg, kwargs)
        target = target.logger
    if not target.isEnabledFor(level):
        return
    record = target.makeRecord(
        target.name, level, __file__, 0, msg, args, None, extra=kwargs.get("extra")
    )
    record.created, record.msecs = created, created % 1 * 1000
    target.handle(record)
