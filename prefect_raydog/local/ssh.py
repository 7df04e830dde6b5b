"""SSH into process nodes, as into a cloud VM: an OpenSSH server inside each node's namespaces,
on every address of the node, that accepts the public keys found in the node's userdata."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SSH_USER = "yd-agent"
SSH_PORT = 22
HOST_KEY_FILE = "ssh_host_ed25519_key"

PUBLIC_KEY = re.compile(
    r"^\s*((?:ssh-(?:ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-\S+@openssh\.com)"
    r"\s+[A-Za-z0-9+/]+={0,3}(?:[ \t]+[^\n]*?)?)\s*$",
    re.MULTILINE,
)
"""An OpenSSH public key on a line of its own (as in an `authorized_keys` heredoc)."""

START_SSHD = r"""
set -e
mount --bind "$1" /etc/passwd
mkdir -p /run/sshd
exec "$2" -D -e -f "$3"
"""
"""Runs inside the node: makes the agent user known (as uid 0, home the node's home), then
becomes sshd. The mount is private to the node's mount namespace."""

ENTER_TASK = r"""#!/bin/bash
as_user=(@AS_USER@)
pid="$(cat "$(dirname "$0")/task.pid" 2>/dev/null || true)"
if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    enter=(nsenter --target "$pid" --pid --mount --uts --)
else
    enter=(unshare --pid --fork --mount-proc --)
fi
if [ -n "${SSH_ORIGINAL_COMMAND:-}" ]; then
    exec "${enter[@]}" "${as_user[@]}" /bin/bash -c "$SSH_ORIGINAL_COMMAND"
fi
exec "${enter[@]}" "${as_user[@]}" /bin/bash -l
"""
"""sshd's ForceCommand: a login joins the PID and mount namespaces of the task running on the
node, so it sees the node's processes as on a VM (Ray finds its raylet by listing processes);
with no task running, it gets a PID namespace of its own. On a sealed node it then becomes the
agent user (`as_user` of `prepare`): sshd knows that user as uid 0 so that the login can enter."""

_host_key_lock = threading.Lock()


def authorized_keys(user_data: str | None) -> list[str]:
    """The OpenSSH public keys that userdata authorizes, one per line, in order."""
    return [match.group(1).strip() for match in PUBLIC_KEY.finditer(user_data or "")]


def host_key(data_dir: Path) -> Path:
    """The platform's SSH host key, made once per data directory and shared by its nodes."""
    path = data_dir / HOST_KEY_FILE
    with _host_key_lock:
        if not path.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                           check=True, capture_output=True)
    return path


def keep_host_key(kept_dir: Path, data_dir: Path) -> None:
    """Make `data_dir`'s host key the one kept in `kept_dir` (made there first when missing),
    so that the nodes' key outlives one data directory, as an image's does."""
    kept = host_key(kept_dir)
    with _host_key_lock:
        for suffix in ("", ".pub"):
            target = data_dir / f"{HOST_KEY_FILE}{suffix}"
            target.unlink(missing_ok=True)
            with os.fdopen(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                           "wb") as copy:
                copy.write(Path(f"{kept}{suffix}").read_bytes())


def prepare(root: Path, home: Path, keys: list[str], host_key_path: Path,
            path_variable: str, as_user: list[str] | None = None,
            owner: tuple[int, int] | None = None) -> Path:
    """Write the node's sshd configuration, authorized keys, passwd file and the login shell's
    PATH (the one its tasks get); return the configuration file. `as_user` is the command
    prefix a login runs under once inside the node (none: it stays uid 0), and `owner` the
    (uid, gid) it runs as, whose home's login files are its own."""
    ssh_dir = root / "ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    node_host_key = ssh_dir / "ssh_host_ed25519_key"
    shutil.copyfile(host_key_path, node_host_key)
    node_host_key.chmod(0o600)
    keys_file = ssh_dir / "authorized_keys"
    keys_file.write_text("".join(f"{key}\n" for key in keys))
    keys_file.chmod(0o600)
    # The node's own account replaces a host account of the same name: sshd takes the first.
    passwd = [line for line in Path("/etc/passwd").read_text().splitlines()
              if not line.startswith(f"{SSH_USER}:")]
    (ssh_dir / "passwd").write_text(
        "".join(f"{line}\n" for line in passwd)
        + f"{SSH_USER}:x:0:0:YellowDog agent:{home}:/bin/bash\n")
    profile = f'export PATH="{path_variable}"\nexport RAY_USAGE_STATS_ENABLED=0\n'
    for name in (".bashrc", ".profile"):
        (home / name).write_text(profile)
        if owner is not None:
            os.chown(home / name, *owner)
    enter_task = ssh_dir / "enter-task.sh"
    enter_task.write_text(ENTER_TASK.replace("@AS_USER@", shlex.join(as_user or [])))
    enter_task.chmod(0o755)
    config = ssh_dir / "sshd_config"
    config.write_text(
        f"ListenAddress 0.0.0.0:{SSH_PORT}\nHostKey {node_host_key}\n"
        f"AuthorizedKeysFile {keys_file}\nPidFile none\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPrintMotd no\nAllowTcpForwarding yes\n"
        f"AllowUsers {SSH_USER} root\nForceCommand {enter_task}\n")
    return config


def start(enter: list[str], root: Path, config: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start sshd in the node (through its `enter` command prefix); its log goes to `log`."""
    with log.open("ab") as output:
        return subprocess.Popen(
            [*enter, "/bin/bash", "-c", START_SSHD, "start-sshd", str(root / "ssh" / "passwd"),
             SSHD, str(config)],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True)


def publish_task(root: Path, process: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Record the first process inside a task's namespaces (the child of its `unshare`), for
    logins to join; the task is `process`."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError):
            first = children.read_text().split()
            if first:
                (root / "ssh" / "task.pid").write_text(first[0])
                return
        time.sleep(0.01)


def wait_listening(address: str, process: subprocess.Popen[bytes], log: Path,
                   timeout: float = 10.0) -> None:
    """Return once sshd accepts connections; raise OSError with its log if it does not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection((address, SSH_PORT), 0.5):
            return
        time.sleep(0.02)
    stop(process)
    raise OSError(f"sshd did not start: {log.read_text(errors='replace').strip()}")


def stop(process: subprocess.Popen[bytes]) -> None:
    """End sshd and every session under it (its PID namespace ends with it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)
