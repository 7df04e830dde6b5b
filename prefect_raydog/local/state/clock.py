"""The platform's clock: one lock, timers, and a scheduler thread that runs `step()` whenever
something changes and at least every 50 ms; slow node work runs off the lock in a thread pool."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)

STEP_INTERVAL_S = 0.05


class Clock(ABC):
    """The lock every change holds, the timers, and the thread that runs `step()`."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._timers: list[tuple[float, int, str, Any, int]] = []
        self._sequence = itertools.count()
        self._actions: list[Callable[[], None]] = []
        self._dirty = False
        self._steps = 0
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="yd-local-node")
        self._thread: threading.Thread | None = None
        self._stopping = False

    @abstractmethod
    def step(self) -> None:
        """Move the platform along; the caller holds the lock."""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="yd-local-scheduler", daemon=True)
        self._thread.start()

    @property
    def stopped(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                if not (self._dirty or self._actions):
                    self._cond.wait(self._wait_time())
                try:
                    self.step()
                except Exception:  # a bug in one step must not stop the whole platform
                    logger.exception("The local platform's scheduler step failed")
                self._steps += 1
                self._cond.notify_all()
                actions, self._actions = self._actions, []
            for action in actions:
                action()

    def settle(self, timeout: float = 10.0) -> None:
        """Return once the scheduler has run a whole step (due timers, claims, pool growth) that
        started after this call: what the state at the call leads to at once has happened."""
        with self._cond:
            target = self._steps + 1
            self._changed()
            if not self._cond.wait_for(lambda: self._steps >= target or self._stopping, timeout):
                raise TimeoutError(f"The local platform's scheduler ran no step in {timeout} s")

    def _wait_time(self) -> float:
        if not self._timers:
            return STEP_INTERVAL_S
        return max(0.0, min(STEP_INTERVAL_S, self._timers[0][0] - time.monotonic()))

    def _changed(self) -> None:
        self._dirty = True
        self._cond.notify_all()

    def _timer(self, delay_s: float, kind: str, subject: Any, epoch: int = 0) -> None:
        heapq.heappush(
            self._timers, (time.monotonic() + delay_s, next(self._sequence), kind, subject, epoch)
        )

    def _later(self, action: Callable[[], None]) -> None:
        """Run `action` off the lock, in the node thread pool (it may block)."""
        self._actions.append(lambda: self._executor.submit(self._logged, action))

    @staticmethod
    def _logged(action: Callable[[], None]) -> None:
        try:
            action()
        except Exception:  # the executor would swallow it silently
            logger.exception("A node action of the local platform failed")

    def _fire_due_timers(self) -> None:
        """Call `_on_<kind>(subject, epoch)` for every timer that is due."""
        clock = time.monotonic()
        while self._timers and self._timers[0][0] <= clock:
            _, _, kind, subject, epoch = heapq.heappop(self._timers)
            getattr(self, f"_on_{kind}")(subject, epoch)
