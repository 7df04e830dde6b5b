"""The autoscaler's tag store: Ray's node tags kept on the head node, one small JSON file per node
under `~/.raydog/tags/`. The monitor on the head reads and writes the files directly; `ray up` on
the user's machine reaches the same files over SSH. Nothing to install, and a restarted monitor
finds every tag again."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Protocol

from prefect_raydog.autoscaler.remote import RemoteShell

TAGS_DIR = ".raydog/tags"


def file_name(node_id: str) -> str:
    """A node id (a YellowDog task id) as a file name."""
    return node_id.replace(":", "_").replace("/", "_") + ".json"


class TagStore(Protocol):
    """Ray's tags per node id; `load` reads them all, `save` replaces one node's tags."""

    def load(self) -> dict[str, dict[str, str]]: ...

    def save(self, node_id: str, tags: dict[str, str]) -> None: ...

    def forget(self, node_id: str) -> None: ...


class FileTags:
    """The tag files, read and written in place (on the head node)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def load(self) -> dict[str, dict[str, str]]:
        found: dict[str, dict[str, str]] = {}
        if not self.directory.is_dir():
            return found
        for path in self.directory.glob("*.json"):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            found[record["node_id"]] = record["tags"]
        return found

    def save(self, node_id: str, tags: dict[str, str]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / file_name(node_id)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"node_id": node_id, "tags": tags}))
        temporary.replace(path)

    def forget(self, node_id: str) -> None:
        (self.directory / file_name(node_id)).unlink(missing_ok=True)


class RemoteTags:
    """The same files on the head node, through SSH (from `ray up` on the user's machine)."""

    def __init__(self, shell: RemoteShell) -> None:
        self.shell = shell

    def load(self) -> dict[str, dict[str, str]]:
        output = self.shell.run(
            f'for f in ~/{TAGS_DIR}/*.json; do [ -f "$f" ] && cat "$f" && echo; done; true')
        found: dict[str, dict[str, str]] = {}
        for line in output.splitlines():
            if line.strip():
                record = json.loads(line)
                found[record["node_id"]] = record["tags"]
        return found

    def save(self, node_id: str, tags: dict[str, str]) -> None:
        path = f"~/{TAGS_DIR}/{file_name(node_id)}"
        self.shell.run(f"mkdir -p ~/{TAGS_DIR} && cat > {path}.tmp && mv {path}.tmp {path}",
                       stdin=json.dumps({"node_id": node_id, "tags": tags}))

    def forget(self, node_id: str) -> None:
        self.shell.run(f"rm -f ~/{TAGS_DIR}/{shlex.quote(file_name(node_id))}")
