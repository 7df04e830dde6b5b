"""A Python package index inside the local platform's network. It stands in for the package
mirror a private cloud subnet has, so that a node's userdata installs packages offline: the
nodes reach only the platform, which fetches from the real index and keeps what it fetched."""

from __future__ import annotations

import hashlib
import html
import os
import re
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO
from urllib.parse import quote, urljoin, urlsplit

import httpx
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, Response, StreamingResponse
from packaging.utils import canonicalize_name

PREFIX = "/pypi"
OCTET_STREAM = "application/octet-stream"
_HREF = re.compile(r"""(?<![\w-])href=(["'])(.*?)\1""", re.IGNORECASE | re.DOTALL)
_FILES_HREF = re.compile(rf'href="{PREFIX}/files/(https?)/([^/"]+)/')
_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


def default_upstream() -> str:
    """The index this environment's installers use: uv's, else pip's, else PyPI."""
    for variable in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL"):
        if value := os.environ.get(variable):
            return value
    return "https://pypi.org/simple"


def _project_page(project: str, links: list[str]) -> str:
    anchors = "\n".join(links)
    return (f'<!DOCTYPE html>\n<html><head><meta name="pypi:repository-version" content="1.0">'
            f"<title>Links for {project}</title></head>\n<body><h1>Links for {project}</h1>\n"
            f"{anchors}\n</body></html>\n")


def _safe_parts(path: str) -> list[str]:
    """`path`'s segments, or 404 for one that could step out of the cache."""
    parts = path.split("/")
    if not all(part and part not in (".", "..") and "\x00" not in part for part in parts):
        raise HTTPException(404, "Not a file of this index")
    return parts


class PackageMirror:
    """A pull-through mirror of a Python package index (PEP 503 simple API), with local
    projects (wheels in a directory) that take the place of upstream projects of their name.

    Upstream file links are rewritten to `/pypi/files/{scheme}/{host}/{path}`, which serves each
    file from `cache_dir/files/{host}/{path}`, fetching it the first time. Only hosts that
    upstream pages linked to are fetched from, so that the mirror is not an open proxy."""

    def __init__(self, cache_dir: Path, upstream: str | None = None,
                 local: Callable[[], dict[str, Path]] | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.upstream = (upstream or default_upstream()).rstrip("/")
        self.local = local
        self._hosts: set[tuple[str, str]] = set()
        self._digests: dict[tuple[Path, int, int], str] = {}

    def router(self) -> APIRouter:
        """The mirror's routes, under `/pypi`, without authentication."""
        router = APIRouter(prefix=PREFIX)

        @router.get("/simple/{project}")
        async def simple(project: str) -> Response:
            project = canonicalize_name(project)
            if (directory := self._local_dirs().get(project)) is not None:
                return HTMLResponse(self._local_page(project, directory))
            return HTMLResponse(await self._upstream_page(project))

        @router.get("/files/{scheme}/{host}/{path:path}")
        async def files(scheme: str, host: str, path: str, request: Request) -> Response:
            if (scheme, host) not in self._hosts:
                raise HTTPException(404, "Not a host that an index page linked to")
            target = self.cache_dir.joinpath("files", *_safe_parts(f"{host}/{path}"))
            if target.is_file():
                return FileResponse(target, media_type=OCTET_STREAM)
            query = f"?{request.url.query}" if request.url.query else ""
            return await self._fetch(f"{scheme}://{host}/{quote(path)}{query}", target)

        @router.get("/local/{project}/{filename}")
        async def local(project: str, filename: str) -> Response:
            directory = self._local_dirs().get(canonicalize_name(project))
            if directory is None or filename in ("", ".", "..") or "\\" in filename:
                raise HTTPException(404, "No such local file")
            path = directory / filename
            if not path.is_file() or path.resolve().parent != directory.resolve():
                raise HTTPException(404, "No such local file")
            return FileResponse(path, media_type=OCTET_STREAM)

        return router

    def _local_dirs(self) -> dict[str, Path]:
        projects = self.local() if self.local else {}
        return {canonicalize_name(name): Path(directory) for name, directory in projects.items()}

    def _local_page(self, project: str, directory: Path) -> str:
        return _project_page(project, [
            f'<a href="{PREFIX}/local/{project}/{quote(wheel.name)}#sha256={self._sha256(wheel)}">'
            f"{html.escape(wheel.name)}</a>" for wheel in sorted(directory.glob("*.whl"))])

    def _sha256(self, path: Path) -> str:
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = hashlib.sha256(path.read_bytes()).hexdigest()
        return self._digests[key]

    async def _upstream_page(self, project: str) -> str:
        """Upstream's page for `project`, rewritten; the last one fetched if upstream is down."""
        url, saved = f"{self.upstream}/{project}/", self.cache_dir / "simple" / f"{project}.html"
        try:
            async with httpx.AsyncClient(timeout=_TIMEOUT, follow_redirects=True) as client:
                response = await client.get(url, headers={"Accept": "text/html"})
        except httpx.HTTPError:
            response = None
        if response is not None and response.status_code == 404:
            raise HTTPException(404, f"No project {project!r} upstream")
        if response is None or response.status_code != 200:
            if not saved.is_file():
                raise HTTPException(502, f"Upstream index did not answer for {url}")
            page = saved.read_text()
            self._hosts.update(_FILES_HREF.findall(page))
            return page
        page = self._rewrite(response.text, str(response.url))
        self._write_whole(saved, page.encode())
        return page

    def _rewrite(self, page: str, page_url: str) -> str:
        """`page` with its http(s) links (relative ones resolved) pointing into `/pypi/files`."""

        def rewrite(match: re.Match[str]) -> str:
            link = urlsplit(urljoin(page_url, html.unescape(match[2])))
            if link.scheme not in ("http", "https") or not link.netloc:
                return match[0]
            self._hosts.add((link.scheme, link.netloc))
            href = f"{PREFIX}/files/{link.scheme}/{link.netloc}{link.path}"
            href += (f"?{link.query}" if link.query else "") + (
                f"#{link.fragment}" if link.fragment else "")
            return f'href="{html.escape(href)}"'

        return _HREF.sub(rewrite, page)

    def _partial(self) -> IO[bytes]:
        """A new temporary file on the cache's filesystem, for a file to appear whole."""
        (directory := self.cache_dir / "partial").mkdir(parents=True, exist_ok=True)
        return tempfile.NamedTemporaryFile(dir=directory, delete=False)

    def _write_whole(self, target: Path, content: bytes) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._partial() as partial:
            partial.write(content)
        os.replace(partial.name, target)

    async def _fetch(self, url: str, target: Path) -> Response:
        """Stream `url` to the client while caching it at `target`, in place once complete."""
        client = httpx.AsyncClient(timeout=_TIMEOUT, follow_redirects=True)
        try:
            response = await client.send(client.build_request("GET", url), stream=True)
        except httpx.HTTPError as error:
            await client.aclose()
            raise HTTPException(502, f"Upstream did not answer for {url}") from error
        if response.status_code != 200:
            await response.aclose()
            await client.aclose()
            missing = response.status_code == 404
            raise HTTPException(404 if missing else 502, f"Upstream {response.status_code}: {url}")
        target.parent.mkdir(parents=True, exist_ok=True)

        async def body() -> AsyncIterator[bytes]:
            partial = self._partial()
            try:
                with partial:
                    async for chunk in response.aiter_bytes():
                        partial.write(chunk)
                        yield chunk
                os.replace(partial.name, target)
            finally:
                Path(partial.name).unlink(missing_ok=True)
                await response.aclose()
                await client.aclose()

        length = response.headers.get("content-length")
        headers = {"content-length": length} if length and (
            "content-encoding" not in response.headers) else None
        return StreamingResponse(body(), media_type=OCTET_STREAM, headers=headers)
