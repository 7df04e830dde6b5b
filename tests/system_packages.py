"""The Debian packages the tests drive for real, installed with apt-get (as root, or through
`sudo -n`) once per run by the process that starts the test workers, when they are missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

# Each package by a file it installs.
PACKAGES = {
    "openssh-server": "/usr/sbin/sshd",  # the SSH tunnels, the nodes `ray up` logs in to
    "rsync": "/usr/bin/rsync",  # `ray up` copies files to the head with it
    "chromium": "/usr/bin/chromium",  # the UI test's browser: Selenium downloads nothing
    "chromium-driver": "/usr/bin/chromedriver",
}
# Why each package is still missing, for the test workers (started after the install).
_REASONS = "RAYDOG_TESTS_MISSING_PACKAGES"
_APT_TIMEOUT_S = 900


def missing(packages: Mapping[str, str] = PACKAGES) -> list[str]:
    """The packages whose file is not there."""
    return [name for name, path in packages.items() if not Path(path).exists()]


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    command = ["apt-get", "-q", "-y", "-o", "DPkg::Lock::Timeout=120", *args]
    if os.geteuid() != 0:
        command = ["sudo", "-n", *command]
    return subprocess.run(
        command,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=_APT_TIMEOUT_S,
    )


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _apt_install(names: list[str]) -> str | None:
    """Run `apt-get update` and `apt-get install`; return why it failed, or None."""
    if shutil.which("apt-get") is None:
        return "apt-get is not on PATH (not a Debian system?): install it by hand"
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        return "not root, and sudo is not installed: install it by hand as root"
    for args in (["update"], ["install", "--no-install-recommends", *names]):
        try:
            result = _apt_get(*args)
        except subprocess.TimeoutExpired:
            return f"`apt-get {args[0]}` took over {_APT_TIMEOUT_S} s"
        if result.returncode != 0:
            how = "" if os.geteuid() == 0 else "sudo -n "
            return f"`{how}apt-get {args[0]}` failed: {_last_line(result.stdout)}"
    return None


def install(packages: Mapping[str, str], say: Callable[[str], None]) -> dict[str, str]:
    """Install the missing ones of `packages` (name to a file it installs); `say` gets one line
    before the install and one per package still missing after it. Return why each of those
    is missing."""
    names = missing(packages)
    if not names:
        return {}
    say(f"Installing the Debian packages the tests drive: {' '.join(names)} (apt-get)")
    failure = _apt_install(names)
    reasons = {
        name: failure or f"apt-get installed it, but {packages[name]} is still missing"
        for name in missing(packages)
    }
    for name, reason in reasons.items():
        say(f"{name} is missing and could not be installed: {reason}; tests that need it skip")
    return reasons


def install_for_workers(say: Callable[[str], None]) -> None:
    """Install what is missing, and leave why anything still is for the workers to read."""
    os.environ[_REASONS] = json.dumps(install(PACKAGES, say))


def why_missing(name: str) -> str | None:
    """Why `name` is not installed, or None when it is."""
    if name not in missing({name: PACKAGES[name]}):
        return None
    reasons = json.loads(os.environ.get(_REASONS, "{}"))
    return f"{name} is not installed: {reasons.get(name, 'not installed')}"
