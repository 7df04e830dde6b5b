"""Default task scripts and node userdata, shipped as package data: `load("head")` returns the
text of `head.sh`. The same scripts run on YellowDog's nodes and the local platform's; what
differs comes through the task environment."""

from __future__ import annotations

from importlib import resources


def names() -> list[str]:
    """The names of the scripts this package ships, without the `.sh` suffix."""
    files = resources.files(__name__).iterdir()
    return sorted(f.name.removesuffix(".sh") for f in files if f.name.endswith(".sh"))


def load(name: str) -> str:
    """The text of the named script, e.g. "head", "worker", "observability"."""
    script = resources.files(__name__).joinpath(f"{name}.sh")
    if not script.is_file():
        raise ValueError(f"No script named {name!r}; the package ships {names()}")
    return script.read_text()
