"""One temporary Prefect server for a whole test run. Under pytest-xdist the controller starts it
in the background as the run begins and every worker's tests report to it: a server costs about
13 CPU-seconds to start and 1.4 a minute to idle, so one per worker cost CI a minute on two
cores. The workers learn its address from a file the controller writes once it answers."""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prefect.context import _temporary_global_settings_context, get_settings_context
from prefect.events.worker import EventsWorker
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.testing.utilities import prefect_test_harness
from prefect.utilities.asyncutils import run_coro_as_sync

ADDRESS_FILE = "RAYDOG_TESTS_PREFECT_API_FILE"
"""The environment variable naming the file where the controller writes the server's API URL."""
STARTUP_S = 240.0


class SharedServer:
    """The controller's side: the harness in a thread of its own, from `start` to `stop`."""

    def __init__(self) -> None:
        self._home = Path(tempfile.mkdtemp(prefix="raydog-prefect-"))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="shared-prefect", daemon=True)

    def start(self) -> None:
        os.environ[ADDRESS_FILE] = str(self._home / "api-url")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        shutil.rmtree(self._home, ignore_errors=True)

    @staticmethod
    def wanted() -> bool:
        """Whether this run needs a server of its own: not a run that a test started, which
        uses its parent's."""
        return ADDRESS_FILE not in os.environ

    def _serve(self) -> None:
        written = self._home / "api-url.new"
        try:
            with prefect_test_harness(server_startup_timeout=int(STARTUP_S)):
                written.write_text(PREFECT_API_URL.value())
                written.replace(self._home / "api-url")
                self._stop.wait()
        except Exception as error:  # the workers' tests say why
            written.write_text(f"error: {type(error).__name__}: {error}")
            written.replace(self._home / "api-url")


@contextmanager
def prefect_server() -> Iterator[str]:
    """The run's Prefect API URL, set for this process as `prefect_test_harness` sets it: the
    controller's server when there is one, else a temporary server of this process's own."""
    address_file = os.environ.get(ADDRESS_FILE)
    if address_file is None:
        with prefect_test_harness(server_startup_timeout=120):
            yield PREFECT_API_URL.value()
        return
    url = _wait_for_address(Path(address_file))
    # The second context is made once the first is entered (as the harness makes it).
    with (
        temporary_settings(updates={PREFECT_API_URL: url}),
        _temporary_global_settings_context(get_settings_context()),
    ):
        try:
            yield url
        finally:
            # As the harness does: logs and events still queued would meet a stopped server.
            run_coro_as_sync(_drain())


async def _drain() -> None:
    for result in (APILogWorker.instance().drain(), EventsWorker.drain_all()):
        if inspect.isawaitable(result):
            await result


def _wait_for_address(path: Path) -> str:
    deadline = time.monotonic() + STARTUP_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"The run's Prefect server did not start within {STARTUP_S:g} s")
        time.sleep(0.1)
    url = path.read_text()
    if url.startswith("error: "):
        raise RuntimeError(f"The run's Prefect server failed to start: {url[7:]}")
    return url
