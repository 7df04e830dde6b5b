"""The local platform's package mirror (`PackageMirror`): uv and pip install through it from a
fake upstream index on loopback, from its cache once upstream is gone, and local projects in
place of upstream ones; it fetches only from hosts that index pages linked to."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from prefect_raydog.local.package_mirror import PackageMirror

VENV_BIN = Path(sys.executable).parent
UV = VENV_BIN / "uv"


def make_wheel(directory: Path, name: str, version: str) -> Path:
    """A pure-Python wheel of project `name` whose module records `version`."""
    module, dist_info = name.replace("-", "_"), f"{name.replace('-', '_')}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f'VERSION = "{version}"\n',
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n",
    }
    record = [f"{path},sha256={_b64_digest(text.encode())},{len(text.encode())}"
              for path, text in files.items()]
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    wheel = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def _b64_digest(content: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Handler(SimpleHTTPRequestHandler):
    """Serves the index's directory; `/broken/...` sends a third of what it promises."""

    def do_GET(self) -> None:
        if self.path.startswith("/broken/"):
            self.send_response(200)
            self.send_header("Content-Length", "3000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def fake_index(root: Path) -> Iterator[str]:
    """An index of the wheels in `root/packages` on loopback: `rdm-alpha` linked by absolute URL
    with PEP 658 metadata, `rdm-beta` by relative URL, `rdm-gamma` 1.0 and a broken `rdm-broken`.
    Yields its address."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
    url = f"http://127.0.0.1:{server.server_address[1]}"
    packages = root / "packages"
    if not packages.exists():
        packages.mkdir(parents=True)
        alpha, beta, gamma = (make_wheel(packages, f"rdm-{name}", "1.0")
                              for name in ("alpha", "beta", "gamma"))
        with zipfile.ZipFile(alpha) as archive:
            metadata = archive.read("rdm_alpha-1.0.dist-info/METADATA")
        Path(f"{alpha}.metadata").write_bytes(metadata)
        meta = f"sha256={hashlib.sha256(metadata).hexdigest()}"
        pages = {
            "rdm-alpha": f'<a href="{url}/packages/{alpha.name}#sha256={sha256(alpha)}" '
                         f'data-requires-python="&gt;=3.8" data-dist-info-metadata="{meta}" '
                         f'data-core-metadata="{meta}">{alpha.name}</a>',
            "rdm-beta": f'<a href="../../packages/{beta.name}#sha256={sha256(beta)}">x</a>',
            "rdm-gamma": f'<a href="{url}/packages/{gamma.name}#sha256={sha256(gamma)}">x</a>',
            "rdm-broken": f'<a href="{url}/broken/rdm_broken-1.0-py3-none-any.whl">x</a>',
        }
        for project, link in pages.items():
            (page := root / "simple" / project / "index.html").parent.mkdir(parents=True)
            page.write_text(f"<!DOCTYPE html><html><body>{link}</body></html>\n")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _StripTrailingSlash:
    """Drops a trailing `/` before routing, as the local platform's app does."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and len(scope["path"]) > 1:
            path = scope["path"].rstrip("/") or "/"
            scope = {**scope, "path": path, "raw_path": path.encode()}
        await self.app(scope, receive, send)


@contextmanager
def serving(mirror: PackageMirror) -> Iterator[str]:
    """`mirror` alone in an app under uvicorn on loopback; yields its address."""
    app = FastAPI(redirect_slashes=False)
    app.include_router(mirror.router())
    config = uvicorn.Config(_StripTrailingSlash(app), host="127.0.0.1", port=0,
                            log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def installer_env() -> dict[str, str]:
    """This environment without index, proxy or installer settings that would send an
    installer anywhere but the mirror."""
    env = {key: value for key, value in os.environ.items()
           if not key.upper().startswith(("UV_", "PIP_")) and "PROXY" not in key.upper()}
    return {**env, "UV_NO_CONFIG": "1", "UV_PYTHON_DOWNLOADS": "never",
            "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def uv_install(mirror_url: str, target: Path, project: str) -> None:
    command = [str(UV), "pip", "install", "--python", sys.executable, "--no-cache",
               "--index-url", f"{mirror_url}/pypi/simple/", "--target", str(target), project]
    done = subprocess.run(command, env=installer_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def installed_version(target: Path, module: str) -> str:
    text = (target / module / "__init__.py").read_text()
    return text.removeprefix('VERSION = "').split('"')[0]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with fake_index(tmp_path_factory.mktemp("index")) as url:
        yield url


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("local-gamma")
    make_wheel(directory, "rdm-gamma", "2.0")
    (directory.parent / "secret").write_text("not for nodes")
    return directory


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory, upstream: str,
           local_dir: Path) -> PackageMirror:
    return PackageMirror(tmp_path_factory.mktemp("cache"), f"{upstream}/simple",
                         local=lambda: {"RDM_Gamma": local_dir})


@pytest.fixture(scope="module")
def mirror_url(mirror: PackageMirror) -> Iterator[str]:
    with serving(mirror) as url:
        yield url


@pytest.mark.parametrize("project", ["rdm-alpha", "rdm-beta"])
def test_uv_installs_through_the_mirror_and_it_keeps_the_file(
        mirror: PackageMirror, mirror_url: str, upstream: str, tmp_path: Path,
        project: str) -> None:
    uv_install(mirror_url, tmp_path, project)
    module = project.replace("-", "_")
    assert installed_version(tmp_path, module) == "1.0"
    cached = mirror.cache_dir / "files" / upstream.removeprefix("http://") / "packages" / (
        f"{module}-1.0-py3-none-any.whl")
    assert cached.is_file()
    assert not any((mirror.cache_dir / "partial").iterdir())


def test_installs_from_the_cache_once_upstream_is_gone(tmp_path: Path) -> None:
    mirror = PackageMirror(tmp_path / "cache", "http://127.0.0.1:9/simple")
    with serving(mirror) as mirror_url:
        with fake_index(tmp_path / "index") as upstream:
            mirror.upstream = f"{upstream}/simple"
            uv_install(mirror_url, tmp_path / "first", "rdm-alpha")
        uv_install(mirror_url, tmp_path / "second", "rdm-alpha")
        page = httpx.get(f"{mirror_url}/pypi/simple/rdm-alpha")
    assert installed_version(tmp_path / "second", "rdm_alpha") == "1.0"
    assert page.status_code == 200 and "/pypi/files/http/127.0.0.1:" in page.text


def test_a_local_project_takes_the_place_of_the_upstream_one(mirror_url: str,
                                                              tmp_path: Path) -> None:
    uv_install(mirror_url, tmp_path, "rdm-gamma")
    assert installed_version(tmp_path, "rdm_gamma") == "2.0"
    assert (tmp_path / "rdm_gamma-2.0.dist-info").is_dir()
    page = httpx.get(f"{mirror_url}/pypi/simple/rdm.gamma").text
    assert "/pypi/local/rdm-gamma/rdm_gamma-2.0-py3-none-any.whl#sha256=" in page
    assert "/pypi/files/" not in page


def test_upstream_pages_keep_their_attributes_and_only_linked_hosts_are_fetched(
        mirror_url: str, upstream: str) -> None:
    page = httpx.get(f"{mirror_url}/pypi/simple/RDM_Alpha")
    host = upstream.removeprefix("http://")
    href = f"/pypi/files/http/{host}/packages/rdm_alpha-1.0-py3-none-any.whl"
    assert page.status_code == 200 and f'href="{href}#sha256=' in page.text
    assert 'data-requires-python="&gt;=3.8"' in page.text
    assert 'data-core-metadata="sha256=' in page.text
    metadata = httpx.get(f"{mirror_url}{href}.metadata")
    assert metadata.status_code == 200 and b"Name: rdm-alpha" in metadata.content

    for path in [f"/pypi/files/http/127.0.0.1:1/packages/{href.rsplit('/', 1)[1]}",
                 f"/pypi/files/https/{host}/packages/rdm_alpha-1.0-py3-none-any.whl",
                 f"/pypi/files/http/{host}/packages/no_such-1.0-py3-none-any.whl",
                 f"/pypi/files/http/{host}/..%2F..%2Fsecret",
                 f"/pypi/files/http/{host}/packages/%2E%2E/%2E%2E/secret",
                 "/pypi/local/rdm-gamma/..%2F..%2Fsecret", "/pypi/local/rdm-gamma/%2E%2E",
                 "/pypi/local/rdm-gamma/..%2Fsecret", "/pypi/local/rdm-alpha/x.whl",
                 "/pypi/simple/no-such-project"]:
        assert httpx.get(f"{mirror_url}{path}").status_code in (400, 404), path


def test_concurrent_and_failed_downloads_leave_whole_files_only(mirror: PackageMirror,
                                                                mirror_url: str,
                                                                upstream: str) -> None:
    host = upstream.removeprefix("http://")
    assert httpx.get(f"{mirror_url}/pypi/simple/rdm-gamma").status_code == 200
    assert httpx.get(f"{mirror_url}/pypi/simple/rdm-broken").status_code == 200
    gamma = f"{mirror_url}/pypi/files/http/{host}/packages/rdm_gamma-1.0-py3-none-any.whl"
    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(lambda _: httpx.get(gamma).content, range(8)))
    cached = mirror.cache_dir / "files" / host / "packages" / "rdm_gamma-1.0-py3-none-any.whl"
    assert len(set(bodies)) == 1 and cached.read_bytes() == bodies[0]

    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{mirror_url}/pypi/files/http/{host}/broken/rdm_broken-1.0-py3-none-any.whl")
    deadline = time.monotonic() + 5
    while any((mirror.cache_dir / "partial").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any((mirror.cache_dir / "partial").iterdir())
    assert not (mirror.cache_dir / "files" / host / "broken").exists() or not any(
        (mirror.cache_dir / "files" / host / "broken").iterdir())


def test_pip_installs_through_the_mirror(mirror_url: str, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--no-input",
               "--index-url", f"{mirror_url}/pypi/simple/", "--target", str(tmp_path),
               "rdm-alpha"]
    done = subprocess.run(command, env=installer_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert installed_version(tmp_path, "rdm_alpha") == "1.0"
