"""Which SSH host keys the package's connections to nodes accept: one policy, `HostKeys`, for the
SSH tunnel, the Ray token's delivery and `ray up`'s OpenSSH client. Keys come as OpenSSH
`known_hosts` lines (host patterns with `*` and `?`, `!` negations, hashed names) or bare public
key lines (valid for any node, as an image's one host key is); an address no line covers is
refused, or, when asked, trusted the first time it is seen."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import paramiko

from prefect_raydog.errors import HostKeyRefused

USER_KNOWN_HOSTS = "~/.ssh/known_hosts"
_KEY_TYPE = re.compile(r"^(ssh-[a-z0-9-]+|ecdsa-sha2-nistp\d+|sk-[a-z0-9@.-]+)$")


@dataclass(frozen=True)
class _Entry:
    patterns: tuple[str, ...]
    blob: bytes
    line: str


def host_name(address: str, port: int = 22) -> str:
    """The name OpenSSH looks up in known_hosts: `address`, or `[address]:port` off port 22."""
    return address if port == 22 else f"[{address}]:{port}"


def fingerprint(blob: bytes) -> str:
    """A key as OpenSSH shows it: its type and SHA256 fingerprint."""
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"{_blob_type(blob)} SHA256:{digest}"


def _blob_type(blob: bytes) -> str:
    (length,) = struct.unpack(">I", blob[:4])
    return blob[4:4 + length].decode("ascii")


def _parse_line(line: str, where: str) -> _Entry:
    fields = line.split()
    if fields[0].startswith("@"):
        raise ValueError(f"{where}: markers such as {fields[0]} are not supported")
    patterns = ("*",) if _KEY_TYPE.match(fields[0]) else tuple(fields.pop(0).split(","))
    if len(fields) < 2 or not _KEY_TYPE.match(fields[0]):
        raise ValueError(f"{where}: expected `[HOSTS] KEY-TYPE BASE64-KEY [COMMENT]`, "
                         "as in known_hosts or a .pub file")
    try:
        blob = base64.b64decode(fields[1], validate=True)
        embedded = _blob_type(blob)
    except (binascii.Error, struct.error, UnicodeDecodeError):
        raise ValueError(f"{where}: the key is not valid base64 of an SSH public key") from None
    if embedded != fields[0]:
        raise ValueError(f"{where}: the key is a {embedded!r} key, not {fields[0]!r}")
    return _Entry(patterns, blob, f"{','.join(patterns)} {fields[0]} {fields[1]}")


def _parse(text: str, source: str) -> list[_Entry]:
    return [
        _parse_line(line.strip(), f"{source}: line {number}")
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip() and not line.strip().startswith("#")
    ]


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):
        try:
            salt, digest = (base64.b64decode(part) for part in pattern[3:].split("|"))
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)
    regex = "".join({"*": ".*", "?": "."}.get(char, re.escape(char)) for char in pattern)
    return re.fullmatch(regex, name, re.IGNORECASE) is not None


def _covers(entry: _Entry, name: str) -> bool:
    """OpenSSH's rule: a line applies when a pattern matches and no negated one does."""
    if any(_matches(p[1:], name) for p in entry.patterns if p.startswith("!")):
        return False
    return any(_matches(p, name) for p in entry.patterns if not p.startswith("!"))


class HostKeys(paramiko.MissingHostKeyPolicy):
    """The host keys that SSH connections to a cluster's nodes accept.

    A node whose address a line of `known_hosts` covers must present one of those lines' keys;
    a node no line covers is refused, unless `trust_first_use`: then its first key is kept and a
    later connection to it with another key is refused. Either refusal is `HostKeyRefused`,
    naming the address and the key seen, before any credential is sent. `source` names where
    the lines came from in errors. One object serves a cluster's every connection, so that what
    it learned on first use holds for all of them.

    Example:
        ```python
        from pathlib import Path

        host_keys = HostKeys(Path("image_host_key.pub").read_text())
        ```
    """

    def __init__(self, known_hosts: str = "", *, trust_first_use: bool = False,
                 source: str = "ssh_known_hosts") -> None:
        self.source = source
        self.trust_first_use = trust_first_use
        self._entries = _parse(known_hosts, source)
        self._learned: dict[str, bytes] = {}
        self._lock = threading.Lock()

    @classmethod
    def user_known_hosts(cls) -> HostKeys:
        """OpenSSH's default: the lines of this user's ~/.ssh/known_hosts (none: all refused)."""
        path = Path(USER_KNOWN_HOSTS).expanduser()
        return cls(path.read_text() if path.is_file() else "", source=USER_KNOWN_HOSTS)

    def __repr__(self) -> str:
        return (f"HostKeys(source={self.source!r}, lines={len(self._entries)}, "
                f"trust_first_use={self.trust_first_use})")

    def check(self, name: str, key: paramiko.PKey | bytes) -> None:
        """Accept `key` for the host `name` (see `host_name`) or raise `HostKeyRefused`."""
        blob = key if isinstance(key, bytes) else key.asbytes()
        lines = [entry for entry in self._entries if _covers(entry, name)]
        if any(entry.blob == blob for entry in lines):
            return
        seen = fingerprint(blob)
        if lines:
            allowed = ", ".join(sorted({fingerprint(entry.blob) for entry in lines}))
            raise HostKeyRefused(
                f"The SSH host key of {name} is {seen}, not a key that {self.source} gives "
                f"for it ({allowed}): another machine may be answering at that address; if "
                "the node's image changed its host key, pin the new one")
        if not self.trust_first_use:
            raise HostKeyRefused(
                f"The SSH host key of {name} ({seen}) is not known: no line of {self.source} "
                "covers that address; pin the nodes' host public key (a line such as "
                "`* ssh-ed25519 AAAA...`), or turn on trust on first use")
        with self._lock:
            first = self._learned.setdefault(name, blob)
        if first != blob:
            raise HostKeyRefused(
                f"The SSH host key of {name} changed: it is {seen}, and was "
                f"{fingerprint(first)} when first seen for this cluster")

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        """paramiko's hook: every key goes through `check` (the client holds no keys)."""
        self.check(hostname, key)

    def openssh_options(self, known_hosts_file: Path) -> dict[str, str]:
        """OpenSSH client options that apply this policy, with its lines in `known_hosts_file`
        (kept with trust on first use: OpenSSH adds the key it learns there)."""
        if not (self.trust_first_use and known_hosts_file.exists()):
            known_hosts_file.write_text("".join(f"{e.line}\n" for e in self._entries))
        return {"StrictHostKeyChecking": "accept-new" if self.trust_first_use else "yes",
                "UserKnownHostsFile": str(known_hosts_file), "GlobalKnownHostsFile": "/dev/null"}
