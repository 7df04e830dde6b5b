"""The Prefect server a benchmark reports to: a temporary one of its own, or, with
`--prefect-api-url`, one already running (the test suite's, so that a smoke run does not start a
second server on a busy machine)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.settings import PREFECT_API_URL, temporary_settings


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefect-api-url", metavar="URL",
                        help="report to this Prefect API instead of a temporary server")


@contextmanager
def prefect_server(url: str | None) -> Iterator[None]:
    """Flows run in here report to `url`, or to a temporary server started for them."""
    if url is None:
        from prefect.testing.utilities import prefect_test_harness  # not in cold processes

        with prefect_test_harness(server_startup_timeout=120):
            yield
    else:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
