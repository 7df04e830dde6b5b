"""The reaper of a local platform's bridge: a small process that outlives the platform and, if
the platform dies without closing its bridge (SIGKILL included), kills what is left in the
bridge's node namespaces and removes them, their veth pairs and the bridge at once.

It runs from this file alone (standard library only, no package import), so it starts in
milliseconds; `network.py` uses its removal functions for an orderly close too."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

NETNS_CONFIG = Path("/etc/netns")
RELEASE = b"release\n"
"""What the platform writes before closing the pipe when it has removed everything itself."""


class Reaper:
    """The platform's end of its reaper: the reaper holds the bridge's lock (an inherited flock,
    so no other platform can claim the bridge until the reaper is done) and the read end of a
    pipe whose write end only the platform holds, so it reads EOF however the platform ends."""

    def __init__(self, bridge: str, lock_fd: int, lock_path: str) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-I", __file__, bridge, str(lock_fd), lock_path],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, pass_fds=(lock_fd,),
            start_new_session=True)

    @property
    def pid(self) -> int:
        return self._process.pid

    def release(self) -> None:
        """Tell the reaper that the platform removed everything; wait until it has exited, so
        that it holds the bridge's lock no longer."""
        assert self._process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self._process.stdin.write(RELEASE)
            self._process.stdin.close()
        self._process.wait()


def remove_bridge(bridge: str) -> None:
    """Remove `bridge`, its node namespaces (and their processes) and their hosts files. Only
    called while holding the bridge's lock, so nothing removed belongs to a live platform."""
    namespaces = subprocess.run(("ip", "netns", "list"), capture_output=True, text=True,
                                check=False).stdout.split()
    for name in namespaces:
        if name.startswith(f"{bridge}-"):
            delete_namespace(name)
    for config in NETNS_CONFIG.glob(f"{bridge}-*"):
        shutil.rmtree(config, ignore_errors=True)
    subprocess.run(("ip", "link", "del", bridge), capture_output=True, check=False)


def delete_namespace(name: str) -> None:
    """Kill every process in the node namespace `name`, then remove it, its veth pair and its
    hosts file."""
    pids = subprocess.run(("ip", "netns", "pids", name), capture_output=True, text=True,
                          check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    # Deleting a namespace removes its veth pair only later; deleting the pair is immediate.
    subprocess.run(("ip", "link", "del", veth_of(name)), capture_output=True, check=False)
    subprocess.run(("ip", "netns", "del", name), capture_output=True, check=False)
    shutil.rmtree(NETNS_CONFIG / name, ignore_errors=True)


def veth_of(namespace: str) -> str:
    """The host-side veth of a node namespace: `ydl3-7` has `ydl3v7` (names are at most 15
    characters)."""
    return namespace.replace("-", "v", 1)


def unlink_held_lock(lock_fd: int, lock_path: str) -> None:
    """Remove the lock file while still holding its lock (if it is still the file we hold)."""
    with contextlib.suppress(FileNotFoundError):
        if os.stat(lock_path).st_ino == os.fstat(lock_fd).st_ino:
            os.unlink(lock_path)


def _main(bridge: str, lock_fd: int, lock_path: str) -> None:
    # Ctrl-C and a closing terminal are for the platform, which ends in order; EOF tells us.
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    if sys.stdin.buffer.read() == RELEASE:
        return
    remove_bridge(bridge)
    unlink_held_lock(lock_fd, lock_path)


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
