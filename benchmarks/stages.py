"""Time stamps of a benchmark's stages on stderr, so that a run shows where its time goes:
`stage("cluster up")` once a stage has ended prints its length and the seconds since the
process started (imports included). Stages in threads side by side are timed each in its own."""

from __future__ import annotations

import os
import sys
import threading
import time


def _process_age_s() -> float:
    with open("/proc/self/stat") as stat:
        start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as uptime:
        return float(uptime.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")


_started = time.monotonic() - _process_age_s()
_last = {threading.main_thread().ident: _started}
"""When each thread's last stage ended; a new thread's stages follow the main thread's."""


def stage(name: str) -> None:
    """Print that the stage `name` has just ended: how long it took (since the previous stage in
    this thread ended) and how long the process has run so far."""
    now = time.monotonic()
    last = _last.get(threading.get_ident(), _last[threading.main_thread().ident])
    print(f"[stage] {name}: {now - last:.1f} s (at {now - _started:.1f} s)", file=sys.stderr,
          flush=True)
    _last[threading.get_ident()] = now
