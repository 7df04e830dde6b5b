"""A process node as hard as a cloud VM: it sees only its image (none of the driver's Python,
packages, checkout, HOME or local package registries), runs its userdata as root at boot, and
runs tasks and SSH logins as the non-root `yd-agent` user."""

from __future__ import annotations

import configparser
import os
import pwd
import subprocess
import sys
from pathlib import Path

from prefect_raydog.local.images import IMAGE_MOUNT, Image
from prefect_raydog.local.nodes import NodeBootError

AGENT_USER = "yd-agent"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USERDATA_TIMEOUT_S = 600.0
PROJECT = Path(__file__).resolve().parents[2]

SEAL_NODE = r"""
set -e
image="$1" prefix="$5" root="$6" here="$PWD"
disk="$root/disk"
# /root as a VM's, but for the search right that an image Python under it needs (pyenv's).
mkdir -p "$disk/opt/image" "$disk/root" && chmod 711 "$disk/root"
mount --bind "$disk/opt" "${image%/*}"
mount --bind "$2" "$image" && mount -o remount,bind,ro "$image"
mount --bind "$3" "$image/app" && mount -o remount,bind,ro "$image/app"
mount --bind "$4" /etc/passwd
shift 6
exec 3<"$root" 4<"$disk/root"
while [ "$1" != "--" ]; do
    mount -t tmpfs -o mode=755,size=1m hidden "$1"
    shift
done
shift
mount --no-canonicalize --bind /proc/self/fd/4 /root
if [ -n "$prefix" ]; then mkdir -p "$prefix" && mount --bind "$image/python" "$prefix"; fi
if [ ! -d "$root" ]; then
    mkdir -p "$root" && mount --no-canonicalize --bind /proc/self/fd/3 "$root"
fi
exec 3<&- 4<&-
cd "$here"
exec "$@"
"""
"""Runs inside the node after its hostname and /tmp are in place: gives the node a disk of its
own at /opt/yellowdog and /root (under its directory: what its userdata installs there is
its own, as on a VM), mounts the image read-only, makes the agent user known, hides the host's
paths under empty tmpfs (keeping the node's own directory, reopened through a descriptor taken
before) and puts the image's Python where its venv expects it. Any failure ends the command
rather than run it unsealed."""


def agent_user() -> pwd.struct_passwd:
    """The `yd-agent` user, created on this machine (as a system user) when missing."""
    try:
        return pwd.getpwnam(AGENT_USER)
    except KeyError:
        pass
    result = subprocess.run(
        # No password, not locked ("*", not "!"): sshd refuses keys for a locked account.
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--shell",
            "/bin/bash",
            "--password",
            "*",
            AGENT_USER,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    # Another platform may have created it meanwhile.
    try:
        return pwd.getpwnam(AGENT_USER)
    except KeyError:
        raise NodeBootError(
            f"cannot create the {AGENT_USER} user: {result.stderr.strip()}"
        ) from None


def passwd_file(user: pwd.struct_passwd, home: Path) -> str:
    """The node's /etc/passwd: the host's, with the agent user's home the node's home."""
    lines = [
        line
        for line in Path("/etc/passwd").read_text().splitlines()
        if not line.startswith(f"{AGENT_USER}:")
    ]
    lines.append(f"{AGENT_USER}:x:{user.pw_uid}:{user.pw_gid}:YellowDog agent:{home}:/bin/bash")
    return "\n".join(lines) + "\n"


def as_agent(user: pwd.struct_passwd) -> list[str]:
    """Prefix that runs a command as the agent user, without any capability of root."""
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups", "--"]


def login_as_agent(user: pwd.struct_passwd, passwd: Path) -> list[str]:
    """Prefix for an SSH login, entered as uid 0, to become the agent user; where sshd's own
    passwd is in place (no task's namespaces to join) the node's is put back first."""
    return [
        "/bin/bash",
        "-c",
        'cmp -s "$0" /etc/passwd || mount --bind "$0" /etc/passwd; exec "$@"',
        str(passwd),
        *as_agent(user),
    ]


def seal(image: Image, passwd: Path, node_root: Path) -> list[str]:
    """Command prefix (after the node's hostname and /tmp are set up) that seals the node."""
    return [
        "/bin/bash",
        "-c",
        SEAL_NODE,
        "seal-node",
        str(IMAGE_MOUNT),
        str(image.base),
        str(image.layer),
        str(passwd),
        image.python_prefix,
        str(node_root),
        *[str(path) for path in hidden_paths()],
        "--",
    ]


def image_path(image: Image) -> str:
    """A login's and a task's PATH on the node: the image's venv first, as its system Python
    (the system's alone on a bare image)."""
    return SYSTEM_PATH if image.bare else f"{image.venv / 'bin'}:{SYSTEM_PATH}"


def hidden_paths() -> list[str]:
    """The host's paths a node must not see, outermost only: HOME, the driver's Python, venv,
    import path and checkout, and local package registries. Paths under /tmp (the node has its
    own) and the system's /usr stay out."""
    candidates = {
        Path.home(),
        Path(sys.prefix),
        Path(sys.base_prefix),
        PROJECT,
        *(Path(entry) for entry in sys.path if entry),
        *_local_registries(),
    }
    found = sorted({path.resolve() for path in candidates if path.is_dir()})
    kept: list[Path] = []
    for path in found:
        if (
            path == Path("/")
            or path.is_relative_to("/tmp")
            or path.is_relative_to("/usr")
            or IMAGE_MOUNT.is_relative_to(path)
        ):
            continue
        if not any(path.is_relative_to(outer) for outer in kept):
            kept.append(path)
    return [str(path) for path in kept]


def _local_registries() -> list[Path]:
    """Directories that pip's configuration installs from (`file://` indexes, find-links)."""
    files = [
        Path("/etc/pip.conf"),
        Path("/etc/xdg/pip/pip.conf"),
        Path.home() / ".config/pip/pip.conf",
        Path.home() / ".pip/pip.conf",
    ]
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    parser = configparser.ConfigParser(interpolation=None)
    parser.read([str(path) for path in files])
    keys = ("index-url", "extra-index-url", "find-links")
    values = [
        parser.get(section, key)
        for section in parser.sections()
        for key in keys
        if parser.has_option(section, key)
    ]
    values += [os.environ.get(f"PIP_{key.upper().replace('-', '_')}", "") for key in keys]
    locations = [word.removeprefix("file://") for value in values for word in value.split()]
    return [Path(location) for location in locations if location.startswith("/")]
