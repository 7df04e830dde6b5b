"""A benchmark stopped with SIGTERM (`kill`, `timeout`, a CI runner) ends as after Ctrl-C: its
`with` blocks and `finally` clauses stop the platforms, clusters and processes it started.
Python's default for SIGTERM ends the process at once and leaves them running."""

from __future__ import annotations

import signal
import sys


def stop_in_order_on_sigterm() -> None:
    """From now on, SIGTERM (and SIGINT, even where it was inherited ignored, as by a background
    job of a script) raises in the main thread, so the benchmark unwinds."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    signal.signal(signal.SIGINT, signal.default_int_handler)
