"""Node images of the local platform, built on the host like an AMI: the driver's Python and a
virtual environment of pinned packages, cached once per content hash, with prefect-raydog as a
cheap top layer made from the driver's installed copy."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

IMAGE_MOUNT = Path("/opt/yellowdog/image")
"""Where a node sees its image (read-only); the venv is at `venv/`, the top layer at `app/`."""

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prefect-raydog"
LAYOUT = "1"
"""Bumped when the image's layout changes, so that older cached images are not reused."""

DISTRIBUTION = "prefect-raydog"
PACKAGE_DIR = Path(__file__).resolve().parents[1]
SYSTEM_PREFIXES = ("/", "/usr", "/usr/local")
"""A base interpreter installed here is the machine's own: nodes see it as a VM's system Python."""

BUILD_SCRIPT = r"""
set -e
partial="$1" image="$2" python="$3"
shift 3
mount --bind "$partial" "$image"
"$python" -m venv "$image/venv"
"$@" -r "$image/requirements.txt"
"""
"""Run in a mount namespace of its own, so that the venv's paths are those a node sees; the
arguments after the Python are the installer's command."""


class ImageBuildError(RuntimeError):
    """A node image could not be built; the message holds the reason and pip's output."""


@dataclass(frozen=True)
class Image:
    """A built node image: the base (Python and venv) and the prefect-raydog layer over it."""

    base: Path
    layer: Path
    python_prefix: str
    """Where the node sees the image's Python (the driver's base prefix), or "" for a system
    Python that the node shares with the host."""
    bare: bool = False
    """A base image: no venv, the machine's system Python alone."""

    @property
    def venv(self) -> Path:
        """The venv's path inside a node."""
        return IMAGE_MOUNT / "venv"


def node_requirements(extra: Iterable[str] = ()) -> list[str]:
    """The packages a node needs to run this driver's flows, pinned to the driver's versions.

    prefect-raydog itself, then each of its dependencies (Prefect, Ray and the rest), then
    `extra` (a name without a version is pinned to the driver's installed version). The node's
    Python must have the driver's minor version too (`sys.version_info[:2]`): Ray Client
    refuses another, and pickled code needs the same.

    Args:
        extra: further requirements, such as the flow's own packages.

    Returns:
        Requirement lines for `pip install -r`.

    Example:
        Write a requirements file for a node image:
        ```python
        from prefect_raydog import node_requirements

        Path("node-requirements.txt").write_text("\\n".join(node_requirements(["numpy"])))
        ```
    """
    own = importlib.metadata.distribution(DISTRIBUTION)
    lines = [f"{DISTRIBUTION}=={own.version}"]
    for text in [*(own.requires or []), *extra]:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            lines.append(_pinned(requirement))
    return lines


def node_userdata(extra: Iterable[str] = ()) -> str:
    """The package's `node-userdata.sh` with this driver's Python minor version and
    `node_requirements(extra)` filled in: userdata that gives a base Ubuntu node the venv the
    head and worker scripts activate."""
    script = (PACKAGE_DIR / "scripts" / "node-userdata.sh").read_text()
    python = f'PYTHON_VERSION="{sys.version_info[0]}.{sys.version_info[1]}"'
    script = re.sub(r'^PYTHON_VERSION=".*"$', python, script, count=1, flags=re.M)
    lines = "".join(f"{line}\n" for line in node_requirements(extra))
    return re.sub(r"(<<'END_OF_REQUIREMENTS'\n).*?(?=^END_OF_REQUIREMENTS$)",
                  lambda match: match.group(1) + lines, script, count=1, flags=re.M | re.S)


def _pinned(requirement: Requirement) -> str:
    """`requirement` pinned to the installed version, or as given when it is not installed or
    names versions of its own."""
    try:
        version = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        return str(requirement)
    if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
        return str(requirement)
    extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
    return f"{requirement.name}{extras}=={version}"


def image_id(requirements: Iterable[str]) -> str:
    """The content hash of a base image: its requirements, the Python and the layout."""
    parts = [LAYOUT, sys.version, sys.platform, os.uname().machine, *sorted(requirements)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def ensure_image(extra: Iterable[str] = (), cache: Path = CACHE) -> Image:
    """The image of `node_requirements(extra)`, built on first use and reused after that (by
    every process: concurrent builders wait for the first)."""
    requirements = [
        line for line in node_requirements(extra) if Requirement(line).name != DISTRIBUTION
    ]
    base = cache / "images" / image_id(requirements)
    with _locked(base.with_name(base.name + ".lock")):
        if not (base / "image.json").exists():
            _build_base(base, requirements)
    layer = ensure_layer(cache)
    prefix = json.loads((base / "image.json").read_text())["python_prefix"]
    return Image(base=base, layer=layer, python_prefix=prefix)


def ensure_bare_image(cache: Path = CACHE) -> Image:
    """The base image: nothing installed, so a node has the machine's system Python alone."""
    base = cache / "images" / f"bare-{LAYOUT}"
    (base / "app").mkdir(parents=True, exist_ok=True)
    IMAGE_MOUNT.mkdir(parents=True, exist_ok=True)
    return Image(base=base, layer=base / "app", python_prefix="", bare=True)


def _build_base(base: Path, requirements: list[str]) -> None:
    if os.geteuid() != 0:
        raise ImageBuildError("building a node image needs root (a mount namespace)")
    partial = base.with_name(base.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    prefix = sys.base_prefix if sys.base_prefix not in SYSTEM_PREFIXES else ""
    if prefix:
        _copy_python(Path(prefix), partial / "python")
    (partial / "app").mkdir(parents=True)
    (partial / "requirements.txt").write_text("".join(f"{line}\n" for line in requirements))
    IMAGE_MOUNT.mkdir(parents=True, exist_ok=True)
    python = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    started = time.monotonic()
    installer = _installer(IMAGE_MOUNT / "venv" / "bin" / "python")
    _run(
        ["unshare", "--mount", "--propagation", "private", "--", "/bin/bash", "-c", BUILD_SCRIPT,
         "build-image", str(partial), str(IMAGE_MOUNT), str(python), *installer],
        f"cannot build the node image {base.name}: {Path(installer[0]).name} failed",
    )
    site = next((partial / "venv" / "lib").glob("python*/site-packages"))
    # The top layer is mounted at app/; the venv finds it through this path file.
    (site / "raydog-layer.pth").write_text(f"{IMAGE_MOUNT / 'app'}\n")
    (partial / "image.json").write_text(
        json.dumps(
            {
                "python_prefix": prefix,
                "python": sys.version,
                "requirements": requirements,
                "build_s": round(time.monotonic() - started, 1),
            },
            indent=1,
        )
    )
    partial.rename(base)


def _installer(venv_python: Path) -> list[str]:
    """The command that installs requirements into the image's venv: uv when the driver has it
    (seconds from its cache, where pip takes a minute or more on two cores), else pip. Both
    compile bytecode: the image is read-only on the nodes, so nothing compiled there is kept."""
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is not None:
        return [uv, "pip", "install", "-q", "--compile-bytecode", "--python", str(venv_python)]
    return [str(venv_python), "-m", "pip", "install", "-q", "--no-input",
            "--disable-pip-version-check"]


def _copy_python(prefix: Path, target: Path) -> None:
    """The interpreter's prefix without its site-packages (hard links where possible)."""
    site = prefix / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    shutil.copytree(
        prefix,
        target,
        symlinks=True,
        copy_function=_link_or_copy,
        ignore=lambda directory, _names: (
            ["site-packages"] if Path(directory) == site.parent else []
        ),
    )
    (target / site.relative_to(prefix)).mkdir()


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def ensure_layer(cache: Path = CACHE) -> Path:
    """The top layer: prefect-raydog installed from a wheel of the driver's own copy; built
    again only when that copy's files change."""
    wheel_name, files = _wheel_contents()
    digest = hashlib.sha256()
    for name, data in files:
        digest.update(name.encode() + b"\0" + data)
    layer = cache / "layers" / digest.hexdigest()[:16]
    with _locked(layer.with_name(layer.name + ".lock")):
        if not (layer / "site").exists():
            _build_layer(layer, wheel_name, files)
    return layer / "site"


def _build_layer(layer: Path, wheel_name: str, files: list[tuple[str, bytes]]) -> None:
    layer.mkdir(parents=True, exist_ok=True)
    wheel = layer / wheel_name
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files:
            archive.writestr(name, data)
    partial = layer / "site.partial"
    shutil.rmtree(partial, ignore_errors=True)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(partial),
            str(wheel),
        ],
        f"cannot install {wheel.name} into the image's top layer",
    )
    partial.rename(layer / "site")


def _run(command: list[str], failure: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()[-2000:]
        raise ImageBuildError(f"{failure} (exit {result.returncode}): {output}")


def _wheel_contents() -> tuple[str, list[tuple[str, bytes]]]:
    """The wheel's file name and its files (RECORD last): the package's sources and data, and
    the metadata of the installed distribution."""
    own = importlib.metadata.distribution(DISTRIBUTION)
    version = own.version
    info = f"prefect_raydog-{version}.dist-info"
    files = [
        (f"prefect_raydog/{path.relative_to(PACKAGE_DIR).as_posix()}", path.read_bytes())
        for path in sorted(PACKAGE_DIR.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    ]
    # An editable install found through the checkout may be an egg-info: PKG-INFO, same format.
    metadata = own.read_text("METADATA") or own.read_text("PKG-INFO") or ""
    files += [
        (f"{info}/METADATA", metadata.encode()),
        (f"{info}/entry_points.txt", (own.read_text("entry_points.txt") or "").encode()),
        (
            f"{info}/WHEEL",
            b"Wheel-Version: 1.0\nGenerator: prefect-raydog\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n",
        ),
    ]
    record = "".join(f"{name},sha256={_digest(data)},{len(data)}\n" for name, data in files)
    files.append((f"{info}/RECORD", f"{record}{info}/RECORD,,\n".encode()))
    return f"prefect_raydog-{version}-py3-none-any.whl", files


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield
